"""Whole-matrix edits: the field's locate-then-edit method (MEMIT, AlphaEdit) applied to a VLM's image tokens, the
baseline that edits layers, not neurons (docs/method.md, "Locality by construction").

Keys and target. The FFN of layer l writes W_l O_t into the residual stream, O_t [d_ff] its activations at position t
(hook site ``ffn``). The *keys* K [m, d_ff] are O_t at the object's image tokens (``PatchGeometry.object_tokens`` of
the union of k's instance masks; every image token with ``tokens=image``) of the images of k that fitting may see
(the identification images and ``edit.fit_k`` more; ``EditInputs.k_views``). The *target* z_t [d_model] at each is
the residual stream after the window's last layer L on the same image with every instance of k inpainted away (the
counterfactual of stage 1), on the model as it was before the edit.

MEMIT's spread. The window's layers l_0 < ... < l_{n-1} are edited in ascending order; before layer l_i the keys and
the residual h_t after L are computed again on the model with l_0..l_{i-1} already edited, and l_i writes its share of
what is left, R = (z - h) / (n - i) [m, d_model] (divided by the write gain of a norm after the FFN, to first order).

``alpha_edit`` (AlphaEdit, Fang et al. 2025). U [d_ff, r]: the eigenvectors of the preserved second moment A_l of the
activations (``knexp.editing.preserved``, site ``ffn``: images without k, never measured, with their captions, and
text prompts) whose eigenvalue is at most ``threshold`` times the largest; P = U U^T. Then

    Delta_l = argmin over Delta = G U^T of ||Delta K^T - R^T||^2 + ||Delta Kp^T||^2 + alpha ||G||^2
            = R^T K U (U^T (K^T K + Kp^T Kp) U + alpha I)^-1 U^T                             [d_model, d_ff]

which is AlphaEdit's R^T K P (Kp^T Kp P + K^T K P + alpha I)^-1. Kp [n_p, d_ff]: the activations at every image token
of the locality images (a sequence's earlier objects' images among them: AlphaEdit's K_p), on the model as edited so
far. Since Delta = Delta P, Delta O_t = 0 wherever P O_t = 0: at preserved positions the layer's output is unchanged up
to what the relative threshold lets through. alpha = ``ridge`` times the mean of ||U^T k||^2 over the keys. The
*reach* of a layer, ||K U|| / ||K|| (Frobenius), is the share of the keys the update can act on.

``memit`` (Meng et al. 2023). No projection; the preserved positions enter as a covariance penalty:

    Delta_l = argmin ||Delta K^T - R^T||^2 + ||Delta Kp^T||^2 + lam m tr(Delta A_l Delta^T) + alpha ||Delta||^2
            = R^T K (K^T K + Kp^T Kp + lam m A_l + alpha I)^-1

(A_l is a mean over positions; lam m weighs it as lam times the m keys; alpha = ``ridge`` times the mean ||k||^2, for
an A_l of fewer positions than d_ff).

Every column of the window's ``down_proj`` matrices may change: the edit's cost says so. It does not read the neuron
set (``edits_neurons`` False: no random-neuron control). Erase only: a swap's target would need k' drawn into the
image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from knexp.editing.inputs import EditInputs, PreservedSite
from knexp.editing.preserved import PreservedKeys
from knexp.editing.rules import EditRule
from knexp.models.hooks.record import record, recorded, run_through
from knexp.models.prepared import Prepared
from knexp.models.weight_edit import LayerDelta, WeightEdit, applied
from knexp.settings import Choice, Flag, Integer, Many, Number, SettingError, check_fields

TOKENS = ("object", "image")
log = logging.getLogger(__name__)


def alpha_update(residual: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, basis: torch.Tensor,
                 ridge: float) -> torch.Tensor:
    """Delta [d_out, d_in] float64 of ``alpha_edit`` (module docstring): ``residual`` R [m, d_out], ``keys`` K [m,
    d_in], ``kept`` Kp [n_p, d_in], ``basis`` U [d_in, r]; zero where r = 0."""
    residual, keys, kept, basis = residual.double(), keys.double(), kept.double(), basis.double()
    if basis.shape[1] == 0:
        return torch.zeros(residual.shape[1], keys.shape[1], dtype=torch.float64)
    ku, pu = keys @ basis, kept @ basis  # [m, r], [n_p, r]
    alpha = ridge * float(ku.pow(2).sum(1).mean().clamp_min(1e-12))
    gram = ku.T @ ku + pu.T @ pu + alpha * torch.eye(basis.shape[1], dtype=torch.float64)  # [r, r]
    g = torch.linalg.solve(gram, ku.T @ residual).T  # G [d_out, r]
    return g @ basis.T


def memit_update(residual: torch.Tensor, keys: torch.Tensor, kept: torch.Tensor, second: torch.Tensor,
                 lam: float, ridge: float) -> torch.Tensor:
    """Delta [d_out, d_in] float64 of ``memit`` (module docstring): ``second`` A_l [d_in, d_in]."""
    residual, keys, kept, second = residual.double(), keys.double(), kept.double(), second.double()
    alpha = ridge * float(keys.pow(2).sum(1).mean().clamp_min(1e-12))
    system = keys.T @ keys + kept.T @ kept + lam * len(keys) * second  # [d_in, d_in], symmetric
    system += alpha * torch.eye(len(system), dtype=torch.float64)
    return torch.linalg.solve(system, keys.T @ residual).T


@dataclass
class Views:
    """The images of k as the edit reads them, in batches of at most ``batch_size`` rows: the prompts of the images
    (``original``) and of their counterfactuals (``without``), and each row's image tokens its keys are taken at
    (``tokens``, long [m_i] per row)."""

    original: list[Prepared]
    without: list[Prepared]
    tokens: list[list[torch.Tensor]]

    def gather(self, batch: int, rows: torch.Tensor) -> torch.Tensor:
        """The keyed tokens' rows [m_b, d] of batch ``batch``'s recorded tensor ``rows`` [B, P, d]."""
        return torch.cat([rows[i, t] for i, t in enumerate(self.tokens[batch])])


@dataclass
class MatrixInputs:
    """What the whole-matrix rules read: the images of k with their counterfactuals (``views``), the targets on the
    model before the edit (``goals``), the keys and residuals on the model as edited so far (``keys_and_now``), the
    locality images' keys (``kept``) and the preserved second moments at site ``ffn`` (``preserved``, with their null
    bases)."""

    inputs: EditInputs
    per_unit: float
    tokens: str
    _views: Views | None = field(default=None, repr=False)
    _goals: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _kept: list[Prepared] | None = field(default=None, repr=False)

    def __post_init__(self):
        self._preserved = PreservedSite(self.inputs, self.per_unit, "ffn")

    def _chunks(self, items: list) -> list[list]:
        """``items`` in batches of at most the captioner's batch size."""
        size = max(int(self.inputs.batch_size), 1)
        return [items[i:i + size] for i in range(0, len(items), size)]

    def views(self) -> Views:
        """Every image of k that fitting may see, with at least one token to take keys at."""
        if self._views is None:
            adapter, rows = self.inputs.adapter, []
            for image, without, mask in self.inputs.k_views():
                tokens = (adapter.geometry.object_tokens(mask) if self.tokens == "object"
                          else np.arange(len(adapter.geometry)))
                if len(tokens):
                    rows.append((image, without, torch.as_tensor(tokens, dtype=torch.long)))
            batches = self._chunks(rows)
            self._views = Views([adapter.prepare([r[0] for r in b]) for b in batches],
                                [adapter.prepare([r[1] for r in b]) for b in batches],
                                [[r[2] for r in b] for b in batches])
        return self._views

    def goals(self, last: int) -> torch.Tensor:
        """Z [m, d_model] float64: the residual after layer ``last`` at every view's tokens on its counterfactual, on
        the model as it is at the first call (before the edit)."""
        if not self.views().original:
            return torch.zeros(0, self.inputs.adapter.down_proj(0).out_features, dtype=torch.float64)
        if last not in self._goals:
            views, adapter = self.views(), self.inputs.adapter
            with torch.no_grad():
                self._goals[last] = torch.cat([
                    views.gather(b, recorded(adapter, p, [last + 1], site="resid_pre")[last + 1])
                    for b, p in enumerate(views.without)]).double().cpu()
        return self._goals[last]

    def keys_and_now(self, layer: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K [m, d_ff], H [m, d_model]) float64 on the model as it is now: the activations of ``layer`` and the
        residual after layer ``last`` at every view's tokens of the original image, from one pass per batch."""
        views, adapter, keys, now = self.views(), self.inputs.adapter, [], []
        for b, prepared in enumerate(views.original):
            with torch.no_grad(), record(adapter, prepared, [layer]) as o, \
                    record(adapter, prepared, [last + 1], site="resid_pre") as h:
                run_through(adapter, prepared, last + 1)
            keys.append(views.gather(b, o.activations[layer]))
            now.append(views.gather(b, h.activations[last + 1]))
        return torch.cat(keys).double().cpu(), torch.cat(now).double().cpu()

    def kept(self, layer: int) -> torch.Tensor:
        """Kp [n_p, d_ff] float64: the activations of ``layer`` at every image token of the locality images, on the
        model as it is now (no rows without locality images)."""
        adapter = self.inputs.adapter
        if self._kept is None:
            self._kept = [adapter.prepare(b) for b in self._chunks(list(self.inputs.locality))]
        rows = [recorded(adapter, p, [layer])[layer].flatten(0, 1) for p in self._kept]  # [B * P, d_ff] each
        return torch.cat(rows).double().cpu() if rows else torch.zeros(0, adapter.d_ff, dtype=torch.float64)

    def preserved(self, layers: list[int]) -> PreservedKeys:
        """A_l of ``layers`` over at least ``per_unit`` x d_ff preserved positions."""
        return self._preserved(layers)


