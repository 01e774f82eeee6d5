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
}


def get_task(name: str) -> Callable[[DictConfig], dict]:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)} (choose with task=<name>)")
    return importlib.import_module(TASKS[name]).run
