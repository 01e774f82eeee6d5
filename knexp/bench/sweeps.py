"""Sweep-level benchmarks, each sweep ``python run.py ...`` in a fresh process as ``make run`` does, with its own sweep
folder and, where it says cold, an empty cache folder (only the converted LM linked in, as after ``make install``), so
it also pays for generating the toy-world split, inpainting, statistics and captions.

demo_and_cache: the demo cold, its report, the same sweep warm, and resumed.
launchers: one 4-job sweep with Hydra's basic launcher (one job after another) and with ``hydra/launcher=parallel``
(2 jobs at a time, each on cores // 2 torch threads).
grids: the whole grids projected from measured subsets: ``experiment=paper_table2``'s protocol on the embedded model
and ``experiment=embedded_table2`` with its size curves and noise table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from knexp.paths import default_cache_dir, project_root


def _timed_run(*args: str) -> float:
    """Seconds that ``python run.py *args`` takes in a fresh process; its stderr tail if it fails."""
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "run.py", *args], cwd=project_root(), capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"run.py {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def _sweep(sweep_dir: Path, cache: Path, *args: str) -> float:
    return _timed_run("experiment=demo", f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={cache}", *args)


def _cold_cache(folder: Path) -> Path:
    """An empty cache folder with the converted LM linked in."""
    folder.mkdir(parents=True)
    lm = default_cache_dir() / "smollm2-135m-instruct"
    (folder / lm.name).symlink_to(lm)
    return folder


def _jobs(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]


def demo_and_cache() -> dict:
    with tempfile.TemporaryDirectory(prefix="knexp-bench-") as tmp:
        tmp = Path(tmp)
        cache = _cold_cache(tmp / "cache")
        cold = _sweep(tmp / "cold", cache)
        report = _timed_run("task=report", f"sweep_dir={tmp / 'cold'}", f"hydra.run.dir={tmp / 'report'}",
                            "logger=none")
        jobs = _jobs(tmp / "cold")
        warm = _sweep(tmp / "warm", cache)
        resumed = _sweep(tmp / "cold", cache)  # the same folder again: every job is finished
        warm_jobs = _jobs(tmp / "warm")
        same = [j["table2"] for j in jobs] == [j["table2"] for j in warm_jobs]
        computed = sum(j["cache"]["captions_computed"] for j in jobs)
    return {
        "per_job": [{k: j[k] for k in ("knowledge", "method", "wall_time_s", "timing")} for j in jobs],
        "jobs": len(jobs), "cold_s": round(cold, 1), "report_s": round(report, 1), "warm_s": round(warm, 1),
        "resumed_s": round(resumed, 1),
        "speedup": round(cold / warm, 2), "target_speedup": ">= 5", "target_demo_s": "<= 900", "same_results": same,
        "captions_computed": computed,
        "warm_captions_computed": sum(j["cache"]["captions_computed"] for j in warm_jobs),
    }


def launchers(jobs: str = "knowledge=bed,bear", methods: str = "method=ours,random") -> dict:
    """One 4-job demo sweep (2 objects x 2 methods, warm shared caches: the toy world and the live window's trace, but
    captions and statistics computed afresh in each job's own cold caption store), with the basic launcher and with
    ``hydra/launcher=parallel`` (2 jobs at a time; each job's torch threads default to cores // 2)."""
    out = {"jobs": 4, "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="knexp-bench-") as tmp:
        tmp = Path(tmp)
        warm = _cold_cache(tmp / "shared")
        _sweep(tmp / "warmup", warm, jobs, "method=random")  # toy world, trace
        for name, extra in (("basic", ()), ("parallel", ("hydra/launcher=parallel",))):
            cache = tmp / name
            shutil.copytree(warm, cache, symlinks=True, ignore=shutil.ignore_patterns("captions*", "stats*"))
            out[f"{name}_s"] = round(_sweep(tmp / f"{name}-sweep", cache, jobs,
                                            methods, *extra), 1)
            out[f"{name}_tables"] = [j["table2"] for j in _jobs(tmp / f"{name}-sweep")]
    out["same_results"] = out.pop("basic_tables") == out.pop("parallel_tables")
    out["ratio"] = round(out["basic_s"] / out["parallel_s"], 2)
    return out


def _full_job(job: dict, factor: float) -> float:
    """A job's wall time with its perturbed captions multiplied by ``factor`` (the rest of the job as measured)."""
    perturbed = job["timing"]["perturbed_captions_s"]
    return job["wall_time_s"] - perturbed + factor * perturbed


def grids(demo_jobs: list[dict], draws: int = 1) -> dict:
    """Projected wall times of the whole grids on the embedded model, each from measured jobs (seconds of a job's
    perturbed captions scale with their number; the rest of the job is taken as measured):

    * ``experiment=paper_table2``'s protocol (30 objects x ours, pan, schwettmann; paper thresholds; noise at 3 levels x
      10 draws; 18 images per set): bed's 3 jobs run cold with ``draws`` draws, their perturbed captions scaled by
      10 / draws; bed stands for every object.
    * ``experiment=embedded_table2`` (30 objects x 7 methods, the inpainted patch), ``embedded_table2_curves`` (30 x 3
      methods x 3 sizes) and ``embedded_table2_noise`` (12 x 4 methods, 3 levels x 1 draw), from the cold demo's 15 jobs
      (the same per-job protocol as the table for 5 of its 7 methods; stage1_only and stage2_only are taken as ours):
      a curve job has 3 times the perturbed captions of a table job, a noise job 3 times (3 rows per image, not 1).
    """
    with tempfile.TemporaryDirectory(prefix="knexp-bench-") as tmp:
        tmp = Path(tmp)
        wall = _timed_run("experiment=paper_table2", "model=embedded", "data=toyworld", "logger=none",
                          f"noise_level.draws={draws}", "knowledge=bed", "method=ours,pan,schwettmann",
                          f"hydra.sweep.dir={tmp / 'paper'}", f"paths.cache_dir={_cold_cache(tmp / 'cache')}")
        paper_jobs = _jobs(tmp / "paper")
    per_method = {}
    for job in demo_jobs:
        per_method.setdefault(job["method"], []).append(job)

    def mean_job(method: str, factor: float) -> float:
        jobs = per_method[method if method in per_method else "ours"]
        return sum(_full_job(j, factor) for j in jobs) / len(jobs)

    table = 30 * sum(mean_job(m, 1) for m in ("ours", "pan", "schwettmann", "random", "stage1_only", "stage2_only",
                                              "attribution"))
    curves = 30 * sum(mean_job(m, 3) for m in ("ours", "attribution", "random"))
    noise = 12 * sum(mean_job(m, 3) for m in ("ours", "pan", "schwettmann", "random"))
    paper = 30 * sum(_full_job(j, 10 / draws) for j in paper_jobs)
    captions = sum(j["timing"]["perturbed_captions"] for j in paper_jobs) * 10 // draws
    return {
        "paper_subset": [{k: j[k] for k in ("method", "wall_time_s", "timing", "set_sizes")} for j in paper_jobs],
        "paper_subset_wall_s": round(wall, 1), "paper_draws_measured": draws,
        "paper_captions_per_s": round(sum(j["timing"]["perturbed_captions"] for j in paper_jobs)
                                      / sum(j["timing"]["perturbed_captions_s"] for j in paper_jobs), 2),
        "paper_table2_h": round(paper / 3600, 1), "paper_table2_captions": 30 * captions, "target_paper_h": "<= 3",
        "embedded_table2_h": round(table / 3600, 1), "embedded_table2_curves_h": round(curves / 3600, 1),
        "embedded_table2_noise_h": round(noise / 3600, 1), "embedded_all_h": round((table + curves + noise) / 3600, 1),
    }
