"""Captions under an intervention on a neuron set (METHOD.md, "Evaluation: captions under noise" and "Beyond the paper").

Every intervention acts on the set's neurons at every image position, during the prompt forward only (the KV
cache carries it into generation):

``noise``      v ~ N(0, I_P) * n added to O'[l, p, u] (the paper's; ``per_neuron`` draws one v per neuron), for each
               level n and draw. Each (image, level, draw) row has its own generator, seeded by (seed, image key,
               level index, draw), so a row's caption does not depend on its batch. Neuron u's noise is scaled by
               ``SetValues.scale``: 1 for the paper's absolute levels, its own spread std_p O'_u (``relative``), or
               its layer's spread over reference images (``calibrated``: a layer-matched control then receives the
               same absolute noise as the set it controls).
``inpainted``  the counterfactual patch: on an image that contains k, the set's O' is set to that image's own
               values with k inpainted away (``SetValues.counterfactual``); on an image without k, each neuron's
               identification shift delta_u = mean_p (O'_i - O'_o) is added (``SetValues.shift``).
``zero``       O' set to 0.             ``mean``  O' set to the neuron's mean over reference images.
The last three are deterministic: one caption per image (level 0, draw 0).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from knexp.identification.methods import NeuronSet
from knexp.models.adapter import Adapter
from knexp.models.hooks import LayerEdit, intervene
from knexp.settings import Choice, Flag, Integer, Many, Number, check_fields
from knexp.store import Store, stable_key

KINDS = ("noise", "inpainted", "zero", "mean")
SCALES = ("absolute", "relative", "calibrated")


@dataclass(frozen=True)
class Row:
    image_index: int  # into the caller's image list
    image_key: int  # stable id of the image (e.g. COCO image id), part of the seed
    level_index: int = 0
    level: float = 0.0
    draw: int = 0


@dataclass(frozen=True)
class Intervention:
    """What is done to a set (module docstring). ``levels``, ``draws``, ``per_neuron`` and ``scale`` concern noise."""

    kind: str = "noise"
    levels: tuple[float, ...] = ()
    draws: int = 1
    per_neuron: bool = False
    scale: str = "absolute"

    def __post_init__(self):
        """Check the settings: ``intervention.name``, and for noise the ``noise_level`` group's (each raises
        ``SettingError`` naming the key)."""
        object.__setattr__(self, "kind", Choice(KINDS)("intervention.name", self.kind))  # the config names the kind `name`
        if self.kind == "noise":
            check_fields(self, "noise_level", levels=Many(Number(low=0.0)), draws=Integer(low=1), per_neuron=Flag(),
                         scale=Choice(SCALES))
            object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))

    @property
    def deterministic(self) -> bool:
        return self.kind != "noise"

    @property
    def needs_reference(self) -> bool:
        """Whether its values come from the reference statistics (the ``mean`` value, calibrated noise's unit)."""
        return self.kind == "mean" or (self.kind == "noise" and self.scale == "calibrated")

    def rows(self, image_keys: list[int]) -> list[Row]:
        """The rows every set is captioned on: levels x draws per image for noise, else one per image."""
        if self.deterministic:
            return [Row(i, key) for i, key in enumerate(image_keys)]
        return rows_for(image_keys, list(self.levels), self.draws)


@dataclass
class SetValues:
    """What an intervention needs of one set, aligned with the set's neurons (length U)."""

    scale: np.ndarray | None = None  # noise: the multiplier of v for each neuron
    shift: np.ndarray | None = None  # inpainted, images without k: delta_u
    fixed: np.ndarray | None = None  # zero and mean: the value each neuron is set to
    counterfactual: Mapping[int, np.ndarray] | None = None  # inpainted, images with k: image index -> [P, U] values

    def key(self) -> list:
        """What captions depend on (for the caption store); counterfactual values follow from the image's identity."""
        def listed(a):
            return None if a is None else np.asarray(a, np.float64).round(7).tolist()

        return [listed(self.scale), listed(self.shift), listed(self.fixed), sorted(self.counterfactual or [])]


def noise_for(row: Row, seed: int, positions: int, units: int, per_neuron: bool) -> np.ndarray:
    """v for one row: [P] (shared by the set's neurons) or [P, U] (per neuron), times the level."""
    rng = np.random.default_rng([seed, row.image_key, row.level_index, row.draw])
    shape = (positions, units) if per_neuron else (positions,)
    return rng.standard_normal(shape) * row.level


def rows_for(image_keys: list[int], levels: list[float], draws: int) -> list[Row]:
    return [Row(i, key, li, float(level), d)
            for i, key in enumerate(image_keys) for li, level in enumerate(levels) for d in range(draws)]


def _edit_values(rows: list[Row], neurons: NeuronSet, how: Intervention, values: SetValues, seed: int,
                 positions: int) -> tuple[str, torch.Tensor]:
    """("add" or "set", float [B, P, U]) for a batch of rows that share one mode."""
    u = len(neurons)
    if how.kind == "noise":
        v = np.stack([noise_for(r, seed, positions, u, how.per_neuron) for r in rows])  # [B, P(, U)]
        v = v if v.ndim == 3 else np.repeat(v[..., None], u, axis=2)
        scale = np.ones(u) if values.scale is None else values.scale
        return "add", torch.as_tensor(v * scale, dtype=torch.float32)
    if how.kind in ("zero", "mean"):
        return "set", torch.as_tensor(np.broadcast_to(values.fixed, (len(rows), positions, u)).copy(), dtype=torch.float32)
    cf = values.counterfactual or {}
    if rows[0].image_index in cf:
        return "set", torch.as_tensor(np.stack([cf[r.image_index] for r in rows]), dtype=torch.float32)
    return "add", torch.as_tensor(np.broadcast_to(values.shift, (len(rows), positions, u)).copy(), dtype=torch.float32)


def _mode(row: Row, how: Intervention, values: SetValues) -> str:
    if how.kind == "inpainted":
        return "set" if row.image_index in (values.counterfactual or {}) else "add"
    return "add" if how.kind == "noise" else "set"


@torch.no_grad()
def intervened_captions(adapter: Adapter, images: list[np.ndarray], rows: list[Row], neurons: NeuronSet, how: Intervention,
                        values: SetValues, seed: int, batch_size: int = 16, max_new_tokens: int = 32,
                        width: int | None = None) -> list[str]:
    """One caption per row (rows of one mode per prompt pass, up to ``width`` rows decoding together: ``Adapter.stream``);
    an empty neuron set gives the clean captions."""
    if how.kind == "inpainted" and values.shift is None:
        raise ValueError("the inpainted intervention needs each neuron's identification shift (SetValues.shift)")
    if how.kind in ("zero", "mean") and values.fixed is None:
        raise ValueError(f"the {how.kind} intervention needs the value to set (SetValues.fixed)")
    layers = sorted(set(neurons.layers.tolist()))
    cols = {layer: np.flatnonzero(neurons.layers == layer) for layer in layers}  # the set's neurons in each layer
    units = {layer: torch.as_tensor(neurons.units[c]) for layer, c in cols.items()}

    def prefill(chunk: list[Row]):
        prepared = adapter.prepare([images[r.image_index] for r in chunk])
        if not layers:
            return adapter.prefill(prepared, max_new_tokens=max_new_tokens)
        mode, tensor = _edit_values(chunk, neurons, how, values, seed, adapter.num_image_tokens)  # [B, P, U]
        key = "add" if mode == "add" else "set_to"
        edits = {layer: LayerEdit(units[layer], **{key: tensor[:, :, cols[layer]]}) for layer in layers}
        with intervene(adapter, prepared, edits):  # armed for the prompt's pass only, removed on any exit
            # nothing below the set's lowest layer can change: those layers run once per image of the batch
            return adapter.prefill(prepared, start_layer=layers[0], groups=[r.image_index for r in chunk], max_new_tokens=max_new_tokens)

    out: list[str | None] = [None] * len(rows)
    for mode in ("add", "set"):
        idx = [i for i, r in enumerate(rows) if _mode(r, how, values) == mode]
        captions = adapter.stream(len(idx), lambda picked, idx=idx: prefill([rows[idx[j]] for j in picked]), batch_size,
                                  max_new_tokens, width, what=f"captions ({how.kind})")
        for i, caption in zip(idx, captions, strict=True):
            out[i] = caption
    return out


def noise_captions(adapter: Adapter, images: list[np.ndarray], rows: list[Row], neurons: NeuronSet, seed: int, per_neuron: bool = False,
                   batch_size: int = 16, max_new_tokens: int = 32, scale: np.ndarray | None = None) -> list[str]:
    """The paper's noise at the levels the ``rows`` carry: absolute, or times ``scale`` [U] per neuron."""
    how = Intervention("noise", tuple(sorted({r.level for r in rows})) or (0.0,), 1, per_neuron,
                       "absolute" if scale is None else "relative")
    return intervened_captions(adapter, images, rows, neurons, how, SetValues(scale=scale), seed, batch_size, max_new_tokens)


def cached_intervened_captions(store: Store, namespace: list, adapter: Adapter, images: list[np.ndarray], rows: list[Row],
                               neurons: NeuronSet, how: Intervention, values: SetValues, seed: int, batch_size: int = 16,
                               max_new_tokens: int = 32, width: int | None = None) -> list[str]:
    """``intervened_captions`` through the caption store. A row's key is (``namespace`` = model identity, dataset and,
    for ``inpainted``, the counterfactual's identity; the set's neurons; the intervention and the set's values; the
    row's image, level and draw; the seed and the generation settings): everything its caption depends on, since a
    row's tokens do not depend on its batch (tested; ``knexp.models.streaming`` notes the float32 rounding caveat)."""
    set_key = stable_key(neurons.layers.tolist(), neurons.units.tolist(), how, values.key())
    keys = [stable_key("intervened", namespace, set_key, r.image_key, r.level_index, r.level, r.draw, seed, max_new_tokens,
                       adapter.caption_prefix) for r in rows]
    return store.get_many(keys, lambda idx: intervened_captions(adapter, images, [rows[i] for i in idx], neurons, how, values,
                                                                seed, batch_size, max_new_tokens, width),
                          chunk=4 * max(batch_size, width or 0))


@torch.no_grad()
def unit_values(adapter: Adapter, images: list[np.ndarray], neurons: NeuronSet, batch_size: int = 16) -> np.ndarray:
    """float32 [N, P, U]: the set's O' at the image positions of each image (e.g. its counterfactual values)."""
    from knexp.models.hooks import record

    layers = sorted(set(neurons.layers.tolist()))
    out = np.zeros((len(images), adapter.num_image_tokens, len(neurons)), np.float32)
    for start in range(0, len(images), batch_size):
        prepared = adapter.prepare(images[start:start + batch_size])
        with record(adapter, prepared, layers=layers) as rec:
            adapter.run_hooks(prepared)
        for layer in layers:
            c = np.flatnonzero(neurons.layers == layer)
            out[start:start + prepared.batch_size, :, c] = rec.activations[layer][:, :, torch.as_tensor(neurons.units[c])].numpy()
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
    """What ``how`` needs of ``neurons``: its spread (relative noise) or its layer's spread over the ``reference``
    statistics (calibrated noise, ``knexp.identification.reference.ReferenceStats``), its shift and the images'
    ``counterfactual`` values (inpainted), zeros, or its reference mean (mean)."""
    if how.kind == "noise":
        if how.scale == "relative":
            if neurons.spread is None:
                raise ValueError("relative noise needs each neuron's spread; identify the set first")
            return SetValues(scale=neurons.spread)
        if how.scale == "calibrated":
            return SetValues(scale=reference.layer_spread[neurons.layers].numpy())
        return SetValues()
    if how.kind == "inpainted":
        return SetValues(shift=neurons.shift, counterfactual=counterfactual)
    if how.kind == "zero":
        return SetValues(fixed=np.zeros(len(neurons)))
    return SetValues(fixed=reference.mean[neurons.layers, neurons.units].numpy())
