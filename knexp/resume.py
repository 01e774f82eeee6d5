"""Job-level resume: a job directory that already holds the finished result of the same job is not rerun.

A job writes ``done.json`` (its job key and the result) as its very last step, after every other file. Rerunning a
multirun into the same sweep directory (``hydra.sweep.dir=<the old one>``) therefore skips the jobs that finished and
reruns the one that was interrupted; that one's finished pieces (inpainted images, statistics, captions) come from the
shared cache. The key (``knexp.job.spec.JobSpec.job_key``) covers every config value a result depends on, so a changed
setting reruns the job instead of returning a stale result.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from knexp.io import atomic_write_text

log = logging.getLogger(__name__)
DONE = "done.json"


def finished(key: str, out: Path) -> dict | None:
    """The stored result when ``out`` holds a finished job of key ``key`` (logged: the job is skipped), else None."""
    path = Path(out) / DONE
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if done.get("key") != key:
        log.warning("%s holds a finished job of another config; rerunning it here", out)
        return None
    log.info("%s: finished before with this config; skipped (delete %s/%s to rerun)", out, out, DONE)
    return done.get("result")


def holds_finished(out: Path) -> bool:
    """Whether ``out`` holds a finished job's ``done.json`` (of any config: ``finished`` checks the key)."""
    return (Path(out) / DONE).is_file()


def mark_finished(key: str, out: Path, result: dict) -> None:
    atomic_write_text(Path(out) / DONE, json.dumps({"key": key, "result": result}, indent=1, default=str))
