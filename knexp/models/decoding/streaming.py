"""Greedy captions of many rows with continuous batching: ``stream_ids`` (and ``greedy_ids``, one batch through it).

They give the same new tokens as the model's own ``generate`` (greedy, ``knexp.models.adapters.adapter.GREEDY``) for
unpadded prompts, with these savings on top of the prompt pass's (``knexp.models.decoding.prefill``):

* **No wasted decode.** A row that has emitted a stop token leaves the running batch (its cache rows are dropped), so
  one long caption does not keep the finished ones decoding.
* **Continuous batching.** When half a prompt batch of places is free, the next rows' prompt pass runs (under their own
  hooks) and they join the decoding as a new cohort; a step runs every cohort at once
  (``knexp.models.decoding.decode_step``).

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

from knexp.models.decoding.batching import halved_after, progress_due
from knexp.models.decoding.decode_step import Cohort, keep_rows, step
from knexp.models.decoding.prefill import Prefilled, prefill
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
    stream = _Stream(model, count, prefill_rows, max_new_tokens, batch_size, max(batch_size, width or batch_size),
                     drop_finished, continuous)
    lm, head = model.language_model()
    while stream.queue or stream.cohorts:
        try:
            stream.refill()
            with record_function("knexp.decode"):
                stream.advance()
                if stream.cohorts:
                    step(lm, head, stream.cohorts)
        except Exception as exc:
            if not retry_out_of_memory:
                raise
            stream.restart(exc, what)  # re-raises what is not out of memory
            continue
        stream.log_progress(what)
    return stream.out


class _Stream:
    """The state of ``stream_ids``: the rows waiting (``queue``), the cohorts decoding (each a prompt batch's rows in
    flight), the tokens so far (``out`` [count, N]) and the progress."""

    def __init__(self, model: Decodable, count: int, prefill_rows, max_new_tokens: int, batch_size: int, width: int,
                 drop_finished: bool, continuous: bool):
        self.prefill_rows, self.max_new_tokens = prefill_rows, max_new_tokens
        self.batch_size, self.width = batch_size, width
        self.drop_finished, self.continuous, self.count = drop_finished, continuous, count
        self.pad, self.device = model.pad_token_id, model.device
        device = self.device
        self.stop = torch.tensor(model.stop_token_ids, device=device)
        self.out = torch.full((count, max_new_tokens), self.pad, dtype=torch.long, device=device)
        self.queue, self.cohorts = deque(range(count)), []
        self.done, self.logged, self.began = 0, 0, time.time()
        self.last = self.began  # when the last progress line was logged

    def refill(self) -> None:
        """Prefill the next rows while half a prompt batch of places is free (every place, without ``continuous``)."""
        alive = sum(len(c.rows) for c in self.cohorts)
        while self.queue and (self.continuous or not self.cohorts):
            take = min(self.batch_size, self.width - alive, len(self.queue))
            if take < min(len(self.queue), max(1, self.batch_size // 2)):
                return
            # in flight before their pass: out of memory there puts them back
            rows = [self.queue.popleft() for _ in range(take)]
            self.cohorts.append(Cohort(torch.tensor(rows, device=self.device), None, None,
                                       torch.zeros(take, dtype=torch.bool, device=self.device)))
            first = self.prefill_rows(rows)
            if first.ids is not None:  # the model decoded the rows itself (no fast paths): they are done
                self.cohorts.pop()
                ids = _after_stop(first.ids[:, :self.max_new_tokens], self.stop, self.pad)
                self.out[rows, :first.ids.shape[1]] = ids
                self.done += take
                continue
            self.cohorts[-1].cache, self.cohorts[-1].logits = first.cache, first.logits
            alive += take

    def advance(self) -> None:
        """Take each cohort's next token; rows that end leave (a cohort whose rows all ended, or that reached
        ``max_new_tokens``, leaves whole)."""
        running = []
        for c in self.cohorts:
            c.token = torch.where(c.ended, self.pad, c.logits.argmax(-1))
            self.out[c.rows, c.step] = c.token
            c.ended |= torch.isin(c.token, self.stop)
            c.step += 1
            if c.step == self.max_new_tokens or bool(c.ended.all()):
                self.done += len(c.rows)
                continue
            if self.drop_finished and bool(c.ended.any()):  # finished rows leave the batch and the cache
                keep = (~c.ended).nonzero().flatten()
                keep_rows(c, keep)
                self.done += len(c.rows) - len(keep)
                c.rows, c.token, c.ended = c.rows[keep], c.token[keep], c.ended[keep]
            running.append(c)
        self.cohorts[:] = running

    def restart(self, exc: Exception, what: str) -> None:
        """After out of memory: the rows in flight go back to the queue, and the prompt batch (or, at one row per prompt
        pass, the decoding width) halves; ``halved_after`` re-raises what is not out of memory."""
        rows = [int(r) for c in self.cohorts for r in c.rows]
        self.out[rows] = self.pad
        self.queue.extendleft(reversed(sorted(rows)))
        self.cohorts.clear()
        if self.batch_size == 1 and self.width > 1:  # one row per prompt pass: narrow the decoding
            self.width = halved_after(exc, self.width, what, "decode_width")
        else:
            self.batch_size = halved_after(exc, self.batch_size, what)
            self.width = max(self.batch_size, self.width // 2)

    def log_progress(self, what: str) -> None:
        """A progress line when ``progress_due`` says so (``knexp.models.decoding.batching``)."""
        done, count = self.done, self.count
        full_batch = done - self.logged >= self.batch_size or done == count
        if done > self.logged and progress_due(count > self.batch_size and full_batch, time.time() - self.last,
                                               done == count):
            log.info("%s: %d/%d (%.1f/s)", what, done, count, done / max(time.time() - self.began, 1e-9))
            self.logged, self.last = done, time.time()


def _after_stop(ids: torch.Tensor, stop: torch.Tensor, pad: int) -> torch.Tensor:
    """``ids`` [B, N] with every position after a row's first stop token set to ``pad``, as ``stream_ids`` leaves a
    row."""
    ended = torch.isin(ids, stop).long().cumsum(1)
    return torch.where((ended - torch.isin(ids, stop).long()) > 0, pad, ids)


def greedy_ids(model: Decodable, prepared: Prepared, max_new_tokens: int, start_layer: int = 0,
               groups: list | None = None, share_prefix: bool = True, drop_finished: bool = True) -> torch.Tensor:
    """New token ids [B, N] of one prepared batch (``prefill``, then ``stream_ids``' decoding). ``share_prefix=False``
    or ``drop_finished=False`` turn one saving off (the bench measures each; the tokens are the same)."""
    batch = prepared.batch_size
    return stream_ids(model, batch,
                      lambda rows: prefill(model, prepared, start_layer, groups, share_prefix, max_new_tokens),
                      max_new_tokens, batch, drop_finished=drop_finished, retry_out_of_memory=False)
