"""``python run.py task=select knowledge=banana`` (or ``task.all_knowledge=true``): choose samples only.

Writes ``selection.json`` per knowledge into the job directory (``selection_<name>.json`` with
``all_knowledge``): accepted candidates with their captions, rejected ones with their reasons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from knexp.io import atomic_write_text
from knexp.job.session import Session
from knexp.settings import Flag, check_fields


@dataclass
class SelectTask:
    """``conf/task/select.yaml``."""

    name: str = "select"
    all_knowledge: bool = False
    cache: bool = True

    def __post_init__(self):
        check_fields(self, "task", all_knowledge=Flag(), cache=Flag())

    def __call__(self, session: Session) -> dict:
        names = session.catalog.names if self.all_knowledge else [session.knowledge.name]
        out = session.spec.output_dir
        summary = {}
        for name in names:
            sel = session.select(name)
            file = "selection.json" if len(names) == 1 else f"selection_{name.replace(' ', '_')}.json"
            atomic_write_text(out / file, json.dumps(sel.to_dict(), indent=1))
            summary[name] = {"accepted": len(sel.accepted), "rejected": len(sel.rejected), "message": sel.message}
        atomic_write_text(out / "select.json", json.dumps(summary, indent=1))
        print(f"selection results: {out}")
        return summary
