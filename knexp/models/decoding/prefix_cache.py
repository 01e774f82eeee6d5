"""The shared prefix once: the prompt tokens before the image are the same in every row and every batch.

Their KV cache is computed for one row, once per model and prefix (``PREFIXES``), and shared by every pass after it:
captioning's prompt passes (``knexp.models.decoding.prefill``) and identification's passes (``logits_after_prefix``).
The prefix cannot depend on the image, and no hook sees its pass (``Prepared.pass_start``: it does not end at the
prompt's end).

``run_layers`` is ``LlamaModel.forward``'s layer loop over a stretch of positions: it serves any decoder whose layers
take a causal mask and 1-D positions (``Decodable.fast_paths``). A model for which that is not exact runs its own
forward instead, and shares no prefix.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from knexp.models.prepared import Decodable, Prepared


def run_layers(lm, hidden: torch.Tensor, start: int, stop: int, cache: DynamicCache, past: int = 0) -> torch.Tensor:
    """Decoder layers start..stop-1 of ``lm`` on hidden states [B, T, d] of prompt positions past..past+T-1, attending
    to the ``past`` positions ``cache`` holds for these layers, and filling ``cache``. Each layer is told its positions
    (``position_ids``), so hooks know where the pass starts."""
    positions = torch.arange(past, past + hidden.shape[1], device=hidden.device)[None]
    mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=None,
                              past_key_values=cache if past else None,
                              position_ids=positions, layer_idx=start if past else None)
    rotary = lm.rotary_emb(hidden, position_ids=positions)
    for layer in lm.layers[start:stop]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions,
                       past_key_values=cache, use_cache=cache is not None)
    return hidden


@contextmanager
def recomputed(layers) -> Iterator[None]:
    """While open, each of ``layers`` keeps only its input for a later backward and runs its forward again when the
    backward reaches it (``torch.utils.checkpoint``, non-reentrant), for passes under grad mode: what autograd keeps for
    a backward through L layers falls from L layers' activations to L inputs and one layer's activations, for one more
    forward of each layer (docs/method.md, "Memory before loading"). Hooks inside a layer run again on that second
    forward, during the backward; a pass with a KV cache must not be recomputed (the second forward would write it
    again)."""
    wrapped = []
    for layer in layers:
        own = layer.__dict__.get("forward")  # an instance's own forward (set by another tool) is put back on exit
        forward = layer.forward

        def run(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = run
        wrapped.append((layer, own))
    try:
        yield
    finally:
        for layer, own in wrapped:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


# The prefix KV caches of each decoder stack, by the prefix's token ids: computed without hooks, reused by every batch.
PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREFIXES_PER_MODEL = 8


def forget(lm) -> None:
    """Drop every shared prefix's cache of ``lm`` (hooks that act on every pass came or went: ``hooks.everywhere``)."""
    PREFIXES.pop(lm, None)


def _prefix_cache(lm, embeds: torch.Tensor, ids: tuple[int, ...]) -> DynamicCache:
    """The KV cache of every layer over the prefix ``ids`` (embeddings [1, past, d_model]), from ``PREFIXES`` or
    computed once. Its tensors are never written to: rows take expanded views of them. The key holds each weight's
    storage and version counter, so weights edited in place or replaced (a planted neuron) compute it again."""
    known = PREFIXES.setdefault(lm, {})
    weights = tuple((p.data_ptr(), p._version) for p in lm.parameters())
    key = (ids, embeds.dtype, embeds.device, weights)
    if key not in known:
        if len(known) >= _PREFIXES_PER_MODEL:
            known.pop(next(iter(known)))
        cache = DynamicCache(config=lm.config)
        with torch.no_grad():  # constants to every pass, also to identification's differentiated one
            run_layers(lm, embeds.detach(), 0, len(lm.layers), cache)
        known[key] = cache
    return known[key]


def shared_prefix(lm, prepared: Prepared, embeds: torch.Tensor, share: bool = True) -> tuple[int, DynamicCache | None]:
    """(past: how many tokens before the image every row of an unpadded batch shares, 0 if they differ or with
    ``share=False``; those tokens' cache from ``PREFIXES``, or None)."""
    mask2d = prepared.inputs.get("attention_mask")
    if mask2d is not None and not bool(mask2d.all()):
        raise ValueError("knexp's passes with the shared prefix take unpadded prompts (every row the same prompt "
                         "length)")
    ids = prepared.input_ids
    past = prepared.first_image if share else 0  # the tokens before the image
    if past and not bool((ids[:, :past] == ids[:1, :past]).all()):
        past = 0
    return past, (_prefix_cache(lm, embeds[:1, :past], tuple(ids[0, :past].tolist())) if past else None)


def with_prefix(lm, prefix: DynamicCache | None, rows: int, layers: range) -> DynamicCache:
    """A cache for ``rows`` rows holding ``prefix``'s keys and values of ``layers`` (expanded views, not copies)."""
    cache = DynamicCache(config=lm.config)
    for layer in layers if prefix is not None else ():
        keys, values = prefix.layers[layer].keys, prefix.layers[layer].values  # [1, heads, past, d_head]
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
    return cache


def logits_after_prefix(model: Decodable, prepared: Prepared, positions: torch.Tensor, recompute: bool = False
                        ) -> torch.Tensor:
    """``model.forward(prepared, positions)``'s logits [B, K, V] at sequence positions ``positions`` (long [K], after
    the image's first token), with the tokens before the image from the prefix cache: the pass runs over positions
    past..T-1 only. Under the caller's grad mode (identification differentiates through it); hooks armed on ``prepared``
    see that pass. A model without ``fast_paths`` runs its own forward over every position. With ``recompute``, the
    decoder layers are ``recomputed`` in the caller's backward, and the pass runs over every position without a KV
    cache (the prefix too: it is a few tokens)."""
    lm, head = model.language_model()
    with recomputed(lm.layers if recompute else ()):
        if not model.fast_paths:
            return model.forward(prepared, positions)
        embeds = model.prompt_embeddings(prepared)  # [B, T, d_model]
        # a position inside the prefix would need its hidden state: then no prefix (and no cache computed for it)
        share = int(positions.min()) >= prepared.first_image and not recompute
        past, prefix = shared_prefix(lm, prepared, embeds, share=share)
        cache = None if recompute else with_prefix(lm, prefix, embeds.shape[0], range(len(lm.layers)))
        hidden = run_layers(lm, embeds[:, past:], 0, len(lm.layers), cache, past)  # [B, T - past, d_model]
        return head(lm.norm(hidden[:, positions - past]))
