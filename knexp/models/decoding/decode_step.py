"""One greedy decoding step of every row in flight, without copies of the cache.

Rows prefilled together form a cohort (``Cohort``): one cache length, so they attend together. A step runs each
cohort's attention proper over its own cache, and the norms, the attention's projections, the MLPs and the LM head
once over every row in flight, so the decoding products stay wide instead of thinning out as rows end. A cohort's
cache grows into spare room (``_append``) instead of being concatenated anew at every step, and eager attention at one
query position shares each key/value head among its query heads in place (``_attend``) instead of copying the cache
once per query head (``repeat_kv``); BENCHMARKS.md has what these save.

The layer loop is ``LlamaDecoderLayer.forward``'s and ``LlamaAttention.forward``'s, split between the attention proper
(per cohort) and the rest (all rows). Another layer type, or a hook that could act on a step on a layer or its
attention, takes the model's own forward, per cohort. Every product is the module's own (``F.linear``), so no product's
rounding depends on the machine beyond what ``F.linear`` itself does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
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


@dataclass
class Cohort:
    """Rows prefilled together: one cache length, so they attend together. Decoding steps run every cohort at once."""

    rows: torch.Tensor  # long [b]: the caller's row numbers, in the cache's row order
    cache: DynamicCache
    logits: torch.Tensor  # float [b, V]: what predicts each row's next token
    ended: torch.Tensor  # bool [b]: emitted a stop token (such rows stay only with drop_finished=False)
    step: int = 0  # tokens emitted so far
    token: torch.Tensor | None = None  # long [b]: the last token emitted, the next step's input
    # by layer: (keys, values) [b, kv_heads, capacity, d_head], the buffers with spare room that the cache's tensors
    # view
    room: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _merged(lm) -> bool:
    """Whether every layer is a ``LlamaDecoderLayer`` with ``LlamaAttention``, whose forwards ``step`` splits, and no
    hook that could act on a decoding step sits on a layer or its attention (``step`` does not call them)."""
    return all(type(layer).forward is LlamaDecoderLayer.forward
               and type(layer.self_attn).forward is LlamaAttention.forward
               and not _hooked(layer, layer.self_attn) for layer in lm.layers)


_ROOM = 16  # positions a cohort's cache grows by at once (``_append``)


def _in_room(c: Cohort, layer: int) -> bool:
    """Whether the cache's tensors of ``layer`` are views of the cohort's buffers for it (not replaced since)."""
    entry, room = c.cache.layers[layer], c.room.get(layer)
    return room is not None and room[0].data_ptr() == entry.keys.data_ptr() and room[0].shape[0] == entry.keys.shape[0]


def _append(c: Cohort, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``c.cache.update(key, value, layer)`` for one new position (key, value [b, kv_heads, 1, d_head]), without copying
    the whole cache at every step: the layer's keys and values are views into buffers (``c.room``) with ``_ROOM`` spare
    positions, copied only when full or when the cache's tensors were replaced."""
    entry = c.cache.layers[layer]
    if type(entry) is not DynamicLayer or not entry.is_initialized:
        return c.cache.update(key, value, layer)
    b, heads, n, d = entry.keys.shape
    if not _in_room(c, layer) or c.room[layer][0].shape[2] <= n:
        room = tuple(torch.empty(b, heads, n + _ROOM, d, dtype=t.dtype, device=t.device)
                     for t in (entry.keys, entry.values))
        room[0][:, :, :n], room[1][:, :, :n] = entry.keys, entry.values
        c.room[layer] = room
    keys, values = c.room[layer]
    keys[:, :, n], values[:, :, n] = key[:, :, 0], value[:, :, 0]
    entry.keys, entry.values = keys[:, :, :n + 1], values[:, :, :n + 1]
    return entry.keys, entry.values


def keep_rows(c: Cohort, keep: torch.Tensor) -> None:
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
    be called, not bypassed). Hooks that ``knexp.models.hooks.attached`` guards to a prompt's pass
    (``prompt_pass_only``: an intervention, a recording) cannot, and do not count."""
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
    # [b, kv_heads, groups, d_head]: head h -> h // groups
    grouped = query.reshape(b, key.shape[1], heads // key.shape[1], d)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * attn.scaling  # [b, kv_heads, groups, n]
    if mask is not None:
        scores = scores + mask  # [b, 1, 1, n]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).reshape(b, 1, heads * d)


def step(lm, head, cohorts: list[Cohort]) -> None:
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
        for c, q, k, v, (mask, (cos, sin)) in zip(cohorts, query.split(sizes), key.split(sizes), value.split(sizes),
                                                  contexts, strict=True):
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = _append(c, index, k, v)
            attended.append(_attend(attn, q, k, v, mask))
        hidden = residual + attn.o_proj(torch.cat(attended))
        residual = hidden
        hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden))
    logits = head(lm.norm(hidden))[:, 0].float()  # [R, V]
    for c, part in zip(cohorts, logits.split(sizes), strict=True):
        c.logits = part
