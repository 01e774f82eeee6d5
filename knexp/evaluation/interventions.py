"""The interventions on a neuron set, one class each (``conf/intervention/*.yaml`` names one by ``_target_``).

Every intervention acts on the set's neurons at every image position, during the prompt's pass only (the KV cache
carries it into generation; docs/method.md, "Evaluation: captions under noise" and "Interventions besides noise"):

``Noise``      v ~ N(0, I_P) * n added to O'[l, p, u] (the paper's; ``per_neuron`` draws one v per neuron), for each
               level n and draw. Each (image, level, draw) row has its own generator, seeded by (seed, image key,
               level index, draw), so a row's caption does not depend on its batch. Neuron u's noise is scaled by
               ``SetValues.scale``: 1 for the paper's absolute levels, its own spread std_p O'_u (``relative``), or
               its layer's spread over reference images (``calibrated``: a layer-matched control then receives the
               same absolute noise as the set it controls).
``Inpainted``  the counterfactual patch: on an image that contains k, the set's O' is set to that image's own
               values with k inpainted away (``SetValues.counterfactual``); on an image without k, each neuron's
               identification shift delta_u = mean_p (O'_i - O'_o) is added (``SetValues.shift``).
``Zero``       O' set to 0.             ``Mean``  O' set to the neuron's mean over reference images.
The last three are deterministic: one caption per image (level 0, draw 0).

An intervention says what it needs of a set (``values``: a ``SetValues``), which rows each image is captioned on
(``rows``), and, for a batch of rows, whether it adds to O' or sets it (``mode``) and by what tensor (``change``). A new
one is one class (here or anywhere importable) and one yaml that names it by ``_target_``. ``key()`` is what the caption
store keys on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from knexp.identification.methods import NeuronSet
from knexp.settings import Choice, Flag, Integer, Many, Number, check_fields

SCALES = ("absolute", "relative", "calibrated")


@dataclass(frozen=True)
class Row:
    image_index: int  # into the caller's image list
    image_key: int  # stable id of the image (e.g. COCO image id), part of the seed
    level_index: int = 0
    level: float = 0.0
    draw: int = 0


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


def _per_row(values: np.ndarray, rows: int, positions: int) -> torch.Tensor:
    """float [B, P, U]: the set's per-neuron values [U] at every position of every row."""
    return torch.as_tensor(np.broadcast_to(values, (rows, positions, len(values))).copy(), dtype=torch.float32)


@dataclass(frozen=True)
class Intervention(ABC):
    """What is done to a set (module docstring); ``name`` is its label in the config."""

    name: str = ""
    kind: ClassVar[str] = ""
    deterministic: ClassVar[bool] = True
    # its values on an image of k come from that image with k inpainted away
    uses_counterfactual: ClassVar[bool] = False

    def __post_init__(self):
        """``intervention.name`` is the class's own: another name would label one intervention as another."""
        from knexp.settings import SettingError

        if self.name and self.name != self.kind:
            raise SettingError("intervention.name", self.name,
                               f"is the label of the {self.kind} intervention; choose another "
                               "one with intervention=<name> (a yaml of conf/intervention)")

    @property
    def needs_reference(self) -> bool:
        """Whether its values come from the reference statistics (the ``mean`` value, calibrated noise's unit)."""
        return False

    def rows(self, image_keys: list[int]) -> list[Row]:
        """The rows every set is captioned on: one per image (``Noise``: levels x draws)."""
        return [Row(i, key) for i, key in enumerate(image_keys)]

    @abstractmethod
    def values(self, neurons: NeuronSet, reference=None,
               counterfactual: Mapping[int, np.ndarray] | None = None) -> SetValues:
        """What it needs of ``neurons`` (the reference statistics, ``knexp.identification.reference.ReferenceStats``,
        and the images' counterfactual values where it uses them)."""

    def mode(self, row: Row, values: SetValues) -> str:
        """"add" or "set": what it does to O' on ``row``."""
        return "set"

    @abstractmethod
    def change(self, rows: list[Row], neurons: NeuronSet, values: SetValues, seed: int, positions: int) -> torch.Tensor:
        """float [B, P, U]: what is added to (or what replaces) the set's O' on a batch of rows of one mode."""

    def key(self) -> dict:
        """What the caption store keys on (the fields every intervention had before they were classes)."""
        return {"kind": self.kind, "levels": [], "draws": 1, "per_neuron": False, "scale": "absolute"}


