"""A weight edit of some neurons' output weights, as an object and as a file (METHOD.md, "Beyond the paper": editing).

An edit changes only the columns of ``down_proj`` (W_out) that belong to its neurons, layer by layer, and perhaps the
layer's ``down_proj`` bias (the ``mean`` rule folds a neuron's mean output into it). ``applied`` changes the model's
weights in memory for the length of a ``with`` block and restores them bit for bit on exit, also after an exception;
``permanent`` does the same without restoring (a job's ``model.edit``). The base weights on disk are never written.

A file holds only the changed columns (safetensors: ``<layer>.units``, ``<layer>.delta`` and ``<layer>.bias``) and its
provenance in the metadata: the model's identity, the neuron set, the rule and its settings. A file made for another
model, or of another shape, is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from knexp.io import atomic_path
from knexp.user_errors import UserError


class EditFileError(UserError):
    """An edit file that cannot be used with this model: unreadable, made for another model, or of another shape."""


@dataclass
class ColumnDelta:
    """What an edit adds to one layer: ``delta`` [d_model, U] to W_out[:, units] (``units`` long [U]), and ``bias``
    [d_model] to down_proj's bias (None: the bias is not touched)."""

    units: torch.Tensor
    delta: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class WeightEdit:
    """An edit: by layer, what it adds (``ColumnDelta``), and its provenance (model identity, op, rule, settings,
    neurons)."""

    layers: dict[int, ColumnDelta]
    provenance: dict = field(default_factory=dict)

    def digest(self) -> str:
        """sha1 of the edit's tensors: names what an edited model computes (cache keys)."""
        h = hashlib.sha1()
        for layer in sorted(self.layers):
            d = self.layers[layer]
            for t in (d.units, d.delta, d.bias):
                h.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:20]

    @property
    def parameters_changed(self) -> int:
        return sum(d.delta.numel() + (0 if d.bias is None else d.bias.numel()) for d in self.layers.values())

    def norm(self) -> float:
        """||Delta||_F over every changed column (and bias)."""
        total = sum(float(d.delta.double().pow(2).sum()) + (0.0 if d.bias is None else float(d.bias.double().pow(2).sum()))
                    for d in self.layers.values())
        return total ** 0.5

    def relative_norm(self, adapter) -> float:
        """||Delta||_F / ||W||_F, W the down_proj weights of the edited layers."""
        base = sum(float(adapter.down_proj(layer).weight.double().pow(2).sum()) for layer in self.layers) ** 0.5
        return self.norm() / base if base else 0.0

    def scaled(self, factor: float) -> WeightEdit:
        """The same edit with every delta times ``factor`` (a control matched to another edit's norm)."""
        return WeightEdit({layer: ColumnDelta(d.units, d.delta * factor, None if d.bias is None else d.bias * factor)
                           for layer, d in self.layers.items()}, {**self.provenance, "scaled": factor})


def _linear(adapter, layer: int) -> nn.Linear:
    return adapter.down_proj(layer)


@torch.no_grad()
def _apply(adapter, edit: WeightEdit, saved: list) -> None:
    """Add ``edit`` to the model's weights, appending to ``saved`` what restores each layer as it is changed (a bias the
    layer lacks is created at zero)."""
    for layer, d in edit.layers.items():
        linear = _linear(adapter, layer)
        units = d.units.to(linear.weight.device)
        saved.append((linear, units, linear.weight[:, units].clone(), None if linear.bias is None else linear.bias.clone()))
        linear.weight[:, units] += d.delta.to(linear.weight)
        if d.bias is not None:
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device),
                                           requires_grad=False)
            linear.bias += d.bias.to(linear.bias)


@torch.no_grad()
def _restore(saved: list) -> None:
    for linear, units, columns, bias in reversed(saved):
        linear.weight[:, units] = columns
        if bias is None:
            linear.bias = None
        else:
            linear.bias.copy_(bias)


@contextmanager
def applied(adapter, edit: WeightEdit) -> Iterator[WeightEdit]:
    """``edit`` applied to the model's weights for the block; the columns (and biases) it changed are restored bit for
    bit on exit, also after an exception, and a bias it had to create is removed."""
    saved: list = []
    try:
        _apply(adapter, edit, saved)
        yield edit
    finally:
        _restore(saved)


def permanent(adapter, edit: WeightEdit) -> None:
    """Apply ``edit`` to the model in memory for good (``model.edit``: the base weights on disk are not touched)."""
    _apply(adapter, edit, [])


def shape_of(adapter) -> dict:
    """What an edit file must match: the decoder's depth and widths."""
    return {"num_layers": adapter.num_layers, "d_model": int(adapter.down_proj(0).out_features), "d_ff": int(adapter.d_ff)}


def save(edit: WeightEdit, path: str | Path, adapter, model_key: str) -> Path:
    """``edit`` as a safetensors file of only its changed columns, with its provenance and the model it was made for."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, d in edit.layers.items():
        tensors[f"{layer}.units"] = d.units.long().cpu().contiguous()
        tensors[f"{layer}.delta"] = d.delta.float().cpu().contiguous()
        if d.bias is not None:
            tensors[f"{layer}.bias"] = d.bias.float().cpu().contiguous()
    meta = {"knexp_edit": json.dumps({**edit.provenance, "model": model_key, "shape": shape_of(adapter)}, sort_keys=True, default=str)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load(path: str | Path, adapter, model_key: str) -> WeightEdit:
    """The edit in ``path``, checked against the model it is for (``model_key``, its identity without the edit)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EditFileError(f"model.edit={str(path)!r}: no such file; give an edit file written by task=edit")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["knexp_edit"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors' own error, a missing key, bad JSON: not a knexp edit file
        raise EditFileError(f"model.edit={str(path)!r} is not a knexp edit file ({exc}); give one written by task=edit") from exc
    if meta.get("model") != model_key:
        raise EditFileError(f"model.edit={str(path)!r} was made for another model (identity {meta.get('model')}, this one is "
                            f"{model_key}); edit this model with task=edit")
    if meta.get("shape") != shape_of(adapter):
        raise EditFileError(f"model.edit={str(path)!r} is for a decoder of shape {meta.get('shape')}, this one is {shape_of(adapter)}")
    layers = {}
    for name in tensors:
        layer, part = name.split(".")
        if part == "units":
            layer = int(layer)
            layers[layer] = ColumnDelta(tensors[name], tensors[f"{layer}.delta"], tensors.get(f"{layer}.bias"))
    return WeightEdit(layers, {k: v for k, v in meta.items() if k not in ("model", "shape")})
