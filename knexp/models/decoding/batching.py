"""Batching with progress and out-of-memory recovery.

``map_batches`` applies a batch function chunk by chunk, logging done/total and the rate (``progress_due``: each
chunk of a call of several, and at least every 10 s). When a chunk runs
out of memory (CUDA or host), the batch size is halved and the chunk retried; the smaller size is kept for the
rest of the call. A row's caption does not depend on its batch (tested; see ``knexp.models.decoding.streaming`` for the
float32 rounding that could in principle break a near-tie), so the results are those of the configured size. Out of
memory at batch size 1 raises ``BatchTooLarge`` naming the settings to lower. ``halved_after`` is the same rule for
``knexp.models.decoding.streaming.stream_ids``.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence

import torch

from knexp.models.errors import BatchTooLarge

log = logging.getLogger("knexp.progress")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halved_after(exc: Exception, size: int, what: str, setting: str = "batch_size") -> int:
    """The size to retry with after ``exc`` at ``size`` rows of ``model.generation.<setting>``: half of it after out of
    memory (memory freed, a warning logged); ``BatchTooLarge`` at size 1; any other exception is raised again."""
    if not is_out_of_memory(exc):
        raise exc
    _free_memory()
    if size == 1:
        raise BatchTooLarge(f"{what}: out of memory with one row per batch; lower model.generation.max_new_tokens, "
                            "use a smaller model.dtype (bfloat16) or a device with more memory") from exc
    smaller = max(1, size // 2)
    log.warning("%s: out of memory at %s %d; retrying with %d (set model.generation.%s=%d to start there)", what,
                setting.replace("_", " "), size, smaller, setting, smaller)
    return smaller


def progress_due(batch_done: bool, since_last_s: float, finished: bool) -> bool:
    """Whether a progress line is due: a batch's worth of rows more in a call of several batches (``batch_done``), or
    rows done 10 s after the last line, or the call's end 5 s after it, so that a long call of one batch is not
    silent."""
    return batch_done or since_last_s >= 10 or (finished and since_last_s >= 5)


def map_batches(fn: Callable[[Sequence], list], items: Sequence, batch_size: int, what: str = "images") -> list:
    """``fn(chunk)`` over ``items`` in chunks of ``batch_size`` (halved on out of memory), results concatenated."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list = []
    total, began, start, size = len(items), time.time(), 0, batch_size
    last = began  # when the last progress line was logged
    while start < total:
        chunk = items[start : start + size]
        try:
            out += fn(chunk)
        except Exception as exc:
            size = halved_after(exc, len(chunk), what)
            continue
        start += len(chunk)
        if progress_due(total > batch_size, time.time() - last, start == total):
            log.info("%s: %d/%d (%.1f/s)", what, start, total, start / max(time.time() - began, 1e-9))
            last = time.time()
    return out
