"""``python run.py task=evaluate knowledge=banana method=ours``: identification, then captions under an intervention.

Reads the session, runs the stages (``Session.identify``; ``Session.evaluate``: ``knexp.evaluation.protocol``) and
writes the outputs: ``metrics.json`` (with Fig. 3, measured: ``knexp.evaluation.fig3``), ``captions.csv``,
``selection.json``, the per-sample neuron sets (``samples/``), the neuron panels and layer histogram (``figures/``,
``neurons.json``) and, with a live window, ``trace.json``;
metrics, the caption table, the layer histogram and the figures are mirrored to W&B when ``logger=wandb``. A job
folder that holds the finished result of the same config is not rerun (``knexp.resume``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import pandas as pd

from knexp.evaluation.fig3 import localize, summary
from knexp.job.session import Session
from knexp.reporting.figures import layer_figure, neuron_figures
from knexp.reporting.outputs import write_data_faults, write_identification, write_trace
from knexp.resume import finished, mark_finished
from knexp.settings import Flag, Integer, Many, Text, check_fields

log = logging.getLogger(__name__)


@dataclass
class EvaluateTask:
    """``conf/task/evaluate.yaml``: the images beside the identification images, BERTScore, caches, size ladder."""

    name: str = "evaluate"
    k_images: int = 6
    other_images: int = 9
    bertscore_model: str | None = None
    bertscore_layers: int = 6
    cache: bool = True
    sizes: list[int] | None = None

    def __post_init__(self):
        check_fields(self, "task", k_images=Integer(low=0), other_images=Integer(low=0),
                     bertscore_model=Text(optional=True),
                     bertscore_layers=Integer(low=1), cache=Flag(), sizes=Many(Integer(low=1), optional=True))

    def __call__(self, session: Session) -> dict:
        t0 = time.time()
        spec, resources = session.spec, session.resources
        out = spec.output_dir
        if (done := finished(spec.job_key, out)) is not None:
            return done
        found = session.identify()
        evaluation = session.evaluate(found, self.k_images, self.other_images, self.sizes, self.bertscore_model,
                                      self.bertscore_layers)
        adapter = resources.adapter
        status = found.status()
        metrics = {**spec.labels(), "status": status, **evaluation.scores, "selection": found.selection.message,
                   "skipped": found.skipped, "rule": [r.rule for r in found.results][:1],
                   "per_layer": evaluation.per_layer(adapter.num_layers)}
        write_identification(out, found, adapter.num_layers)
        if found.context and found.context.live_layers is not None:
            window = session.live_window()
            metrics["live_window"] = window.window["neuron_layers"]
            write_trace(out, window.to_dict())  # the report draws the trace figure
        if found.context and found.context.reference is not None and getattr(spec.intervention, "scale",
                                                                             None) == "calibrated":
            metrics["noise_unit"] = [round(float(v), 6) for v in found.context.reference.layer_spread]  # s_l per layer
        metrics["neurons"], metrics["localization"] = [], {}
        if found.results and not self.sizes:
            layer_figure(metrics["per_layer"], found.method.name, found.knowledge, out)
            metrics["neurons"] = neuron_figures(adapter, resources.selector, found.results, out,
                                                resources.heatmap_store)
            metrics["localization"] = self._localization(session, found, evaluation)
        metrics["data_faults"] = write_data_faults(out, resources.data.audit)
        metrics["cache"] = self._cache_counts(resources)
        metrics["wall_time_s"] = round(time.time() - t0, 1)
        self._log(spec.logger(), metrics, evaluation, out)
        mark_finished(spec.job_key, out, metrics)
        t2 = metrics["table2"] or {}
        print(json.dumps({"output_dir": str(out), "knowledge": found.knowledge, "method": found.method.name,
                          "sets": len(found.results), **{s: t2.get(s) for s in ("S_se", "S_re", "S_mean")},
                          **({"curve_area": metrics["curve_area"]} if self.sizes else {})}, indent=1))
        if status["state"] != "ok":
            log.warning("%s: no usable sample, so no scores (metrics.json status): %s", found.knowledge,
                        "; ".join(status["reasons"]))
        return metrics

    @staticmethod
    def _localization(session: Session, found, evaluation) -> dict:
        """Fig. 3, measured, for the job's method (``knexp.evaluation.fig3``): on its identification images and on the
        evaluation's other images of k, beside layer-matched random neurons and chance."""
        seen = {r.candidate.image_id for r in found.results}
        clean = evaluation.table[(evaluation.table["set_id"] < 0) & (evaluation.table["group"] == "k")]
        heldout = [int(i) for i in dict.fromkeys(clean["image_id"]) if int(i) not in seen]
        spec = session.spec
        return summary(localize(session.adapter, session.data, [found], spec.rule, heldout,
                                session.knowledge.coco_id, spec.seed))

    @staticmethod
    def _cache_counts(resources) -> dict:
        store = resources.captioner.store
        return {"captions_from_cache": store.hits, "captions_computed": store.misses,
                "heatmaps_computed": resources.heatmap_store.misses,
                "damaged_entries_rebuilt": resources.damaged_entries()}

    @staticmethod
    def _log(logger, metrics: dict, evaluation, out) -> None:
        """metrics.json and the job's tables, layer histogram and figures, mirrored to W&B with ``logger=wandb``."""
        logger.log_table("captions", evaluation.table)
        if metrics.get("curve"):
            logger.log_table("curve", pd.DataFrame(metrics["curve"]))
        logger.log_histogram("layers", metrics["per_layer"])
        logger.log_images({p.stem: p for p in sorted((out / "figures").glob("*.png"))})
        logger.log_metrics(metrics)
        logger.finish()
