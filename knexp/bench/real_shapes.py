"""Real sizes without a GPU (``make real-shapes``, ``python -m knexp.bench --only real_shapes``): knexp's steps on
random-weight models at the real configurations of Gemma 3 4B and Qwen2.5-VL 3B, in float32 on the CPU.

Each model (``knexp.bench.shapes.CPU_SHAPES``: real vocabulary, widths, depths, heads, vision tower and image size) is
built and run on one toy-world image, phase by phase:

``build``           the random model, in float32;
``forward``         the bare forward pass: the prompt of the image once, no hooks, no gradient, the head at the last
                    position (what every other phase is compared with);
``gradient``        the bare gradient pass any gradient method runs: the prompt with the caption's words before the
                    target, no hooks, and the backward of the target's logit to the first layer;
``identification``  ``compute_stats`` on the image and the image with its object inpainted away, then every method's
                    ranking;
``captions``        the evaluation's captions for one intervened set (attribution's 30 neurons under noise): ``ROWS``
                    rows of ``NEW_TOKENS`` new tokens;
``edit``            one closed-form edit of that set (``kn``), written to a file, read back, checked equal and applied.

Each phase gives its seconds, its peak resident memory (Linux's high-water mark, reset before the phase through
/proc/self/clear_refs), the extra over the bare forward's peak and the memory check's estimate of it
(``knexp.models.memory``), and logs its progress. A model whose estimate exceeds the free memory is not built: the
section says so, with the memory it would need, and the command still exits 0. The GPU check (``knexp.bench.gpu``)
runs the same phases in bfloat16 on CUDA, where the peak is the allocator's.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from knexp.bench.shapes import CPU_SHAPES, Shape, build
from knexp.models import memory

HEADING = "## Real sizes on the CPU: Gemma 3 4B and Qwen2.5-VL 3B in float32 (issue: real sizes without a GPU)"
ROWS = 2
NEW_TOKENS = 16
SET_SIZE = 30
log = logging.getLogger("knexp.bench.real_shapes")


class Peak:
    """The peak memory of the blocks run under ``during``: CUDA's allocator peak on a CUDA device, else the process's
    resident high-water mark (VmHWM), reset when each block starts; None where neither can be read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None

    @contextmanager
    def during(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_high_water()
        yield self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.bytes = _high_water()


def _reset_high_water() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size to the current one
    except OSError:
        pass


def _high_water() -> int | None:
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return None


def run_phases(adapter, device: torch.device, process: int, rows: int = ROWS, new_tokens: int = NEW_TOKENS
               ) -> list[dict]:
    """The module docstring's phases after ``build`` on ``adapter``: per phase its seconds, peak bytes and estimated
    bytes (``process``: the resident memory before the model was built, which the CPU estimates include)."""
    from knexp.bench.identification import _all_methods, toy_sample
    from knexp.editing.rules import Kn
    from knexp.editing.target import Erase
    from knexp.evaluation.interventions import rows_for
    from knexp.evaluation.perturb import noise_captions
    from knexp.identification import methods as M
    from knexp.identification.passes import compute_stats, locate_target
    from knexp.job.spec import default_catalog
    from knexp.models.decoding.prefix_cache import logits_after_prefix
    from knexp.models.hooks.attach import gradient_anchor
    from knexp.models.weight_edit import applied, load, save

    shape = memory.ModelShape.of(adapter)
    weights = shape.parameters * shape.value_bytes
    one = memory.components(shape, 1, 0)
    steps = memory.step_bytes(shape, rows, new_tokens)
    everything = memory.saved_for_backward(shape.layers, shape.prompt_positions + memory.CONTEXT_TOKENS, shape.d_model,
                                           shape.d_ff, shape.value_bytes, recompute=False)  # a bare backward keeps it
    image, inpainted, knowledge, caption = toy_sample(adapter, default_catalog())
    target = locate_target(adapter, caption, adapter.caption_prefix, knowledge)
    found: dict = {}

    def forward():
        prepared = adapter.prepare([image])
        with torch.no_grad():
            logits_after_prefix(adapter, prepared, prepared.last_position[:1])

    def gradient():
        prepared = adapter.prepare([image], continuations=[target.context])
        with torch.enable_grad(), gradient_anchor(adapter, prepared):
            logits = logits_after_prefix(adapter, prepared, prepared.last_position[:1])
            logits[0, 0, target.token_id].backward()

    def identification():
        stats = compute_stats(adapter, image, inpainted, target)
        _all_methods(stats)
        found["set"] = M.attribution(stats, SET_SIZE)

    def intervened():
        found["captions"] = noise_captions(adapter, [image], rows_for([0], [1.0], rows), found["set"], seed=0,
                                           batch_size=rows, max_new_tokens=new_tokens)

    def edit():
        made = Kn().make(adapter, found["set"], Erase(knowledge), None)
        with tempfile.TemporaryDirectory() as folder:
            path = save(made, Path(folder) / "edit.safetensors", adapter, "real-shapes")
            loaded = load(path, adapter, "real-shapes")
        same = all(torch.equal(a.delta.float(), b.delta.float()) for a, b in zip(made.deltas, loaded.deltas,
                                                                                 strict=True))
        if not same:
            raise RuntimeError("the edit read back from its file differs from the edit made")
        with applied(adapter, loaded):
            pass

    plan = [("forward", forward, one["layer"] + one["vision_layer"] + one["logits"]),
            ("gradient", gradient, everything + one["vision_layer"]),
            ("identification", identification, steps["identification"]),
            ("captions", intervened, steps["captions"]), ("edit", edit, 0)]
    out = [measured(name, fn, device, (process if device.type == "cpu" else 0) + weights + extra)[1]
           for name, fn, extra in plan]
    base = out[0]["peak"]
    for row in out:
        row["extra"] = None if base is None or row["peak"] is None else row["peak"] - base
    return out


def measured(name: str, fn, device: torch.device, estimate: int) -> tuple[object, dict]:
    """(what ``fn()`` returns, the phase's row: its seconds, ``Peak`` and ``estimate``), with a line in the log as the
    phase starts and ends."""
    log.info("%s: started", name)
    peak = Peak(device)
    began = time.perf_counter()
    with peak.during():
        value = fn()
    seconds = time.perf_counter() - began
    log.info("%s: %.1f s, peak %s, estimate %s", name, seconds, _gib(peak.bytes), _gib(estimate))
    return value, {"phase": name, "seconds": round(seconds, 1), "peak": peak.bytes, "estimate": estimate}


def _gib(value: int | None) -> str:
    return "unread" if value is None else f"{value / memory.GIB:.2f} GiB"


def run_shape(shape: Shape, device: torch.device, dtype: torch.dtype, extra=None) -> dict:
    """One model: its estimate first (not built where the device has too little free), then ``build``, the phases and
    ``extra(adapter)`` (a dict of more measures, kept under ``extra``) where given."""
    log.info("%s: estimating (%s, %s)", shape.name, device.type, str(dtype).removeprefix("torch."))
    plan = _planned(shape, dtype)
    process = memory.resident_bytes() if device.type == "cpu" else 0
    est = memory.estimate(plan, ROWS, NEW_TOKENS, device)
    free = memory.free_bytes(device)
    result = {"name": shape.name, "parameters": plan.parameters, "estimate": est.peak(), "free": free}
    if est.peak() > free:
        log.info("%s needs about %s, %s is free: not built", shape.name, _gib(est.peak()), _gib(free))
        return {**result, "skipped": True}
    log.info("%s: %.1f B parameters", shape.name, plan.parameters / 1e9)
    adapter, built = measured("build", lambda: build(shape, device, dtype), device,
                              process + plan.parameters * plan.value_bytes)
    phases = [{**built, "extra": None}, *run_phases(adapter, device, process)]
    more = extra(adapter) if extra else {}
    del adapter
    return {**result, "skipped": False, "phases": phases, "extra": more}


def _planned(shape: Shape, dtype: torch.dtype) -> memory.ModelShape:
    """``shape``'s ``ModelShape`` from its model built on the meta device (no weights)."""
    return memory.ModelShape.of(build(shape, torch.device("meta"), dtype))


def real_shapes(shapes: list[Shape] | None = None) -> dict:
    """Every shape of ``CPU_SHAPES`` (or ``shapes``) on the CPU in float32, with progress lines on the console."""
    from knexp.console import heartbeat

    if not logging.getLogger("knexp").handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("knexp").setLevel(logging.INFO)
    models = []
    with heartbeat():
        for shape in shapes or CPU_SHAPES:
            models.append(run_shape(shape, torch.device("cpu"), torch.float32))
    return {"models": models, "threads": torch.get_num_threads()}


def phases_table(phases: list[dict]) -> str:
    rows = []
    for p in phases:
        measured, est = p["peak"], p["estimate"]
        off = "" if measured is None else f"{100 * (est - measured) / measured:+.0f}%"
        extra = "" if p["extra"] is None else f"{p['extra'] / memory.GIB:.2f}"
        rows.append(f"| {p['phase']} | {p['seconds']} | {_gib(measured).removesuffix(' GiB')} | {extra} | "
                    f"{est / memory.GIB:.2f} | {off} |")
    return ("| phase | seconds | peak memory (GiB) | extra over the bare forward (GiB) | estimate (GiB) | estimate vs "
            "peak |\n|---|---|---|---|---|---|\n" + "\n".join(rows))


def real_shapes_markdown(r: dict) -> str:
    parts = []
    for m in r["models"]:
        if m["skipped"]:
            parts.append(f"### `{m['name']}` ({m['parameters'] / 1e9:.2f} B parameters)\n\nNot run: it needs about "
                         f"{_gib(m['estimate'])}, and {_gib(m['free'])} was free.\n")
            continue
        parts.append(f"### `{m['name']}` ({m['parameters'] / 1e9:.2f} B parameters)\n\n{phases_table(m['phases'])}\n")
    body = "\n".join(parts)
    return f"""{HEADING}

`make real-shapes` (`knexp.bench.real_shapes`): random-weight models at the real configurations (vocabulary, widths,
depths, heads, vision tower, image size), float32 on the CPU ({r['threads']} torch threads), one toy-world image.
Phases: the build; the bare forward (one prompt pass, the head at the last position, no hooks); the bare gradient
pass (the same with the caption's words before the target, and the backward of its logit, no hooks); identification
(`compute_stats` and every method's ranking); the evaluation's captions for attribution's {SET_SIZE} neurons under
noise ({ROWS} rows, {NEW_TOKENS} new tokens); one `kn` edit written, read back and applied. Peak: the resident
high-water mark of the phase (reset at its start); the estimate is the memory check's (`knexp.models.memory`), with
this process's memory before the build included.

{body}"""
