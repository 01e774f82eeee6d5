"""Cache entries that check themselves when they are read: each file carries the key it was written for and a checksum
of its content, so a file cut short (a full disk, an interrupted copy), edited, or copied from another entry is caught.

The caches call ``damaged`` for such an entry: it is rebuilt (recomputed and written again), and a warning names it
(the first few of each cache by name, then one line for the rest). Every writer writes to a temporary file and renames
it (``knexp.io``), so a reader never sees half of a file that a job is writing.

* JSON values: ``knexp.store.Store`` (captions, traces, heatmaps).
* Tensors (safetensors): ``save_tensors`` / ``load_tensors``, and ``read_entry`` for a cache's read (per-sample
  statistics, reference statistics, preserved keys). The key and
  a sha1 of every tensor's name, dtype, shape and bytes go in the file's metadata.
* Images (PNG): ``write_png`` / ``read_png`` (inpainted images). The key and a sha1 of the pixels go in PNG text chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from knexp.io import atomic_path

log = logging.getLogger(__name__)
NAMED_PER_CACHE = 3  # damaged entries named one by one per cache and process; the rest get one line
_named: dict[str, int] = {}
T = TypeVar("T")


class Damaged(Exception):
    """A cache entry that cannot be trusted: unreadable, cut short, edited, or written for another key."""


def damaged(cache: str, path: Path, why: str) -> None:
    """Log that entry ``path`` of cache ``cache`` fails its check (``why``) and is rebuilt."""
    seen = _named[cache] = _named.get(cache, 0) + 1
    if seen <= NAMED_PER_CACHE:
        log.warning("%s cache: %s is damaged (%s); rebuilding it", cache, path, why)
    if seen == NAMED_PER_CACHE:
        log.warning("%s cache: further damaged entries are rebuilt without a line each (metrics.json counts them)",
                    cache)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha1 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha1()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict, key: str) -> None:
    """A safetensors file of ``tensors`` with ``meta`` (JSON), the ``key`` it holds and the tensors' digest."""
    from safetensors.torch import save_file

    tensors = {name: t.contiguous() for name, t in tensors.items()}
    header = {"key": key, "sha1": tensor_digest(tensors), "meta": json.dumps(meta)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_tensors(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a file ``save_tensors`` wrote for ``key``. ``FileNotFoundError`` when there is none;
    ``Damaged`` when it cannot be read, was written for another key, or its tensors fail their digest."""
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if header.get("key") != key:
            why = "no key: written by an older knexp or not by knexp"
            raise Damaged("written for another entry" if "key" in header else why)
        if header.get("sha1") != tensor_digest(tensors):
            raise Damaged("its tensors fail their checksum")
        return tensors, json.loads(header["meta"])
    except Damaged:
        raise
    except Exception as exc:  # safetensors raises its own error, OSError or ValueError for a torn or foreign file
        raise Damaged(f"unreadable: {exc}") from exc


def read_entry(path: Path | None, key: str, cache: str, build: Callable[[dict, dict], T]) -> tuple[T | None, bool]:
    """(``build(tensors, meta)`` of the file that ``save_tensors`` wrote at ``path`` for ``key``, whether it was
    damaged): (None, False) where there is no path or no file; (None, True) where the file fails its check
    (``load_tensors``) or ``build`` refuses it with a KeyError or TypeError (another format: an older knexp's), after
    ``damaged`` has named it for ``cache``."""
    if path is None:
        return None, False
    try:
        return build(*load_tensors(path, key)), False
    except FileNotFoundError:
        return None, False
    except (Damaged, KeyError, TypeError) as exc:
        damaged(cache, path, str(exc))
        return None, True


def _pixels_digest(rgb: np.ndarray) -> str:
    return hashlib.sha1(f"{rgb.shape}:{rgb.dtype}".encode() + np.ascontiguousarray(rgb).tobytes()).hexdigest()


def write_png(path: Path, rgb: np.ndarray, key: str) -> None:
    """RGB uint8 [H, W, 3] as a PNG (lossless) with the ``key`` it holds and a sha1 of its pixels in text chunks."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("knexp-key", key)
    info.add_text("knexp-sha1", _pixels_digest(rgb))
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(tmp, format="PNG", pnginfo=info, compress_level=1)


def read_png(path: Path, key: str) -> np.ndarray:
    """The RGB pixels of a PNG ``write_png`` wrote for ``key``. ``FileNotFoundError`` when there is none; ``Damaged``
    when it cannot be decoded whole, was written for another key, or its pixels fail their digest."""
    from PIL import Image

    if not path.exists():
        raise FileNotFoundError(path)
    try:
        with Image.open(path) as im:
            im.load()  # decodes the whole file: a truncated one raises here
            text, rgb = dict(getattr(im, "text", {})), np.asarray(im.convert("RGB"))
    except Exception as exc:  # Pillow raises OSError, SyntaxError or ValueError for a torn or foreign file
        raise Damaged(f"unreadable: {exc}") from exc
    if text.get("knexp-key") != key:
        why = "no key: written by an older knexp or not by knexp"
        raise Damaged("written for another entry" if "knexp-key" in text else why)
    if text.get("knexp-sha1") != _pixels_digest(rgb):
        raise Damaged("its pixels fail their checksum")
    return rgb
