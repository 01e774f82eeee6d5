"""A content-addressed on-disk store of JSON values (captions, traces, heatmaps), shared by concurrent jobs.

A value lives in ``<root>/<name>/<key[:2]>/<key>.json`` as ``{"key": ..., "sha1": ..., "value": ...}``: the key is a
hash of everything the value depends on (model identity, input, options; see ``stable_key``), the checksum covers the
key and the value, and files are written under a temporary name and renamed. So two jobs may compute the same entry
at once (the last rename wins, both are equal), a reader never sees half a file, and an entry that is cut short,
edited or another entry's file fails its check and is recomputed, with a warning (``knexp.checked.damaged``); an entry
written by an older knexp without its key is recomputed quietly. ``root=None`` disables the store (every ``get``
misses).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from knexp.checked import damaged
from knexp.io import atomic_write_text


def stable_key(*parts) -> str:
    """A short hash of JSON-serialisable parts (dataclasses included)."""
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True,
                      default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()


class Store:
    def __init__(self, root: str | Path | None, name: str):
        self.root = Path(root) / name if root is not None else None
        self.name = name
        self.hits = self.misses = self.damaged = 0

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any | None:
        """The stored value, or None on a miss (absent, or failing its check: then it is recomputed by the caller)."""
        if self.root is None:
            return None
        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
            if isinstance(entry, dict) and "key" not in entry and "sha1" in entry:
                return None  # an older knexp's entry (no key): recomputed and rewritten, no warning
            why = ("not an entry" if not isinstance(entry, dict) or not {"key", "sha1", "value"} <= set(entry)
                   else "written for another entry" if entry["key"] != key
                   else "fails its checksum" if entry["sha1"] != _digest([key, entry["value"]]) else "")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # cut short, not UTF-8, not JSON
            why = f"unreadable: {exc}"
        if why:
            self.damaged += 1
            damaged(self.name, path, why)
            return None
        return entry["value"]

    def put(self, key: str, value: Any) -> None:
        if self.root is not None:
            atomic_write_text(self._path(key), json.dumps({"key": key, "sha1": _digest([key, value]), "value": value}))

    def get_many(self, keys: list[str], compute: Callable[[list[int]], list], chunk: int = 16) -> list:
        """Values for ``keys``; ``compute(indices)`` makes the missing ones, ``chunk`` at a time, each chunk
        stored as soon as it is made (so an interrupted job keeps its finished chunks)."""
        values = [self.get(k) for k in keys]
        missing = [i for i, v in enumerate(values) if v is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for start in range(0, len(missing), chunk):
            part = missing[start:start + chunk]
            for i, value in zip(part, compute(part), strict=True):
                self.put(keys[i], value)
                values[i] = value
        return values


def cache_report(root: str | Path) -> dict[str, dict[str, float]]:
    """Files and MiB per top-level folder of the cache (``python -m knexp.store <cache_dir>``)."""
    root = Path(root)
    report: dict[str, dict[str, float]] = {}
    if not root.is_dir():
        return report
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = [f for f in folder.rglob("*") if f.is_file()]
        report[folder.name] = {"files": len(files), "MiB": round(sum(f.stat().st_size for f in files) / 2**20, 2)}
    return report


if __name__ == "__main__":
    import sys

    from knexp.paths import default_cache_dir

    where = Path(sys.argv[1]) if len(sys.argv) > 1 else default_cache_dir()
    rows = cache_report(where)
    print(f"cache at {where}")
    for name, row in rows.items():
        print(f"  {name:24s} {row['files']:8d} files {row['MiB']:10.2f} MiB")
    print(f"  {'total':24s} {sum(r['files'] for r in rows.values()):8d} files "
          f"{sum(r['MiB'] for r in rows.values()):10.2f} MiB")
