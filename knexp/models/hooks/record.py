"""Recording a hook site's tensor (default O', the neuron activations) at the image tokens, and its gradient."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from knexp.models.adapters.adapter import Adapter
from knexp.models.hooks.attach import attached, gradient_anchor
from knexp.models.prepared import Prepared

REDUCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max": lambda t: t.amax(dim=1),  # over image positions: [B, P, d_f] -> [B, d_f]
    "mean": lambda t: t.mean(dim=1),
}


def image_index(prepared: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [B, 1], positions [B, P]) to gather image-token rows of a [B, T, ...] tensor."""
    pos = prepared.image_positions
    return torch.arange(pos.shape[0], device=pos.device)[:, None], pos


def resolve_layers(adapter: Adapter, layers) -> list[int]:
    """``layers`` (default all) sorted and checked against the model's depth."""
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
def record(adapter: Adapter, prepared: Prepared, layers=None, with_grad: bool = False, reduce: str | None = None,
           site: str = "ffn") -> Iterator[Recording]:
    """Record the ``site`` tensor (default O') at the image positions of ``prepared`` for ``layers`` (default all).

    With ``with_grad``, the pass is anchored (``gradient_anchor``) and a tensor hook on each O^l catches
    dy/dO^l in the caller's one backward pass of any scalar y; with ``reduce``, only the reduction of
    O' * dy/dO' is kept. The caller runs the forward (under ``torch.enable_grad()``) and the backward.
    """
    if reduce is not None and reduce not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduce!r}; use one of {sorted(REDUCTIONS)} or None")
    rows, pos = image_index(prepared)
    layers_ = resolve_layers(adapter, layers)
    rec = Recording()

    def make_hook(layer: int):
        def hook(x: torch.Tensor, start: int) -> None:  # [B, n, d]: prompt positions start..T-1
            here = pos - start  # the image positions within this pass
            o_det = x[rows, here].detach().float()  # [B, P, d]
            rec.activations[layer] = REDUCTIONS[reduce](o_det) if reduce else o_det
            if layer == layers_[0]:
                rec.passes += 1
            if with_grad and not x.requires_grad:
                raise RuntimeError("record(with_grad=True) needs the forward pass under torch.enable_grad()")
            if with_grad:

                def catch(grad: torch.Tensor) -> None:
                    g = grad[rows, here].float()
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
            stack.enter_context(gradient_anchor(adapter, prepared))
        stack.enter_context(attached(adapter, {(site, layer): make_hook(layer) for layer in layers_}, prepared))
        yield rec


class _Enough(Exception):
    """Raised inside a pass by ``run_through`` once the layers it needs have run."""


def run_through(adapter: Adapter, prepared: Prepared, last: int) -> None:
    """``adapter.run_hooks(prepared)``, stopped once decoder layer ``last`` has run (at the input of layer last + 1,
    after every hook armed there before): what hooks at layers <= ``last`` record cannot depend on later layers, so
    those, the final norm and the LM head are skipped. The stop acts on the prepared prompt's pass only (the prefill
    guard of ``attached``), and a forward keeps no state between calls (no KV cache), so nothing is left half done."""
    if last + 1 >= adapter.num_layers:
        adapter.run_hooks(prepared)
        return

    def stop(x: torch.Tensor, start: int) -> None:
        raise _Enough

    try:
        with attached(adapter, {("resid_pre", last + 1): stop}, prepared):
            adapter.run_hooks(prepared)
    except _Enough:
        pass


def recorded(adapter: Adapter, prepared: Prepared, layers=None, site: str = "ffn") -> dict[int, torch.Tensor]:
    """{layer: float32 [B, P, d]}: the ``site`` tensor (default O') at the image positions of ``prepared``, from one
    pass without gradients that stops after the last layer recorded (``record`` around ``run_through``)."""
    with torch.no_grad(), record(adapter, prepared, layers=layers, site=site) as rec:
        run_through(adapter, prepared, max(resolve_layers(adapter, layers)))
    return rec.activations
