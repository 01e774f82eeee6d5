"""Hydra/OmegaConf glue for ``run.py``: the ``${knexp_root:}`` resolver, seeding and threads, building a config group's
object (``build``), and the metric a sweeper optimises. Tasks are named by ``_target_`` in ``conf/task/*.yaml``; the
session (``knexp.job``) builds the rest."""

from __future__ import annotations

import inspect
import logging
import os
import random

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from knexp.console import quiet_third_party
from knexp.paths import project_root
from knexp.settings import Integer, Many, SettingError, Text, check_mapping
from knexp.user_errors import ConfigError, UserError

log = logging.getLogger(__name__)


def register_resolvers() -> None:
    """``${knexp_root:}`` -> the checkout holding ``.project-root`` (used by ``conf/paths``)."""
    if not OmegaConf.has_resolver("knexp_root"):
        OmegaConf.register_new_resolver("knexp_root", lambda: str(project_root()))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _refuse_unset(node: DictConfig, prefix: str = "") -> None:
    """``SettingError`` for the first value under ``node`` left unset (``???``), named by its full key."""
    missing = sorted(OmegaConf.missing_keys(node))
    if missing:
        raise SettingError(f"{prefix}.{missing[0]}" if prefix else missing[0], "???",
                           "is not set; give it a value on the command line or in its yaml")


def check_top_level(cfg: DictConfig) -> dict:
    """The top-level settings, checked: ``seed``, ``num_threads``, ``tags``, ``sweep_dir`` and ``optimized_metric`` (and
    no value anywhere left unset, ``???``, which names its key)."""
    _refuse_unset(cfg)
    if "paths" in cfg:
        paths = OmegaConf.to_container(cfg.paths, resolve=True)
        check_mapping(paths, "paths", **{name: Text() for name in paths})
    return check_mapping({k: cfg.get(k) for k in ("seed", "num_threads", "tags", "sweep_dir", "optimized_metric")}, "",
                         seed=Integer(low=0), num_threads=Integer(low=1, optional=True),
                         tags=Many(Text(), min_len=0, optional=True),
                         sweep_dir=Text(optional=True), optimized_metric=Text(optional=True))


def setup_runtime(cfg: DictConfig) -> None:
    """Third-party loggers quieted (``quiet_third_party``), seeds and thread count from the config (before any model
    is built; both checked first): ``num_threads``, or under a parallel launcher (``hydra/launcher=parallel``) each
    job's share of the cores, cores // n_jobs, so that jobs do not fight over cores (two torch processes that each use
    every core slow each other down; BENCHMARKS.md)."""
    top = check_top_level(cfg)
    quiet_third_party()
    seed_everything(top["seed"])
    threads = top["num_threads"] or parallel_share()
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


def build(node, key: str, **kwargs):
    """``hydra.utils.instantiate(node)`` for the config group at ``key``, with its errors unwrapped. A value that is not
    set (``???``) is named. A user error in a constructor is raised as itself. A ``_target_`` that does not import is
    named as a setting."""
    _refuse_unset(node, key)
    if "name" in node:  # every group's label (the report's and the logger's)
        Text()(f"{key}.name", node["name"])
    try:
        return instantiate(node, **{"_convert_": "all", **kwargs})
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        if "_target_" in node and not _importable(str(node["_target_"])):
            raise SettingError(f"{key}._target_", str(node["_target_"]),
                               "cannot be imported; name a class as module.Class, as conf/ does") from exc
        if "_target_" in node:
            _refuse_unknown(node, key, get_object(str(node["_target_"])))
        raise


def build_with(node: DictConfig, key: str, **built):
    """``build`` for a group whose constructor also takes objects built apart (``built``, e.g. an edit's rule, so that
    its own errors name its own keys): the group's other keys come from ``node``, the objects are passed as they are
    (Hydra would turn a dataclass instance back into a config)."""
    own = OmegaConf.masked_copy(node, [k for k in node if k not in built])
    make = build(own, key, _partial_=True, _recursive_=False)
    _refuse_unknown(own, key, get_object(str(node["_target_"])))
    return make(**built)


def _refuse_unknown(node: DictConfig, key: str, target) -> None:
    """``SettingError`` for a key of ``node`` that ``target`` takes no argument for (``+task.foo=1``, a misspelt
    key)."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    for name in node:
        if not str(name).startswith("_") and name not in params:
            raise SettingError(f"{key}.{name}", node[name],
                               f"is not a setting here; the settings are {', '.join(params)}")


def _importable(path: str) -> bool:
    try:
        get_object(path)
    except Exception:  # ImportError, AttributeError, ValueError: what a bad dotted path raises
        return False
    return True
