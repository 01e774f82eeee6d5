"""Neuron instrumentation at image tokens: record activations (and gradients) and intervene on them.

Both work through forward pre-hooks on each layer's FFN output projection (``Adapter.ffn_out``), whose
input is the neuron activation O^l [B, T, d_f] (METHOD.md, "Notation"). Hooks act only on a pass whose
sequence length is the prepared prompt's (the prefill): cached decoding steps (length 1) are untouched,
so an intervention reaches generation through the KV cache alone. Every hook is removed when its
``with`` block ends, also on an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from knexp.models.adapters.base import Adapter, Prepared

REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max": lambda t: t.amax(dim=1),  # over image positions: [B, P, d_f] -> [B, d_f]
    "mean": lambda t: t.mean(dim=1),
}


@contextmanager
def attached(adapter: Adapter, hooks: dict[int, Callable]) -> Iterator[None]:
    """Register ``hooks[l]`` as a forward pre-hook on layer l's FFN output projection; always remove them."""
    handles = []
    try:
        for layer, hook in hooks.items():
            handles.append(adapter.ffn_out(layer).register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def gradient_anchor(adapter: Adapter, prompt_len: int) -> Iterator[None]:
    """Make every later activation of a ``prompt_len`` pass part of the autograd graph, cheaply.

    A zero scalar that requires grad is added to the first decoder layer's input: values are unchanged,
    but each layer's O^l now has a gradient path, so a tensor hook on O^l receives dy/dO^l in the one
    backward pass. Nothing is copied or detached, so no path between layers is cut.
    """

    def hook(module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if h.shape[1] != prompt_len:
            return None
        h = h + torch.zeros((), dtype=h.dtype, device=h.device, requires_grad=True)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": h}
        return (h, *args[1:]), kwargs

    handle = adapter.decoder_layers()[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _index(prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [B, 1], positions [B, P]) to gather image-token rows of a [B, T, ...] tensor."""
    pos = prepared.image_positions
    return torch.arange(pos.shape[0], device=pos.device)[:, None], pos


def _resolve_layers(adapter: Adapter, layers) -> list[int]:
    n = adapter.num_layers
    chosen = list(range(n)) if layers is None else sorted({int(layer) for layer in layers})
    bad = [layer for layer in chosen if not 0 <= layer < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {n} decoder layers (0..{n - 1})")
    return chosen


@dataclass
class Recording:
    """What ``record`` captured, per layer index.

    ``activations[l]``: O'^l, float32 [B, P, d_f], or [B, d_f] after ``reduce``.
    ``gradients[l]``: dy/dO'^l [B, P, d_f] (``with_grad`` and no ``reduce``).
    ``gradcam[l]``: O'^l * dy/dO'^l [B, P, d_f] or reduced [B, d_f] (``with_grad``).
    Gradients appear after the caller's ``backward()`` on a scalar of the recorded pass.
    """

    activations: dict[int, torch.Tensor] = field(default_factory=dict)
    gradients: dict[int, torch.Tensor] = field(default_factory=dict)
    gradcam: dict[int, torch.Tensor] = field(default_factory=dict)
    passes: int = 0

    def stacked(self, what: str = "activations") -> torch.Tensor:
        """Layers stacked in layer order: [L, B, P, d_f] (or [L, B, d_f])."""
        d = getattr(self, what)
        return torch.stack([d[k] for k in sorted(d)])


@contextmanager
def record(adapter: Adapter, prepared: Prepared, layers=None, with_grad: bool = False, reduce: str | None = None) -> Iterator[Recording]:
    """Record O' at the image positions of ``prepared`` for ``layers`` (default: all).

    With ``with_grad``, the pass is anchored (``gradient_anchor``) and a tensor hook on each O^l catches
    dy/dO^l in the caller's one backward pass of any scalar y; with ``reduce``, only the reduction of
    O' * dy/dO' is kept. The caller runs the forward (under ``torch.enable_grad()``) and the backward.
    """
    if reduce is not None and reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; use one of {sorted(REDUCTIONS)} or None")
    rows, pos = _index(prepared)
    layers_ = _resolve_layers(adapter, layers)
    rec = Recording()

    def make_hook(layer: int):
        def hook(module, args):
            x = args[0]  # [B, T, d_f]
            if x.shape[1] != prepared.prompt_len:
                return None
            o_det = x[rows, pos].detach().float()  # [B, P, d_f]
            rec.activations[layer] = REDUCTIONS[reduce](o_det) if reduce else o_det
            if layer == layers_[0]:
                rec.passes += 1
            if with_grad and not x.requires_grad:
                raise RuntimeError("record(with_grad=True) needs the forward pass under torch.enable_grad()")
            if with_grad:

                def catch(grad: torch.Tensor) -> None:
                    g = grad[rows, pos].float()
                    if reduce:
                        rec.gradcam[layer] = REDUCTIONS[reduce](o_det * g)
                    else:
                        rec.gradients[layer] = g
                        rec.gradcam[layer] = o_det * g

                x.register_hook(catch)
            return None

        return hook

    with contextlib.ExitStack() as stack:
        if with_grad:
            stack.enter_context(gradient_anchor(adapter, prepared.prompt_len))
        stack.enter_context(attached(adapter, {layer: make_hook(layer) for layer in layers_}))
        yield rec


@dataclass
class LayerEdit:
    """An intervention on some units of one layer at every image position, per batch row.

    ``units``: long [U], the units edited. Applied in order: ``scale`` (float [B] or scalar), ``set_to``
    (float [B] or scalar), ``add`` (float [B, P], one value per row and position shared by the units as in
    METHOD.md's v in R^P, or [B, P, U] for an independent draw per neuron). ``row_mask``: bool [B, U],
    which (row, unit) pairs are edited (default all), so each row can carry its own neuron set.
    """

    units: torch.Tensor
    add: torch.Tensor | None = None
    scale: torch.Tensor | float | None = None
    set_to: torch.Tensor | float | None = None
    row_mask: torch.Tensor | None = None
    applied: int = 0  # passes this edit changed (prefill only: one per forward of the prepared batch)

    def apply(self, o: torch.Tensor) -> torch.Tensor:
        """New values for o [B, P, U] (the selected units at image positions)."""
        new = o
        if self.scale is not None:
            new = new * _per_row(self.scale, o)
        if self.set_to is not None:
            new = torch.zeros_like(new) + _per_row(self.set_to, o)
        if self.add is not None:
            add = self.add.to(o.device, o.dtype)
            new = new + (add[..., None] if add.dim() == 2 else add)
        if self.row_mask is not None:
            new = torch.where(self.row_mask.to(o.device)[:, None, :], new, o)
        return new


def _per_row(v, o: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=o.dtype, device=o.device)
    return t.view(-1, 1, 1) if t.dim() == 1 else t


@contextmanager
def intervene(adapter: Adapter, prepared: Prepared, edits: dict[int, LayerEdit]) -> Iterator[dict[int, LayerEdit]]:
    """Apply ``edits[l]`` to O'^l at the image positions of ``prepared``, in its prefill only."""
    rows, pos = _index(prepared)
    _resolve_layers(adapter, edits)

    def make_hook(edit: LayerEdit):
        units = edit.units.to(pos.device)

        def hook(module, args):
            x = args[0]
            if x.shape[1] != prepared.prompt_len:
                return None  # a cached decoding step: leave it alone
            r, p, u = rows[:, :, None], pos[:, :, None], units[None, None, :]
            x = x.clone()
            x[r, p, u] = edit.apply(x[r, p, u])
            edit.applied += 1
            return (x, *args[1:])

        return hook

    with attached(adapter, {layer: make_hook(e) for layer, e in edits.items()}):
        yield edits
