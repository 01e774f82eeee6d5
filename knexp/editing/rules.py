"""Rules that turn a neuron set into a weight edit of its output weights (``conf/edit``: ``edit.rule``).

Each changes only the ``down_proj`` columns of the set's neurons (``knexp.editing.weights.WeightEdit``); the object is
k (``EditTarget.knowledge``), and for a swap k' takes its place (``EditTarget.replacement``).

``zero``       W_out[:, u] = 0: the erase of Dai et al. (2022). Exact: the neuron writes nothing, at every position.
``mean``       the neuron's output replaced by its mean over the reference images: W_out[:, u] = 0 and
               b += sum_u W_out[:, u] m_u (a bias of down_proj, created at zero where the model has none). Exact for
               every input on which the neuron would have taken its mean; it differs from the run-time ``mean``
               intervention only in acting at every position, not only the image's.
``kn``         Dai et al.'s update, norm-scaled (METHOD.md): w_u -= lam_erase ||w_u|| e_k / ||e_k|| for erase (and
               += lam_swap ||w_u|| e_k' / ||e_k'|| for a swap), e_k the *unembedding* row of the first token of k's word
               (not its input embedding), divided by the write gain of a norm after the FFN (Gemma), so that the
               residual stream moves by that much. With ``signed`` (the default), each column's move is also multiplied by
               the sign of the neuron's mean activation on k's images (``NeuronSet.info["act_mean"]``, from
               ``knexp.editing.sets.object_set``): a gated FFN's neuron may fire negative on k, and the literal update
               (``signed=false``) would then write k in, not out.
``optimized``  a learned Delta on the set's columns only (``knexp.editing.fit``): the unlikelihood of k's word forms
               at the caption's target position (erase) or the likelihood of k' there (swap), a KL term to the unedited
               model on locality images and text prompts, and a norm penalty; it stops once the target is met.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch

from knexp.data.catalog import Knowledge
from knexp.editing.weights import ColumnDelta, WeightEdit
from knexp.identification.methods import NeuronSet
from knexp.settings import Choice, Flag, Integer, Number, check_fields

OPS = ("erase", "swap")


@dataclass
class EditTarget:
    """What an edit is for: ``op`` erase (k no longer named) or swap (k' named in k's place)."""

    op: str
    knowledge: Knowledge
    replacement: Knowledge | None = None


def by_layer(neurons: NeuronSet) -> dict[int, torch.Tensor]:
    """{layer: long [U] units} of a set, layers ascending."""
    return {int(layer): torch.as_tensor(neurons.units[neurons.layers == layer]) for layer in sorted(set(neurons.layers.tolist()))}


def word_ids(adapter, knowledge: Knowledge) -> torch.Tensor:
    """long [W]: the first token of each of the object's word forms as it follows a space (how a caption names it)."""
    return torch.as_tensor(sorted({adapter.tokenize(" " + form)[0] for form in knowledge.forms}), device=adapter.device)


def word_direction(adapter, knowledge: Knowledge) -> torch.Tensor:
    """float [d_model]: e_k / ||e_k||, e_k the unembedding row W_U[c] of the first token c of the object's word (its
    singular, as it follows a space): METHOD.md's direction of the ``kn`` rule, the one that raises the word's logit."""
    c = adapter.tokenize(" " + knowledge.singular)[0]
    row = adapter.unembedding()[c].float()
    return row / row.norm().clamp_min(1e-12)


@dataclass
class EditRule(ABC):
    """A rule (``conf/edit/rule/*.yaml``): ``make`` gives the edit of a set for a target. ``needs`` names what the rule
    reads from ``make``'s context (``reference``: the reference statistics; ``fit``: the optimized rule's data)."""

    name: str = ""
    needs: ClassVar[tuple[str, ...]] = ()

    @property
    def label(self) -> str:
        """The rule and its settings, e.g. ``kn(lam_erase=0.3, lam_swap=8.0, signed=True)``: how reports tell rules apart."""
        settings = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "name"]
        return f"{self.name}({', '.join(settings)})" if settings else self.name

    @abstractmethod
    def make(self, adapter, neurons: NeuronSet, target: EditTarget, context: dict) -> WeightEdit:
        """The edit; ``context`` holds what the rule ``needs``."""


def _columns(adapter, neurons: NeuronSet, delta_of) -> WeightEdit:
    """An edit of every layer of ``neurons``: ``delta_of(layer, units, W[:, units])`` gives (delta, bias or None)."""
    layers = {}
    with torch.no_grad():
        for layer, units in by_layer(neurons).items():
            w = adapter.down_proj(layer).weight[:, units.to(adapter.device)].float()
            delta, bias = delta_of(layer, units, w)
            layers[layer] = ColumnDelta(units, delta.cpu(), None if bias is None else bias.cpu())
    return WeightEdit(layers)