@dataclass
class MatrixEdit(EditRule):
    """A closed-form edit of the ``down_proj`` matrices of ``layers`` (module docstring): ``project`` true is
    ``alpha_edit`` (``threshold``: P's relative eigenvalue bound; ``ridge``: alpha over the mean squared projected key),
    false is ``memit`` (``lam``: the preserved moment's weight; ``ridge``: alpha over the mean squared key);
    ``tokens``: the keys at the object's image tokens or at every image token; ``per_unit``: preserved positions per
    FFN unit."""

    name: str = "alpha_edit"
    layers: list[int] = field(default_factory=lambda: list(range(1, 9)))
    project: bool = True
    threshold: float = 1e-2
    ridge: float = 1.0
    lam: float = 1.0
    tokens: str = "object"
    per_unit: float = 10.0
    ops: ClassVar[tuple[str, ...]] = ("erase",)
    edits_neurons: ClassVar[bool] = False

    def __post_init__(self):
        check_fields(self, "edit.rule", layers=Many(Integer(low=0)), project=Flag(),
                     threshold=Number(0.0, 1.0, low_open=True), ridge=Number(low=0.0, low_open=True),
                     lam=Number(low=0.0), tokens=Choice(TOKENS), per_unit=Number(low=0.0, low_open=True))
        self.layers = sorted({int(layer) for layer in self.layers})

    def window(self, adapter) -> list[int]:
        """``layers``, checked against the model: each below the last decoder layer (its target is the residual after
        the window, which a later layer must read)."""
        if self.layers[-1] >= adapter.num_layers - 1:
            raise SettingError("edit.rule.layers", self.layers,
                               f"use layers below {adapter.num_layers - 1}: the model has {adapter.num_layers} decoder "
                               "layers and the target is the residual after the window's last one")
        return self.layers

    def context(self, inputs: EditInputs) -> MatrixInputs:
        return MatrixInputs(inputs, self.per_unit, self.tokens)

    def prepare(self, adapter, neurons, context: MatrixInputs) -> None:
        layers = self.window(adapter)
        context.goals(layers[-1])
        preserved = context.preserved(layers)
        for layer in layers if self.project else ():  # the eigendecompositions, with the statistics
            preserved.null_basis(layer, self.threshold)

    def make(self, adapter, neurons, target, context: MatrixInputs) -> WeightEdit:
        layers = self.window(adapter)
        last = layers[-1]
        if not context.views().original:
            log.warning("%s: no image of it has an image token over its mask, so there is no key: the edit changes "
                        "nothing", context.inputs.target.knowledge.name)
            return WeightEdit([], {"rule": self.name, "layers": layers, "keys": 0})
        goals, preserved = context.goals(last), context.preserved(layers)
        deltas, reach, kept_rows = [], {}, 0
        for i, layer in enumerate(layers):
            with torch.no_grad(), applied(adapter, WeightEdit(list(deltas))):
                keys, now = context.keys_and_now(layer, last)
                kept = context.kept(layer)
                if i == 0:
                    start = float((goals - now).norm())
            residual = (goals - now) / (len(layers) - i)  # [m, d_model]
            gain = adapter.write_gain(layer)
            if gain is not None:  # the norm after the FFN multiplies the write: divide, to first order
                residual = residual / gain.double().cpu().clamp_min(1e-6)
            if self.project:
                basis = preserved.null_basis(layer, self.threshold)
                delta = alpha_update(residual, keys, kept, basis, self.ridge)
                reach[layer] = round(float((keys @ basis).norm() / keys.norm().clamp_min(1e-12)), 4)
            else:
                delta = memit_update(residual, keys, kept, preserved.second[layer], self.lam, self.ridge)
            deltas.append(LayerDelta(layer, "down_proj", "whole", delta.float()))
            kept_rows = len(kept)
        with torch.no_grad(), applied(adapter, WeightEdit(list(deltas))):
            _, now = context.keys_and_now(layers[0], last)
        left = float((goals - now).norm())
        settings = {"layers": layers, "project": self.project, "threshold": self.threshold, "ridge": self.ridge,
                    "lam": self.lam, "tokens": self.tokens, "per_unit": self.per_unit}
        return WeightEdit(deltas, {"rule": self.name, **settings, "preserved_positions": preserved.positions,
                                   "keys": len(goals), "kept_keys": kept_rows, "reach": reach,
                                   "target_closed": round(1 - left / max(start, 1e-12), 4)})
