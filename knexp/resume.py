"""Job-level resume: a job directory that already holds the finished result of the same config is not rerun.

A job writes ``done.json`` (the config's key and the result) as its very last step, after every other file.
Rerunning a multirun into the same sweep directory (``hydra.sweep.dir=<the old one>``) therefore skips the
jobs that finished and reruns the one that was interrupted; that one's finished pieces (inpainted images,
statistics, captions) come from the shared cache. The key covers every config value a result depends on,
so a changed setting reruns the job instead of returning a stale result.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from knexp.io import atomic_write_text
from knexp.models.registry import model_identity
from knexp.store import stable_key

log = logging.getLogger(__name__)
DONE = "done.json"
# config keys that change where or how results are shown, never what they are
PRESENTATION = ("paths", "logger", "tags", "num_threads", "sweep_dir")


def job_key(cfg: DictConfig) -> str:
    """Hash of the config less its presentation keys, with the model as ``model_identity`` sees it (so the
    projector's bytes count, and the generation batch size, which no result depends on, does not)."""
    content = OmegaConf.to_container(cfg, resolve=True)
    for name in PRESENTATION:
        content.pop(name, None)
    content["model"] = model_identity(OmegaConf.to_container(cfg.model, resolve=True))
    return stable_key(content)


def finished(cfg: DictConfig, out: Path) -> dict | None:
    """The stored result when ``out`` holds a finished job of this config (logged: the job is skipped), else None."""
    path = Path(out) / DONE
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if done.get("key") != job_key(cfg):
        log.warning("%s holds a finished job of another config; rerunning it here", out)
        return None
    log.info("%s: finished before with this config; skipped (delete %s/%s to rerun)", out, out, DONE)
    return done.get("result")


def mark_finished(cfg: DictConfig, out: Path, result: dict) -> None:
    atomic_write_text(Path(out) / DONE, json.dumps({"key": job_key(cfg), "result": result}, indent=1, default=str))
