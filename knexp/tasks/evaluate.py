"""``python run.py task=evaluate knowledge=banana method=ours``: identification, then captions under noise.

1. Identify N_k on each selected sample of k (as ``task=identify``; statistics come from the shared cache).
2. Images: those of k (the identification images, then up to ``task.k_images`` others containing k) and
   ``task.other_images`` images of other knowledge, taken round-robin over supercategories, each scored on
   its own object. Orders are seeded.
3. For every neuron set, noise level and draw, caption every image with noise on the set
   (``knexp.evaluation.perturb``), plus one clean caption per image (level 0, the reference row).
4. Table II scores (``knexp.evaluation.scores``) and, on the identification images, Table III metrics against
   the caption of the inpainted image (``knexp.evaluation.text_metrics``).
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
from omegaconf import DictConfig

from knexp.data.catalog import Catalog, Knowledge
from knexp.data.coco import CocoScenes
from knexp.data.loading import load_dataset
from knexp.evaluation.perturb import cached_perturbed_captions, rows_for
from knexp.evaluation.scores import suppression_scores
from knexp.evaluation.text_metrics import caption_metrics
from knexp.identification.pipeline import SampleResult
from knexp.io import atomic_write_text
from knexp.models import load_model, model_identity
from knexp.reporting.logger import make_logger
from knexp.tasks.identify import identify_knowledge
from knexp.tasks.resume import finished, mark_finished
from knexp.tasks.select import make_captioner

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
    store, model_key = captioner.store, captioner.model_key  # perturbed captions go to the same store
    found = identify_knowledge(cfg, catalog, k, adapter, data, dataset_id, out, captioner)
    selection, results = found.selection, found.results
    ident_ids = [r.candidate.image_id for r in results]
    images_meta = evaluation_images(data, catalog, k, ident_ids, cfg.task.k_images, cfg.task.other_images, cfg.seed)
    images = [data.load_image(i) for i, _, _ in images_meta]
    keys = [i for i, _, _ in images_meta]
    noise = cfg.noise_level
    gen = cfg.model.generation
    frames = []
    clean = captioner(images, [[dataset_id, i] for i in keys])
    frames.append(pd.DataFrame({"set_id": -1, "level": 0.0, "draw": 0, "image_id": keys, "caption": clean}))
    empty_sets = []
    rows = rows_for(keys, list(noise.levels), int(noise.draws))  # the same rows for every set
    for set_id, res in enumerate(results):
        if res.neurons.empty:
            empty_sets.append({"set_id": set_id, "image_id": res.candidate.image_id, "note": res.neurons.note})
        caps = cached_perturbed_captions(store, [model_key, dataset_id], adapter, images, rows, res.neurons, seed=cfg.seed,
                                         per_neuron=bool(noise.per_neuron), batch_size=gen.batch_size,
                                         max_new_tokens=gen.max_new_tokens, relative=bool(noise.relative))
        frames.append(pd.DataFrame({"set_id": set_id, "level": [r.level for r in rows], "draw": [r.draw for r in rows],
                                    "image_id": [r.image_key for r in rows], "caption": caps}))
    table = pd.concat(frames, ignore_index=True)
    meta = pd.DataFrame(images_meta, columns=["image_id", "group", "own"]).drop_duplicates("image_id")
    table = table.merge(meta, on="image_id", how="left")
    table["hit"] = [int(catalog[o].mentioned_in(c)) for o, c in zip(table["own"], table["caption"], strict=True)]
    masked = {r.candidate.image_id: r.candidate.inpainted_caption for r in results}
    table["masked_caption"] = table["image_id"].map(masked)

    perturbed = table[table["set_id"] >= 0]
    metrics: dict = {"knowledge": k.name, "method": cfg.method.name, "variant": cfg.method.get("variant", ""),
                     "thresholds": cfg.thresholds.name, "noise_level": noise.name, "model": cfg.model.name, "sets": len(results),
                     "empty_sets": empty_sets,
                     "images": {"k": int((meta["group"] == "k").sum()), "other": int((meta["group"] == "other").sum())},
                     "set_sizes": [len(r.neurons) for r in results], "selection": selection.message}
    clean_rows = table[table["set_id"] < 0]
    metrics["clean"] = {"S_k": float(clean_rows.loc[clean_rows.group == "k", "hit"].mean()),
                        "S_kbar": float(clean_rows.loc[clean_rows.group == "other", "hit"].mean())}
    if len(perturbed):
        metrics["table2"] = suppression_scores(perturbed)
        on_ident = perturbed[perturbed["masked_caption"].notna()]
        metrics["table3"] = caption_metrics(on_ident["caption"].tolist(), on_ident["masked_caption"].tolist(),
                                            cfg.task.get("bertscore_model"), int(cfg.task.bertscore_layers))
    else:
        metrics["table2"] = metrics["table3"] = None
        log.warning("%s: no neuron sets to evaluate (%s)", k.name, selection.message)
    per_layer = np.sum([r.neurons.per_layer(adapter.num_layers) for r in results], axis=0).tolist() if results else []
    metrics["per_layer"] = per_layer
    metrics["neurons"] = figures(adapter, data, results, out, per_layer, f"{k.name} / {cfg.method.name}") if results else []
    metrics["cache"] = {"captions_from_cache": store.hits, "captions_computed": store.misses}
    metrics["wall_time_s"] = round(time.time() - t0, 1)
    logger = make_logger(cfg)
    logger.log_table("captions", table)
    logger.log_histogram("layers", per_layer)
    logger.log_images({p.stem: p for p in sorted((out / "figures").glob("*.png"))})
    logger.log_metrics(metrics)
    logger.finish()
    mark_finished(cfg, out, metrics)
    t2 = metrics["table2"] or {}
    print(json.dumps({"output_dir": str(out), "knowledge": k.name, "method": cfg.method.name, "sets": len(results),
                      **{s: t2.get(s) for s in ("S_se", "S_re", "S_mean")}}, indent=1))
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
