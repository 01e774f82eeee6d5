"""The files a job leaves in its folder, written atomically: selection, per-sample neuron sets, the trace.

``selection.json``: accepted and rejected candidates with reasons (and the skipped samples);
``samples/<image>_<annotation>.json``: one sample's neuron set with scores, captions, target, thresholds and counts per
layer; ``trace.json``: the live window and every traced sample (the report draws the trace figure from it);
``data_faults.json``: every faulty dataset entry and image the job met, by kind, with what was done with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from knexp.data.validation import Audit
from knexp.identification.pipeline import Identification
from knexp.io import atomic_write_text


def write_identification(out: str | Path, found: Identification, num_layers: int) -> None:
    """``selection.json`` and ``samples/*.json`` of one knowledge's identification."""
    out = Path(out)
    atomic_write_text(out / "selection.json",
                      json.dumps({**found.selection.to_dict(), "skipped": found.skipped}, indent=1))
    for res in found.results:
        cand = res.candidate
        atomic_write_text(out / "samples" / f"{cand.image_id}_{cand.annotation_id}.json",
                          json.dumps(res.to_dict(num_layers), indent=1))


def write_trace(out: str | Path, trace: dict) -> Path:
    """``trace.json``: ``{"model", "window", "samples"}`` (``knexp.job.Trace.to_dict``)."""
    return atomic_write_text(Path(out) / "trace.json", json.dumps(trace, indent=1))


def write_data_faults(out: str | Path, audit: Audit) -> dict:
    """``data_faults.json`` (every fault the job's data met: the annotation files' and the images read so far); returns
    the counts by kind."""
    atomic_write_text(Path(out) / "data_faults.json",
                      json.dumps({"summary": audit.summary(), **audit.to_dict()}, indent=1))
    return audit.counts