@dataclass(frozen=True)
class Noise(Intervention):
    """The paper's noise at ``levels`` (``draws`` each), in units of ``scale``."""

    levels: tuple[float, ...] = (40.0, 80.0, 120.0)
    draws: int = 10
    per_neuron: bool = False
    scale: str = "absolute"
    kind: ClassVar[str] = "noise"
    deterministic: ClassVar[bool] = False

    def __post_init__(self):
        """Check the ``noise_level`` group's settings (each raises ``SettingError`` naming the key)."""
        super().__post_init__()
        check_fields(self, "noise_level", levels=Many(Number(low=0.0)), draws=Integer(low=1), per_neuron=Flag(),
                     scale=Choice(SCALES))
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))

    @property
    def needs_reference(self) -> bool:
        return self.scale == "calibrated"

    def rows(self, image_keys: list[int]) -> list[Row]:
        return rows_for(image_keys, list(self.levels), self.draws)

    def values(self, neurons, reference=None, counterfactual=None) -> SetValues:
        if self.scale == "relative":
            if neurons.spread is None:
                raise ValueError("relative noise needs each neuron's spread; identify the set first")
            return SetValues(scale=neurons.spread)
        if self.scale == "calibrated":
            return SetValues(scale=reference.layer_spread[neurons.layers].numpy())
        return SetValues()

    def mode(self, row, values) -> str:
        return "add"

    def change(self, rows, neurons, values, seed, positions):
        u = len(neurons)
        v = np.stack([noise_for(r, seed, positions, u, self.per_neuron) for r in rows])  # [B, P(, U)]
        v = v if v.ndim == 3 else np.repeat(v[..., None], u, axis=2)
        scale = np.ones(u) if values.scale is None else values.scale
        return torch.as_tensor(v * scale, dtype=torch.float32)

    def key(self) -> dict:
        return {"kind": self.kind, "levels": list(self.levels), "draws": self.draws, "per_neuron": self.per_neuron,
                "scale": self.scale}


@dataclass(frozen=True)
class Inpainted(Intervention):
    """The counterfactual patch (module docstring)."""

    kind: ClassVar[str] = "inpainted"
    uses_counterfactual: ClassVar[bool] = True

    def values(self, neurons, reference=None, counterfactual=None) -> SetValues:
        return SetValues(shift=neurons.shift, counterfactual=counterfactual)

    def mode(self, row, values) -> str:
        return "set" if row.image_index in (values.counterfactual or {}) else "add"

    def change(self, rows, neurons, values, seed, positions):
        if values.shift is None:
            raise ValueError("the inpainted intervention needs each neuron's identification shift (SetValues.shift)")
        cf = values.counterfactual or {}
        if rows[0].image_index in cf:
            return torch.as_tensor(np.stack([cf[r.image_index] for r in rows]), dtype=torch.float32)
        return _per_row(values.shift, len(rows), positions)


@dataclass(frozen=True)
class Zero(Intervention):
    """O' set to 0."""

    kind: ClassVar[str] = "zero"

    def values(self, neurons, reference=None, counterfactual=None) -> SetValues:
        return SetValues(fixed=np.zeros(len(neurons)))

    def change(self, rows, neurons, values, seed, positions):
        if values.fixed is None:
            raise ValueError(f"the {self.kind} intervention needs the value to set (SetValues.fixed)")
        return _per_row(values.fixed, len(rows), positions)


@dataclass(frozen=True)
class Mean(Zero):
    """O' set to the neuron's mean over the reference images."""

    kind: ClassVar[str] = "mean"

    @property
    def needs_reference(self) -> bool:
        return True

    def values(self, neurons, reference=None, counterfactual=None) -> SetValues:
        return SetValues(fixed=reference.mean[neurons.layers, neurons.units].numpy())
