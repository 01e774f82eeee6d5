"""The evaluation of one knowledge's neuron sets (docs/method.md, "Evaluation: captions under noise"): images, captions
under the intervention, and their scores.

1. Images (``evaluation_images``): those of k (the identification images, then up to ``k_images`` others containing k)
   and ``other_images`` images of other knowledge, taken round-robin over supercategories, each scored on its own
   object. Orders are seeded.
2. For every neuron set, caption every image under the intervention (``knexp.evaluation.perturb``: the paper's noise at
   each level and draw, or the deterministic inpainted / zero / mean patch), plus one clean caption per image (the
   reference row, ``set_id`` -1) and, for the images of k, the caption of the image with k inpainted away (the
   counterfactual: no set of neurons can suppress more than it does). With a size ladder (``sizes``, e.g. [30, 100,
   300]), the method's top-n set at every n is evaluated instead of its thresholded set (docs/method.md, "Size curves").
3. Table II scores (``knexp.evaluation.scores``), per size with a ladder, and, on the identification images, Table III
   metrics against the caption of the inpainted image (``knexp.evaluation.text_metrics``).
Everything arrives as plain objects; ``evaluate_knowledge`` returns the caption table and the scores, and writes
nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from itertools import islice

import numpy as np
import pandas as pd

from knexp.data.catalog import Catalog, Knowledge
from knexp.data.coco import CocoScenes
from knexp.evaluation.interventions import Intervention
from knexp.evaluation.perturb import cached_intervened_captions, counterfactual_values, set_values
from knexp.evaluation.scores import curve_area, curve_scores, suppression_scores
from knexp.evaluation.text_metrics import caption_metrics
from knexp.identification.methods import NeuronSet
from knexp.identification.pipeline import Identification, annotate
from knexp.identification.reference import ReferenceStats
from knexp.identification.selection import Selector
from knexp.identification.thresholds import Rule

log = logging.getLogger(__name__)
EVAL_STREAM = 4
GENERAL_STREAM = 5  # the general-ability guard's images (general_images)


def evaluation_images(data: CocoScenes, catalog: Catalog, k: Knowledge, identification_ids: list[int], k_images: int,
                      other_images: int, seed: int, skipped: list[dict] | None = None) -> list[tuple[int, str, str]]:
    """(image id, group, own object) rows: group "k" (own object k) then group "other". An image that cannot be used
    (``CocoScenes.image_problem``) is passed over for the next in the seeded order and appended to ``skipped`` with the
    reason."""
    rng = np.random.default_rng([seed, EVAL_STREAM, k.coco_id])

    def usable(image_id: int) -> bool:
        if why := data.image_problem(image_id):
            if skipped is not None:
                skipped.append({"image_id": int(image_id), "reason": why})
            return False
        return True

    with_k = [i for i in data.image_ids_with(k.coco_id) if i not in identification_ids]
    chosen = [(i, "k", k.name) for i in dict.fromkeys(identification_ids)]
    chosen += [(int(i), "k", k.name) for i in islice(filter(usable, rng.permutation(with_k).tolist()), k_images)]
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
                if usable(image_id):
                    others.append((image_id, "other", name))
    return chosen + others


def general_images(data: CocoScenes, avoid: list[Knowledge], count: int, exclude: set[int], seed: int) -> list[int]:
    """The general-ability guard's images (``knexp.evaluation.edit_measures``): the first ``count`` usable images, in
    one seeded order that does not depend on the edited object, that show none of ``avoid`` and are not in
    ``exclude``; the same images for every object that none of them shows."""
    rng = np.random.default_rng([seed, GENERAL_STREAM])
    avoided = {k.coco_id for k in avoid}
    chosen = []
    for image_id in rng.permutation(data.image_ids).tolist():
        if len(chosen) == count:
            break
        if image_id in exclude or avoided & set(data.category_ids(image_id)) or data.image_problem(image_id):
            continue
        chosen.append(int(image_id))
    return chosen


@dataclass
class Evaluation:
    """One knowledge's evaluation: every caption (``table``: set_id, size, level, draw, image_id, caption, group, own,
    hit, masked_caption, rung), the evaluated sets as (set_id, rung n or |N_k|, NeuronSet), and the scores."""

    table: pd.DataFrame
    sets: list[tuple[int, int, NeuronSet]]
    scores: dict

    def per_layer(self, num_layers: int) -> list[int]:
        """Evaluated neurons per layer over every set (L zeros when there is none)."""
        return np.sum([n.per_layer(num_layers) for _, _, n in self.sets],
                      axis=0).tolist() if self.sets else [0] * num_layers


def neuron_sets(found: Identification, rule: Rule, sizes: list[int]) -> list[tuple[int, int, NeuronSet]]:
    """(set_id, size, set): the thresholded set of each sample, or with ``sizes`` its top-n at every n."""
    sets = []
    for res in found.results:
        if sizes:
            sets += [(len(sets) + j, n,
                      annotate(found.method.ranked(res.stats, rule, found.context, n, res.stats.shape[1]), res.stats))
                     for j, n in enumerate(sizes)]
        else:
            sets.append((len(sets), len(res.neurons), res.neurons))
    return sets


def evaluate_knowledge(found: Identification, selector: Selector, rule: Rule, intervention: Intervention,
                       reference: ReferenceStats | None, k_images: int, other_images: int, seed: int,
                       sizes: list[int] | None = None, bertscore_model: str | None = None,
                       bertscore_layers: int = 6) -> Evaluation:
    """Caption the evaluation images under ``intervention`` on each of ``found``'s sets and score them (module
    docstring)."""
    data, catalog, captioner = selector.data, selector.catalog, selector.captioner
    dataset_id, opts = selector.dataset_id, selector.opts
    k = catalog[found.knowledge]
    skipped: list[dict] = []
    images_meta = evaluation_images(data, catalog, k, [r.candidate.image_id for r in found.results], k_images,
                                    other_images, seed, skipped)
    images = [data.load_image(i) for i, _, _ in images_meta]
    keys = [i for i, _, _ in images_meta]
    k_index = [i for i, (_, group, _) in enumerate(images_meta) if group == "k"]
    k_removed = {i: selector.inpaint_cache.without(data, dataset_id, keys[i], k.coco_id, opts) for i in k_index}
    clean = captioner(images, [[dataset_id, i] for i in keys])
    frames = [pd.DataFrame({"set_id": -1, "size": 0, "level": 0.0, "draw": 0, "image_id": keys, "caption": clean})]
    counterfactual_caps = captioner([k_removed[i] for i in k_index],
                                    [[dataset_id, keys[i], "without", k.name, opts] for i in k_index])
    sizes = [int(n) for n in sizes or []]
    sets = neuron_sets(found, rule, sizes)
    began = time.perf_counter()
    more, empty_sets = _intervened(selector, k, sets, intervention, reference, images, keys, k_removed, seed)
    perturbed_s = time.perf_counter() - began  # the intervened captions, computed or from the cache
    table, meta = _annotated(pd.concat(frames + more, ignore_index=True), images_meta, catalog, found, sets)
    clean_rows = table[table["set_id"] < 0]
    scores: dict = {
        "sets": len(found.results), "empty_sets": empty_sets,
        "images": {"k": int((meta["group"] == "k").sum()), "other": int((meta["group"] == "other").sum())},
        "set_sizes": [len(r.neurons) for r in found.results],
        "skipped_images": skipped,  # evaluation images passed over, with the reason
        "clean": {"S_k": float(clean_rows.loc[clean_rows.group == "k", "hit"].mean()),
                  "S_kbar": float(clean_rows.loc[clean_rows.group == "other", "hit"].mean())},
        "counterfactual": {"S_k": float(np.mean([k.mentioned_in(c) for c in counterfactual_caps])) if k_index
                           else None},
        "table2": None, "table3": None,
    }
    perturbed = table[table["set_id"] >= 0]
    scores["timing"] = {"perturbed_captions": int(len(perturbed)), "perturbed_captions_s": round(perturbed_s, 1)}
    scores.update(_scored(perturbed, sizes, k, found, bertscore_model, bertscore_layers))
    return Evaluation(table, sets, scores)


def _intervened(selector: Selector, k: Knowledge, sets: list[tuple[int, int, NeuronSet]], intervention: Intervention,
                reference, images: list, keys: list[int], k_removed: dict, seed: int) -> tuple[list, list[dict]]:
    """(a caption frame per set: every image's rows under ``intervention`` on the set, the sets that were empty)."""
    captioner = selector.captioner
    adapter, store = captioner.adapter, captioner.store
    namespace = [captioner.model_key, selector.dataset_id]
    namespace += [k.name, selector.opts] if intervention.uses_counterfactual else []
    rows = intervention.rows(keys)  # the same rows for every set
    cfs = (counterfactual_values(adapter, k_removed, [n for _, _, n in sets], captioner.batch_size)
           if intervention.uses_counterfactual else [None] * len(sets))
    frames, empty_sets = [], []
    for (set_id, _, neurons), cf in zip(sets, cfs, strict=True):
        log.info("%s: captions with set %d/%d intervened (%d neurons, %s, %d rows)", k.name, set_id + 1, len(sets),
                 len(neurons), type(intervention).__name__, len(rows))
        if neurons.empty:
            empty_sets.append({"set_id": set_id, "note": neurons.note})
        caps = cached_intervened_captions(store, namespace, adapter, images, rows, neurons, intervention,
                                          set_values(intervention, neurons, reference, cf), seed=seed,
                                          batch_size=captioner.batch_size, max_new_tokens=captioner.max_new_tokens,
                                          width=captioner.decode_width)
        frames.append(pd.DataFrame({"set_id": set_id, "size": len(neurons), "level": [r.level for r in rows],
                                    "draw": [r.draw for r in rows], "image_id": [r.image_key for r in rows],
                                    "caption": caps}))
    return frames, empty_sets


def _annotated(table: pd.DataFrame, images_meta: list, catalog: Catalog, found: Identification,
               sets: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the caption table with each image's group and own object, whether the caption names it, the masked caption of
    an identification image, and the ladder's n (or |N_k|) of each set; the images' groups)."""
    meta = pd.DataFrame(images_meta, columns=["image_id", "group", "own"]).drop_duplicates("image_id")
    table = table.merge(meta, on="image_id", how="left")
    table["hit"] = [int(catalog[o].mentioned_in(c)) for o, c in zip(table["own"], table["caption"], strict=True)]
    masked = {r.candidate.image_id: r.candidate.inpainted_caption for r in found.results}
    table["masked_caption"] = table["image_id"].map(masked)
    table["rung"] = table["set_id"].map({set_id: n for set_id, n, _ in sets})
    return table, meta


def _scored(perturbed: pd.DataFrame, sizes: list[int], k: Knowledge, found: Identification, bertscore_model: str | None,
            bertscore_layers: int) -> dict:
    """Table II and III of the perturbed captions, or with a size ladder the curve and its area."""
    if sizes and len(perturbed):
        curve = curve_scores(perturbed, sizes)
        return {"curve": curve, "curve_area": curve_area(curve)}
    if not len(perturbed):
        log.warning("%s: no neuron sets to evaluate (%s)", k.name, found.selection.message)
        return {}
    on_ident = perturbed[perturbed["masked_caption"].notna()]
    table2 = suppression_scores(perturbed)
    log.info("%s: scoring %d perturbed captions (S_se, S_re) and %d against the masked captions (BLEU, ROUGE, "
             "BERTScore)", k.name, len(perturbed), len(on_ident))
    table3 = caption_metrics(on_ident["caption"].tolist(), on_ident["masked_caption"].tolist(), bertscore_model,
                             int(bertscore_layers))
    return {"table2": table2, "table3": table3}
