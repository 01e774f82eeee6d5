"""Captions under an intervention on a neuron set (docs/method.md, "Evaluation: captions under noise" and "Interventions
besides noise").

The interventions themselves are classes (``knexp.evaluation.interventions``: noise, the inpainted patch, zero, mean);
here their activation patches are armed on each prompt's pass (``intervened_captions``), captions go through the caption
store (``cached_intervened_captions``), and the inpainted patch's counterfactual values are recorded
(``counterfactual_values``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np
import torch

from knexp.evaluation.interventions import Intervention, Noise, Row, SetValues
from knexp.identification.methods import NeuronSet
from knexp.models.adapters.adapter import Adapter
from knexp.models.hooks.intervene import ActivationPatch, intervene
from knexp.store import Store, stable_key


@torch.no_grad()
def intervened_captions(adapter: Adapter, images: list[np.ndarray], rows: list[Row], neurons: NeuronSet,
                        how: Intervention, values: SetValues, seed: int, batch_size: int = 16, max_new_tokens: int = 32,
                        width: int | None = None) -> list[str]:
    """One caption per row (rows of one mode per prompt pass, up to ``width`` rows decoding together:
    ``Adapter.stream``); an empty neuron set gives the clean captions."""
    layers = sorted(set(neurons.layers.tolist()))
    cols = {layer: np.flatnonzero(neurons.layers == layer) for layer in layers}  # the set's neurons in each layer
    units = {layer: torch.as_tensor(neurons.units[c]) for layer, c in cols.items()}

    def prefill(chunk: list[Row]):
        prepared = adapter.prepare([images[r.image_index] for r in chunk])
        if not layers:
            return adapter.prefill(prepared, max_new_tokens=max_new_tokens)
        tensor = how.change(chunk, neurons, values, seed, adapter.num_image_tokens)  # [B, P, U]
        key = "add" if how.mode(chunk[0], values) == "add" else "set_to"
        patches = {layer: ActivationPatch(units[layer], **{key: tensor[:, :, cols[layer]]}) for layer in layers}
        with intervene(adapter, prepared, patches):  # armed for the prompt's pass only, removed on any exit
            # nothing below the set's lowest layer can change: those layers run once per image of the batch
            return adapter.prefill(prepared, start_layer=layers[0], groups=[r.image_index for r in chunk],
                                   max_new_tokens=max_new_tokens)

    out: list[str | None] = [None] * len(rows)
    for mode in ("add", "set"):
        idx = [i for i, r in enumerate(rows) if how.mode(r, values) == mode]
        captions = adapter.stream(len(idx), lambda picked, idx=idx: prefill([rows[idx[j]] for j in picked]), batch_size,
                                  max_new_tokens, width, what=f"captions ({how.kind})")
        for i, caption in zip(idx, captions, strict=True):
            out[i] = caption
    return out


def noise_captions(adapter: Adapter, images: list[np.ndarray], rows: list[Row], neurons: NeuronSet, seed: int,
                   per_neuron: bool = False,
                   batch_size: int = 16, max_new_tokens: int = 32, scale: np.ndarray | None = None) -> list[str]:
    """The paper's noise at the levels the ``rows`` carry: absolute, or times ``scale`` [U] per neuron."""
    how = Noise(name="noise", levels=tuple(sorted({r.level for r in rows})) or (0.0,), draws=1, per_neuron=per_neuron,
                scale="absolute" if scale is None else "relative")
    return intervened_captions(adapter, images, rows, neurons, how, SetValues(scale=scale), seed, batch_size,
                               max_new_tokens)


