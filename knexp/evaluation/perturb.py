"""Captions under noise on a neuron set (METHOD.md, "Evaluation: captions under noise").

For a set N_k, a noise level n and a draw d, v ~ N(0, I_P) * n is added to O'[l, p, u] for every (l, u) in
N_k at every image position p, during the prompt forward only (the KV cache carries it into generation);
``per_neuron`` draws an independent v per neuron instead. Every (image, level, draw) row has its own
generator, seeded by (seed, image key, level index, draw), so a row's caption does not depend on its batch.
With ``relative``, the level is in units of each neuron's spread (``NeuronSet.spread``, std_p O' on the
neuron's identification sample): neuron u receives v[p] * n * spread_u, since the paper's absolute levels
(40, 80, 120) belong to LLaMA-2-7B's activation scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from knexp.identification.methods import NeuronSet
from knexp.models.adapters.base import Adapter
from knexp.models.batching import map_batches
from knexp.models.hooks import LayerEdit, intervene
from knexp.store import Store, stable_key


@dataclass(frozen=True)
class NoiseRow:
    image_index: int  # into the caller's image list
    image_key: int  # stable id of the image (e.g. COCO image id), part of the seed
    level_index: int
    level: float
    draw: int


def noise_for(row: NoiseRow, seed: int, positions: int, units: int, per_neuron: bool) -> np.ndarray:
    """v for one row: [P] (shared by the set's neurons) or [P, U] (per neuron), times the level."""
    rng = np.random.default_rng([seed, row.image_key, row.level_index, row.draw])
    shape = (positions, units) if per_neuron else (positions,)
    return rng.standard_normal(shape) * row.level


def rows_for(image_keys: list[int], levels: list[float], draws: int) -> list[NoiseRow]:
    return [NoiseRow(i, key, li, float(level), d)
            for i, key in enumerate(image_keys) for li, level in enumerate(levels) for d in range(draws)]


@torch.no_grad()
def perturbed_captions(adapter: Adapter, images: list[np.ndarray], rows: list[NoiseRow], neurons: NeuronSet, seed: int,
                       per_neuron: bool = False, batch_size: int = 16, max_new_tokens: int = 32, relative: bool = False) -> list[str]:
    """One caption per row, batched; an empty neuron set gives the clean captions."""
    if relative and (neurons.spread is None or len(neurons.spread) != len(neurons)):
        raise ValueError("relative noise needs each neuron's spread (NeuronSet.spread); identify the set first")
    layers = sorted(set(neurons.layers.tolist()))
    cols = {layer: np.flatnonzero(neurons.layers == layer) for layer in layers}  # the set's neurons in each layer
    units = {layer: torch.as_tensor(neurons.units[c]) for layer, c in cols.items()}
    spread = {layer: torch.as_tensor(neurons.spread[c], dtype=torch.float32) for layer, c in cols.items()} if relative else {}

    def run(chunk) -> list[str]:
        prepared = adapter.prepare([images[r.image_index] for r in chunk])
        if not layers:
            return adapter.generate(prepared, max_new_tokens)
        noise = np.stack([noise_for(r, seed, adapter.num_image_tokens, len(neurons), per_neuron) for r in chunk])  # [B, P(, N)]
        edits = {}
        for layer in layers:
            if per_neuron:
                add = torch.as_tensor(noise[:, :, cols[layer]], dtype=torch.float32)  # [B, P, U_l]
            else:
                add = torch.as_tensor(noise, dtype=torch.float32)  # [B, P]
            if relative:  # v[p] * n * spread_u: [B, P, U_l]
                add = (add if add.dim() == 3 else add[..., None]) * spread[layer]
            edits[layer] = LayerEdit(units[layer], add=add)
        with intervene(adapter, prepared, edits):  # removed on any exit, out-of-memory retries included
            return adapter.generate(prepared, max_new_tokens)

    return map_batches(run, rows, batch_size, "perturbed captions")


def cached_perturbed_captions(store: Store, namespace: list, adapter: Adapter, images: list[np.ndarray], rows: list[NoiseRow],
                              neurons: NeuronSet, seed: int, per_neuron: bool = False, batch_size: int = 16, max_new_tokens: int = 32,
                              relative: bool = False) -> list[str]:
    """``perturbed_captions`` through the caption store. A row's key is (``namespace`` = model identity and
    dataset, the set's neurons and, for relative noise, their spreads, the row's image, level and draw, the
    seed and the generation settings): everything its caption depends on, since rows are batch-invariant."""
    set_key = stable_key(neurons.layers.tolist(), neurons.units.tolist(), neurons.spread.tolist() if relative else None)
    keys = [stable_key("perturbed", namespace, set_key, r.image_key, r.level_index, r.level, r.draw, seed, per_neuron, relative,
                       max_new_tokens, adapter.caption_prefix) for r in rows]
    return store.get_many(keys, lambda idx: perturbed_captions(adapter, images, [rows[i] for i in idx], neurons, seed, per_neuron,
                                                               batch_size, max_new_tokens, relative), chunk=4 * batch_size)
