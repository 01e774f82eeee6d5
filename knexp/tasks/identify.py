"""``python run.py task=identify knowledge=banana method=ours``: find knowledge neurons on selected samples.

Reads the session, runs selection and identification (``Session.identify``; each sample's statistics are computed once,
cached on disk and shared by every method) and writes into the job directory, atomically: ``selection.json`` (accepted
and rejected candidates with reasons, skipped samples with theirs), ``samples/<image>_<annotation>.json`` (neuron set
with scores, captions, target, thresholds, counts per layer) and ``identify.json`` (the summary); prints where they
went.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from knexp.io import atomic_write_text
from knexp.job.session import Session
from knexp.reporting.outputs import write_data_faults, write_identification
from knexp.settings import Flag, check_fields

log = logging.getLogger(__name__)


@dataclass
class IdentifyTask:
    """``conf/task/identify.yaml``."""

    name: str = "identify"
    cache: bool = True

    def __post_init__(self):
        check_fields(self, "task", cache=Flag())

    def __call__(self, session: Session) -> dict:
        spec, resources = session.spec, session.resources
        out, adapter = spec.output_dir, resources.adapter
        found = session.identify()
        write_identification(out, found, adapter.num_layers)
        stats = resources.stats_cache
        summary = {
            **{k: v for k, v in spec.labels().items() if k in ("knowledge", "method", "variant", "model")},
            "thresholds": spec.rule.name, "status": found.status(), "samples": len(found.results),
            "requested": resources.selector.per_knowledge,
            "selection": found.selection.message, "skipped": found.skipped,
            "sizes": [len(r.neurons) for r in found.results],
            "per_layer": found.per_layer(adapter.num_layers), "passes_computed": stats.computed,
            "stats_from_disk": stats.loaded,
            "data_faults": write_data_faults(out, resources.data.audit), "output_dir": str(out),
        }
        atomic_write_text(out / "identify.json", json.dumps(summary, indent=1))
        logger = spec.logger()
        logger.log_metrics({"status": summary["status"],
                            "identify": {k: summary[k] for k in ("samples", "sizes", "per_layer", "passes_computed")}})
        logger.finish()
        print(f"identification results: {out} ({len(found.results)} samples; {out / 'identify.json'})")
        if summary["status"]["state"] != "ok":
            log.warning("%s: no usable sample (identify.json status): %s", found.knowledge,
                        "; ".join(summary["status"]["reasons"]))
        return summary
