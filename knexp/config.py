"""Hydra/OmegaConf glue for ``run.py``: the ``${knexp_root:}`` resolver, seeding and threads, and the metric a sweeper
optimises. Tasks are named by ``_target_`` in ``conf/task/*.yaml``; the session (``knexp.job``) builds the rest."""

from __future__ import annotations

import random

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from knexp.paths import project_root


def register_resolvers() -> None:
    """``${knexp_root:}`` -> the checkout holding ``.project-root`` (used by ``conf/paths``)."""
    if not OmegaConf.has_resolver("knexp_root"):
        OmegaConf.register_new_resolver("knexp_root", lambda: str(project_root()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_runtime(cfg: DictConfig) -> None:
    """Seeds and thread count from the config (before any model is built)."""
    seed_everything(int(cfg.seed))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))


def metric_value(result: dict, name: str | None) -> float | None:
    """``result[name]`` (dots reach into nested dicts) as a float, for a sweeper that optimises it."""
    if not name:
        return None
    value = result
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"optimized_metric={name!r} is not in the task's result (keys: {', '.join(result)})")
        value = value[part]
    return float(value)
