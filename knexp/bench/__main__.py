"""``python -m knexp.bench [--out BENCHMARKS.md]``: measure and record knexp's performance targets.

hook_overhead: batched greedy captioning on the embedded model with intervention hooks armed (zero
noise on ``units`` neurons in every layer) versus no hooks; the target is a ratio <= 1.05. Runs
alternate, in the reverse order every other round (``knexp.bench.timing``), and the median of each is compared, so
drift on a busy machine and the order of the pair hit both.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from knexp.bench.caption_speed import (
    MFU_HEADING,
    REUSE_HEADING,
    mfu_markdown,
    reuse_and_decode,
    reuse_markdown,
    utilisation,
)
from knexp.bench.data import annotation_pass
from knexp.bench.edit_costs import HEADING as EDIT_HEADING
from knexp.bench.edit_costs import edit_costs, edit_markdown
from knexp.bench.family_costs import HEADING as FAMILIES_HEADING
from knexp.bench.family_costs import family_costs, family_markdown
from knexp.bench.gpu import HEADING as GPU_HEADING
from knexp.bench.gpu import NO_GPU, gpu_check, gpu_markdown
from knexp.bench.real_shapes import HEADING as REAL_HEADING
from knexp.bench.real_shapes import real_shapes, real_shapes_markdown
from knexp.bench.sweeps import grids, launchers
from knexp.data.toyworld.scenes import SceneOptions, make_scene
from knexp.job.session import session
from knexp.paths import project_root


def hook_overhead(images: int = 32, batch_size: int = 16, units: int = 64, repeats: int = 4,
                  max_new_tokens: int = 32) -> dict:
    from knexp.bench.family_costs import hooked_captions

    s = session("model=embedded", "logger=none")
    adapter, catalog = s.adapter, s.catalog
    pics = [make_scene(catalog, np.random.default_rng([2024, 5, i]),
                       SceneOptions(gap_px=8)).image for i in range(images)]
    timed = hooked_captions(adapter, pics, batch_size, units, repeats, max_new_tokens)
    return {
        "images": images, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "armed_layers": adapter.num_layers, "units_per_layer": units, "repeats": repeats, **timed, "target": "<= 1.05",
    }


def evaluation_throughput(images: int = 8, levels: tuple = (40.0, 80.0), draws: int = 2, batch_size: int = 32) -> dict:
    """Perturbed captions per second: batched rows (one seeded generator per row) vs one generate per caption."""
    from knexp.evaluation.interventions import rows_for
    from knexp.evaluation.perturb import noise_captions
    from knexp.identification.methods import NeuronSet

    s = session("model=embedded", "logger=none")
    adapter, catalog = s.adapter, s.catalog
    pics = [make_scene(catalog, np.random.default_rng([77, 5, i]), SceneOptions(gap_px=8)).image for i in range(images)]
    rng = np.random.default_rng(0)
    layers = np.sort(rng.integers(15, 30, 20))
    neurons = NeuronSet("bench", "", layers, rng.integers(0, adapter.d_ff, 20), np.zeros(20))
    rows = rows_for(list(range(images)), list(levels), draws)
    t = time.perf_counter()
    batched = noise_captions(adapter, pics, rows, neurons, seed=0, batch_size=batch_size)
    batched_s = time.perf_counter() - t
    t = time.perf_counter()
    single = [noise_captions(adapter, pics, [r], neurons, seed=0, batch_size=1)[0] for r in rows]
    single_s = time.perf_counter() - t
    assert batched == single, "batching must not change a caption"
    return {"captions": len(rows), "batch_size": batch_size, "batched_per_s": round(len(rows) / batched_s, 2),
            "per_caption_per_s": round(len(rows) / single_s, 2), "ratio": round(single_s / batched_s, 2),
            "target": ">= 20"}


def _floor(g: dict, u: dict | None) -> str:
    """The arithmetic floor of the paper grid: each caption's prompt pass alone (no decoding), at the GEMM peak."""
    if not u or "profiled" not in u:
        return ""
    per_caption = u["profiled"]["prefill"]["gflop"] / u["captions"]  # every layer: the measured sets reach layer 0
    hours = g["paper_table2_captions"] * per_caption / u["gemm_peak_gflops"] / 3600
    return (f" A floor no implementation on this machine can beat: each caption's prompt pass through every layer"
            f" ({per_caption:.1f} GFLOP, as the sets reach layer 0), with no decoding at all, at the measured GEMM peak"
            f" ({u['gemm_peak_gflops']} GFLOP/s): **{hours:.1f} h**.")