@dataclass
class Zero(EditRule):
    name: str = "zero"

    def make(self, adapter, neurons, target, context):
        edit = _columns(adapter, neurons, lambda layer, units, w: (-w, None))
        edit.provenance.update(rule=self.name)
        return edit


@dataclass
class Mean(EditRule):
    name: str = "mean"
    needs: ClassVar[tuple[str, ...]] = ("reference",)

    def make(self, adapter, neurons, target, context):
        reference = context["reference"]

        def delta(layer, units, w):
            mean = reference.mean[layer, units].float().to(w.device)  # [U]
            return -w, w @ mean

        edit = _columns(adapter, neurons, delta)
        edit.provenance.update(rule=self.name)
        return edit


@dataclass
class Kn(EditRule):
    """Dai et al.'s update, norm-scaled (module docstring); ``lam_erase`` and ``lam_swap`` are the lambdas."""

    name: str = "kn"
    lam_erase: float = 0.3
    lam_swap: float = 8.0
    signed: bool = True

    def __post_init__(self):
        check_fields(self, "edit.rule", lam_erase=Number(low=0.0), lam_swap=Number(low=0.0), signed=Flag())

    def make(self, adapter, neurons, target, context):
        direction = -self.lam_erase * word_direction(adapter, target.knowledge)
        if target.op == "swap":
            direction = direction + self.lam_swap * word_direction(adapter, target.replacement)
        act = neurons.info.get("act_mean")
        signs = torch.as_tensor(np.sign(act) if self.signed and act is not None else np.ones(len(neurons)), dtype=torch.float32)
        sign_of = {(int(a), int(b)): float(g) or 1.0 for a, b, g in zip(neurons.layers, neurons.units, signs, strict=True)}

        def delta(layer, units, w):
            d = direction.to(w.device)
            gain = adapter.write_gain(layer)
            if gain is not None:  # the norm after the FFN multiplies the write: divide, so the residual moves by d
                d = d / gain.to(w.device).clamp_min(1e-6)
            s = torch.tensor([sign_of[(layer, int(u))] for u in units], device=w.device)  # [U]
            return w.norm(dim=0, keepdim=True) * s[None, :] * d[:, None], None  # [d_model, U]: each column by its own norm

        edit = _columns(adapter, neurons, delta)
        edit.provenance.update(rule=self.name, lam_erase=self.lam_erase, lam_swap=self.lam_swap, signed=self.signed)
        return edit


@dataclass
class Optimized(EditRule):
    """A learned Delta on the set's columns (``knexp.editing.fit.fit_columns``)."""

    name: str = "optimized"
    needs: ClassVar[tuple[str, ...]] = ("fit",)
    steps: int = 60
    lr: float = 0.05
    kl_weight: float = 1.0
    norm_weight: float = 1e-3
    target_prob: float = 0.05  # erase: stop once every fitting sample gives k's word forms less than this

    def __post_init__(self):
        check_fields(self, "edit.rule", steps=Integer(low=1), lr=Number(low=0.0, low_open=True), kl_weight=Number(low=0.0),
                     norm_weight=Number(low=0.0), target_prob=Number(0.0, 1.0, low_open=True))

    def make(self, adapter, neurons, target, context):
        from knexp.editing.fit import fit_columns

        edit = fit_columns(adapter, neurons, target, context["fit"], self)
        edit.provenance.update(rule=self.name, steps=self.steps, lr=self.lr, kl_weight=self.kl_weight, norm_weight=self.norm_weight,
                               target_prob=self.target_prob)
        return edit


RULES = {r.name: r for r in (Zero, Mean, Kn, Optimized)}


def rule_named(name: str, **settings) -> EditRule:
    from knexp.settings import SettingError

    if name not in RULES:
        raise SettingError("edit.rule", name, f"use one of {', '.join(RULES)}")
    return RULES[name](**settings)


def matched_norm(edit: WeightEdit, norm: float) -> WeightEdit:
    """``edit`` scaled to ||Delta||_F = ``norm`` (a random control with the same budget as the edit it controls)."""
    own = edit.norm()
    return edit.scaled(norm / own) if own > 0 else edit


def check_op(op: str, replacement) -> str:
    """``edit.op``: erase, or swap with a replacement."""
    from knexp.settings import SettingError

    Choice(OPS)("edit.op", op)
    if op == "swap" and replacement is None:
        raise SettingError("edit.replacement", None, "a swap needs the object that takes k's place, e.g. edit.replacement=bus")
    return op

