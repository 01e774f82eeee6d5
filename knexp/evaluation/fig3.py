"""Fig. 3, measured (docs/method.md, "Fig. 3, measured"): does a neuron set's map over the image tokens point at the
object, and better than random neurons of the same layers?

For one object k and each identification method's result on it:

- **images**: the identification images, each with its own sample's set, and held-out images of k (never identified
  on), each with the consensus set of the samples (``knexp.editing.sets.object_set``, of the samples' mean set size).
  A method that ranks neurons by where the change peaks is favoured on its own images, hence the held-out ones.
- **the object's tokens**: ``PatchGeometry.object_tokens`` of the union of k's instance masks in the image (the
  tokens the edits take their keys at), over the finest view.
- **a neuron's map**: s_u O'^l[p, u] over the image tokens p of the *original* image (one pass records every layer
  the sets use), s_u = +1 where the neuron's mean change mean_p (O'_o - O'_i) on the identification image is >= 0,
  else -1 (the sign the heatmaps draw; averaged over the samples for a consensus set). Not the change itself: that
  peaks where the inpainting was done for any neuron, so it would localize by construction.
- **three maps per set**: ``top``, the top neuron's; ``top10``, each of the top 10 neurons' maps measured apart and
  the measures averaged; ``set``, sum_u w_u z(s_u O'[:, u]) (``localization.set_map``) with w the method's scores
  normalised to sum 1 for a ranking method's own sample set, uniform for thresholded sets (ours), consensus sets and
  random neurons.
- **the control**: the set's layer-matched random counterpart, rank by rank a random unit of the same layer outside
  the set (``layer_matched_units``), signed by its own change, measured on the same maps.

Every map is scored by ``localization.localization``; the chance of each image is that of a constant map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from knexp.data.coco import CocoScenes
from knexp.editing.sets import object_set
from knexp.evaluation.localization import MEASURES, chance, localization, set_map
from knexp.identification.methods import NeuronSet, layer_matched_units
from knexp.identification.pipeline import Identification
from knexp.identification.thresholds import Rule
from knexp.models.adapters.adapter import Adapter
from knexp.models.hooks.record import recorded

MAPS = ("top", "top10", "set")
TOP = 10  # the neurons the top10 map averages over
UNIFORM = ("ours", "random")  # thresholded or unranked sets: every neuron weighs the same in the set's map
FIG3_STREAM = 35  # the seed stream of the random counterparts


@dataclass
class Scored:
    """One set on one image: the set, each neuron's sign s_u, and the set's map weights."""

    neurons: NeuronSet
    signs: np.ndarray  # int [n], +1 or -1
    weights: np.ndarray  # float [n], summing to 1


def signs_of(shift: np.ndarray) -> np.ndarray:
    """int [n]: +1 where the mean change mean_p (O'_o - O'_i) = -``shift`` is >= 0, else -1 (``shift``: the
    ``shift_mean`` statistic, mean_p (O'_i - O'_o), of each neuron)."""
    return np.where(np.asarray(shift) <= 0, 1, -1)


def weights_of(neurons: NeuronSet, ranked: bool) -> np.ndarray:
    """float [n] summing to 1: the scores clipped at 0 and normalised where ``ranked`` (a ranking method's own sample
    set) and they sum above 0; uniform otherwise."""
    n = len(neurons)
    scores = np.clip(np.asarray(neurons.scores, np.float64), 0, None)
    if ranked and neurons.method not in UNIFORM and neurons.variant != "threshold" and scores.sum() > 0:
        return scores / scores.sum()
    return np.full(n, 1.0 / n) if n else np.zeros(0)


def counterpart(neurons: NeuronSet, d_ff: int, rng: np.random.Generator) -> NeuronSet:
    """Rank by rank, a random unit of the same layer that ``neurons`` does not hold (distinct within a layer)."""
    layers, draws = layer_matched_units(neurons, d_ff, rng, disjoint=True)
    units = neurons.units.copy()
    for layer, draw in zip(sorted(set(layers)), draws, strict=True):
        units[neurons.layers == layer] = draw
    return NeuronSet("random", f"matched:{neurons.method}", neurons.layers.copy(), units, np.zeros(len(units)))


def signed_maps(records: dict[int, np.ndarray], neurons: NeuronSet, signs: np.ndarray) -> np.ndarray:
    """float [n, P]: each neuron's signed map s_u O'^l[:, u], from ``records`` {layer: float [P, d_ff]}."""
    return np.stack([s * records[int(lay)][:, int(u)] for lay, u, s in zip(neurons.layers, neurons.units, signs,
                                                                             strict=True)])


def image_records(adapter: Adapter, image: np.ndarray, layers: list[int]) -> dict[int, np.ndarray]:
    """{layer: float [P, d_ff]}: O' at the image tokens of ``image``, one pass."""
    return {lay: o[0].numpy() for lay, o in recorded(adapter, adapter.prepare([image]), layers).items()}