SWEEPS_HEADING = "## Sweeps: the demo, the cache and resume (issue: sweeps)"


def sweeps_markdown(s: dict) -> str:
    make_run = f"**{round(s['cold_s'] + s['report_s'], 1)}** (target {s['target_demo_s']})"
    return f"""{SWEEPS_HEADING}

`python run.py experiment=demo` ({s['jobs']} jobs: 3 objects x 5 methods with the defaults: the budget rule in the
live window, the inpainted patch), each run in a fresh process with its own sweep folder. Cold: an empty cache
(only the converted LM linked in), so it also generates the toy-world split and computes every inpainting, the
live window's trace, every statistic and caption. Warm: the same sweep
into a new folder with the cache the cold run left. Resumed: the cold run's folder again (every job finished).

| | seconds |
|---|---|
| demo, cold cache ({s['captions_computed']} captions computed) | {s['cold_s']} |
| of which its first job (the toy world, the live window's trace, then bed x ours) | {s['per_job'][0]['wall_time_s']} |
| its report (`task=report`) | {s['report_s']} |
| **`make run` after `make install`: the two together** | {make_run} |
| the same sweep, warm cache ({s['warm_captions_computed']} captions computed) | {s['warm_s']} |
| **cache speed-up** | **{s['speedup']}x** (target {s['target_speedup']}) |
| rerun into the finished folder (resume: all jobs skipped) | {s['resumed_s']} |

Warm and cold runs gave the same Table II for every job: {s['same_results']}.
"""


LAUNCHERS_HEADING = "## Parallel jobs on one machine (issue: captioning at the machine's limit)"
GRIDS_HEADING = "## The whole grids, projected (issue: captioning at the machine's limit)"


def launchers_markdown(r: dict) -> str:
    return f"""{LAUNCHERS_HEADING}

One sweep of {r['jobs']} demo jobs (bed, bear x ours, random; shared caches warm, each job's captions and statistics
computed afresh), with Hydra's basic launcher (one job after another, each on every core) and with
`hydra/launcher=parallel` (joblib, 2 jobs at a time, each job's torch threads cores // 2 by default),
{r['cores']} cores.

| launcher | seconds |
|---|---|
| basic | {r['basic_s']} |
| parallel (2 jobs x {max(1, (r['cores'] or 2) // 2)} threads) | {r['parallel_s']} |
| **basic / parallel** | **{r['ratio']}x** |

Both gave the same Table II for every job: {r['same_results']}.
"""


def grids_markdown(g: dict, u: dict | None = None) -> str:
    paper = "\n".join(f"| {j['method']} | {j['set_sizes']} | {j['timing']['perturbed_captions']} | "
                      f"{j['timing']['perturbed_captions_s']} | {j['wall_time_s']} |" for j in g["paper_subset"])
    return f"""{GRIDS_HEADING}

Projected from measured jobs (`knexp.bench.sweeps.grids`): a job's perturbed captions take time in proportion to their
number, the rest of the job (model, selection, identification, clean captions, metrics) as measured.

**`experiment=paper_table2`'s protocol on the embedded model** (30 objects x ours, pan, schwettmann; paper thresholds;
noise at 40, 80, 120 x 10 draws on 18 images per set, 3 sets: {g['paper_table2_captions']} perturbed captions).
Measured: bed's 3 jobs, cold cache, with {g['paper_draws_measured']} draw (one tenth of the captions),
{g['paper_subset_wall_s']} s:

| method | set sizes | perturbed captions | their seconds | job seconds |
|---|---|---|---|---|
{paper}

Their perturbed captions ran at {g['paper_captions_per_s']} captions/s: the sets hold about 1500 neurons from layer 0
up, so no layer is reused, and the noise turns most captions into 32 tokens. Projection (bed's jobs scaled to 10 draws,
x 30 objects): **{g['paper_table2_h']} h** (target {g['target_paper_h']} h). Reaching 3 h would take
{round(g['paper_table2_captions'] / 10800, 1)} captions/s.{_floor(g, u)}

**`experiment=embedded_table2` with its curves and noise table**, from the cold demo's jobs above:

| sweep | jobs | projected hours |
|---|---|---|
| `embedded_table2` (7 methods, inpainted patch) | 210 | {g['embedded_table2_h']} |
| `embedded_table2_curves` (3 methods x sizes 100, 1000, 3000) | 90 | {g['embedded_table2_curves_h']} |
| `embedded_table2_noise` (4 methods, 3 levels x 1 draw) | 48 | {g['embedded_table2_noise_h']} |
| **all three** | 348 | **{g['embedded_all_h']}** |

The demo's cold jobs include one-off costs (generating the toy world, the live window's trace) that a whole sweep pays
once, so these are upper bounds.
"""

