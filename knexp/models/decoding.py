"""Greedy captioning that does no work an intervention cannot change, with continuous batching.

``prefill`` runs a batch's prompt pass; ``stream_ids`` decodes many such batches together; ``greedy_ids`` is one batch
through both. They give the same new tokens as the adapter's ``generate`` (greedy, ``GREEDY``) for unpadded prompts,
with these savings:

* **The shared prefix once.** The prompt tokens before the image (system turn, user header) are the same in every row
  and every batch: their KV cache is computed for one row, once per model and prefix (``PREFIXES``), and shared by all,
  identification's passes included (``logits_after_prefix``).
* **Reuse below the lowest edited layer.** An intervention on layers >= l_min at image positions cannot change any
  position's state below l_min: attention is causal and the FFN acts per position. With ``start_layer = l_min`` and
  ``groups`` (rows of one group share their prompt, e.g. one image under several noise draws), layers 0..l_min-1 run
  once per group on the clean prompt; their KV cache and the hidden states entering l_min are copied to the group's
  rows, and only layers l_min..L-1 run per row, with the intervention's hooks armed. Decoding then continues from the
  combined cache through every layer.
* **No wasted decode.** A row that has emitted a stop token leaves the running batch (its cache rows are dropped), so
  one long caption does not keep the finished ones decoding.
* **Continuous batching.** When half a prompt batch of places is free, the next rows' prompt pass runs (under their own
  hooks) and they join the decoding as a new cohort. A step runs each cohort's attention proper over its own cache and
  the norms, the attention's projections, the MLPs and the LM head once over every row in flight, so the decoding GEMMs
  stay wide instead of thinning out.
* **No copies of the cache per step.** A cohort's cache grows into spare room (``_append``) instead of being
  concatenated anew at every step, and eager attention at one query position shares each key/value head among its
  query heads in place (``_attend``) instead of copying the cache once per query head (``repeat_kv``). On the embedded
  model, a decoding step of 4 cohorts of 16 rows took 0.62 s with these copies and the projections run per cohort, and
  0.39 s without (measured under torch.profiler, the same tokens).

Every product is the module's own (``nn.Linear``'s ``F.linear``). Computing it transposed, (W x^T)^T, was faster on
one CPU and rounded the same there from 12 rows on; on another (AVX-512, MKL 2024.2) it rounded differently up to 15
rows and for some transposed inputs, with no speed gained, so it was removed: no product here depends on the machine
for its rounding beyond what ``F.linear`` itself does.

A row's tokens do not depend on its batch: tests compare them with the model's own ``generate`` on the tiny models of
every adapter and on the embedded model, for interventions on one layer and on many, and for streams of several
cohorts, and the bench compares every caption it times. Its logits can, in the last bit: torch's float32 matrix product
on the 2-core CPU rounds a row differently when the batch has 1, 2, 3 or 5 rows than when it has 4, 8, 16 or more
(measured at the LM's shapes), so a near-tie between two tokens could break differently under another batch shape,
as it could between two batch sizes of ``generate``. In half precision on a GPU this has not been measured.

The adapter supplies the LLaMA-family decoder stack (``Adapter.language_model``), the prompt embeddings and the stop
ids; the layer loops below are ``LlamaModel.forward``'s, ``LlamaDecoderLayer.forward``'s and ``LlamaAttention.forward``'s,
split at ``start_layer`` and, while decoding, between the attention proper (per cohort) and the rest (all rows).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.profiler import record_function
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from knexp.models.batching import halved_after
from knexp.user_errors import ConfigError

if TYPE_CHECKING:  # the adapter calls this module; it needs only the adapter's interface
    from knexp.models.adapter import Adapter, Prepared

log = logging.getLogger("knexp.progress")


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
        with torch.no_grad():  # constants to every pass, also to identification's differentiated one
            _run_layers(lm, embeds.detach(), 0, len(lm.layers), cache)
        known[key] = cache
    return known[key]


def _shared_prefix(lm, prepared: Prepared, embeds: torch.Tensor, share: bool = True) -> tuple[int, DynamicCache | None]:
    """(past: how many tokens before the image every row of an unpadded batch shares, 0 if they differ or with
    ``share=False``; those tokens' cache from ``PREFIXES``, or None)."""
    mask2d = prepared.inputs.get("attention_mask")
    if mask2d is not None and not bool(mask2d.all()):
        raise ValueError("knexp's passes with the shared prefix take unpadded prompts (every row the same prompt length)")
    ids = prepared.input_ids
    past = int(prepared.image_positions[:, 0].min()) if share else 0  # the tokens before the image
    if past and not bool((ids[:, :past] == ids[:1, :past]).all()):
        past = 0
    return past, (_prefix_cache(lm, embeds[:1, :past], tuple(ids[0, :past].tolist())) if past else None)


def _with_prefix(lm, prefix: DynamicCache | None, rows: int, layers: range) -> DynamicCache:
    """A cache for ``rows`` rows holding ``prefix``'s keys and values of ``layers`` (expanded views, not copies)."""
    cache = DynamicCache(config=lm.config)
    for layer in layers if prefix is not None else ():
        keys, values = prefix.layers[layer].keys, prefix.layers[layer].values  # [1, heads, past, d_head]
        cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), layer)
    return cache


