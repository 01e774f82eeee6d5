"""``python run.py task=tune``: one threshold setting evaluated on a split of objects; the objective of tuning.

Runs the evaluation job (``task.job``: ``task=evaluate``'s settings, composed into this task by its config) for every
object of ``splits[task.split]``, each in ``<job dir>/<object>/``, resumable and cached as usual, with one loaded model,
and returns the mean of their Table II scores. ``run.py`` hands ``optimized_metric`` of this result to the sweeper, so
``hparams_search=thresholds_optuna`` tunes the threshold rule's parameters for S_mean on the tuning objects;
``task.split=heldout`` with the best parameters then measures them on objects the tuning never saw (docs/guide.md,
"Threshold tuning").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from omegaconf import OmegaConf

from knexp.config import build
from knexp.io import atomic_write_text
from knexp.job.session import Session
from knexp.settings import Flag, SettingError, Text, check_fields

log = logging.getLogger(__name__)


@dataclass
class TuneTask:
    """``conf/task/tune.yaml``: ``job`` is the evaluation task built from ``task.job`` (its settings checked as
    ``task.job.*``)."""

    job: Callable[[Session], dict]
    name: str = "tune"
    split: str = "tuning"
    cache: bool = True

    def __post_init__(self):
        # knexp.job.session.build_job builds tasks without recursing: the job is built here
        if isinstance(self.job, Mapping):
            try:
                self.job = build(OmegaConf.create(dict(self.job)), "task")
            except SettingError as exc:
                raise exc.under("task", "task.job") from None
        check_fields(self, "task", split=Text(), cache=Flag())  # after the job: task.cache is task.job.cache

    def check_session(self, session: Session) -> None:
        """``task.split`` is one of the splits (checked when the job is built)."""
        if self.split not in session.spec.splits:
            raise SettingError("task.split", self.split,
                               f"use one of the splits: {', '.join(session.spec.splits)} (conf/splits)")

    def __call__(self, session: Session) -> dict:
        names = [session.catalog[n].name for n in session.spec.splits[self.split]]
        out = session.spec.output_dir
        per_object = {}
        for name in names:
            result = self.job(session.for_knowledge(name, out / name.replace(" ", "_")))
            per_object[name] = result.get("table2") or {}
        found = [t for t in per_object.values() if t]
        scores = {s: float(np.mean([t[s] for t in found])) if found else float("nan")
                  for s in ("S_se", "S_re", "S_mean")}
        summary = {"split": self.split, "objects": names, "thresholds": session.spec.settings_of("thresholds"),
                   **scores, "per_object": per_object}
        atomic_write_text(out / "tune.json", json.dumps(summary, indent=1))
        log.info("%s split (%d objects): S_se %.4f S_re %.4f S_mean %.4f", self.split, len(names), *scores.values())
        return summary
