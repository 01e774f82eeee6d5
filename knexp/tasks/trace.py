"""``python run.py task=trace``: the causal trace of the image tokens and the model's live window.

Traces ``trace.per_object`` selected samples of each object in ``trace.objects`` (the tuning split by default;
``knexp.identification.trace``), each cached per model, data and sample, and writes ``trace.json`` (every
sample's Δy_c and caption per patch kind and layer, and the live window) and ``figures/trace.png`` (per-object
curves and their average), mirrored to W&B. Identification with ``layers: live`` calls ``live_window_for``,
which reads the same cache.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.catalog import Catalog
from knexp.data.coco import CocoScenes
from knexp.data.loading import load_dataset
from knexp.identification.passes import TargetNotFound, locate_target
from knexp.identification.trace import KINDS, SampleTrace, cached_trace, live_window, trace_sample
from knexp.io import atomic_write_text
from knexp.models import load_model, model_identity
from knexp.models.captioning import Captioner
from knexp.reporting.logger import make_logger
from knexp.store import Store
from knexp.tasks.select import make_captioner, run_selection

log = logging.getLogger(__name__)


def traced_samples(cfg: DictConfig, catalog: Catalog, adapter, data: CocoScenes, dataset_id: str, captioner: Captioner,
                   kinds: tuple[str, ...] = KINDS, captions: bool = True) -> list[SampleTrace]:
    """The trace (``kinds``, with or without captions) of ``trace.per_object`` selected samples of every object in
    ``trace.objects``, from the cache where it holds them."""
    cache_root = cfg.paths.cache_dir if cfg.task.get("cache", True) else None
    inpaint_cache, store = InpaintCache(cache_root), Store(cache_root, "trace")
    opts = InpaintOptions(**OmegaConf.to_container(cfg.inpaint, resolve=True))
    gen = cfg.model.generation
    traces = []
    for name in cfg.trace.objects:
        knowledge = catalog[name]
        selection = run_selection(cfg, catalog, captioner, data, dataset_id, knowledge.name, inpaint_cache)
        for cand in selection.accepted[: int(cfg.trace.per_object)]:
            try:
                target = locate_target(adapter, cand.original_caption, adapter.caption_prefix, knowledge)
            except TargetNotFound as exc:
                log.warning("trace: skipping image %d: %s", cand.image_id, exc)
                continue

            def compute(todo, with_captions, cand=cand, target=target, knowledge=knowledge) -> SampleTrace:
                image = data.load_image(cand.image_id)
                inst = next(i for i in data.instances(cand.image_id) if i.annotation_id == cand.annotation_id)
                edited = inpaint_cache.get(dataset_id, cand.image_id, cand.annotation_id, image, inst.bbox,
                                           data.instance_mask(cand.annotation_id), opts)
                log.info("trace: %s, image %d (%s x %d patched rows%s)", knowledge.name, cand.image_id, "/".join(todo),
                         adapter.num_layers, ", with captions" if with_captions else "")
                return trace_sample(adapter, image, edited, target, knowledge, cand.image_id, cand.annotation_id,
                                    gen.batch_size, gen.max_new_tokens, todo, with_captions)

            traces.append(cached_trace(store, [captioner.model_key, dataset_id, cand.image_id, cand.annotation_id, opts,
                                               cand.original_caption, gen.max_new_tokens],
                                       (knowledge.name, cand.image_id, cand.annotation_id), compute, kinds, captions))
    if not traces:
        raise ValueError(f"trace: no usable sample among trace.objects={list(cfg.trace.objects)}; add objects or images")
    return traces


def live_window_for(cfg: DictConfig, catalog: Catalog, adapter, data: CocoScenes, dataset_id: str,
                    captioner: Captioner) -> tuple[dict, list[SampleTrace]]:
    """The model's live window on this data (``live_window`` of the residual trace, without captions), and the traces."""
    traces = traced_samples(cfg, catalog, adapter, data, dataset_id, captioner, kinds=("resid",), captions=False)
    window = live_window(traces, float(cfg.trace.frac))
    log.info("live window: neuron layers %s (residual layers reaching %.0f%% of the counterfactual: %s)",
             _span(window["neuron_layers"]), 100 * window["frac"], _span(window["resid_layers"]))
    return window, traces


def write_trace(out: Path, model: str, window: dict, traces: list[SampleTrace]) -> dict:
    """``trace.json`` in ``out``: the live window and every traced sample (the report draws the figure from it)."""
    result = {"model": model, "window": window, "samples": [t.to_dict() for t in traces]}
    atomic_write_text(Path(out) / "trace.json", json.dumps(result, indent=1))
    return result


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers and layers == list(range(layers[0], layers[-1] + 1)) else str(layers)


def run(cfg: DictConfig) -> dict:
    from knexp.reporting.analysis import trace_png

    catalog = Catalog.load()
    data, dataset_id = load_dataset(cfg.data, catalog)
    adapter = load_model(cfg.model, cfg.paths.cache_dir)
    captioner = make_captioner(cfg, adapter, model_identity(cfg.model))
    out = Path(cfg.paths.output_dir)
    traces = traced_samples(cfg, catalog, adapter, data, dataset_id, captioner)  # every kind, with captions
    window = live_window(traces, float(cfg.trace.frac))
    result = write_trace(out, cfg.model.name, window, traces)
    figure = trace_png(traces, window, out / "figures" / "trace.png", f"causal trace of the image tokens: {cfg.model.name}")
    logger = make_logger(cfg)
    logger.log_images({"trace": figure})
    logger.log_metrics({"trace": {k: window[k] for k in ("neuron_layers", "resid_layers", "frac", "samples", "full_effect")}})
    logger.finish()
    print(f"live window of {cfg.model.name}: neuron layers {_span(window['neuron_layers'])}; trace: {out / 'trace.json'}")
    return result
