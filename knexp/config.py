"""Hydra/OmegaConf glue: resolvers, seeding and the task registry used by ``run.py``."""

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
