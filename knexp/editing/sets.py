"""The neuron set of an object's edit, and the random sets it is compared with.

An edit acts on every image, so it takes one set per object, not one per sample: the *consensus* of the identification
samples. Each sample's method ranks its neurons (``Method.ranked``: its top ``size``); a neuron's consensus score is
sum_s (1 - r_s / size) over the samples s whose top ``size`` holds it at rank r_s (0 first), so a neuron found on
every sample outranks one found once, and ties go to the better ranks. The set is the ``size`` best by that score.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from knexp.identification.methods import NeuronSet, layer_matched_units
from knexp.identification.pipeline import Identification
from knexp.identification.thresholds import Rule


def object_set(found: Identification, rule: Rule, size: int) -> NeuronSet:
    """The consensus set of ``size`` neurons over ``found``'s samples (module docstring); empty without a sample."""
    score: dict[tuple[int, int], float] = defaultdict(float)
    for res in found.results:
        ranked = found.method.ranked(res.stats, rule, found.context, size, res.stats.shape[1])
        for r, pair in enumerate(zip(ranked.layers.tolist(), ranked.units.tolist(), strict=True)):
            score[pair] += 1.0 - r / size
    best = sorted(score, key=lambda p: (-score[p], p))[:size]
    layers, units = np.array([p[0] for p in best], np.int64), np.array([p[1] for p in best], np.int64)
    # each neuron's mean activation on k's images (mean_p O'_o, averaged over the samples): its sign says which way the
    # neuron fires when k is there, which a gated FFN's neurons may do either way (the kn rule reads it)
    act = np.mean([res.stats.act_mean[layers, units].numpy() for res in found.results], axis=0) if best else np.zeros(0)
    return NeuronSet(found.method.name, "consensus", layers, units, np.array([score[p] for p in best]),
                     note=f"consensus of {len(found.results)} samples",
                     info={"samples": len(found.results), "act_mean": act.tolist()})


def disjoint_random(neurons: NeuronSet, d_ff: int, seed: int) -> NeuronSet:
    """The control of an edit rule: in each layer, as many random units as ``neurons`` has there, none of them
    (``layer_matched_units`` with ``disjoint``; the ``random`` method's control may share units), ascending within a
    layer, seeded."""
    layers, draws = layer_matched_units(neurons, d_ff, np.random.default_rng([seed, 26, len(neurons)]), disjoint=True)
    units = [u for draw in draws for u in sorted(draw.tolist())]
    return NeuronSet("random", "layer-matched", np.array(layers, np.int64), np.array(units, np.int64),
                     np.zeros(len(units)))


def random_columns(count: int, num_layers: int, d_ff: int, seed: int) -> NeuronSet:
    """``count`` neurons drawn uniformly over every layer's units, seeded: the fine-tuning baseline's columns."""
    rng = np.random.default_rng([seed, 27, count])
    flat = np.sort(rng.choice(num_layers * d_ff, size=count, replace=False))
    return NeuronSet("random", "columns", (flat // d_ff).astype(np.int64), (flat % d_ff).astype(np.int64),
                     np.zeros(count))


def by_layer(neurons: NeuronSet) -> dict[int, torch.Tensor]:
    """{layer: long [U] units} of a set, layers ascending."""
    return {int(layer): torch.as_tensor(neurons.units[neurons.layers == layer])
            for layer in sorted(set(neurons.layers.tolist()))}
