"""Per-sample statistics cached in memory and on disk, so every method on a sample reuses one set of passes.

Keys hash the model's identity, the sample (dataset, image, annotation, inpainting options) and the caption. Files are
safetensors written atomically, with their key and a checksum of their tensors (``knexp.checked``): a file cut short,
edited or copied from another entry is recomputed, with a warning. ``computed`` counts cache misses, i.e. the passes
actually run; ``damaged`` the entries found damaged (and recomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from knexp.checked import read_entry, save_tensors
from knexp.identification.passes import SampleStats


class StatsCache:
    def __init__(self, root: str | Path | None):
        self.root = Path(root) / "stats" if root is not None else None
        self._memory: dict[str, SampleStats] = {}
        self.computed = self.loaded = self.damaged = 0

    def get(self, key: str, compute: Callable[[], SampleStats]) -> SampleStats:
        if key in self._memory:
            return self._memory[key]
        stats = self._read(key)
        if stats is None:
            stats = compute()
            self.computed += 1
            self._write(key, stats)
        else:
            self.loaded += 1
        self._memory[key] = stats
        return stats

    def _path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key}.safetensors"

    def _read(self, key: str) -> SampleStats | None:
        stats, bad = read_entry(self._path(key), key, "statistics", lambda t, meta: SampleStats(**t, **meta))
        self.damaged += bad
        return stats

    def _write(self, key: str, stats: SampleStats) -> None:
        path = self._path(key)
        if path is None:
            return
        tensors = {name: getattr(stats, name) for name in SampleStats.TENSORS}
        meta = {"target_id": stats.target_id, "target_position": stats.target_position,
                "forward_passes": stats.forward_passes}
        save_tensors(path, tensors, meta, key)
