"""``python run.py task=tune``: one threshold setting evaluated on a split of objects; the objective of tuning.

Runs ``task=evaluate`` for every object of ``splits[task.split]`` (each in ``<job dir>/<object>/``, each
resumable and cached as usual) and returns the mean of their Table II scores. ``run.py`` hands
``optimized_metric`` of this result to the sweeper, so ``hparams_search=thresholds_optuna`` tunes the
threshold rule's parameters for S_mean on the tuning objects; ``task.split=heldout`` with the best parameters
then measures them on objects the tuning never saw (README, "Threshold tuning").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from knexp.data.catalog import Catalog
from knexp.io import atomic_write_text
from knexp.tasks import evaluate

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    splits = cfg.splits
    if cfg.task.split not in splits:
        raise KeyError(f"task.split={cfg.task.split!r} is not one of the splits ({', '.join(splits)}; conf/splits)")
    catalog = Catalog.load()
    names = [catalog[n].name for n in splits[cfg.task.split]]  # unknown names fail here, before any work
    out = Path(cfg.paths.output_dir)
    per_object = {}
    for name in names:
        job = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        job.knowledge = {"name": name}
        job.paths.output_dir = str(out / name.replace(" ", "_"))
        result = evaluate.run(job)
        per_object[name] = result.get("table2") or {}
    scores = {s: float(np.mean([t[s] for t in per_object.values() if t])) if any(per_object.values()) else float("nan")
              for s in ("S_se", "S_re", "S_mean")}
    summary = {"split": cfg.task.split, "objects": names, "thresholds": OmegaConf.to_container(cfg.thresholds, resolve=True),
               **scores, "per_object": per_object}
    atomic_write_text(out / "tune.json", json.dumps(summary, indent=1))
    log.info("%s split (%d objects): S_se %.4f S_re %.4f S_mean %.4f", cfg.task.split, len(names), *scores.values())
    return summary
