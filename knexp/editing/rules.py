"""Rules that turn a neuron set into a weight edit of its output weights (``conf/edit/rule``, by ``_target_``;
docs/method.md, "Editing with the found neurons").

Each changes only the ``down_proj`` columns of the set's neurons (``knexp.models.weight_edit.WeightEdit``) for a target
(``knexp.editing.target``: erase k, or swap it for k'). A rule builds what it reads beyond the set from the job's
``EditInputs`` (``context``), and makes the edit from it (``make``): a new rule is one class and one yaml.

``zero``       W_out[:, u] = 0: the erase of Dai et al. (2022). Exact: the neuron writes nothing, at every position.
``mean``       the neuron's output replaced by its mean over the reference images: W_out[:, u] = 0 and
               b += sum_u W_out[:, u] m_u (a bias of down_proj, created at zero where the model has none). Exact for
               every input on which the neuron would have taken its mean; it differs from the run-time ``mean``
               intervention only in acting at every position, not only the image's.
``kn``         Dai et al.'s update, norm-scaled: w_u -= lam_erase ||w_u|| e_k / ||e_k|| for erase (and
               += lam_swap ||w_u|| e_k' / ||e_k'|| for a swap), e_k the *unembedding* row of the first token of k's word
               (not its input embedding), divided by the write gain of a norm after the FFN (Gemma), so that the
               residual stream moves by that much. With ``signed`` (the default), each column's move is also multiplied
               by the sign of the neuron's mean activation on k's images (``NeuronSet.info["act_mean"]``, from
               ``knexp.editing.sets.object_set``): a gated FFN's neuron may fire negative on k, and the literal update
               (``signed=false``) would then write k in, not out.
``optimized``  a learned Delta on the set's columns only (``knexp.editing.fit``): the target's loss at the caption's
               target position, a KL term to the unedited model on locality images and text prompts, and a norm
               penalty; it stops once the target is met at those positions, or (``stop=captions``) once the greedy
               captions of the fitting images show the edit. ``local`` (``knexp.editing.local``) adds a penalty on the
               change at preserved positions.

Beside them, rules that edit other parts of the FFN: ``input_null`` (``knexp.editing.input_null``: the set's
``up_proj`` rows) and ``alpha_edit`` / ``memit`` (``knexp.editing.matrix``: whole ``down_proj`` matrices, not the
set's).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch

from knexp.editing.fit import FitData, fit_columns, fit_data
from knexp.editing.inputs import EditInputs
from knexp.editing.sets import by_layer
from knexp.editing.target import EditTarget, word_direction
from knexp.identification.methods import NeuronSet
from knexp.models.weight_edit import LayerDelta, WeightEdit
from knexp.settings import Choice, Flag, Integer, Number, check_fields


@dataclass
class EditRule(ABC):
    """A rule (``conf/edit/rule/*.yaml``): ``context`` builds what it reads beyond the set, once per job; ``make`` gives
    the edit of a set for a target from it. ``ops``: the targets it can make (``edit.op``); ``edits_neurons``: whether
    the edit depends on the set (a rule that edits whole matrices does not, so it has no random-neuron control)."""

    name: str = ""
    ops: ClassVar[tuple[str, ...]] = ("erase", "swap")
    edits_neurons: ClassVar[bool] = True

    @property
    def label(self) -> str:
        """The rule and its settings, e.g. ``kn(lam_erase=0.3, lam_swap=8.0, signed=True)``: how reports tell rules
        apart."""
        settings = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if f.name != "name"]
        return f"{self.name}({', '.join(settings)})" if settings else self.name

    def context(self, inputs: EditInputs) -> object:
        """What ``make`` reads beyond the set (default: nothing). Rules whose ``context`` is the same function share one
        per job."""
        return None

    def prepare(self, adapter, neurons: NeuronSet, context) -> None:
        """Compute what ``make`` needs of ``context`` for this set and keep it there (default: nothing): statistics the
        edit's own cost leaves out, such as preserved keys (``knexp.editing.make.make`` times it apart)."""
        return None

    @abstractmethod
    def make(self, adapter, neurons: NeuronSet, target: EditTarget, context) -> WeightEdit:
        """The edit of ``neurons`` for ``target``; ``context`` is what ``context`` built."""


def column_edit(adapter, neurons: NeuronSet, delta_of) -> WeightEdit:
    """An edit of the ``down_proj`` columns of every layer of ``neurons``: ``delta_of(layer, units, W[:, units])`` gives
    (delta [d_model, U], bias [d_model] or None)."""
    deltas = []
    with torch.no_grad():
        for layer, units in by_layer(neurons).items():
            w = adapter.down_proj(layer).weight[:, units.to(adapter.device)].float()
            delta, bias = delta_of(layer, units, w)
            deltas.append(LayerDelta.columns(layer, units, delta.cpu(), None if bias is None else bias.cpu()))
    return WeightEdit(deltas)


@dataclass
class Zero(EditRule):
    name: str = "zero"

    def make(self, adapter, neurons, target, context):
        edit = column_edit(adapter, neurons, lambda layer, units, w: (-w, None))
        edit.provenance.update(rule=self.name)
        return edit


@dataclass
class Mean(EditRule):
    """Each neuron's output replaced by its reference mean, folded into a bias (module docstring)."""

    name: str = "mean"

    def context(self, inputs: EditInputs):
        return inputs.reference()

    def make(self, adapter, neurons, target, context):
        def delta(layer, units, w):
            mean = context.mean[layer, units].float().to(w.device)  # [U]
            return -w, w @ mean

        edit = column_edit(adapter, neurons, delta)
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
        if target.replacement is not None:
            direction = direction + self.lam_swap * word_direction(adapter, target.replacement)
        act = neurons.info.get("act_mean")
        signs = torch.as_tensor(np.sign(act) if self.signed and act is not None else np.ones(len(neurons)),
                                dtype=torch.float32)
        sign_of = {(int(a), int(b)): float(g) or 1.0
                   for a, b, g in zip(neurons.layers, neurons.units, signs, strict=True)}

        def delta(layer, units, w):
            d = direction.to(w.device)
            gain = adapter.write_gain(layer)
            if gain is not None:  # the norm after the FFN multiplies the write: divide, so the residual moves by d
                d = d / gain.to(w.device).clamp_min(1e-6)
            s = torch.tensor([sign_of[(layer, int(u))] for u in units], device=w.device)  # [U]
            # [d_model, U]: each column by its own norm
            return w.norm(dim=0, keepdim=True) * s[None, :] * d[:, None], None

        edit = column_edit(adapter, neurons, delta)
        edit.provenance.update(rule=self.name, lam_erase=self.lam_erase, lam_swap=self.lam_swap, signed=self.signed)
        return edit


@dataclass
class Optimized(EditRule):
    """A learned Delta on the set's columns (``knexp.editing.fit.fit_columns``), fitted on the identification images,
    the locality images with their unedited captions and the text prompts."""

    name: str = "optimized"
    steps: int = 30
    lr: float = 0.005
    kl_weight: float = 10.0
    norm_weight: float = 1e-3
    target_prob: float = 0.05  # stop="target": stop once every fitting sample gives k's word forms less than this
    stop: str = "captions"  # "target": on target_prob at the target positions; "captions": on the greedy captions
    check_every: int = 5  # stop="captions": steps between two regenerations of the captions

    def __post_init__(self):
        check_fields(self, "edit.rule", steps=Integer(low=1), lr=Number(low=0.0, low_open=True),
                     kl_weight=Number(low=0.0), norm_weight=Number(low=0.0),
                     target_prob=Number(0.0, 1.0, low_open=True), stop=Choice(("target", "captions")),
                     check_every=Integer(low=1))

    def context(self, inputs: EditInputs) -> FitData:
        images = list(inputs.locality)
        return fit_data(inputs.adapter, inputs.target.knowledge, inputs.fitting_k(),
                        list(zip(images, inputs.captions(images), strict=True)), inputs.texts, inputs.batch_size,
                        inputs.max_new_tokens)

    def make(self, adapter, neurons, target, context):
        edit = fit_columns(adapter, neurons, target, context, self)
        edit.provenance.update(rule=self.name, **self.settings())
        return edit

    def settings(self) -> dict:
        """The fit's settings, as the provenance records them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "name"}


def matched_norm(edit: WeightEdit, norm: float) -> WeightEdit:
    """``edit`` scaled to ||Delta||_F = ``norm`` (a random control with the same budget as the edit it controls)."""
    own = edit.norm()
    return edit.scaled(norm / own) if own > 0 else edit
