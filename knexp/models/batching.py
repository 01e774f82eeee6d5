"""Batching with progress: one log line per batch, so long captioning runs show where they are."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence

log = logging.getLogger("knexp.progress")


def batches(items: Sequence, batch_size: int, what: str = "images") -> Iterator[Sequence]:
    """Yield ``items`` in chunks of ``batch_size``, logging done/total and the rate after each chunk."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total, began = len(items), time.time()
    for start in range(0, total, batch_size):
        yield items[start : start + batch_size]
        done = min(start + batch_size, total)
        if total > batch_size:
            rate = done / max(time.time() - began, 1e-9)
            log.info("%s: %d/%d (%.1f/s)", what, done, total, rate)
