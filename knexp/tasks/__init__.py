"""Tasks that ``run.py`` dispatches on ``cfg.task.name``; each is ``run(cfg) -> dict`` of results."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from omegaconf import DictConfig

TASKS = {
    "train_projector": "knexp.tasks.train_projector",
    "caption_eval": "knexp.tasks.caption_eval",
    "identify": "knexp.tasks.identify",
    "evaluate": "knexp.tasks.evaluate",
    "select": "knexp.tasks.select",
    "report": "knexp.tasks.report",
    "tune": "knexp.tasks.tune",
    "trace": "knexp.tasks.trace",
}


def get_task(name: str) -> Callable[[DictConfig], dict]:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} (choose with task=<name>)")
    return importlib.import_module(TASKS[name]).run


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
