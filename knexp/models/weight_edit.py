"""A weight edit of a model's FFNs, as an object and as a file (docs/method.md, "Editing with the found neurons").

An edit adds a delta to parts of the linear maps of some layers' FFNs (``LayerDelta``): columns of ``down_proj``
(W_out: what some neurons write), rows of ``gate_proj`` or ``up_proj`` (what some neurons read), or a whole matrix,
and perhaps the map's bias (a bias the map lacks is created at zero). ``applied`` changes the model's weights in memory
for the length of a ``with`` block and restores them bit for bit on exit, also after an exception; ``permanent`` does
the same without restoring (a job's ``model.edit``). The base weights on disk are never written.

A file (safetensors) holds only the deltas, under ``<layer>.<map>.columns`` or ``.rows`` (the long indices, absent for
a whole matrix), ``<layer>.<map>.delta`` and ``<layer>.<map>.bias``, and in its metadata the provenance, the identity of
the model it was made for and that model's shape. ``load`` checks every tensor against the model and the metadata
before anything is applied; a file made for another model, of another shape or damaged is refused with one line that
names it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from knexp.io import atomic_path
from knexp.user_errors import UserError

FFN_MAPS = ("down_proj", "gate_proj", "up_proj")  # the FFN's linear maps an edit may change (``Adapter.ffn_linear``)
AXES = ("columns", "rows", "whole")
FORMAT = 2  # of the file; 1 held down_proj columns only, as <layer>.units / .delta / .bias


class EditFileError(UserError):
    """An edit file that cannot be used with this model: unreadable, damaged, made for another model or of another
    shape."""


@dataclass
class LayerDelta:
    """What an edit adds to one linear map (``module``, one of ``FFN_MAPS``) of layer ``layer``'s FFN. ``axis``:
    ``columns`` (``delta`` [out, U] added to W[:, index], ``index`` long [U]: for ``down_proj``, the value vectors of
    neurons ``index``), ``rows`` (``delta`` [U, in] added to W[index, :]) or ``whole`` (``delta`` W's shape, no index).
    ``bias`` [out] is added to the map's bias (None: the bias is not touched)."""

    layer: int
    module: str
    axis: str
    delta: torch.Tensor
    index: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @classmethod
    def columns(cls, layer: int, units: torch.Tensor, delta: torch.Tensor,
                bias: torch.Tensor | None = None) -> LayerDelta:
        """A change of neurons ``units``' value vectors: ``delta`` [d_model, U] added to W_out[:, units]."""
        return cls(int(layer), "down_proj", "columns", delta, units, bias)

    @property
    def units(self) -> int:
        """How many of the FFN's units the delta changes: its columns or rows, or every unit for a whole matrix (the
        FFN's units are ``down_proj``'s columns and ``gate_proj``'s and ``up_proj``'s rows)."""
        if self.axis == "whole":
            return int(self.delta.shape[1] if self.module == "down_proj" else self.delta.shape[0])
        return len(self.index)

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.index, self.delta, self.bias


@dataclass
class WeightEdit:
    """An edit: its deltas (at most one per layer and map, layers ascending) and its provenance (model identity, op,
    rule, settings, neurons)."""

    deltas: list[LayerDelta]
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self.deltas = sorted(self.deltas, key=lambda d: (d.layer, FFN_MAPS.index(d.module)))

    @property
    def layers(self) -> list[int]:
        """The edited layers, ascending."""
        return sorted({d.layer for d in self.deltas})

    def at(self, layer: int, module: str = "down_proj") -> LayerDelta:
        """The delta of ``module`` in ``layer`` (KeyError where the edit has none)."""
        for d in self.deltas:
            if (d.layer, d.module) == (layer, module):
                return d
        raise KeyError((layer, module))

    def digest(self) -> str:
        """sha1 of the edit's tensors: names what an edited model computes (cache keys)."""
        h = hashlib.sha1()
        for d in self.deltas:
            h.update(f"{d.layer}.{d.module}.{d.axis}".encode())
            for t in d.tensors():
                h.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:20]

    @property
    def parameters_changed(self) -> int:
        return sum(d.delta.numel() + (0 if d.bias is None else d.bias.numel()) for d in self.deltas)

    @property
    def units_changed(self) -> int:
        """Units (columns or rows) changed over every map and layer."""
        return sum(d.units for d in self.deltas)

    def norm(self) -> float:
        """||Delta||_F over every delta (and bias)."""
        total = sum(_squares(d.delta) + _squares(d.bias) for d in self.deltas)
        return total ** 0.5

    def relative_norm(self, adapter) -> float:
        """||Delta||_F / ||W||_F, W the weights of the edited maps."""
        base = sum(_squares(adapter.ffn_linear(d.layer, d.module).weight) for d in self.deltas) ** 0.5
        return self.norm() / base if base else 0.0

    def scaled(self, factor: float) -> WeightEdit:
        """The same edit with every delta times ``factor`` (a control matched to another edit's norm)."""
        return WeightEdit([replace(d, delta=d.delta * factor, bias=None if d.bias is None else d.bias * factor)
                           for d in self.deltas], {**self.provenance, "scaled": factor})


