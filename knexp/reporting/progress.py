"""A sweep's place and ETA on the console.

``SweepProgress`` is a Hydra callback (``conf/hydra/default.yaml``, ``hydra.callbacks.progress``). At each job's start
it logs "job i/N", the time since the sweep began and an ETA: the jobs left times the mean time of the jobs that ran
after the first that ran (the first pays the sweep's one-off costs: the toy world, the caches, the live window's trace),
or the time so far over the jobs that ran while only one has finished or the jobs ran in other processes (a parallel
launcher). The jobs of a resumed sweep that finished before (their folder holds ``done.json``, ``knexp.resume``) are
skipped in a second and count in neither, so a resumed sweep's ETA is not a few seconds. N is the product of the
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
from knexp.resume import holds_finished

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


def eta_line(index: int, total: int | None, elapsed_s: float, ran_s: list[float] = (), skipped: int = 0) -> str:
    """ "job i/N · <elapsed> elapsed · ETA <left>" for the job numbered ``index`` (0-based) of ``total``, ``elapsed_s``
    seconds after the sweep began. ``ran_s`` are the durations of the jobs that ran in this process, in order, and
    ``skipped`` the number of jobs before this one that were skipped as finished. The ETA is the jobs left times the
    mean of ``ran_s`` after its first where there are two or more, else times elapsed / the jobs that ran; none before
    a job has run."""
    line = f"job {index + 1}/{total if total else '?'} · {clock(elapsed_s)} elapsed"
    ran = index - skipped  # jobs before this one that ran, here or in other processes
    if total and ran > 0:
        per_job = sum(ran_s[1:]) / len(ran_s[1:]) if len(ran_s) > 1 else elapsed_s / ran
        line += f" · ETA {clock(per_job * (total - index))}"
    return line


class SweepProgress(Callback):
    """Logs "job i/N · elapsed · ETA" as each job of a multirun starts and "job i/N done in <time>" as it ends."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.job_began = 0.0
        self.job_skips = False  # whether the job now running finished before (a resumed sweep skips it)
        self.ran_s: list[float] = []  # durations of the jobs that ran in this process, in order
        self.skipped = 0  # jobs of this process skipped as finished before

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.total = sweep_size(config)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        if self.total is None:  # a job in another process (a parallel launcher): count again
            self.total = sweep_size(config)
        started = Path(config.hydra.sweep.dir) / "multirun.yaml"
        self.job_began = time.time()
        self.job_skips = holds_finished(Path(config.hydra.runtime.output_dir))
        elapsed = self.job_began - started.stat().st_mtime if started.exists() else 0.0
        overrides = " ".join(o for o in config.hydra.overrides.task if not o.startswith("experiment="))
        line = eta_line(int(config.hydra.job.num), self.total, elapsed, self.ran_s, self.skipped)
        log.info("%s · %s", line, overrides)

    def on_job_end(self, config: DictConfig, job_return=None, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and self.job_began:
            took = time.time() - self.job_began
            if self.job_skips:
                self.skipped += 1
            else:
                self.ran_s.append(took)
            log.info("job %d/%s done in %s", int(config.hydra.job.num) + 1, self.total or "?", clock(took))