def logits_after_prefix(adapter: Adapter, prepared: Prepared, positions: torch.Tensor) -> torch.Tensor:
    """``Adapter.forward(prepared, positions)``'s logits [B, K, V] at sequence positions ``positions`` (long [K], after
    the image's first token), with the tokens before the image from the prefix cache: the pass runs over positions
    past..T-1 only. Under the caller's grad mode (identification differentiates through it); hooks armed on ``prepared``
    see that pass (``prepared.cached`` = past while it runs)."""
    lm, head = adapter.language_model()
    embeds = adapter.prompt_embeddings(prepared)  # [B, T, d_model]
    # a position inside the prefix would need its hidden state: then no prefix (and no cache computed for it)
    past, prefix = _shared_prefix(lm, prepared, embeds, share=int(positions.min()) >= int(prepared.image_positions[:, 0].min()))
    cache = _with_prefix(lm, prefix, embeds.shape[0], range(len(lm.layers)))
    prepared.cached = past
    try:
        hidden = _run_layers(lm, embeds[:, past:], 0, len(lm.layers), cache, past)  # [B, T - past, d_model]
    finally:
        prepared.cached = 0
    return head(lm.norm(hidden[:, positions - past]))


def _group_rows(groups: list, batch: int) -> tuple[list[int], torch.Tensor]:
    """(the first row of each group, in order of appearance; long [B]: each row's group number)."""
    if len(groups) != batch:
        raise ValueError(f"{len(groups)} groups for {batch} rows")
    order = list(dict.fromkeys(groups))
    firsts = [groups.index(g) for g in order]
    return firsts, torch.tensor([order.index(g) for g in groups])


@dataclass
class Prefilled:
    """A prompt's pass over a batch: the KV cache of every layer and the logits [B, V] that predict the first new token."""

    cache: DynamicCache
    logits: torch.Tensor


@torch.no_grad()
def prefill(adapter: Adapter, prepared: Prepared, start_layer: int = 0, groups: list | None = None,
            share_prefix: bool = True) -> Prefilled:
    """The prompt's pass of an unpadded prepared batch, the tokens before the image from the prefix cache, layers below
    ``start_layer`` once per group of ``groups`` (default: every row its own group). Hooks armed on the adapter act on
    the layers they sit on (all must be >= ``start_layer``), at positions ``prepared.cached``..T-1."""
    lm, head = adapter.language_model()
    embeds = adapter.prompt_embeddings(prepared)  # [B, T, d_model]
    batch, num_layers = embeds.shape[0], len(lm.layers)
    past, prefix = _shared_prefix(lm, prepared, embeds, share_prefix)

    with record_function("knexp.prefill"):  # labels for torch.profiler (the bench's profile by operator)
        rest = embeds[:, past:]  # [B, T - past, d_model]
        cache = _with_prefix(lm, prefix, batch, range(start_layer, num_layers))
        prepared.cached = past  # the prompt's pass now covers positions past..T-1: hooks index it so
        try:
            if start_layer > 0:
                firsts, row_group = _group_rows(groups if groups is not None else list(range(batch)), batch)
                clean = _with_prefix(lm, prefix, len(firsts), range(start_layer))
                below = _run_layers(lm, rest[firsts], 0, start_layer, clean, past)  # [G, T - past, d]: clean states entering it
                index = row_group.to(embeds.device)
                for layer in range(start_layer):
                    cache.update(clean.layers[layer].keys[index], clean.layers[layer].values[index], layer)
                rest = below[index]
            hidden = lm.norm(_run_layers(lm, rest, start_layer, num_layers, cache, past))
        finally:
            prepared.cached = 0
        # the last position's rows made contiguous: the head is then one matrix product over the rows, where a strided
        # [B, 1, d] view takes a batched product of B single rows (measured: 3.4x slower at 16 rows, 49,152 tokens)
        return Prefilled(cache, head(hidden[:, -1:].contiguous())[:, 0].float())


