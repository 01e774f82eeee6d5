"""``python run.py task=trace``: the causal trace of the image tokens and the model's live window.

Traces ``trace.per_object`` selected samples of each object in ``trace.objects`` (the tuning split by default;
``Session.trace``, ``knexp.identification.causal_trace``), each cached per model, data and sample, and writes
``trace.json`` (every sample's Δy_c and caption per patch kind and layer, and the live window) and ``figures/trace.png``
(per-object curves and their average), mirrored to W&B. Identification with ``layers: live`` reads the same cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from knexp.identification.causal_trace import span
from knexp.job.session import Session
from knexp.reporting.analysis import trace_png
from knexp.reporting.outputs import write_trace
from knexp.settings import Flag, check_fields


@dataclass
class TraceTask:
    """``conf/task/trace.yaml`` (the trace's own settings are the ``trace`` group)."""

    name: str = "trace"
    cache: bool = True

    def __post_init__(self):
        check_fields(self, "task", cache=Flag())

    def __call__(self, session: Session) -> dict:
        out = session.spec.output_dir
        trace = session.trace()  # every kind, with captions
        result = trace.to_dict()
        write_trace(out, result)
        window = trace.window
        figure = trace_png(trace.samples, window, out / "figures" / "trace.png",
                           f"causal trace of the image tokens: {trace.model}")
        logger = session.spec.logger()
        logger.log_images({"trace": figure})
        kept = ("neuron_layers", "resid_layers", "frac", "samples", "full_effect")
        logger.log_metrics({"trace": {k: window[k] for k in kept}})
        logger.finish()
        print(f"live window of {trace.model}: neuron layers {span(window['neuron_layers'])}; trace: "
              f"{out / 'trace.json'}")
        return result
