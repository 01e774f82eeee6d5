"""A decoding-time filter: tokens that greedy decoding may never emit (what an edit's erase is compared with)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from knexp.models.adapters.adapter import Adapter


@contextmanager
def banned(adapter: Adapter, token_ids: list[int]) -> Iterator[None]:
    """Logits of ``token_ids`` set to -inf wherever the LM head runs (every pass and decoding step, knexp's decoding
    and a model's own ``generate`` alike), so greedy decoding never picks them: the decoding-time filter that bans an
    object's word forms. Removed on exit."""
    head = adapter.language_model()[1]
    ids = torch.as_tensor(sorted(set(int(t) for t in token_ids)), dtype=torch.long)

    def mask(module, args, output):
        out = output.clone()
        out[..., ids.to(out.device)] = float("-inf")
        return out

    handle = head.register_forward_hook(mask)
    try:
        yield
    finally:
        handle.remove()
