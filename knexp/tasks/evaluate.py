"""``python run.py task=evaluate knowledge=banana method=ours``: identification, then captions under an intervention.

1. Identify N_k on each selected sample of k (as ``task=identify``; statistics come from the shared cache).
2. Images: those of k (the identification images, then up to ``task.k_images`` others containing k) and
   ``task.other_images`` images of other knowledge, taken round-robin over supercategories, each scored on
   its own object. Orders are seeded.
3. For every neuron set, caption every image under the configured intervention (``knexp.evaluation.perturb``:
   the paper's noise at each level and draw, or the deterministic inpainted / zero / mean patch), plus one clean
   caption per image (the reference row) and, for the images of k, the caption of the image with k inpainted away
   (the counterfactual: no set of neurons can suppress more than it does).
   With ``task.sizes`` (a ladder such as [30, 100, 300]), the method's top-n set at every n is evaluated instead of
   its thresholded set (METHOD.md, "Size curves"; ``knexp.identification.pipeline.ranked_set``).
4. Table II scores (``knexp.evaluation.scores``), per size with a ladder, and, on the identification images,
   Table III metrics against the caption of the inpainted image (``knexp.evaluation.text_metrics``).
Writes ``metrics.json``, ``captions.csv``, ``selection.json``, the per-sample neuron sets (``samples/``), the
layer histogram and ``figures/`` to the job directory, and mirrors metrics, the caption table, the layer
histogram and the figures to W&B when ``logger=wandb``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.catalog import Catalog, Knowledge
from knexp.data.coco import CocoScenes
from knexp.data.loading import load_dataset
from knexp.evaluation.perturb import Intervention, cached_intervened_captions, counterfactual_values, set_values
from knexp.evaluation.scores import curve_area, curve_scores, suppression_scores
from knexp.evaluation.text_metrics import caption_metrics
from knexp.identification.pipeline import SampleResult, annotate, ranked_set
from knexp.identification.thresholds import RuleContext
from knexp.io import atomic_write_text
from knexp.models import load_model, model_identity
from knexp.reporting.logger import make_logger
from knexp.tasks.identify import identify_knowledge
from knexp.tasks.resume import finished, mark_finished
from knexp.tasks.select import make_captioner
from knexp.tasks.trace import write_trace

log = logging.getLogger(__name__)
EVAL_STREAM = 4


def evaluation_images(data: CocoScenes, catalog: Catalog, k: Knowledge, identification_ids: list[int], k_images: int,
                      other_images: int, seed: int) -> list[tuple[int, str, str]]:
    """(image id, group, own object) rows: group "k" (own object k) then group "other"."""
    rng = np.random.default_rng([seed, EVAL_STREAM, k.coco_id])
    with_k = [i for i in data.image_ids_with(k.coco_id) if i not in identification_ids]
    chosen = [(i, "k", k.name) for i in dict.fromkeys(identification_ids)]
    chosen += [(int(i), "k", k.name) for i in rng.permutation(with_k)[:k_images]]
    pools: dict[str, list[tuple[int, str]]] = {}
    for image_id in rng.permutation(data.image_ids).tolist():
        cats = data.category_ids(image_id)
        if k.coco_id in cats:
            continue
        own = sorted((catalog.by_coco_id(c) for c in cats if c in catalog.coco_ids), key=lambda x: x.coco_id)
        if own:
            pools.setdefault(own[0].supercategory, []).append((image_id, own[0].name))
    others, supercats = [], sorted(pools)
    while len(others) < other_images and any(pools.values()):
        for sc in supercats:
            if pools[sc] and len(others) < other_images:
                image_id, name = pools[sc].pop(0)
                others.append((image_id, "other", name))
    return chosen + others


def intervention_from(cfg: DictConfig) -> Intervention:
    """The configured intervention (``intervention`` group; noise takes its levels from ``noise_level``)."""
    if cfg.intervention.name != "noise":
        return Intervention(cfg.intervention.name)
    noise = cfg.noise_level
    return Intervention("noise", tuple(float(v) for v in noise.levels), int(noise.draws), bool(noise.per_neuron),
                        str(noise.get("scale", "absolute")))


def rule_label(rule: DictConfig) -> str:
    """The threshold rule as the report shows it: ``paper``, or e.g. ``budget(abs, live)`` (stage-1 score, layers; the
    stage-2 score too when it is not the paper's max) for an automatic rule."""
    if rule.name in ("paper", "fixed"):
        return rule.name
    second = "" if rule.get("stage2", "max") == "max" else f", {rule.stage2}"
    return f"{rule.name}({rule.get('stage1', 'raw')}{second}, {rule.get('layers', 'all')})"


def run(cfg: DictConfig) -> dict:
    t0 = time.time()
    out = Path(cfg.paths.output_dir)
    if (done := finished(cfg, out)) is not None:
        log.info("%s: finished before with this config; skipped (delete %s/done.json to rerun)", out, out)
        return done
    catalog = Catalog.load()
    k = catalog[cfg.knowledge.name]
    data, dataset_id = load_dataset(cfg.data, catalog)
    adapter = load_model(cfg.model, cfg.paths.cache_dir)
    captioner = make_captioner(cfg, adapter, model_identity(cfg.model))  # selection and clean captions
    store, model_key = captioner.store, captioner.model_key  # intervened captions go to the same store
    found = identify_knowledge(cfg, catalog, k, adapter, data, dataset_id, out, captioner)
    selection, results, context = found.selection, found.results, found.context
    ident_ids = [r.candidate.image_id for r in results]
    images_meta = evaluation_images(data, catalog, k, ident_ids, cfg.task.k_images, cfg.task.other_images, cfg.seed)
    images = [data.load_image(i) for i, _, _ in images_meta]
    keys = [i for i, _, _ in images_meta]
    how = intervention_from(cfg)
    gen = cfg.model.generation
    opts = InpaintOptions(**OmegaConf.to_container(cfg.inpaint, resolve=True))
    inpaint_cache = InpaintCache(cfg.paths.cache_dir if cfg.task.cache else None)
    k_index = [i for i, (_, group, _) in enumerate(images_meta) if group == "k"]
    k_removed = {i: inpaint_cache.without(data, dataset_id, keys[i], k.coco_id, opts) for i in k_index}
    frames = []
    clean = captioner(images, [[dataset_id, i] for i in keys])
    frames.append(pd.DataFrame({"set_id": -1, "size": 0, "level": 0.0, "draw": 0, "image_id": keys, "caption": clean}))
    counterfactual_caps = captioner([k_removed[i] for i in k_index], [[dataset_id, keys[i], "without", k.name, opts] for i in k_index])
    sizes = [int(n) for n in cfg.task.get("sizes") or []]
    ctx = RuleContext(k.name, context["window"]["neuron_layers"] if context["window"] else None, context["reference"])
    sets = []  # (set_id, size, NeuronSet): the thresholded set of each sample, or its top-n at every size
    for res in results:
        if sizes:
            sets += [(len(sets) + j, n, annotate(ranked_set(cfg.method, res.stats, cfg.thresholds, ctx, n, adapter.d_ff), res.stats))
                     for j, n in enumerate(sizes)]
        else:
            sets.append((len(sets), len(res.neurons), res.neurons))
    namespace = [model_key, dataset_id] + ([k.name, opts] if how.kind == "inpainted" else [])
    empty_sets = []
    rows = how.rows(keys)  # the same rows for every set
    cfs = (counterfactual_values(adapter, k_removed, [n for _, _, n in sets], gen.batch_size) if how.kind == "inpainted"
           else [None] * len(sets))
    for (set_id, _, neurons), cf in zip(sets, cfs, strict=True):
        if neurons.empty:
            empty_sets.append({"set_id": set_id, "note": neurons.note})
        caps = cached_intervened_captions(store, namespace, adapter, images, rows, neurons, how,
                                          set_values(how, neurons, context["reference"], cf), seed=cfg.seed,
                                          batch_size=gen.batch_size, max_new_tokens=gen.max_new_tokens)
        frames.append(pd.DataFrame({"set_id": set_id, "size": len(neurons), "level": [r.level for r in rows],
                                    "draw": [r.draw for r in rows], "image_id": [r.image_key for r in rows], "caption": caps}))
    table = pd.concat(frames, ignore_index=True)
    meta = pd.DataFrame(images_meta, columns=["image_id", "group", "own"]).drop_duplicates("image_id")
    table = table.merge(meta, on="image_id", how="left")
    table["hit"] = [int(catalog[o].mentioned_in(c)) for o, c in zip(table["own"], table["caption"], strict=True)]
    masked = {r.candidate.image_id: r.candidate.inpainted_caption for r in results}
    table["masked_caption"] = table["image_id"].map(masked)
    table["rung"] = table["set_id"].map({set_id: n for set_id, n, _ in sets})  # the ladder's n (or |N_k|)

    perturbed = table[table["set_id"] >= 0]
    metrics: dict = {"knowledge": k.name, "method": cfg.method.name, "variant": cfg.method.get("variant", ""),
                     "thresholds": rule_label(cfg.thresholds), "intervention": how.kind,
                     "noise_level": cfg.noise_level.name if how.kind == "noise" else "-", "model": cfg.model.name,
                     "sets": len(results), "empty_sets": empty_sets,
                     "images": {"k": int((meta["group"] == "k").sum()), "other": int((meta["group"] == "other").sum())},
                     "set_sizes": [len(r.neurons) for r in results], "selection": selection.message,
                     "rule": [r.rule for r in results][:1]}
    if context["window"]:
        metrics["live_window"] = context["window"]["neuron_layers"]
        write_trace(out, cfg.model.name, context["window"], context["traces"])  # the report draws the trace figure
    if how.kind == "noise" and how.scale == "calibrated":
        metrics["noise_unit"] = [round(float(v), 6) for v in context["reference"].layer_spread]  # s_l per layer
    clean_rows = table[table["set_id"] < 0]
    metrics["clean"] = {"S_k": float(clean_rows.loc[clean_rows.group == "k", "hit"].mean()),
                        "S_kbar": float(clean_rows.loc[clean_rows.group == "other", "hit"].mean())}
    metrics["counterfactual"] = {"S_k": float(np.mean([k.mentioned_in(c) for c in counterfactual_caps])) if k_index else None}
    metrics["table2"] = metrics["table3"] = None
    if sizes and len(perturbed):
        metrics["curve"] = curve_scores(perturbed, sizes)
        metrics["curve_area"] = curve_area(metrics["curve"])
    elif len(perturbed):
        metrics["table2"] = suppression_scores(perturbed)
        on_ident = perturbed[perturbed["masked_caption"].notna()]
        metrics["table3"] = caption_metrics(on_ident["caption"].tolist(), on_ident["masked_caption"].tolist(),
                                            cfg.task.get("bertscore_model"), int(cfg.task.bertscore_layers))
    else:
        log.warning("%s: no neuron sets to evaluate (%s)", k.name, selection.message)
    per_layer = np.sum([n.per_layer(adapter.num_layers) for _, _, n in sets], axis=0).tolist() if sets else []
    metrics["per_layer"] = per_layer
    metrics["neurons"] = figures(adapter, data, results, out, per_layer, f"{k.name} / {cfg.method.name}") if results and not sizes else []
    metrics["cache"] = {"captions_from_cache": store.hits, "captions_computed": store.misses}
    metrics["wall_time_s"] = round(time.time() - t0, 1)
    logger = make_logger(cfg)
    logger.log_table("captions", table)
    if metrics.get("curve"):
        logger.log_table("curve", pd.DataFrame(metrics["curve"]))
    logger.log_histogram("layers", per_layer)
    logger.log_images({p.stem: p for p in sorted((out / "figures").glob("*.png"))})
    logger.log_metrics(metrics)
    logger.finish()
    mark_finished(cfg, out, metrics)
    t2 = metrics["table2"] or {}
    print(json.dumps({"output_dir": str(out), "knowledge": k.name, "method": cfg.method.name, "sets": len(results),
                      **{s: t2.get(s) for s in ("S_se", "S_re", "S_mean")},
                      **({"curve_area": metrics["curve_area"]} if sizes else {})}, indent=1))
    return metrics


def figures(adapter, data: CocoScenes, results: list[SampleResult], out: Path, per_layer: list[int], title: str) -> list[dict]:
    """Fig. 2 (layer histogram), Fig. 3 (top neuron of each set over its image, with the 0.95-quantile mask's
    IoU against the instance mask) and the decoded top-10 tokens of each set's five best neurons."""
    import cv2
    import torch

    from knexp.models.hooks import record
    from knexp.reporting.analysis import decode_neuron, layer_histogram_png, mask_iou, overlay, token_heatmap

    fig_dir = out / "figures"
    layer_histogram_png({title.split(" / ")[1]: per_layer}, fig_dir / "layers.png", title)
    rows = []
    for res in results:
        if res.neurons.empty:
            continue
        cand = res.candidate
        image = data.load_image(cand.image_id)
        layer, unit = int(res.neurons.layers[0]), int(res.neurons.units[0])
        prepared = adapter.prepare([image])
        with torch.no_grad(), record(adapter, prepared, layers=[layer]) as rec:
            adapter.forward(prepared)
        heat = token_heatmap(rec.activations[layer][0, :, unit].numpy(), adapter.geometry, *image.shape[:2])
        iou = mask_iou(heat, data.instance_mask(cand.annotation_id))
        name = f"heatmap_{cand.image_id}_L{layer}_U{unit}.png"
        fig_dir.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(fig_dir / name), cv2.cvtColor(overlay(image, heat), cv2.COLOR_RGB2BGR))
        decoded = [{"layer": int(lay), "unit": int(u), "tokens": decode_neuron(adapter, int(lay), int(u))}
                   for lay, u in zip(res.neurons.layers[:5], res.neurons.units[:5], strict=True)]
        rows.append({"image_id": cand.image_id, "top_neuron": [layer, unit], "heatmap": name, "iou_q95": iou, "decoded": decoded})
    atomic_write_text(out / "neurons.json", json.dumps(rows, indent=1))
    return [{k: r[k] for k in ("image_id", "top_neuron", "iou_q95")} for r in rows]
