"""Hydra/OmegaConf glue for ``run.py``: the ``${knexp_root:}`` resolver, seeding and threads, and the metric a sweeper
optimises. Tasks are named by ``_target_`` in ``conf/task/*.yaml``; the session (``knexp.job``) builds the rest."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from knexp.paths import project_root
from knexp.user_errors import ConfigError

log = logging.getLogger(__name__)


def register_resolvers() -> None:
    """``${knexp_root:}`` -> the checkout holding ``.project-root`` (used by ``conf/paths``)."""
    if not OmegaConf.has_resolver("knexp_root"):
        OmegaConf.register_new_resolver("knexp_root", lambda: str(project_root()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_runtime(cfg: DictConfig) -> None:
    """Seeds and thread count from the config (before any model is built): ``num_threads``, or under a parallel launcher
    (``hydra/launcher=parallel``) each job's share of the cores, cores // n_jobs, so that jobs do not fight over cores
    (two 2-thread torch processes on 2 cores were measured at up to 10x slower each)."""
    seed_everything(int(cfg.seed))
    threads = cfg.get("num_threads") or parallel_share()
    if threads:
        torch.set_num_threads(int(threads))
        log.info("torch threads: %d", torch.get_num_threads())


def parallel_share(cores: int | None = None) -> int | None:
    """cores // n_jobs when this job runs under the joblib launcher with n_jobs > 1 (n_jobs -1: every core a job), else
    None (torch's default: every core)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except ValueError:  # not inside a Hydra job
        return None
    if "joblib" not in str(launcher.get("_target_", "")):
        return None
    cores = cores or os.cpu_count() or 1
    n_jobs = int(launcher.get("n_jobs") or 1)
    n_jobs = cores if n_jobs < 0 else n_jobs
    return max(1, cores // n_jobs) if n_jobs > 1 else None


def metric_value(result: dict, name: str | None) -> float | None:
    """``result[name]`` (dots reach into nested dicts) as a float, for a sweeper that optimises it."""
    if not name:
        return None
    value = result
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"optimized_metric={name!r} is not in the task's result (keys: {', '.join(result)})")
        value = value[part]
    return float(value)