# BENCHMARKS.md from this heading on is written by hand (how to read a run, notes measured by hand): every render keeps
# it
HAND_HEADING = "## Notes written by hand (`make bench` keeps this part as it is)"


def hand_written(old: str) -> str:
    """The hand-written tail of BENCHMARKS.md's text ``old`` (from ``HAND_HEADING`` on), or '' where it has none."""
    return old[old.index(HAND_HEADING):] if HAND_HEADING in old else ""


def _kept(out: Path) -> str:
    """The hand-written tail of the file ``out`` as it is now ('' for a new file)."""
    return hand_written(out.read_text()) if out.exists() else ""


DATA_HEADING = "## The dataset doctor's annotation pass (issue: real COCO-format datasets)"


def data_markdown(d: dict) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(d["counts"].items()))
    annotation_pass = f"**{d['annotation_pass_s']}** (target {d['target']})"
    return f"""{DATA_HEADING}

`python run.py task=validate_data data=coco2017 task.images=false` in a fresh process, on a synthetic
{d['annotations']}-annotation COCO file ({d['file_mib']} MiB; polygons of 4 to 8 points over
{d['annotations'] // 5} images, {d['spoiled']} entries spoiled five ways; `knexp/bench/data.py`). It found
{d['faults_found']} faults ({kinds}).

| | seconds |
|---|---|
| the annotation pass (read, check every entry, index), as the task reports it | {annotation_pass} |
| the whole command (Python, Hydra, the pass, per-object counts, the report) | {d['command_s']} |
"""


def _last_run() -> dict:
    """The last full run's raw numbers (``runs/bench.json``)."""
    return json.loads((project_root() / "runs" / "bench.json").read_text())


SECTIONS = {"reuse": (REUSE_HEADING, lambda: reuse_markdown(reuse_and_decode())),
            "sweeps": (SWEEPS_HEADING, lambda: sweeps_markdown(_demo_and_cache())),
            "mfu": (MFU_HEADING, lambda: mfu_markdown(utilisation())),
            "launchers": (LAUNCHERS_HEADING, lambda: launchers_markdown(launchers())),
            "data": (DATA_HEADING, lambda: data_markdown(annotation_pass())),
            "families": (FAMILIES_HEADING, lambda: family_markdown(family_costs())),
            "gpu": (GPU_HEADING, lambda: gpu_markdown(gpu_check())),
            "real_shapes": (REAL_HEADING, lambda: real_shapes_markdown(real_shapes())),
            "edit": (EDIT_HEADING, lambda: edit_markdown(edit_costs())),
            # the grids scale the demo's jobs: those of the last full run's raw numbers
            "grids": (GRIDS_HEADING, lambda: grids_markdown(grids(_last_run()["sweeps"]["per_job"])))}