@dataclass
class _Cohort:
    """Rows prefilled together: one cache length, so they attend together. Decoding steps run every cohort at once."""

    rows: torch.Tensor  # long [b]: the caller's row numbers, in the cache's row order
    cache: DynamicCache
    logits: torch.Tensor  # float [b, V]: what predicts each row's next token
    ended: torch.Tensor  # bool [b]: emitted a stop token (such rows stay only with drop_finished=False)
    step: int = 0  # tokens emitted so far
    token: torch.Tensor | None = None  # long [b]: the last token emitted, the next step's input
    # by layer: (keys, values) [b, kv_heads, capacity, d_head], the buffers with spare room that the cache's tensors view
    room: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _merged(lm) -> bool:
    """Whether every layer is a ``LlamaDecoderLayer`` with ``LlamaAttention``, whose forwards ``_step`` splits, and no
    hook that could act on a decoding step sits on a layer or its attention (``_step`` does not call them)."""
    return all(type(layer).forward is LlamaDecoderLayer.forward and type(layer.self_attn).forward is LlamaAttention.forward
               and not _hooked(layer, layer.self_attn) for layer in lm.layers)


_ROOM = 16  # positions a cohort's cache grows by at once (``_append``)


def _in_room(c: _Cohort, layer: int) -> bool:
    """Whether the cache's tensors of ``layer`` are views of the cohort's buffers for it (not replaced since)."""
    entry, room = c.cache.layers[layer], c.room.get(layer)
    return room is not None and room[0].data_ptr() == entry.keys.data_ptr() and room[0].shape[0] == entry.keys.shape[0]


