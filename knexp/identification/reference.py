"""A model's neurons on reference data: their usual values and how they respond to removing other objects.

From ``images`` reference images (a seeded draw from the dataset), over images and image positions:
  mean          [L, d_f]  mean of O'                      (the ``mean`` intervention's value)
  std           [L, d_f]  standard deviation of O'        (a neuron's spread: the unit of stage 1's ``spread`` score)
  layer_spread  [L]       median_u std[l, u]              (layer l's spread: the unit of calibrated noise, so that
                                                           a layer-matched control gets the same absolute noise)
From ``removals`` reference removals (a seeded draw of annotated instances, each inpainted away as in Stage 1):
  removal_diff  [R, L, d_f]  max_p (O'_o - O'_i) of removal r, and ``removal_objects`` [R], the removed object.
The null distribution of stage 1 for knowledge k is this diff over the removals of objects other than k
(``null_for``): a neuron that responds as much to removing any object is not specific to k.
Everything is computed from forwards without gradients and cached per model, data and options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from knexp.checked import read_entry, save_tensors
from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.catalog import Catalog
from knexp.data.coco import CocoScenes, EntryError
from knexp.models.adapters.adapter import Adapter
from knexp.models.decoding.batching import map_batches
from knexp.models.hooks.attach import attached
from knexp.settings import Integer, check_fields
from knexp.store import stable_key
from knexp.user_errors import ConfigError

log = logging.getLogger(__name__)
REFERENCE_STREAM = 6  # random stream of the reference draw (the dataset's seed, this stream)


@dataclass(frozen=True)
class ReferenceSettings:
    """``reference``: images for each neuron's mean and spread, reference removals (the null of stage 1), and the seed
    of their draw. Checked when the session is built."""

    images: int = 32
    removals: int = 48
    seed: int = 0

    def __post_init__(self):
        check_fields(self, "reference", images=Integer(low=1), removals=Integer(low=0), seed=Integer(low=0))


@dataclass
class ReferenceStats:
    mean: torch.Tensor
    std: torch.Tensor
    layer_spread: torch.Tensor
    removal_diff: torch.Tensor
    removal_objects: list[str]
    images: list[int]

    TENSORS = ("mean", "std", "layer_spread", "removal_diff")

    def null_for(self, knowledge: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [L, d_f] of max_p V over the reference removals of objects other than ``knowledge``."""
        keep = [i for i, name in enumerate(self.removal_objects) if name != knowledge]
        if len(keep) < 2:
            raise ConfigError("the contrastive null needs at least 2 reference removals of objects other than "
                              f"{knowledge!r}; "
                             f"raise reference.removals")
        diffs = self.removal_diff[keep]
        return diffs.mean(0), diffs.std(0, correction=0)


class _Moments:
    """Running sum and sum of squares per (layer, unit) over image positions of many images (float64)."""

    def __init__(self):
        self.n = 0
        self.s: dict[int, torch.Tensor] = {}
        self.s2: dict[int, torch.Tensor] = {}

    def add(self, layer: int, o: torch.Tensor) -> None:  # o [B, P, d_f]
        o = o.double().flatten(0, 1)
        self.s[layer] = self.s.get(layer, 0) + o.sum(0)
        self.s2[layer] = self.s2.get(layer, 0) + (o * o).sum(0)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        layers = sorted(self.s)
        s, s2 = torch.stack([self.s[k] for k in layers]), torch.stack([self.s2[k] for k in layers])
        mean = s / self.n
        return mean.float(), (s2 / self.n - mean * mean).clamp_min(0).sqrt().float()


@torch.no_grad()
def _image_positions_values(adapter: Adapter, images: list[np.ndarray], on_layer, batch_size: int, what: str) -> None:
    """Forward ``images`` in batches, calling ``on_layer(layer, O' [B, P, d_f], start)`` for every layer."""
    layers = range(adapter.num_layers)

    def run(chunk) -> list[None]:
        prepared = adapter.prepare([images[i] for i in chunk])
        rows = torch.arange(prepared.batch_size)[:, None]

        def hook_for(layer):
            return lambda x, start: on_layer(layer, x[rows, prepared.image_positions - start].detach().float(),
                                             chunk[0])

        with attached(adapter, {("ffn", layer): hook_for(layer) for layer in layers}, prefill=prepared):
            adapter.run_hooks(prepared)
        return [None] * len(chunk)

    map_batches(run, list(range(len(images))), batch_size, what)


