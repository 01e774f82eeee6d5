"""The input-side edit: the set's neurons stop responding to the object, and nothing preserved sees a change
(docs/method.md, "Locality by construction").

A neuron u of a gated FFN has activation O_u = act(g_u . x) * (w_u . x), x the MLP input, w_u row u of ``up_proj``.
The ``up`` factor is linear in x, so the row update that silences u at the object's image tokens has a closed form,
and AlphaEdit's projection P (``knexp.editing.preserved``) keeps it off the preserved inputs. Per edited layer, with
W [U, d_model] the set's ``up_proj`` rows, X1 [m, d_model] the MLP inputs at the object's image tokens of the fitting
images (``PatchGeometry.object_tokens``), and alpha = ``ridge`` times the mean diagonal of X1 P X1^T:

    Δ = argmin over Δ = Δ P of ||(W + Δ) X1^T||^2 + alpha ||Δ||^2
      = -W X1^T (X1 P X1^T + alpha I)^-1 X1 P                                    [U, d_model]

so (W + Δ) x = W x wherever P x = 0: at preserved positions the set's up factors, hence their activations and the
layer's output, are unchanged up to what the relative threshold lets through. The *reach* of a layer,
|P X1| / |X1| (Frobenius), says how much of the object's inputs lies outside the preserved span; where it is small the
edit cannot silence the neurons without touching preserved inputs, and the ridge keeps the update from blowing up.
Only an erase: the rows can take a response away, not write another object in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from knexp.editing.inputs import EditInputs, PreservedSite
from knexp.editing.preserved import PreservedKeys
from knexp.editing.rules import EditRule
from knexp.editing.sets import by_layer
from knexp.models.hooks.record import recorded
from knexp.models.weight_edit import LayerDelta, WeightEdit
from knexp.settings import Number, check_fields


def input_null_update(w: torch.Tensor, keys: torch.Tensor, projection: torch.Tensor, ridge: float) -> torch.Tensor:
    """Δ [U, d] (float64) of the module docstring: ``w`` [U, d] rows, ``keys`` X1 [m, d], ``projection`` P [d, d]."""
    w, keys, projection = w.double(), keys.double(), projection.double()
    gram = keys @ projection @ keys.T  # X1 P X1^T [m, m]
    alpha = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    solved = torch.linalg.solve(gram + alpha * torch.eye(len(gram), dtype=gram.dtype), keys @ projection)  # [m, d]
    return -(w @ keys.T) @ solved


@dataclass
class InputSide:
    """What the input-side rule reads, computed for the layers a set needs and kept: the MLP inputs at the object's
    image tokens of the identification images, and the preserved keys (``EditInputs.preserved``)."""

    inputs: EditInputs
    per_unit: float
    _keys: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self._preserved = PreservedSite(self.inputs, self.per_unit)

    def object_inputs(self, layers: list[int]) -> dict[int, torch.Tensor]:
        """{layer: X1 [m, d_model] float64}: the MLP inputs at the object's image tokens of the identification
        images."""
        missing = [layer for layer in layers if layer not in self._keys]
        if missing:
            adapter, data = self.inputs.adapter, self.inputs.data
            rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in missing}
            for result in self.inputs.found.results:
                prepared = adapter.prepare([data.load_image(result.candidate.image_id)])
                tokens = adapter.geometry.object_tokens(data.instance_mask(result.candidate.annotation_id))
                inputs = recorded(adapter, prepared, missing, site="ffn_in")  # {layer: [1, P, d_model]}
                for layer in missing:
                    rows[layer].append(inputs[layer][0, torch.as_tensor(tokens, dtype=torch.long)].double())
            self._keys.update({layer: torch.cat(rows[layer]) for layer in missing})
        return {layer: self._keys[layer] for layer in layers}

    def preserved(self, layers: list[int]) -> PreservedKeys:
        """The preserved keys of ``layers``, from at least ``per_unit`` x d_ff positions."""
        return self._preserved(layers)


@dataclass
class InputNull(EditRule):
    """The input-side edit of the set's ``up_proj`` rows (module docstring): ``threshold`` is P's relative eigenvalue
    bound, ``ridge`` alpha over the mean diagonal, ``per_unit`` the preserved positions per FFN unit."""

    name: str = "input_null"
    threshold: float = 1e-2
    ridge: float = 1e-3
    per_unit: float = 10.0
    ops: ClassVar[tuple[str, ...]] = ("erase",)

    def __post_init__(self):
        check_fields(self, "edit.rule", threshold=Number(0.0, 1.0, low_open=True), ridge=Number(low=0.0, low_open=True),
                     per_unit=Number(low=0.0, low_open=True))

    def context(self, inputs: EditInputs) -> InputSide:
        return InputSide(inputs, self.per_unit)

    def prepare(self, adapter, neurons, context: InputSide) -> None:
        layers = sorted(set(neurons.layers.tolist()))
        context.object_inputs(layers)
        context.preserved(layers)

    def make(self, adapter, neurons, target, context: InputSide) -> WeightEdit:
        units = by_layer(neurons)
        keys, preserved = context.object_inputs(list(units)), context.preserved(list(units))
        deltas, reach = [], {}
        with torch.no_grad():
            for layer, rows in units.items():
                projection = preserved.null_projection(layer, self.threshold)
                w = adapter.ffn_linear(layer, "up_proj").weight[rows.to(adapter.device)].double().cpu()
                delta = input_null_update(w, keys[layer], projection, self.ridge)
                deltas.append(LayerDelta(layer, "up_proj", "rows", delta.float(), rows))
                reach[layer] = round(float((keys[layer] @ projection).norm() / keys[layer].norm().clamp_min(1e-12)), 4)
        return WeightEdit(deltas, {"rule": self.name, "threshold": self.threshold, "ridge": self.ridge,
                                   "per_unit": self.per_unit, "preserved_positions": preserved.positions,
                                   "reach": reach})