def map_measures(records: dict[int, np.ndarray], scored: Scored, inside: np.ndarray, finest: np.ndarray) -> dict:
    """{map kind: {measure: value}} of one set on one image; ``records`` {layer: float [P, d_ff]} O' at the image's
    tokens, ``inside`` bool [P] the object's tokens, ``finest`` bool [P] the tokens of the finest view."""
    maps = signed_maps(records, scored.neurons, scored.signs)[:, finest]  # [n, P_finest]
    target = inside[finest]
    tops = [localization(m, target) for m in maps[:TOP]]
    return {"top": tops[0],
            "top10": {k: _mean([t[k] for t in tops]) for k in MEASURES},
            "set": localization(set_map(maps, scored.weights), target)}


def _at(stat, neurons: NeuronSet) -> np.ndarray:
    """float [n]: a [L, d_ff] statistic at the set's neurons."""
    return stat[torch.as_tensor(neurons.layers), torch.as_tensor(neurons.units)].numpy()


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def localize(adapter: Adapter, data: CocoScenes, founds: list[Identification], rule: Rule, heldout_ids: list[int],
             category_id: int, seed: int) -> pd.DataFrame:
    """One row per (image, method, neurons: the method's set or its random counterpart, map kind) with the three
    measures and the image's chance levels (``chance_<measure>``), for every identification result in ``founds`` (of
    one object, ``category_id``) on its identification images and on ``heldout_ids`` (module docstring). One pass per
    image records every layer any set uses."""
    d_ff = adapter.d_ff
    work: list[tuple[int, str, str, Scored]] = []  # (image id, images kind, method, set)
    for found in founds:
        rng = np.random.default_rng([seed, FIG3_STREAM, category_id])
        for res in found.results:
            if not res.neurons.empty:
                work.append((res.candidate.image_id, "identification", found.method.name,
                             Scored(res.neurons, signs_of(_at(res.stats.shift_mean, res.neurons)),
                                    weights_of(res.neurons, ranked=True))))
        sizes = [len(r.neurons) for r in found.results if not r.neurons.empty]
        consensus = object_set(found, rule, round(float(np.mean(sizes)))) if sizes else None
        if consensus is not None and not consensus.empty:
            shift = np.mean([_at(r.stats.shift_mean, consensus) for r in found.results], 0)
            held = Scored(consensus, signs_of(shift), weights_of(consensus, ranked=False))
            work += [(i, "held-out", found.method.name, held) for i in heldout_ids]
        for image_id, kind, method, scored in [w for w in work if w[2] == found.method.name]:
            control = counterpart(scored.neurons, d_ff, rng)
            shifts = [_at(r.stats.shift_mean, control) for r in found.results
                      if kind == "held-out" or r.candidate.image_id == image_id]
            work.append((image_id, kind, "random:" + method,
                         Scored(control, signs_of(np.mean(shifts, 0)), weights_of(control, False))))
    layers = sorted({int(lay) for *_, s in work for lay in s.neurons.layers})
    rows, finest = [], adapter.geometry.finest
    for image_id in dict.fromkeys(i for i, *_ in work):
        records = image_records(adapter, data.load_image(image_id), layers)
        inside = np.zeros(len(finest), bool)
        inside[adapter.geometry.object_tokens(data.object_mask(image_id, category_id))] = True
        base = {f"chance_{k}": v for k, v in chance(inside[finest]).items()}
        for i, kind, method, scored in work:
            if i != image_id:
                continue
            neurons = "random" if method.startswith("random:") else "method"
            for map_kind, measures in map_measures(records, scored, inside, finest).items():
                rows.append({"image_id": image_id, "images": kind, "method": method.removeprefix("random:"),
                             "neurons": neurons, "map": map_kind, "size": len(scored.neurons), **measures, **base})
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame) -> dict:
    """{method: {images kind: {map: {measure: mean over images, "random_<measure>": the counterparts' mean, "chance_
    <measure>": the images' mean chance, "n_images"}}}}: what a job reports, and what the sweep report averages over
    objects."""
    out: dict = {}
    if rows.empty:
        return out
    for (method, kind, map_kind), g in rows.groupby(["method", "images", "map"], sort=False):
        own, control = g[g["neurons"] == "method"], g[g["neurons"] == "random"]
        cell = {}
        for k in MEASURES:
            cell[k] = _mean(own[k].tolist())
            cell[f"random_{k}"] = _mean(control[k].tolist())
            cell[f"chance_{k}"] = _mean(own[f"chance_{k}"].tolist())
        cell["n_images"] = int(own["image_id"].nunique())
        out.setdefault(method, {}).setdefault(kind, {})[map_kind] = cell
    return out