def _append(c: _Cohort, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``c.cache.update(key, value, layer)`` for one new position (key, value [b, kv_heads, 1, d_head]), without copying
    the whole cache at every step: the layer's keys and values are views into buffers (``c.room``) with ``_ROOM`` spare
    positions, copied only when full or when the cache's tensors were replaced."""
    entry = c.cache.layers[layer]
    if type(entry) is not DynamicLayer or not entry.is_initialized:
        return c.cache.update(key, value, layer)
    b, heads, n, d = entry.keys.shape
    if not _in_room(c, layer) or c.room[layer][0].shape[2] <= n:
        room = tuple(torch.empty(b, heads, n + _ROOM, d, dtype=t.dtype, device=t.device) for t in (entry.keys, entry.values))
        room[0][:, :, :n], room[1][:, :, :n] = entry.keys, entry.values
        c.room[layer] = room
    keys, values = c.room[layer]
    keys[:, :, n], values[:, :, n] = key[:, :, 0], value[:, :, 0]
    entry.keys, entry.values = keys[:, :, :n + 1], values[:, :, :n + 1]
    return entry.keys, entry.values


def _keep_rows(c: _Cohort, keep: torch.Tensor) -> None:
    """``c.cache.batch_select_indices(keep)`` (long [k]: the rows that stay), each layer's rows taken with their spare
    room: one copy, where selecting the cache's tensors and then growing them again into room would make two."""
    for layer, entry in enumerate(c.cache.layers):
        if _in_room(c, layer):  # only _append makes room, for initialised DynamicLayers
            n = entry.keys.shape[2]
            keys, values = c.room[layer] = (c.room[layer][0][keep], c.room[layer][1][keep])
            entry.keys, entry.values = keys[:, :, :n], values[:, :, :n]
        else:
            entry.batch_select_indices(keep)


def _hooked(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has a forward hook or pre-hook that could act on a decoding step (then the module must
    be called, not bypassed). Hooks that ``knexp.models.hooks.attached`` guards to a prompt's pass (``prompt_pass_only``:
    an intervention, a recording) cannot, and do not count."""
    return any(not getattr(h, "prompt_pass_only", False)
               for m in modules for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()))


def _attend(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask) -> torch.Tensor:
    """Attention of one query position (query [b, heads, 1, d_head]) over key, value [b, kv_heads, n, d_head]:
    [b, 1, heads * d_head], as ``attn``'s configured attention function computes it. Eager attention's products and
    softmax are computed with each key/value head shared by its query heads in place, instead of ``repeat_kv``'s copy
    of the whole cache per query head (at one query position the two are the same products)."""
    b, heads, _, d = query.shape
    if attn.config._attn_implementation != "eager":
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
        return interface(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)[0].reshape(b, 1, heads * d)
    grouped = query.reshape(b, key.shape[1], heads // key.shape[1], d)  # [b, kv_heads, groups, d_head]: head h -> h // groups
    scores = torch.matmul(grouped, key.transpose(2, 3)) * attn.scaling  # [b, kv_heads, groups, n]
    if mask is not None:
        scores = scores + mask  # [b, 1, 1, n]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).reshape(b, 1, heads * d)


def _step(lm, head, cohorts: list[_Cohort]) -> None:
    """One decoding step of every cohort: each cohort's ``token`` in, its ``logits`` out.

    ``LlamaDecoderLayer.forward`` and ``LlamaAttention.forward`` with the attention proper run per cohort (each attends
    over its own cache, at its own position), and the norms, the projections, the MLP and the LM head run once over the
    rows of all cohorts: these act on each row alone, so a row's tokens are those of its cohort alone (up to the
    rounding noted in the module docstring), while the GEMMs see every row in flight. Each module is called (its hooks
    fire; an intervention's, guarded to the prompt's pass, do nothing). Another layer type, or a hook that could act on
    the step on a layer or its attention, takes the model's own forward, per cohort."""
    if not _merged(lm):
        for c in cohorts:
            out = lm(inputs_embeds=lm.embed_tokens(c.token)[:, None], past_key_values=c.cache, use_cache=True)
            c.logits = head(out.last_hidden_state[:, -1:, :])[:, -1].float()
        return
    sizes = [len(c.rows) for c in cohorts]
    hidden = lm.embed_tokens(torch.cat([c.token for c in cohorts]))[:, None]  # [R, 1, d_model]
    contexts = []  # per cohort, as LlamaModel.forward makes them: (mask, rotary embeddings (cos, sin))
    for c, part in zip(cohorts, hidden.split(sizes), strict=True):
        positions = torch.tensor([[c.cache.get_seq_length()]], device=hidden.device)
        mask = create_causal_mask(config=lm.config, inputs_embeds=part, attention_mask=None, past_key_values=c.cache,
                                  position_ids=positions)
        contexts.append((mask, lm.rotary_emb(part, position_ids=positions)))
    for index, layer in enumerate(lm.layers):
        attn = layer.self_attn
        residual = hidden
        normed = layer.input_layernorm(hidden)
        shape = (len(hidden), 1, -1, attn.head_dim)
        query = attn.q_proj(normed).reshape(shape).transpose(1, 2)  # [R, heads, 1, d_head]
        key = attn.k_proj(normed).reshape(shape).transpose(1, 2)  # [R, kv_heads, 1, d_head]
        value = attn.v_proj(normed).reshape(shape).transpose(1, 2)
        attended = []
        for c, q, k, v, (mask, (cos, sin)) in zip(cohorts, query.split(sizes), key.split(sizes), value.split(sizes), contexts,
                                                  strict=True):
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = _append(c, index, k, v)
            attended.append(_attend(attn, q, k, v, mask))
        hidden = residual + attn.o_proj(torch.cat(attended))
        residual = hidden
        hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
    logits = head(lm.norm(hidden))[:, 0].float()  # [R, V]
    for c, part in zip(cohorts, logits.split(sizes), strict=True):
        c.logits = part


