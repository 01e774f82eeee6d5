"""A prompt's pass that does no work an intervention cannot change.

* **The shared prefix once** (``knexp.models.decoding.prefix_cache``): the tokens before the image come from its cache.
* **Reuse below the lowest edited layer.** An intervention on layers >= l_min at image positions cannot change any
  position's state below l_min: attention is causal and the FFN acts per position. With ``start_layer = l_min`` and
  ``groups`` (rows of one group share their prompt, e.g. one image under several noise draws), layers 0..l_min-1 run
  once per group on the clean prompt; their KV cache and the hidden states entering l_min are copied to the group's
  rows, and only layers l_min..L-1 run per row, with the intervention's hooks armed. Decoding then continues from the
  combined cache through every layer (``knexp.models.decoding.streaming``).

A model without ``fast_paths`` (``knexp.models.prepared.Decodable``) gets neither: its prompt's pass is the first pass
of its own ``generate``, which then decodes the whole caption under the same hooks (guarded to the prompt's pass, they
do nothing at its decoding steps), and ``Prefilled.ids`` holds the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.profiler import record_function
from transformers import DynamicCache

from knexp.models.decoding.prefix_cache import run_layers, shared_prefix, with_prefix
from knexp.models.prepared import Decodable, Prepared


def _group_rows(groups: list, batch: int) -> tuple[list[int], torch.Tensor]:
    """(the first row of each group, in order of appearance; long [B]: each row's group number)."""
    if len(groups) != batch:
        raise ValueError(f"{len(groups)} groups for {batch} rows")
    order = list(dict.fromkeys(groups))
    firsts = [groups.index(g) for g in order]
    return firsts, torch.tensor([order.index(g) for g in groups])


@dataclass
class Prefilled:
    """A prompt's pass over a batch: the KV cache of every layer and the logits [B, V] that predict the first new token;
    or, for a model that decodes itself (no ``fast_paths``), the new token ids [B, N] its ``generate`` gave."""

    cache: DynamicCache | None
    logits: torch.Tensor | None
    ids: torch.Tensor | None = None


@torch.no_grad()
def prefill(model: Decodable, prepared: Prepared, start_layer: int = 0, groups: list | None = None,
            share_prefix: bool = True, max_new_tokens: int | None = None) -> Prefilled:
    """The prompt's pass of an unpadded prepared batch, the tokens before the image from the prefix cache, layers below
    ``start_layer`` once per group of ``groups`` (default: every row its own group). Hooks armed on the model act on
    the layers they sit on (all must be >= ``start_layer``). A model without ``fast_paths`` generates
    ``max_new_tokens`` instead (module docstring)."""
    if not model.fast_paths:
        if max_new_tokens is None:
            raise ValueError("a model without fast paths decodes in its prompt's pass: give max_new_tokens")
        return Prefilled(None, None, model.generate_ids(prepared, max_new_tokens))
    lm, head = model.language_model()
    embeds = model.prompt_embeddings(prepared)  # [B, T, d_model]
    batch, num_layers = embeds.shape[0], len(lm.layers)
    past, prefix = shared_prefix(lm, prepared, embeds, share_prefix)

    with record_function("knexp.prefill"):  # labels for torch.profiler (the bench's profile by operator)
        rest = embeds[:, past:]  # [B, T - past, d_model]
        cache = with_prefix(lm, prefix, batch, range(start_layer, num_layers))
        if start_layer > 0:
            firsts, row_group = _group_rows(groups if groups is not None else list(range(batch)), batch)
            clean = with_prefix(lm, prefix, len(firsts), range(start_layer))
            # [G, T - past, d]: clean states entering it
            below = run_layers(lm, rest[firsts], 0, start_layer, clean, past)
            index = row_group.to(embeds.device)
            for layer in range(start_layer):
                cache.update(clean.layers[layer].keys[index], clean.layers[layer].values[index], layer)
            rest = below[index]
        hidden = lm.norm(run_layers(lm, rest, start_layer, num_layers, cache, past))
        # the last position's rows made contiguous: the head is then one matrix product over the rows, where a strided
        # [B, 1, d] view takes a batched product of B single rows, several times slower (BENCHMARKS.md)
        return Prefilled(cache, head(hidden[:, -1:].contiguous())[:, 0].float())
