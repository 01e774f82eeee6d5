"""Activation patches: a hook site's tensor (default O') changed at the image tokens, in the prompt's pass only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from knexp.models.adapters.adapter import Adapter
from knexp.models.hooks.attach import attached
from knexp.models.hooks.record import image_index, resolve_layers
from knexp.models.prepared import Prepared


@dataclass
class ActivationPatch:
    """An intervention on some units of one layer's site tensor at every image position, per batch row.

    ``units``: long [U], the units patched, or None for all of them (a whole-state patch). Applied in order:
    ``scale`` (float [B] or scalar), ``set_to`` (float [B], scalar, or [B, P, U] values per row, position and
    unit), ``add`` (float [B, P], one value per row and position shared by the units, as the paper's noise
    v in R^P is: docs/method.md, "Evaluation: captions under noise"; or [B, P, U] per unit). ``row_mask``: bool [B, U]
    (or [B]), which rows (and units) are patched (default all), so each row can carry its own neuron set.
    """

    units: torch.Tensor | None
    add: torch.Tensor | None = None
    scale: torch.Tensor | float | None = None
    set_to: torch.Tensor | float | None = None
    row_mask: torch.Tensor | None = None
    applied: int = 0  # passes this patch changed (prefill only: one per forward of the prepared batch)

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
            mask = self.row_mask.to(o.device)
            new = torch.where(mask[:, None, :] if mask.dim() == 2 else mask[:, None, None], new, o)
        return new


def _per_row(v, o: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=o.dtype, device=o.device)
    return t.view(-1, 1, 1) if t.dim() == 1 else t


@contextmanager
def intervene(adapter: Adapter, prepared: Prepared, patches: dict[int, ActivationPatch],
              site: str = "ffn") -> Iterator[dict[int, ActivationPatch]]:
    """Apply ``patches[l]`` to the ``site`` tensor (default O'^l) at the image positions of ``prepared``, in its
    prefill only."""
    rows, pos = image_index(prepared)
    resolve_layers(adapter, patches)

    def make_hook(patch: ActivationPatch):
        units = None if patch.units is None else patch.units.to(pos.device)

        def hook(x: torch.Tensor, start: int) -> torch.Tensor:
            x = x.clone()
            here = pos - start  # the image positions within this pass
            if units is None:
                x[rows, here] = patch.apply(x[rows, here])
            else:
                r, p, u = rows[:, :, None], here[:, :, None], units[None, None, :]
                x[r, p, u] = patch.apply(x[r, p, u])
            patch.applied += 1
            return x

        return hook

    with attached(adapter, {(site, layer): make_hook(p) for layer, p in patches.items()}, prepared):
        yield patches
