"""Greedy captioning that does no work an intervention cannot change.

``greedy_ids`` gives the same new tokens as the adapter's ``generate`` (greedy, ``GREEDY``) for an unpadded batch of
prompts, with three savings:

* **The shared prefix once.** The prompt tokens before the image (system turn, user header) are the same in every row
  and every batch: their KV cache is computed for one row, once per model and prefix (``PREFIXES``), and shared by all.
* **Reuse below the lowest edited layer.** An intervention on layers >= l_min at image positions cannot change any
  position's state below l_min: attention is causal and the FFN acts per position. With ``start_layer = l_min`` and
  ``groups`` (rows of one group share their prompt, e.g. one image under several noise draws), layers 0..l_min-1 run
  once per group on the clean prompt; their KV cache and the hidden states entering l_min are copied to the group's
  rows, and only layers l_min..L-1 run per row, with the intervention's hooks armed. Decoding then continues from the
  combined cache through every layer.
* **No wasted decode.** A row that has emitted a stop token leaves the running batch (its cache rows are dropped), so
  one long caption does not keep the finished ones decoding.

Rows are batch-invariant in float32 (tested), so the tokens equal the full recompute's; a test compares them on the tiny
models of every adapter and on the embedded model, for interventions on one layer and on many. In half precision on a
GPU, kernels may round differently for other batch shapes, so a near-tie can break differently than in the model's own
``generate`` (as it could between two batch sizes before); this has not been measured on a GPU. The adapter supplies the
LLaMA-family decoder stack (``Adapter.language_model``), the prompt embeddings and the stop ids; the layer loop below is
``LlamaModel.forward``'s, split at ``start_layer``.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

if TYPE_CHECKING:  # the adapter calls this module; it needs only the adapter's interface
    from knexp.models.adapter import Adapter, Prepared


def _run_layers(lm, hidden: torch.Tensor, start: int, stop: int, cache: DynamicCache, past: int = 0) -> torch.Tensor:
    """Decoder layers start..stop-1 of ``lm`` on hidden states [B, T, d] of prompt positions past..past+T-1, attending to
    the ``past`` positions ``cache`` holds for these layers, and filling ``cache``."""
    positions = torch.arange(past, past + hidden.shape[1], device=hidden.device)[None]
    mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=None, past_key_values=cache if past else None,
                              position_ids=positions, layer_idx=start if past else None)
    rotary = lm.rotary_emb(hidden, position_ids=positions)
    for layer in lm.layers[start:stop]:
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions, past_key_values=cache,
                       use_cache=True)
    return hidden


# The prefix KV caches of each decoder stack, by the prefix's token ids: computed without hooks, reused by every batch.
PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREFIXES_PER_MODEL = 8


def _prefix_cache(lm, embeds: torch.Tensor, ids: tuple[int, ...]) -> DynamicCache:
    """The KV cache of every layer over the prefix ``ids`` (embeddings [1, past, d_model]), from ``PREFIXES`` or computed
    once. Its tensors are never written to: rows take expanded views of them. The key holds each weight's storage and
    version counter, so weights edited in place or replaced (a planted neuron) compute it again."""
    known = PREFIXES.setdefault(lm, {})
    weights = tuple((p.data_ptr(), p._version) for p in lm.parameters())
    key = (ids, embeds.dtype, embeds.device, weights)
    if key not in known:
        if len(known) >= _PREFIXES_PER_MODEL:
            known.pop(next(iter(known)))
        cache = DynamicCache(config=lm.config)
        _run_layers(lm, embeds, 0, len(lm.layers), cache)
        known[key] = cache
    return known[key]


def _group_rows(groups: list, batch: int) -> tuple[list[int], torch.Tensor]:
    """(the first row of each group, in order of appearance; long [B]: each row's group number)."""
    if len(groups) != batch:
        raise ValueError(f"{len(groups)} groups for {batch} rows")
    order = list(dict.fromkeys(groups))
    firsts = [groups.index(g) for g in order]
    return firsts, torch.tensor([order.index(g) for g in groups])


@torch.no_grad()
def greedy_ids(adapter: Adapter, prepared: Prepared, max_new_tokens: int, start_layer: int = 0, groups: list | None = None,
               share_prefix: bool = True, drop_finished: bool = True) -> torch.Tensor:
    """New token ids [B, N] (stop token included, then the pad id), greedy, for an unpadded prepared batch; layers below
    ``start_layer`` run once per group of ``groups`` (default: every row its own group). Hooks armed on the adapter act
    as in ``generate``: in the prompt's pass only, for the layers they sit on (all must be >= ``start_layer``).
    ``share_prefix=False`` or ``drop_finished=False`` turn one saving off (the bench measures each; the tokens are the
    same)."""
    mask2d = prepared.inputs.get("attention_mask")
    if mask2d is not None and not bool(mask2d.all()):
        raise ValueError("greedy_ids takes unpadded prompts (every row the same prompt length)")
    lm, head = adapter.language_model()
    embeds = adapter.prompt_embeddings(prepared)  # [B, T, d_model]
    batch, num_layers = embeds.shape[0], len(lm.layers)
    ids = prepared.input_ids
    past = int(prepared.image_positions[:, 0].min()) if share_prefix else 0  # the tokens before the image
    if past and not bool((ids[:, :past] == ids[:1, :past]).all()):
        past = 0
    prefix = _prefix_cache(lm, embeds[:1, :past], tuple(ids[0, :past].tolist())) if past else None

    def with_prefix(rows: int, layers: range) -> DynamicCache:
        cache = DynamicCache(config=lm.config)
        for layer in layers if past else ():
            keys, values = prefix.layers[layer].keys, prefix.layers[layer].values  # [1, heads, past, d_head]
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
        return cache

    with record_function("knexp.prefill"):  # labels for torch.profiler (the bench's profile by operator)
        rest = embeds[:, past:]  # [B, T - past, d_model]
        cache = with_prefix(batch, range(start_layer, num_layers))
        prepared.cached = past  # the prompt's pass now covers positions past..T-1: hooks index it so
        try:
            if start_layer > 0:
                firsts, row_group = _group_rows(groups if groups is not None else list(range(batch)), batch)
                clean = with_prefix(len(firsts), range(start_layer))
                below = _run_layers(lm, rest[firsts], 0, start_layer, clean, past)  # [G, T - past, d]: clean states entering it
                index = row_group.to(embeds.device)
                for layer in range(start_layer):
                    cache.update(clean.layers[layer].keys[index], clean.layers[layer].values[index], layer)
                rest = below[index]
            hidden = lm.norm(_run_layers(lm, rest, start_layer, num_layers, cache, past))
        finally:
            prepared.cached = 0
        logits = head(hidden[:, -1:, :])[:, -1].float()  # [B, V]: what predicts the first new token

    stop = torch.tensor(adapter.stop_token_ids, device=embeds.device)
    out = torch.full((batch, max_new_tokens), adapter.pad_token_id, dtype=torch.long, device=embeds.device)
    alive = torch.arange(batch, device=embeds.device)  # the rows still decoding, in the cache's row order
    ended = torch.zeros(batch, dtype=torch.bool, device=embeds.device)  # [alive]: ended, kept only if not drop_finished
    with record_function("knexp.decode"):
        for step in range(max_new_tokens):
            token = torch.where(ended, adapter.pad_token_id, logits.argmax(-1))
            out[alive, step] = token
            ended = ended | torch.isin(token, stop)
            if step == max_new_tokens - 1 or bool(ended.all()):
                break
            if drop_finished and bool(ended.any()):  # finished rows leave the batch and the cache
                keep = (~ended).nonzero().flatten()
                cache.batch_select_indices(keep)
                alive, token, ended = alive[keep], token[keep], ended[keep]
            step_out = lm(inputs_embeds=lm.embed_tokens(token)[:, None], past_key_values=cache, use_cache=True)
            logits = head(step_out.last_hidden_state[:, -1:, :])[:, -1].float()
    return out
