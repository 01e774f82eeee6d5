"""Greedy captions of many rows with continuous batching: ``stream_ids`` (and ``greedy_ids``, one batch through it).

They give the same new tokens as the model's own ``generate`` (greedy, ``knexp.models.adapter.GREEDY``) for unpadded
prompts, with these savings on top of the prompt pass's (``knexp.models.prefill``):

* **No wasted decode.** A row that has emitted a stop token leaves the running batch (its cache rows are dropped), so
  one long caption does not keep the finished ones decoding.
* **Continuous batching.** When half a prompt batch of places is free, the next rows' prompt pass runs (under their own
  hooks) and they join the decoding as a new cohort; a step runs every cohort at once (``knexp.models.decode_step``).

A row's tokens do not depend on its batch: tests compare them with the model's own ``generate`` on the tiny models of
every adapter and on the embedded model, for interventions on one layer and on many, and for streams of several
cohorts, and the bench compares every caption it times. Its logits can, in the last bit: torch's float32 matrix product
rounds a row differently at some batch sizes than at others (BENCHMARKS.md), so a near-tie between two tokens could
break differently under another batch shape, as it could between two batch sizes of ``generate``.

A model without ``fast_paths`` decodes each prompt batch with its own ``generate`` in its prefill (``Prefilled.ids``);
those rows are done as soon as they are prefilled.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import torch
from torch.profiler import record_function

from knexp.models.batching import halved_after, progress_due
from knexp.models.decode_step import Cohort, keep_rows, step
from knexp.models.prefill import Prefilled, prefill
from knexp.models.prepared import Decodable, Prepared
from knexp.settings import Integer

log = logging.getLogger("knexp.progress")


@torch.no_grad()
def stream_ids(model: Decodable, count: int, prefill_rows: Callable[[list[int]], Prefilled], max_new_tokens: int,
               batch_size: int, width: int | None = None, drop_finished: bool = True, continuous: bool = True,
               retry_out_of_memory: bool = True, what: str = "captions") -> torch.Tensor:
    """New token ids [count, N] (stop token included, then the pad id), greedy, for rows 0..count-1, decoded with
    continuous batching.

    ``prefill_rows(rows)`` runs the prompt's pass of those rows (at most ``batch_size``, with whatever hooks the rows
    need; for a model without ``fast_paths``, their whole captions of ``max_new_tokens``). Up to ``width`` rows
    (default ``batch_size``) decode together. A row that ends leaves at once; when half a prefill batch of places is
    free, the next rows are prefilled and join the decoding, so one long caption no longer keeps a thinning batch
    running (``continuous=False``: the next batch waits until every row in flight has ended, the bench's comparison).
    Out of memory (with ``retry_out_of_memory``) halves ``batch_size`` and ``width`` (at one row per prompt pass,
    ``width`` alone); the rows in flight start again, finished rows are kept. The tokens do not depend on any of this
    (tested)."""
    batch_size = Integer(low=1)("model.generation.batch_size", batch_size)
    width = Integer(low=1, optional=True)("model.generation.decode_width", width)
    lm, head = model.language_model()
    device, pad = model.device, model.pad_token_id
    stop = torch.tensor(model.stop_token_ids, device=device)
    out = torch.full((count, max_new_tokens), pad, dtype=torch.long, device=device)
    width = max(batch_size, width or batch_size)
    queue, cohorts = deque(range(count)), []
    done, logged, began = 0, 0, time.time()
    last = began  # when the last progress line was logged

    def refill() -> None:
        nonlocal done
        alive = sum(len(c.rows) for c in cohorts)
        while queue and (continuous or not cohorts):
            take = min(batch_size, width - alive, len(queue))
            if take < min(len(queue), max(1, batch_size // 2)):
                return
            rows = [queue.popleft() for _ in range(take)]  # in flight before their pass: out of memory there puts them back
            cohorts.append(Cohort(torch.tensor(rows, device=device), None, None, torch.zeros(take, dtype=torch.bool, device=device)))
            first = prefill_rows(rows)
            if first.ids is not None:  # the model decoded the rows itself (no fast paths): they are done
                cohorts.pop()
                out[rows, :first.ids.shape[1]] = _after_stop(first.ids[:, :max_new_tokens], stop, pad)
                done += take
                continue
            cohorts[-1].cache, cohorts[-1].logits = first.cache, first.logits
            alive += take

    while queue or cohorts:
        try:
            refill()
            with record_function("knexp.decode"):
                running = []
                for c in cohorts:
                    c.token = torch.where(c.ended, pad, c.logits.argmax(-1))
                    out[c.rows, c.step] = c.token
                    c.ended |= torch.isin(c.token, stop)
                    c.step += 1
                    if c.step == max_new_tokens or bool(c.ended.all()):
                        done += len(c.rows)
                        continue
                    if drop_finished and bool(c.ended.any()):  # finished rows leave the batch and the cache
                        keep = (~c.ended).nonzero().flatten()
                        keep_rows(c, keep)
                        done += len(c.rows) - len(keep)
                        c.rows, c.token, c.ended = c.rows[keep], c.token[keep], c.ended[keep]
                    running.append(c)
                cohorts[:] = running
                if cohorts:
                    step(lm, head, cohorts)
        except Exception as exc:
            if not retry_out_of_memory:
                raise
            rows = [int(r) for c in cohorts for r in c.rows]
            out[rows] = pad
            queue.extendleft(reversed(sorted(rows)))
            cohorts.clear()
            # halved_after re-raises what is not out of memory
            if batch_size == 1 and width > 1:  # one row per prompt pass: narrow the decoding
                width = halved_after(exc, width, what, "decode_width")
            else:
                batch_size = halved_after(exc, batch_size, what)
                width = max(batch_size, width // 2)
            continue
        if done > logged and progress_due(count > batch_size and (done - logged >= batch_size or done == count),
                                           time.time() - last, done == count):
            log.info("%s: %d/%d (%.1f/s)", what, done, count, done / max(time.time() - began, 1e-9))
            logged, last = done, time.time()
    return out


def _after_stop(ids: torch.Tensor, stop: torch.Tensor, pad: int) -> torch.Tensor:
    """``ids`` [B, N] with every position after a row's first stop token set to ``pad``, as ``stream_ids`` leaves a row."""
    ended = torch.isin(ids, stop).long().cumsum(1)
    return torch.where((ended - torch.isin(ids, stop).long()) > 0, pad, ids)


def greedy_ids(model: Decodable, prepared: Prepared, max_new_tokens: int, start_layer: int = 0, groups: list | None = None,
               share_prefix: bool = True, drop_finished: bool = True) -> torch.Tensor:
    """New token ids [B, N] of one prepared batch (``prefill``, then ``stream_ids``' decoding). ``share_prefix=False`` or
    ``drop_finished=False`` turn one saving off (the bench measures each; the tokens are the same)."""
    batch = prepared.batch_size
    return stream_ids(model, batch, lambda rows: prefill(model, prepared, start_layer, groups, share_prefix, max_new_tokens),
                      max_new_tokens, batch, drop_finished=drop_finished, retry_out_of_memory=False)
