"""A sweep's place and ETA on the console.

``SweepProgress`` is a Hydra callback (``conf/hydra/default.yaml``, ``hydra.callbacks.progress``). At each job's start
it logs "job i/N", the time since the sweep began and an ETA: the jobs left times the mean time of the finished jobs
after the first (the first pays the sweep's one-off costs: the toy world, the caches, the live window's trace), or of
every job so far while only the first has finished or the jobs ran in other processes (a parallel launcher). A resumed
sweep, whose finished jobs are skipped in a second, starts with a short ETA that grows. N is the product of the
swept values' counts (Hydra's basic sweeper, the command line's and ``hydra.sweeper.params``'), or ``n_trials`` for an
optimising sweeper; the sweep's start is the time the sweeper wrote ``multirun.yaml`` into the sweep folder, so the
count and the times are the same in a job that a parallel launcher runs in another process.
The console's other helpers (the heartbeat, quiet third-party loggers) are ``knexp.console``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from knexp.console import clock

log = logging.getLogger("knexp.progress")


def sweep_size(config: DictConfig) -> int | None:
    """The number of jobs the sweep of ``config`` launches: the product of every swept key's value count (the basic
    sweeper's rule), ``n_trials`` for a sweeper that has it (Optuna), None when it cannot be told."""
    sweeper = config.hydra.get("sweeper") or {}
    if sweeper.get("n_trials") is not None:
        return int(sweeper.n_trials)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
        return len(BasicSweeper.split_arguments(overrides, None)[0])
    except HydraException:  # a sweep the basic sweeper cannot count (an interval), or one it cannot parse: no count
        return None


def eta_line(index: int, total: int | None, elapsed_s: float, later_jobs_s: list[float] = ()) -> str:
    """ "job i/N · <elapsed> elapsed · ETA <left>" for the job numbered ``index`` (0-based) of ``total``, ``elapsed_s``
    seconds after the sweep began. The ETA is the jobs left times the mean of ``later_jobs_s`` (the durations of the
    finished jobs after the first) where there are any, else times elapsed / jobs done; none before a job has ended."""
    line = f"job {index + 1}/{total if total else '?'} · {clock(elapsed_s)} elapsed"
    if total and index > 0:
        per_job = sum(later_jobs_s) / len(later_jobs_s) if later_jobs_s else elapsed_s / index
        line += f" · ETA {clock(per_job * (total - index))}"
    return line


class SweepProgress(Callback):
    """Logs "job i/N · elapsed · ETA" as each job of a multirun starts and "job i/N done in <time>" as it ends."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.job_began = 0.0
        self.later_jobs_s: list[float] = []  # durations of the jobs after the sweep's first that ended in this process

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.total = sweep_size(config)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if self.total is None:  # a job in another process (a parallel launcher): count again
            self.total = sweep_size(config)
        started = Path(config.hydra.sweep.dir) / "multirun.yaml"
        self.job_began = time.time()
        elapsed = self.job_began - started.stat().st_mtime if started.exists() else 0.0
        overrides = " ".join(o for o in config.hydra.overrides.task if not o.startswith("experiment="))
        log.info("%s · %s", eta_line(int(config.hydra.job.num), self.total, elapsed, self.later_jobs_s), overrides)

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and self.job_began:
            took = time.time() - self.job_began
            if int(config.hydra.job.num) > 0:
                self.later_jobs_s.append(took)
            log.info("job %d/%s done in %s", int(config.hydra.job.num) + 1, self.total or "?", clock(took))