def _squares(t: torch.Tensor | None) -> float:
    """The sum of squares of ``t``'s entries, in float64 (0 for None)."""
    return 0.0 if t is None else float(t.double().pow(2).sum())


def _view(weight: torch.Tensor, d: LayerDelta, index: torch.Tensor | None):
    """(read, write): the part of ``weight`` that ``d`` changes, and a function that stores a new value there."""
    if d.axis == "columns":
        return weight[:, index], lambda v: weight.__setitem__((slice(None), index), v)
    if d.axis == "rows":
        return weight[index], lambda v: weight.__setitem__(index, v)
    return weight, weight.copy_


@torch.no_grad()
def _apply(adapter, edit: WeightEdit, saved: list) -> None:
    """Add ``edit`` to the model's weights, appending to ``saved`` what restores each map as it is changed (a bias the
    map lacks is created at zero)."""
    for d in edit.deltas:
        linear = adapter.ffn_linear(d.layer, d.module)
        index = None if d.index is None else d.index.to(linear.weight.device)
        part, write = _view(linear.weight, d, index)
        saved.append((linear, write, part.clone(), None if linear.bias is None else linear.bias.clone()))
        write(part + d.delta.to(linear.weight))
        if d.bias is not None:
            if linear.bias is None:
                zeros = torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
                linear.bias = nn.Parameter(zeros, requires_grad=False)
            linear.bias += d.bias.to(linear.bias)


@torch.no_grad()
def _restore(saved: list) -> None:
    for linear, write, part, bias in reversed(saved):
        write(part)
        if bias is None:
            linear.bias = None
        else:
            linear.bias.copy_(bias)


@contextmanager
def applied(adapter, edit: WeightEdit) -> Iterator[WeightEdit]:
    """``edit`` applied to the model's weights for the block; what it changed is restored bit for bit on exit, also
    after an exception, and a bias it had to create is removed."""
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
    return {"num_layers": adapter.num_layers, "d_model": int(adapter.down_proj(0).out_features),
            "d_ff": int(adapter.d_ff)}


