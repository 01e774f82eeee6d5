"""Preserved keys: what an FFN reads where an edit must change nothing (docs/method.md, "Locality by construction").

An edit of a layer's FFN changes its output at a position t only through what the edited maps read there:
``gate_proj`` and ``up_proj`` read the MLP input x_t (the residual after the post-attention norm, the hook site
``ffn_in``), ``down_proj`` reads the activations O_t. The *preserved positions* are every position of images that
show none of the edited objects, each with its unedited caption teacher-forced after it, and of text-only prompts.
Per layer l their MLP inputs are summarised by the uncentred second moment

    C_l = (1/n) sum_t x_t x_t^T   [d_model, d_model]

so that an update Δ of rows changes the preserved outputs by (1/n) sum_t ||Δ x_t||^2 = tr(Δ C_l Δ^T) on average.
AlphaEdit's projection keeps an update where the preserved inputs do not reach: P_l = U U^T over the eigenvectors of
C_l whose eigenvalue is at most ``threshold`` times the largest (``null_projection``; a relative threshold, since with
many positions C_l has full rank and only its smallest directions are unused), and (W + Δ P_l) x_t ≈ W x_t there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from knexp.checked import read_entry, save_tensors
from knexp.models.decoding.batching import progress_due
from knexp.models.hooks.attach import everywhere
from knexp.models.prepared import Prepared
from knexp.store import stable_key

log = logging.getLogger("knexp.progress")


@dataclass
class PreservedKeys:
    """``second[l]``: C_l, float64 [d_model, d_model], over ``positions`` preserved positions (module docstring)."""

    second: dict[int, torch.Tensor]
    positions: int
    _bases: dict[tuple[int, float], torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def null_basis(self, layer: int, threshold: float) -> torch.Tensor:
        """U, float64 [width, r]: the eigenvectors of C_l whose eigenvalue is at most ``threshold`` times the largest
        (orthonormal columns); each decomposition made once (an edit and its random control share it)."""
        if (layer, threshold) not in self._bases:
            values, vectors = torch.linalg.eigh(self.second[layer])  # ascending
            self._bases[(layer, threshold)] = vectors[:, values <= threshold * values[-1].clamp_min(0)]
        return self._bases[(layer, threshold)]

    def null_projection(self, layer: int, threshold: float) -> torch.Tensor:
        """P_l = U U^T, float64 [width, width], U = ``null_basis(layer, threshold)``."""
        kept = self.null_basis(layer, threshold)
        return kept @ kept.T


def second_moments(adapter, prompts: list, layers: list[int], site: str = "ffn_in") -> PreservedKeys:
    """The second moment of the tensor at hook site ``site`` of ``layers`` (``ffn_in``: the MLP inputs x, C_l;
    ``ffn``: the FFN activations O, A_l = (1/n) sum_t O_t O_t^T [d_ff, d_ff]) over every position of ``prompts``:
    one-row prepared prompts (``Prepared``: an image with its caption teacher-forced) and text-only prompts (``str``),
    each run alone so that no padding is counted; a progress line every 10 s or so (``progress_due``, the rule of the
    batched passes)."""
    sums: dict[int, torch.Tensor] = {}
    count = [0]

    def accumulate(layer: int):
        def hook(x: torch.Tensor) -> None:  # x [1, n, width]: the site's tensor in one pass
            flat = x[0].detach().double().cpu()
            sums[layer] = sums[layer] + flat.T @ flat if layer in sums else flat.T @ flat
            if layer == layers[0]:
                count[0] += flat.shape[0]
        return hook

    began = last = time.time()
    with torch.no_grad(), everywhere(adapter, {(site, layer): accumulate(layer) for layer in layers}):
        for done, prompt in enumerate(prompts, 1):
            if isinstance(prompt, Prepared):
                adapter.run_hooks(prompt)
            else:
                adapter.text_logits([prompt])
            now = time.time()
            if progress_due(False, now - last, done == len(prompts)):
                log.info("preserved keys (%s): %d/%d prompts (%.1f/s)", site, done, len(prompts),
                         done / max(now - began, 1e-9))
                last = now
    return PreservedKeys({layer: s / max(count[0], 1) for layer, s in sums.items()}, count[0])


class PreservedCache:
    """``get(key parts, layers, compute)``: each layer's C_l from ``<root>/preserved/<key>_L<layer>.safetensors``, the
    missing layers computed together by ``compute(layers)``; a damaged file is recomputed with a warning. C_l is kept
    in float32 (a relative eigenvalue threshold of 1e-5 or more is far above its rounding) and used in float64."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) / "preserved" if root is not None else None
        self.computed = 0

    def get(self, parts: list, layers: list[int], compute) -> PreservedKeys:
        key = stable_key(*parts)
        found, positions = {}, None
        for layer in layers:
            entry, _ = read_entry(self._path(key, layer), f"{key}:{layer}", "preserved keys",
                                  lambda tensors, meta: (tensors["second"].double(), int(meta["positions"])))
            if entry is not None:
                found[layer], positions = entry
        missing = [layer for layer in layers if layer not in found]
        if missing:
            fresh = compute(missing)
            self.computed += 1
            positions = fresh.positions
            for layer in missing:
                stored = fresh.second[layer].float()  # as the file holds it, so a cold and a warm run agree
                found[layer] = stored.double()
                if (path := self._path(key, layer)) is not None:
                    save_tensors(path, {"second": stored}, {"positions": fresh.positions}, f"{key}:{layer}")
        return PreservedKeys(found, positions)

    def _path(self, key: str, layer: int) -> Path | None:
        return self.root / f"{key}_L{layer}.safetensors" if self.root is not None else None
