"""Sweep-level benchmarks: the demo's wall time (cold cache), the same sweep again (warm cache), and the
projected wall time of experiment=paper_table2's protocol on the embedded model.

Each run is ``python run.py experiment=demo`` in a fresh process, as ``make run`` does, with its own sweep
folder; the cold run gets an empty cache folder (only the converted LM is linked in, as after
``make install``), so it also pays for generating the toy-world split, inpainting, statistics and captions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from knexp.paths import default_cache_dir, project_root

# conf/experiment/paper_table2.yaml's protocol on the embedded model: 30 objects x 3 methods; per job 3 sets x
# (3 identification + 6 other images of k + 9 of other objects) x 3 levels x 10 draws perturbed captions.
PAPER_JOBS = 30 * 3
PAPER_CAPTIONS_PER_JOB = 3 * (3 + 6 + 9) * 3 * 10


def _timed_run(*args: str) -> float:
    """Seconds that ``python run.py *args`` takes in a fresh process; its stderr tail if it fails."""
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "run.py", *args], cwd=project_root(), capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"run.py {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def _sweep(sweep_dir: Path, cache: Path) -> float:
    return _timed_run("experiment=demo", f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={cache}")


def _jobs(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]


def demo_and_cache() -> dict:
    with tempfile.TemporaryDirectory(prefix="knexp-bench-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        cache.mkdir()
        lm = default_cache_dir() / "smollm2-135m-instruct"
        (cache / lm.name).symlink_to(lm)
        cold = _sweep(tmp / "cold", cache)
        report = _timed_run("task=report", f"sweep_dir={tmp / 'cold'}", f"hydra.run.dir={tmp / 'report'}", "logger=none")
        jobs = _jobs(tmp / "cold")
        warm = _sweep(tmp / "warm", cache)
        resumed = _sweep(tmp / "cold", cache)  # the same folder again: every job is finished
        warm_jobs = _jobs(tmp / "warm")
        same = [j["table2"] for j in jobs] == [j["table2"] for j in warm_jobs]
        computed = sum(j["cache"]["captions_computed"] for j in jobs)
        per_caption = cold / computed
    return {
        "jobs": len(jobs), "cold_s": round(cold, 1), "report_s": round(report, 1), "warm_s": round(warm, 1), "resumed_s": round(resumed, 1),
        "speedup": round(cold / warm, 2), "target_speedup": ">= 5", "target_demo_s": "<= 900", "same_results": same,
        "captions_computed": computed, "warm_captions_computed": sum(j["cache"]["captions_computed"] for j in warm_jobs),
        "s_per_caption": round(per_caption, 4),
        "paper_table2_projection_h": round(PAPER_JOBS * PAPER_CAPTIONS_PER_JOB * per_caption / 3600, 1),
        "paper_table2_captions": PAPER_JOBS * PAPER_CAPTIONS_PER_JOB,
    }
