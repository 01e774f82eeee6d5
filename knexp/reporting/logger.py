"""Result logging: files in the job directory always, Weights & Biases on top when ``logger=wandb``.

No result depends on W&B: metrics go to ``metrics.json`` and tables to CSV in the job directory first.
``conf/logger/*.yaml`` names its settings class by ``_target_`` (``FilesOnly`` or ``Wandb``), built and checked when the
session is built; ``open`` starts the job's logger (``knexp.job.spec.JobSpec.logger`` gives it the job's folder, config,
tags and type).
W&B runs offline unless the user asks for online mode; online mode without credentials falls back to
offline with a warning rather than waiting on a network or a prompt.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from knexp.io import atomic_path, atomic_write_text
from knexp.settings import Choice, Text, check_fields

WANDB_MODES = ("online", "offline", "disabled")

log = logging.getLogger(__name__)


class RunLogger:
    """Writes metrics and tables into ``out_dir``; subclasses mirror them elsewhere (``logger=none``: files only)."""

    def __init__(self, out_dir: str | Path, name: str = "none", run_config: dict | None = None,
                 tags: list[str] | None = None, job_type: str = ""):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics: dict = {}

    def log_metrics(self, metrics: dict) -> None:
        self.metrics.update(metrics)
        atomic_write_text(self.out_dir / "metrics.json", json.dumps(self.metrics, indent=1, sort_keys=True))

    def log_table(self, name: str, table: pd.DataFrame) -> Path:
        path = self.out_dir / f"{name}.csv"
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        self.mirror_table(name, table)
        return path

    def mirror_table(self, name: str, table: pd.DataFrame) -> None:
        """A table already written as a file (the report's CSVs): only trackers log it."""

    def log_histogram(self, name: str, counts: list[int]) -> Path:
        """Counts per bin (e.g. neurons per layer), written as ``<name>_histogram.csv``."""
        return self.log_table(f"{name}_histogram", pd.DataFrame({"bin": range(len(counts)), "count": counts}))

    def log_images(self, images: dict[str, Path]) -> None:
        """Figures already written to the job directory; only mirrored by trackers."""

    def finish(self) -> None:
        pass


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a sweep's runs: the last two parts of its folder (e.g. ``demo/multirun``)."""
    return "/".join(Path(sweep_dir).parts[-2:])


def _sweep_group() -> str | None:
    """The W&B group of a multirun job: its sweep folder (``sweep_group``), so a sweep's runs sit together."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:  # not inside a Hydra job
        return None
    if hc.mode is None or hc.mode.name != "MULTIRUN":
        return None
    return sweep_group(hc.sweep.dir)


class WandbLogger(RunLogger):
    """``logger=wandb``: also a W&B run (offline unless ``mode=online`` and credentials exist) in the sweep's group."""

    def __init__(self, out_dir: str | Path, name: str = "wandb", run_config: dict | None = None,
                 tags: list[str] | None = None,
                 job_type: str = "", project: str = "knexp", entity: str | None = None, mode: str = "offline",
                 group: str | None = None, dir: str | Path | None = None):
        super().__init__(out_dir)
        import wandb

        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
            log.warning("logger.mode=online but no W&B credentials (WANDB_API_KEY); logging offline instead")
            mode = "offline"
        kw = dict(project=project, entity=entity, group=group or _sweep_group(), dir=str(dir or out_dir),
                  config=run_config or {}, tags=list(tags or []), job_type=job_type, reinit="finish_previous")
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=10, silent=True), **kw)
        except Exception as exc:  # an unreachable server or a refused key must not cost the run
            if mode != "online":
                raise
            log.warning("W&B online init failed (%s); logging offline instead", exc)
            self.run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kw)

    def log_metrics(self, metrics: dict) -> None:
        super().log_metrics(metrics)
        self.run.summary.update(_flatten(metrics))

    def mirror_table(self, name: str, table: pd.DataFrame) -> None:
        import wandb

        self.run.log({name: wandb.Table(dataframe=table)})

    def log_histogram(self, name: str, counts: list[int]) -> Path:
        import numpy as np
        import wandb

        path = super().log_histogram(name, counts)
        if counts:
            bins = (np.asarray(counts), np.arange(len(counts) + 1))
            self.run.log({f"{name}_histogram": wandb.Histogram(np_histogram=bins)})
        return path

    def log_images(self, images: dict[str, Path]) -> None:
        import wandb

        if images:
            self.run.log({name: wandb.Image(str(path)) for name, path in images.items()})

    def finish(self) -> None:
        self.run.finish()


@dataclass
class FilesOnly:
    """``logger=none``: metrics.json and tables in the job directory only."""

    name: str = "none"

    def open(self, out_dir: str | Path, run_config: dict | None = None, tags: list[str] | None = None,
             job_type: str = "", group: str | None = None) -> RunLogger:
        return RunLogger(out_dir)


@dataclass
class Wandb(FilesOnly):
    """``logger=wandb``: the files, mirrored to a W&B run (``WandbLogger``); its settings are checked when built."""

    name: str = "wandb"
    project: str = "knexp"
    entity: str | None = None
    mode: str = "offline"
    group: str | None = None
    dir: str | None = None

    def __post_init__(self):
        check_fields(self, "logger", project=Text(), entity=Text(optional=True), mode=Choice(WANDB_MODES),
                     group=Text(optional=True), dir=Text(optional=True))

    def open(self, out_dir: str | Path, run_config: dict | None = None, tags: list[str] | None = None,
             job_type: str = "", group: str | None = None) -> RunLogger:
        """The run, in ``logger.group``, else ``group`` (a report: its sweep's), else its own sweep's group."""
        return WandbLogger(out_dir, self.name, run_config, tags, job_type, self.project, self.entity, self.mode,
                           self.group or group, self.dir)


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as "a/b" keys; a list of dicts (e.g. a size curve) as "a/0/b", "a/1/b", ..."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            v = {str(i): x for i, x in enumerate(v)}
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out
