"""``python run.py task=report sweep_dir=runs/evaluate/multiruns/<date>``: the paper's tables for a sweep.

Writes ``report.md`` and a self-contained ``report.html`` (tables and figures inline) with the CSV tables and PNG
figures beside them, and mirrors the figures (Fig. 2: every method's layer histogram side by side) and tables to W&B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from knexp.job.compose import sweep_tags
from knexp.job.session import Session
from knexp.reporting.logger import sweep_group
from knexp.reporting.sweep import write_report
from knexp.settings import Flag, SettingError, check_fields


@dataclass
class ReportTask:
    """``conf/task/report.yaml``; the sweep folder is the top-level ``sweep_dir``."""

    name: str = "report"
    cache: bool = True

    def __post_init__(self):
        check_fields(self, "task", cache=Flag())

    def check_session(self, session: Session) -> None:
        """``sweep_dir`` names a folder (checked when the job is built)."""
        where = session.spec.sweep_dir
        if not isinstance(where, str) or not Path(where).is_dir():
            raise SettingError("sweep_dir", where, "task=report needs a multirun folder of task=evaluate jobs, e.g. "
                               "sweep_dir=runs/evaluate/multiruns/2026-01-01_12-00-00")

    def __call__(self, session: Session) -> dict:
        spec = session.spec
        report = write_report(spec.sweep_dir, spec.output_dir, spec.splits or None)
        # the report's run sits in its sweep's W&B group and carries the sweep's tags, not the default config's
        logger = spec.logger(group=sweep_group(Path(spec.sweep_dir).resolve()), tags=sweep_tags(spec.sweep_dir))
        for name, table in report.tables.items():
            if len(table):
                logger.mirror_table(f"report_{name}", table.reset_index())  # its CSV is beside the report already
        logger.log_images({p.stem: p for p in report.figures})
        logger.finish()
        print(f"report: {report.markdown} and {report.html} (tables and figures beside them)")
        return {"report": str(report.markdown), "html": str(report.html)}
