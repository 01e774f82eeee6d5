"""``python run.py task=report sweep_dir=runs/evaluate/multiruns/<date>``: the paper's tables for a sweep."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from knexp.reporting.report import write_report


def run(cfg: DictConfig) -> dict:
    if not cfg.get("sweep_dir"):
        raise ValueError("task=report needs sweep_dir=<a multirun folder of task=evaluate jobs>, e.g. "
                         "sweep_dir=runs/evaluate/multiruns/2026-01-01_12-00-00")
    splits = OmegaConf.to_container(cfg.splits, resolve=True) if cfg.get("splits") else None
    path = write_report(cfg.sweep_dir, Path(cfg.paths.output_dir), splits)
    print(f"report: {path} (tables and figures beside it)")
    return {"report": str(path)}