def compute_reference(adapter: Adapter, data: CocoScenes, dataset_id: str, catalog: Catalog, opts: InpaintOptions,
                      inpaint_cache: InpaintCache, images: int, removals: int, seed: int,
                      batch_size: int = 16) -> ReferenceStats:
    """The reference statistics of the module docstring, from a seeded draw of the dataset."""
    rng = np.random.default_rng([seed, REFERENCE_STREAM])
    ids = [int(i) for i in rng.permutation(data.image_ids)[:images]]
    pics = []
    for i in ids:
        try:
            pics.append(data.load_image(i))
        except EntryError as exc:
            log.warning("reference image %d skipped: %s", i, exc)
    moments = _Moments()
    moments.n = len(pics) * adapter.num_image_tokens
    _image_positions_values(adapter, pics, lambda layer, o, _: moments.add(layer, o), batch_size, "reference images")
    mean, std = moments.result()

    instances = [inst for i in rng.permutation(data.image_ids).tolist() for inst in data.instances(i)
                 if inst.category_id in catalog.coco_ids]
    chosen = instances[:removals]
    originals, edited, objects = [], [], []
    for inst in chosen:
        try:
            image = data.load_image(inst.image_id)
        except EntryError as exc:
            log.warning("reference removal of annotation %d skipped: %s", inst.annotation_id, exc)
            continue
        originals.append(image)
        edited.append(inpaint_cache.get(dataset_id, inst.image_id, inst.annotation_id, image, inst.bbox,
                                        data.instance_mask(inst.annotation_id), opts))
        objects.append(catalog.by_coco_id(inst.category_id).name)
    n, num_layers = len(originals), adapter.num_layers
    o_vals = torch.zeros(n, num_layers, adapter.num_image_tokens,
                         adapter.d_ff) if n * num_layers * adapter.d_ff < 2**28 else None
    diff = torch.zeros(n, num_layers, adapter.d_ff)
    if o_vals is None:  # a large model: keep the original's values one removal at a time
        for r in range(n):
            _removal_diff(adapter, originals[r], edited[r], diff[r], batch_size)
    else:
        def keep(layer, o, start):
            o_vals[start:start + len(o), layer] = o

        def reduce(layer, o, start):
            diff[start:start + len(o), layer] = (o_vals[start:start + len(o), layer] - o).amax(1)

        _image_positions_values(adapter, originals, keep, batch_size, "reference removals (originals)")
        _image_positions_values(adapter, edited, reduce, batch_size, "reference removals (inpainted)")
    return ReferenceStats(mean, std, std.median(dim=1).values, diff, objects, ids)


def _removal_diff(adapter: Adapter, original: np.ndarray, edited: np.ndarray, out: torch.Tensor,
                  batch_size: int) -> None:
    values: dict[int, torch.Tensor] = {}
    _image_positions_values(adapter, [original], lambda layer, o, _: values.__setitem__(layer, o[0]), batch_size,
                            "removal")
    _image_positions_values(adapter, [edited], lambda layer, o,
                            _: out.__setitem__(layer, (values.pop(layer) - o[0]).amax(0)), batch_size, "removal")


class ReferenceCache:
    """``get(key parts, compute)``: reference statistics from ``<root>/reference/<key>.safetensors`` or computed. A file
    that fails its check (``knexp.checked``: cut short, edited, another entry's) is recomputed, with a warning."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) / "reference" if root is not None else None
        self.computed = self.damaged = 0

    def get(self, parts: list, compute) -> ReferenceStats:
        key = stable_key(*parts)
        path = self.root / f"{key}.safetensors" if self.root is not None else None
        stats, bad = read_entry(path, key, "reference statistics", lambda t, meta: ReferenceStats(**t, **meta))
        self.damaged += bad
        if stats is not None:
            return stats
        stats = compute()
        self.computed += 1
        if path is not None:
            save_tensors(path, {k: getattr(stats, k) for k in ReferenceStats.TENSORS},
                         {"removal_objects": stats.removal_objects, "images": stats.images}, key)
        return stats
