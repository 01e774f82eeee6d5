"""Per-sample statistics cached in memory and on disk, so every method on a sample reuses one set of passes.

Keys hash the model's identity, the sample (dataset, image, annotation, inpainting options) and the caption;
files are safetensors written atomically. ``computed`` counts cache misses, i.e. the passes actually run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from knexp.identification.passes import SampleStats
from knexp.io import atomic_path


class StatsCache:
    def __init__(self, root: str | Path | None):
        self.root = Path(root) / "stats" if root is not None else None
        self._memory: dict[str, SampleStats] = {}
        self.computed = self.loaded = 0

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
        path = self._path(key)
        if path is None or not path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = json.loads(f.metadata()["meta"])
            tensors = load_file(str(path))
            return SampleStats(**tensors, **meta)
        except (SafetensorError, OSError, KeyError, ValueError, TypeError):
            return None  # torn, foreign or older-format file: recompute

    def _write(self, key: str, stats: SampleStats) -> None:
        path = self._path(key)
        if path is None:
            return
        tensors = {name: getattr(stats, name).contiguous() for name in SampleStats.TENSORS}
        meta = {"target_id": stats.target_id, "target_position": stats.target_position, "forward_passes": stats.forward_passes}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
