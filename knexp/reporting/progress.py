"""What the console shows during long runs: a sweep's place and ETA, and quiet third-party libraries.

``SweepProgress`` is a Hydra callback (``conf/hydra/default.yaml``, ``hydra.callbacks.progress``). At each job's start it
logs "job i/N", the time since the sweep began and an ETA: the jobs left times the mean time of the finished jobs after
the first (the first pays the sweep's one-off costs: the toy world, the caches, the live window's trace), or of every
job so far while only the first has finished or the jobs ran in other processes (a parallel launcher). A resumed
sweep, whose finished jobs are skipped in a second, starts with a short ETA that grows. N is the product of the
swept values' counts (Hydra's basic sweeper, the command line's and ``hydra.sweeper.params``'), or ``n_trials`` for an
optimising sweeper; the sweep's start is the time the sweeper wrote ``multirun.yaml`` into the sweep folder, so the
count and the times are the same in a job that a parallel launcher runs in another process.

``heartbeat`` (around each job's task in ``run.py``) guarantees a line at least every ``every_s`` seconds: when knexp
has logged nothing for that long (a long forward, a slow machine), it logs the phase still running (the last line's
message) and for how long. Each phase logs its own lines with counts and rates; the heartbeat only fills their gaps.

``quiet_third_party`` lowers the libraries that print between knexp's lines (absl's "Using default tokenizer" from
rouge-score, matplotlib's font cache, the weight-loading progress bars of transformers and huggingface_hub) to warnings.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

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
    line = f"job {index + 1}/{total if total else '?'} · {_clock(elapsed_s)} elapsed"
    if total and index > 0:
        per_job = sum(later_jobs_s) / len(later_jobs_s) if later_jobs_s else elapsed_s / index
        line += f" · ETA {_clock(per_job * (total - index))}"
    return line


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


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
            log.info("job %d/%s done in %s", int(config.hydra.job.num) + 1, self.total or "?", _clock(took))


def quiet_third_party() -> None:
    """Third-party loggers to warnings and their progress bars off (module docstring); knexp's own lines are untouched."""
    for name in ("absl", "matplotlib", "matplotlib.font_manager", "PIL", "filelock", "urllib3", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_warning()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


class _LastLine(logging.Handler):
    """Remembers when knexp last logged and what (a heartbeat's own lines keep the phase they report)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.at = self.phase_at = time.time()
        self.phase = "starting"

    def emit(self, record: logging.LogRecord) -> None:
        self.at = record.created
        if not getattr(record, "heartbeat", False):
            self.phase, self.phase_at = record.getMessage(), record.created


@contextmanager
def heartbeat(every_s: float = 20.0, logger: str = "knexp") -> Iterator[None]:
    """While the block runs, log "still at work on: <phase> (<time> since that line)" whenever ``logger`` and its children
    have been silent for ``every_s`` seconds (module docstring). The watching thread is stopped and the handler removed
    on the way out, also on an error."""
    watched = logging.getLogger(logger)
    last = _LastLine()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(min(1.0, every_s / 4)):
            if time.time() - last.at >= every_s:
                log.info("still at work on: %s (%s since that line)", last.phase[:160], _clock(time.time() - last.phase_at),
                         extra={"heartbeat": True})

    watched.addHandler(last)
    thread = threading.Thread(target=watch, name="knexp-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        watched.removeHandler(last)
