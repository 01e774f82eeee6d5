"""Side-by-side timings that the order of the runs cannot bias.

Measured here (2026-11-27): the hook-overhead pair timed in a fixed order (plain, then hooked) gave 1.079; the same
pair in the reverse order gave 0.967. Whichever ran second was about 5% slower, so a fixed order puts that bias into
every ratio. ``alternating`` reverses the order every other round (A B, B A, A B, ...), so with an even number of rounds
each variant runs first and second equally often, and compares the medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def alternating(variants: dict[str, Callable[[], Any]], rounds: int) -> tuple[dict[str, float], dict[str, Any]]:
    """({name: median seconds over ``rounds`` runs}, {name: its last run's result}), running the variants in their order
    in even rounds and in the reverse order in odd rounds."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, Any] = {}
    for r in range(rounds):
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            t = time.perf_counter()
            results[name] = variants[name]()
            seconds[name].append(time.perf_counter() - t)
    return {name: statistics.median(s) for name, s in seconds.items()}, results