def save(edit: WeightEdit, path: str | Path, adapter, model_key: str, after: list[str] | None = None) -> Path:
    """``edit`` as a safetensors file of its deltas only, with its provenance, the model it was made on (``model_key``,
    the identity of the model with every earlier edit applied) and the hashes of those earlier edit files (``after``,
    in their order)."""
    from safetensors.torch import save_file

    tensors = {}
    for d in edit.deltas:
        name = f"{d.layer}.{d.module}"
        if d.index is not None:
            tensors[f"{name}.{d.axis}"] = d.index.long().cpu().contiguous()
        tensors[f"{name}.delta"] = d.delta.float().cpu().contiguous()
        if d.bias is not None:
            tensors[f"{name}.bias"] = d.bias.float().cpu().contiguous()
    meta = {"knexp_edit": json.dumps({**edit.provenance, "model": model_key, "shape": shape_of(adapter),
                                      "after": list(after or []), "format": FORMAT},
                                     sort_keys=True, default=str)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load(path: str | Path, adapter, model_key: str, key: str = "model.edit", earlier: list[str] | None = None
         ) -> WeightEdit:
    """The edit in ``path``, checked whole against the model it is for (``model_key``, its identity with the edit files
    before it applied, whose hashes are ``earlier``) before anything is applied; ``key`` names the setting."""
    from safetensors import safe_open

    path = Path(path)
    named = f"{key}={str(path)!r}"
    if not path.is_file():
        raise EditFileError(f"{named}: no such file; give an edit file written by task=edit")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["knexp_edit"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors' own error, a missing key, bad JSON: not a knexp edit file
        raise EditFileError(f"{named} is not a knexp edit file ({exc}); give one written by task=edit") from exc
    if meta.get("format") != FORMAT:
        raise EditFileError(f"{named} was written by another version of knexp (format {meta.get('format', 1)}, this "
                            f"one reads {FORMAT}); make the edit again with task=edit")
    after, earlier = meta.get("after", []), list(earlier or [])
    if meta.get("model") != model_key and after != earlier:
        made = f"after {len(after)} other edit file(s) ({', '.join(h[:8] for h in after)})" if after else "first"
        raise EditFileError(f"{named} was made {made}, but model.edit applies {len(earlier)} before it "
                            f"({', '.join(h[:8] for h in earlier) or 'none'}): list the files in the order they were "
                            "made, none missing")
    if meta.get("model") != model_key:
        raise EditFileError(f"{named} was made for another model (identity {meta.get('model')}, this one is "
                            f"{model_key}); edit this model with task=edit")
    if meta.get("shape") != shape_of(adapter):
        raise EditFileError(f"{named} is for a decoder of shape {meta.get('shape')}, this one is {shape_of(adapter)}")
    edit = WeightEdit(_deltas(tensors, named),
                      {k: v for k, v in meta.items() if k not in ("model", "shape", "format", "after")})
    for d in edit.deltas:
        _check(d, adapter.ffn_linear(d.layer, d.module) if 0 <= d.layer < adapter.num_layers else None, named)
    return edit


def _deltas(tensors: dict[str, torch.Tensor], named: str) -> list[LayerDelta]:
    """The deltas a file's tensors hold (``<layer>.<map>.<part>``), or ``EditFileError`` for a name that is none."""
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        layer, module, part = (name.split(".") + ["", ""])[:3]
        if not layer.isdigit() or module not in FFN_MAPS or part not in ("delta", "bias", "columns", "rows"):
            raise EditFileError(f"{named} holds a tensor {name!r} that no edit writes; make the edit again with "
                                "task=edit")
        parts.setdefault((int(layer), module), {})[part] = tensor
    deltas = []
    for (layer, module), got in sorted(parts.items()):
        axes = [a for a in ("columns", "rows") if a in got]
        if "delta" not in got or len(axes) > 1:
            raise EditFileError(f"{named}: layer {layer}'s {module} has {sorted(got)}, not one delta with at most one "
                                "index")
        axis = axes[0] if axes else "whole"
        deltas.append(LayerDelta(layer, module, axis, got["delta"], got.get(axis), got.get("bias")))
    return deltas


def _check(d: LayerDelta, linear: nn.Linear | None, named: str) -> None:
    """``EditFileError`` naming the fault where ``d`` cannot apply to ``linear`` (None: no such layer)."""
    where = f"{named}: layer {d.layer}'s {d.module}"
    if linear is None:
        raise EditFileError(f"{named}: layer {d.layer} is outside this model")
    out, width = linear.weight.shape
    if d.index is not None:
        size = width if d.axis == "columns" else out
        if d.index.dim() != 1 or d.index.dtype != torch.long or len(torch.unique(d.index)) != len(d.index):
            raise EditFileError(f"{where}: its {d.axis} are not distinct integer indices")
        if len(d.index) and not (0 <= int(d.index.min()) and int(d.index.max()) < size):
            raise EditFileError(f"{where}: a {d.axis[:-1]} index is outside 0..{size - 1}")
    expected = {"columns": (out, len(d.index) if d.index is not None else 0), "whole": (out, width),
                "rows": (len(d.index) if d.index is not None else 0, width)}[d.axis]
    if tuple(d.delta.shape) != expected:
        raise EditFileError(f"{where}: its delta is {tuple(d.delta.shape)}, its {d.axis} need {expected}")
    if d.bias is not None and tuple(d.bias.shape) != (out,):
        raise EditFileError(f"{where}: its bias is {tuple(d.bias.shape)}, the map needs ({out},)")
    if not all(bool(torch.isfinite(t).all()) for t in (d.delta, d.bias) if t is not None):
        raise EditFileError(f"{where}: its delta holds NaN or Inf")
