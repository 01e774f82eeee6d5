"""The GPU check (``make gpu-check``, ``python -m knexp.bench --only gpu``): knexp at real sizes, in bfloat16.

On a machine with CUDA it
1. runs the family tests (``tests/test_families.py``) on the GPU in bfloat16;
2. builds random-weight models at real shapes (``knexp.bench.shapes.SHAPES``: LLaVA-1.5-7B, Qwen2.5-VL-7B, Gemma-3-4B,
   their vision towers, decoders and vocabularies at full size) in bfloat16 on the GPU and runs on each the phases of
   ``make real-shapes`` (``knexp.bench.real_shapes``: the bare forward, identification, the evaluation's captions, an
   edit and its reload; seconds, the allocator's peak and the memory check's estimate), then the hook overhead
   (captions with zero-noise hooks on 64 units of every layer, against none) and batched captions per second;
3. writes its section of BENCHMARKS.md.
Without CUDA it says so, measures nothing and leaves BENCHMARKS.md alone. The tests build the same models at small
``Shape``s on the CPU and measure them, so the check's code runs in CI although no GPU does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import torch

from knexp.bench.shapes import SHAPES
from knexp.bench.timing import alternating
from knexp.paths import project_root

HEADING = "## GPU check: real shapes in bfloat16 (issue: any Hugging Face VLM)"
NO_GPU = ("no CUDA device on this machine: the GPU check measures nothing here (run it where "
          "`torch.cuda.is_available()`)")


def measure(adapter, captions: int = 16, batch_size: int = 8, max_new_tokens: int = 32, units: int = 64,
            rounds: int = 2) -> dict:
    """Hook overhead, one sample's identification (seconds, peak extra GPU memory) and batched captions per second."""
    from knexp.bench.family_costs import _images, hooked_captions
    from knexp.identification.passes import compute_stats, locate_target
    from knexp.job.spec import default_catalog

    cuda = adapter.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    hooks = hooked_captions(adapter, _images(adapter, captions, 0), batch_size, units, rounds, max_new_tokens)
    h, w = adapter.image_size
    rng = np.random.default_rng(1)
    original, inpainted = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(2)]
    target = locate_target(adapter, "the image shows a bus.", adapter.caption_prefix, default_catalog()["bus"])
    compute_stats(adapter, original, inpainted, target)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    sync()
    began = time.perf_counter()
    compute_stats(adapter, original, inpainted, target)
    sync()
    identify_s = time.perf_counter() - began
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
    pics = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(2 * captions)]
    def captions():
        return adapter.caption(pics, batch_size=2 * batch_size, max_new_tokens=max_new_tokens)

    median, _ = alternating({"captions": captions}, rounds)
    return {"hook_overhead": hooks["ratio"], "identification_s": round(identify_s, 3),
            "identification_extra_gib": None if peak is None else round(peak, 2),
            "captions_per_s": round(len(pics) / median["captions"], 2), "fast_paths": adapter.fast_paths}


def family_tests_on_gpu(timeout: int = 240) -> dict:
    """``tests/test_families.py`` on the GPU in bfloat16 (``KNEXP_TEST_DEVICE``, ``KNEXP_TEST_DTYPE``)."""
    env = {**os.environ, "KNEXP_TEST_DEVICE": "cuda", "KNEXP_TEST_DTYPE": "bfloat16", "HF_HUB_OFFLINE": "1"}
    began = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_families.py"],
                       cwd=project_root(), capture_output=True, text=True, timeout=timeout, env=env)
    tail = [line for line in r.stdout.splitlines() if line.strip()][-1:] or [r.stderr[-300:]]
    return {"returncode": r.returncode, "summary": tail[0], "seconds": round(time.perf_counter() - began, 1)}


def gpu_check() -> dict | None:
    """The check of the module docstring, or None (and a line saying so) without CUDA."""
    if not torch.cuda.is_available():
        print(NO_GPU)
        return None
    from knexp.bench.real_shapes import run_shape

    out = {"device": torch.cuda.get_device_name(0), "tests": family_tests_on_gpu(), "models": {}}
    for shape in SHAPES:
        r = run_shape(shape, torch.device("cuda"), torch.bfloat16, extra=measure)
        out["models"][shape.name] = {**r.get("extra", {}), "params_b": round(r["parameters"] / 1e9, 2), "run": r}
        torch.cuda.empty_cache()
    return out


def gpu_markdown(r: dict) -> str:
    from knexp.bench.real_shapes import phases_table

    measured = {name: m for name, m in r["models"].items() if not m["run"]["skipped"]}
    phases = "\n".join(f"`{name}`:\n\n{phases_table(m['run']['phases'])}\n" for name, m in measured.items())
    rows = [f"| `{name}` | {m['params_b']} | {'yes' if m['fast_paths'] else 'no'} | {m['hook_overhead']} | "
            f"{m['identification_s']} | "
            f"{m['identification_extra_gib']} | {m['captions_per_s']} |" for name, m in measured.items()]
    skipped = "".join(f"\n`{name}` was not run: it needs about {m['run']['estimate'] / 2**30:.1f} GiB, "
                      f"{m['run']['free'] / 2**30:.1f} GiB was free.\n" for name, m in r["models"].items()
                      if m["run"]["skipped"])
    header = ("| model | parameters (billions) | fast paths | hook overhead | one sample's identification (s) "
              "| its peak extra GPU memory (GiB) | captions per second (batch 16, 32 tokens) |")
    return f"""{HEADING}

On {r['device']}: the family tests in bfloat16 on the GPU: {r['tests']['summary']} ({r['tests']['seconds']} s).
Random-weight models at real shapes (the test tokenizer padded to the real vocabulary), bfloat16 (`knexp.bench.gpu`):

{header}
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{skipped}
The phases of `make real-shapes` in bfloat16 (peak: the CUDA allocator's; the estimate without the process's host
memory):

{phases}"""
