"""What the console shows while knexp works, below everything else: quiet third-party loggers and a heartbeat.

``quiet_third_party`` lowers the libraries that print between knexp's lines (absl's "Using default tokenizer" from
rouge-score, matplotlib's font cache, the weight-loading progress bars of transformers and huggingface_hub) to warnings.

``heartbeat`` (around each job's task in ``run.py``) guarantees a line at least every ``every_s`` seconds: when knexp
has logged nothing for that long (a long forward, a slow machine), it logs the phase still running (the last line's
message) and for how long. Each phase logs its own lines with counts and rates; the heartbeat only fills their gaps.
A sweep's place and ETA are ``knexp.reporting.progress``'s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("knexp.progress")


def clock(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


def quiet_third_party() -> None:
    """Third-party loggers to warnings and their progress bars off (module docstring); knexp's own lines are
    untouched."""
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
    """While the block runs, log "still at work on: <phase> (<time> since that line)" whenever ``logger`` and its
    children have been silent for ``every_s`` seconds (module docstring). The watching thread is stopped and the handler
    removed on the way out, also on an error."""
    watched = logging.getLogger(logger)
    last = _LastLine()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(min(1.0, every_s / 4)):
            if time.time() - last.at >= every_s:
                log.info("still at work on: %s (%s since that line)", last.phase[:160],
                         clock(time.time() - last.phase_at), extra={"heartbeat": True})

    watched.addHandler(last)
    thread = threading.Thread(target=watch, name="knexp-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        watched.removeHandler(last)
