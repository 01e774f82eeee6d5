"""``python run.py task=identify knowledge=banana method=ours``: find knowledge neurons on selected samples.

For the configured knowledge: select samples (``knexp.identification.selection``), then for each one
compute its statistics once (cached on disk, shared by every method), apply the threshold rule and the
method. Writes into the job directory, atomically: ``selection.json`` (accepted and rejected candidates with
reasons), ``samples/<image>_<annotation>.json`` (neuron set with scores, captions, target, thresholds,
counts per layer) and ``identify.json`` (the summary); prints where they went.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.catalog import Catalog, Knowledge
from knexp.data.coco import CocoScenes
from knexp.data.loading import load_dataset
from knexp.identification.cache import StatsCache
from knexp.identification.passes import TargetNotFound
from knexp.identification.pipeline import SampleResult, identify_sample
from knexp.identification.reference import ReferenceCache, ReferenceStats, compute_reference
from knexp.identification.selection import Selection
from knexp.identification.thresholds import RuleContext
from knexp.io import atomic_write_text
from knexp.models import load_model, model_identity
from knexp.models.captioning import Captioner
from knexp.reporting.logger import make_logger
from knexp.tasks.select import make_captioner, run_selection
from knexp.tasks.trace import live_window_for

log = logging.getLogger(__name__)


@dataclass
class Identification:
    """What identifying one knowledge produced; ``results`` keeps the samples that gave a neuron set."""

    selection: Selection
    results: list[SampleResult]
    skipped: list[dict]
    stats_cache: StatsCache
    context: dict  # model_context's result (empty values when no sample was selected)


def reference_for(cfg: DictConfig, catalog: Catalog, adapter, data: CocoScenes, dataset_id: str, model_key: str) -> ReferenceStats:
    """The model's reference statistics on this data (``knexp.identification.reference``), cached."""
    cache_root = cfg.paths.cache_dir if cfg.task.get("cache", True) else None
    opts = InpaintOptions(**OmegaConf.to_container(cfg.inpaint, resolve=True))
    ref = cfg.reference
    return ReferenceCache(cache_root).get(
        [model_key, dataset_id, opts, int(ref.images), int(ref.removals), int(ref.seed)],
        lambda: compute_reference(adapter, data, dataset_id, catalog, opts, InpaintCache(cache_root), int(ref.images),
                                  int(ref.removals), int(ref.seed), cfg.model.generation.batch_size))


def needs(cfg: DictConfig) -> dict[str, bool]:
    """Which model-level context the configured rule, method and intervention use."""
    rule, method = cfg.thresholds, cfg.method
    automatic = rule.name not in ("paper", "fixed")
    live = (automatic and rule.get("layers") == "live") or (method.name == "attribution" and method.get("layers") == "live")
    reference = (automatic and rule.get("stage1") in ("spread", "contrastive")) or cfg.intervention.name == "mean" or (
        cfg.intervention.name == "noise" and cfg.noise_level.get("scale") == "calibrated")
    return {"live": bool(live), "reference": bool(reference)}


def model_context(cfg: DictConfig, catalog: Catalog, adapter, data: CocoScenes, dataset_id: str, captioner: Captioner) -> dict:
    """{"window": the live window, "traces": its traced samples, "reference": ReferenceStats}, each None unless
    ``needs`` asks for it."""
    need = needs(cfg)
    window, traces = live_window_for(cfg, catalog, adapter, data, dataset_id, captioner) if need["live"] else (None, None)
    reference = reference_for(cfg, catalog, adapter, data, dataset_id, captioner.model_key) if need["reference"] else None
    return {"window": window, "traces": traces, "reference": reference}


def identify_knowledge(cfg: DictConfig, catalog: Catalog, knowledge: Knowledge, adapter, data: CocoScenes, dataset_id: str,
                       out: Path, captioner: Captioner | None = None, context: dict | None = None) -> Identification:
    """Select samples of ``knowledge`` and identify neurons on each; writes selection.json and samples/*.json.
    ``captioner``: the job's (to share its store and model key with later steps); by default a new one.
    ``context``: ``model_context``'s result, computed here (once a sample is selected) when not given."""
    cache_root = cfg.paths.cache_dir if cfg.task.cache else None
    inpaint_cache, stats_cache = InpaintCache(cache_root), StatsCache(cache_root)
    opts = InpaintOptions(**OmegaConf.to_container(cfg.inpaint, resolve=True))
    captioner = captioner or make_captioner(cfg, adapter, model_identity(cfg.model))
    key = captioner.model_key
    selection = run_selection(cfg, catalog, captioner, data, dataset_id, knowledge.name, inpaint_cache)
    atomic_write_text(out / "selection.json", json.dumps(selection.to_dict(), indent=1))
    if context is None:
        context = (model_context(cfg, catalog, adapter, data, dataset_id, captioner) if selection.accepted
                   else {"window": None, "traces": None, "reference": None})
    window = context["window"]
    ctx = RuleContext(knowledge.name, window["neuron_layers"] if window else None, context["reference"])
    results, skipped = [], []
    for cand in selection.accepted:
        try:
            res = identify_sample(adapter, key, data, dataset_id, cand, knowledge, opts, inpaint_cache, stats_cache,
                                  cfg.thresholds, cfg.method, ctx)
        except (TargetNotFound, ValueError) as exc:
            skipped.append({"image_id": cand.image_id, "annotation_id": cand.annotation_id, "reason": str(exc)})
            log.warning("skipping image %d annotation %d: %s", cand.image_id, cand.annotation_id, exc)
            continue
        atomic_write_text(out / "samples" / f"{cand.image_id}_{cand.annotation_id}.json",
                          json.dumps(res.to_dict(adapter.num_layers), indent=1))
        results.append(res)
        note = f" ({res.neurons.note})" if res.neurons.note else ""
        log.info("image %d: %s found %d neurons%s", cand.image_id, cfg.method.name, len(res.neurons), note)
    return Identification(selection, results, skipped, stats_cache, context)


def run(cfg: DictConfig) -> dict:
    catalog = Catalog.load()
    knowledge = catalog[cfg.knowledge.name]
    data, dataset_id = load_dataset(cfg.data, catalog)
    adapter = load_model(cfg.model, cfg.paths.cache_dir)
    out = Path(cfg.paths.output_dir)
    found = identify_knowledge(cfg, catalog, knowledge, adapter, data, dataset_id, out)
    selection, stats_cache, skipped = found.selection, found.stats_cache, found.skipped
    results = [r.to_dict(adapter.num_layers) for r in found.results]
    per_layer = np.sum([r["per_layer"] for r in results], axis=0).tolist() if results else [0] * adapter.num_layers
    summary = {
        "knowledge": knowledge.name, "method": cfg.method.name, "variant": cfg.method.get("variant", ""), "thresholds": cfg.thresholds.name,
        "model": cfg.model.name, "samples": len(results), "requested": cfg.data.per_knowledge, "selection": selection.message,
        "skipped": skipped, "sizes": [r["neuron_set"]["size"] for r in results], "per_layer": per_layer,
        "passes_computed": stats_cache.computed, "stats_from_disk": stats_cache.loaded, "output_dir": str(out),
    }
    atomic_write_text(out / "identify.json", json.dumps(summary, indent=1))
    logger = make_logger(cfg)
    logger.log_metrics({"identify": {k: summary[k] for k in ("samples", "sizes", "per_layer", "passes_computed")}})
    logger.finish()
    print(f"identification results: {out} ({len(results)} samples; {out / 'identify.json'})")
    return summary