def _demo_and_cache() -> dict:
    from knexp.bench.sweeps import demo_and_cache

    return demo_and_cache()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m knexp.bench")
    parser.add_argument("--out", default=str(project_root() / "BENCHMARKS.md"))
    parser.add_argument("--json", default=str(project_root() / "runs" / "bench.json"))
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one benchmark and replace its section of --out")
    parser.add_argument("--render", action="store_true",
                        help="redraw --out from --json's raw numbers, measuring nothing")
    args = parser.parse_args()
    if args.render:
        Path(args.out).write_text(render(json.loads(Path(args.json).read_text())) + _kept(Path(args.out)))
        return
    if args.only == "gpu" and not torch.cuda.is_available():
        print(NO_GPU)  # nothing measured, BENCHMARKS.md left as it is
        return
    if args.only:
        heading, run = SECTIONS[args.only]
        old = Path(args.out).read_text() if Path(args.out).exists() else ""
        # a new one before the notes
        start = old.index(heading) if heading in old else len(old) - len(hand_written(old))
        end = (old.find("\n## ", start + 1) + 1 or len(old)) if heading in old else start
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = run() + f"\nMeasured alone (`--only {args.only}`) on {machine()}, {stamp}.\n\n"
        Path(args.out).write_text(old[:start] + section + old[end:])
        print(section)
        return
    from knexp.bench.identification import identification_cost, peak_memory_7b_shape

    result: dict = {}
    steps = {"data": annotation_pass, "launchers": launchers, "hook_overhead": hook_overhead,
             "identification_cost": identification_cost,
             "peak_memory": peak_memory_7b_shape, "evaluation_throughput": evaluation_throughput,
             "reuse": reuse_and_decode,
             "utilisation": utilisation, "sweeps": _demo_and_cache, "grids": lambda: grids(result["sweeps"]["per_job"]),
             "families": family_costs, "edit": edit_costs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for name, step in steps.items():  # the raw numbers are saved after each step: a failure keeps the finished ones
        result[name] = step()
        Path(args.json).write_text(json.dumps(result, indent=1))
    result["machine"], result["stamp"] = machine(), datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    Path(args.json).write_text(json.dumps(result, indent=1))
    text = render(result)
    Path(args.out).write_text(text + _kept(Path(args.out)))  # read now: notes edited during the run are kept
    print(text)


def _remeasured(result: dict) -> str:
    """The note of a section measured again alone after a full run (its own ``measured`` field), with both numbers."""
    h, full = result["hook_overhead"], result.get("hook_overhead_full_run")
    if not full:
        return ""
    return (f"\nMeasured again alone ({h['measured']}); the full run's numbers are kept in `runs/bench.json` as "
            f"`hook_overhead_full_run` (ratio {full['ratio']}).\n")


def render(result: dict) -> str:
    """BENCHMARKS.md from a full run's raw numbers, up to its hand-written notes (``--render`` redraws it from
    ``runs/bench.json``)."""
    stamp = result.get("stamp", "")
    h, c, m = result["hook_overhead"], result["identification_cost"], result["peak_memory"]
    e, s, r = result["evaluation_throughput"], result["sweeps"], result["reuse"]
    return f"""# Benchmarks

Measured with `make bench` (`python -m knexp.bench`) on {result.get('machine', '')}, {stamp}.
Raw numbers: `runs/bench.json`.

## Hook overhead (issue: instrumentation)

Batched greedy captioning on the embedded model ({h['images']} toy-world images, batch {h['batch_size']},
{h['max_new_tokens']} new tokens), with intervention hooks armed on {h['units_per_layer']} units in each of
the {h['armed_layers']} layers and zero noise, against no hooks. Median of {h['repeats']} runs each,
the pair's order reversed every other round.
Zero noise reproduces the plain captions exactly (checked in the run).

| | seconds |
|---|---|
| no hooks | {h['plain_s']} |
| hooks armed, zero noise | {h['hooked_s']} |
| **ratio** | **{h['ratio']}** (target {h['target']}) |
{_remeasured(result)}
## Identification cost (issue: identification)

One sample on the embedded model: `compute_stats` (inpainted forward, original forward and backward, all
reductions) plus every method's ranking, against the bare passes any gradient method needs (the same
forwards and the backward of y_c, no hooks). Median of {c['repeats']} runs each, in the reverse order every other round.

| | seconds |
|---|---|
| bare passes | {c['bare_s']} |
| identification, all methods | {c['identification_s']} |
| **ratio** | **{c['ratio']}** (target {c['target']}) |

## Peak extra memory at LLaVA-1.5-7B activation shape (issues: identification, neurons that act)

{m['shape']}, simulated with a random LLaVA of that FFN width and depth (residual width 64); peak RSS of a
fresh process per mode, malloc's mmap threshold fixed so that freed tensors leave the process. `compute_stats`
computes every statistic, attribution included: it keeps O'_o and O'_i of each layer (model dtype) until that
layer's gradient arrives, two [L, P, d_f] tensors at most.

| | MiB |
|---|---|
| bare passes | {m['bare_peak_mib']} |
| identification (`compute_stats`, attribution included) | {m['identification_peak_mib']} |
| **extra** | **{m['extra_mib']}** (target {m['target']}) |
| extra with glibc's default malloc settings (freed blocks stay resident) | {m['extra_mib_default_malloc']} |

## Evaluation throughput (issue: evaluation)

{e['captions']} perturbed captions (noise on 20 neurons, 32 new tokens) on the embedded model: batched rows
(batch {e['batch_size']}, one seeded generator per row) against one `generate` call per caption. The
captions are identical (checked in the run).

| | captions / s |
|---|---|
| one `generate` per caption | {e['per_caption_per_s']} |
| batched | {e['batched_per_s']} |
| **speed-up** | **{e['ratio']}x** (target {e['target']}) |

{reuse_markdown(r)}
{mfu_markdown(result["utilisation"])}
{sweeps_markdown(s)}
{launchers_markdown(result["launchers"])}
{grids_markdown(result["grids"], result["utilisation"])}
{data_markdown(result["data"])}
{family_markdown(result["families"]) if "families" in result else ""}
{edit_markdown(result["edit"]) if "edit" in result else ""}
"""


if __name__ == "__main__":
    main()