@torch.no_grad()
def stream_ids(adapter: Adapter, count: int, prefill_rows: Callable[[list[int]], Prefilled], max_new_tokens: int,
               batch_size: int, width: int | None = None, drop_finished: bool = True, continuous: bool = True,
               retry_out_of_memory: bool = True, what: str = "captions") -> torch.Tensor:
    """New token ids [count, N] (stop token included, then the pad id), greedy, for rows 0..count-1, decoded with
    continuous batching.

    ``prefill_rows(rows)`` runs the prompt's pass of those rows (at most ``batch_size``, with whatever hooks the rows
    need). Up to ``width`` rows (default ``batch_size``) decode together. A row that ends leaves at once; when half a
    prefill batch of places is free, the next rows are prefilled and join the decoding, so one long caption no longer
    keeps a thinning batch running (``continuous=False``: the next batch waits until every row in flight has ended, the
    bench's comparison). Out of memory (with ``retry_out_of_memory``) halves ``batch_size`` and ``width`` (at one row
    per prompt pass, ``width`` alone);
    the rows in flight start again, finished rows are kept. The tokens do not depend on any of this (tested)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"model.generation.batch_size={batch_size!r}: use a whole number of rows, at least 1")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ConfigError(f"model.generation.decode_width={width!r}: use null (the batch size) or a whole number of rows, "
                          "at least 1")
    lm, head = adapter.language_model()
    device = adapter.device
    stop = torch.tensor(adapter.stop_token_ids, device=device)
    out = torch.full((count, max_new_tokens), adapter.pad_token_id, dtype=torch.long, device=device)
    width = max(batch_size, width or batch_size)
    queue, cohorts = deque(range(count)), []
    done, logged, began = 0, 0, time.time()

    def refill() -> None:
        alive = sum(len(c.rows) for c in cohorts)
        while queue and (continuous or not cohorts):
            take = min(batch_size, width - alive, len(queue))
            if take < min(len(queue), max(1, batch_size // 2)):
                return
            rows = [queue.popleft() for _ in range(take)]  # in flight before their pass: out of memory there puts them back
            cohorts.append(_Cohort(torch.tensor(rows, device=device), None, None, torch.zeros(take, dtype=torch.bool, device=device)))
            first = prefill_rows(rows)
            cohorts[-1].cache, cohorts[-1].logits = first.cache, first.logits
            alive += take

    while queue or cohorts:
        try:
            refill()
            with record_function("knexp.decode"):
                running = []
                for c in cohorts:
                    c.token = torch.where(c.ended, adapter.pad_token_id, c.logits.argmax(-1))
                    out[c.rows, c.step] = c.token
                    c.ended |= torch.isin(c.token, stop)
                    c.step += 1
                    if c.step == max_new_tokens or bool(c.ended.all()):
                        done += len(c.rows)
                        continue
                    if drop_finished and bool(c.ended.any()):  # finished rows leave the batch and the cache
                        keep = (~c.ended).nonzero().flatten()
                        _keep_rows(c, keep)
                        done += len(c.rows) - len(keep)
                        c.rows, c.token, c.ended = c.rows[keep], c.token[keep], c.ended[keep]
                    running.append(c)
                cohorts[:] = running
                if cohorts:
                    _step(lm, head, cohorts)
        except Exception as exc:
            if not retry_out_of_memory:
                raise
            rows = [int(r) for c in cohorts for r in c.rows]
            out[rows] = adapter.pad_token_id
            queue.extendleft(reversed(sorted(rows)))
            cohorts.clear()
            # halved_after re-raises what is not out of memory
            if batch_size == 1 and width > 1:  # one row per prompt pass: narrow the decoding
                width = halved_after(exc, width, what, "decode_width")
            else:
                batch_size = halved_after(exc, batch_size, what)
                width = max(batch_size, width // 2)
            continue
        if count > batch_size and (done - logged >= batch_size or done == count):
            log.info("%s: %d/%d (%.1f/s)", what, done, count, done / max(time.time() - began, 1e-9))
            logged = done
    return out


def greedy_ids(adapter: Adapter, prepared: Prepared, max_new_tokens: int, start_layer: int = 0, groups: list | None = None,
               share_prefix: bool = True, drop_finished: bool = True) -> torch.Tensor:
    """New token ids [B, N] of one prepared batch (``prefill``, then ``stream_ids``' decoding). ``share_prefix=False`` or
    ``drop_finished=False`` turn one saving off (the bench measures each; the tokens are the same)."""
    batch = prepared.batch_size
    return stream_ids(adapter, batch, lambda rows: prefill(adapter, prepared, start_layer, groups, share_prefix), max_new_tokens,
                      batch, drop_finished=drop_finished, retry_out_of_memory=False)
