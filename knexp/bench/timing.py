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


def paired_ratio(base: Callable[[], Any], other: Callable[[], Any], rounds: int) -> tuple[float, float, float]:
    """(median seconds of ``base``, of ``other``, median over rounds of other / base within the round). Each round runs
    both, in the reverse order every other round; the ratio within a round cancels the machine's drift between rounds,
    which the ratio of two medians keeps."""
    seconds: dict[str, list[float]] = {"base": [], "other": []}
    for r in range(rounds):
        for name, run in ((("base", base), ("other", other)) if r % 2 == 0 else (("other", other), ("base", base))):
            t = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t)
    ratios = [o / b for b, o in zip(seconds["base"], seconds["other"], strict=True)]
    return statistics.median(seconds["base"]), statistics.median(seconds["other"]), statistics.median(ratios)