def cached_intervened_captions(store: Store, namespace: list, adapter: Adapter, images: list[np.ndarray],
                               rows: list[Row],
                               neurons: NeuronSet, how: Intervention, values: SetValues, seed: int,
                               batch_size: int = 16, max_new_tokens: int = 32, width: int | None = None) -> list[str]:
    """``intervened_captions`` through the caption store. A row's key is (``namespace`` = model identity, dataset and,
    for ``inpainted``, the counterfactual's identity; the set's neurons; the intervention and the set's values; the
    row's image, level and draw; the seed and the generation settings): everything its caption depends on, since a
    row's tokens do not depend on its batch (tested; ``knexp.models.decoding.streaming`` notes the float32 rounding
    caveat)."""
    set_key = stable_key(neurons.layers.tolist(), neurons.units.tolist(), how.key(), values.key())
    keys = [stable_key("intervened", namespace, set_key, r.image_key, r.level_index, r.level, r.draw, seed,
                       max_new_tokens, adapter.caption_prefix) for r in rows]
    def compute(idx: list[int]) -> list[str]:
        return intervened_captions(adapter, images, [rows[i] for i in idx], neurons, how, values, seed, batch_size,
                                   max_new_tokens, width)

    return store.get_many(keys, compute, chunk=4 * max(batch_size, width or 0))


@torch.no_grad()
def unit_values(adapter: Adapter, images: list[np.ndarray], neurons: NeuronSet, batch_size: int = 16) -> np.ndarray:
    """float32 [N, P, U]: the set's O' at the image positions of each image (e.g. its counterfactual values)."""
    from knexp.models.hooks.record import recorded

    layers = sorted(set(neurons.layers.tolist()))
    out = np.zeros((len(images), adapter.num_image_tokens, len(neurons)), np.float32)
    for start in range(0, len(images), batch_size):
        prepared = adapter.prepare(images[start:start + batch_size])
        activations = recorded(adapter, prepared, layers)
        for layer in layers:
            c = np.flatnonzero(neurons.layers == layer)
            units = torch.as_tensor(neurons.units[c])
            out[start:start + prepared.batch_size, :, c] = activations[layer][:, :, units].numpy()
    return out


class _Deferred(Mapping):
    """{image index: [P, U] values}, with its keys known up front and its values made by ``compute()`` (shared by
    several mappings, run at most once) on the first read of any value."""

    def __init__(self, keys: list[int], compute: Callable[[], dict[int, np.ndarray]]):
        self._keys, self._compute = list(keys), compute

    def __getitem__(self, key: int) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._compute()[key]

    def __contains__(self, key) -> bool:  # Mapping's own reads the value
        return key in self._keys

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def counterfactual_values(adapter: Adapter, removed: dict[int, np.ndarray], sets: list[NeuronSet],
                          batch_size: int = 16) -> list[Mapping[int, np.ndarray]]:
    """For each set, {image index: [P, U] values of its neurons on that image with k removed} (the inpainted
    intervention's values on the images of k), from one pass over ``removed`` for the union of the sets' neurons.
    The pass runs when a value is first read, so captions that all come from the caption store (whose keys name the
    images, not the values: ``SetValues.key``) cost no pass."""
    union = NeuronSet.union(sets)
    column = {pair: c for c, pair in enumerate(zip(union.layers.tolist(), union.units.tolist(), strict=True))}
    index = list(removed)

    @functools.cache
    def per_set() -> list[dict[int, np.ndarray]]:
        values = unit_values(adapter, [removed[i] for i in index], union, batch_size)  # [N, P, U_union]
        out = []
        for neurons in sets:
            cols = [column[pair] for pair in zip(neurons.layers.tolist(), neurons.units.tolist(), strict=True)]
            out.append(dict(zip(index, values[:, :, cols], strict=True)))
        return out

    return [_Deferred(index, lambda s=s: per_set()[s]) for s in range(len(sets))]


def set_values(how: Intervention, neurons: NeuronSet, reference=None,
               counterfactual: Mapping[int, np.ndarray] | None = None) -> SetValues:
    """What ``how`` needs of ``neurons`` (``Intervention.values``)."""
    return how.values(neurons, reference, counterfactual)
