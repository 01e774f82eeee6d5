"""Folders built once into the cache and checked every time they are used: the toy-world splits and the converted LM.

A manifest inside the folder records the settings the folder was built with and every file it holds, with its size and
sha1. ``built`` then:

* returns at once when the manifest holds these settings and every file it lists is whole (the common case: reading
  the manifest and hashing the files; BENCHMARKS.md has what that costs);
* builds the folder when there is none;
* rebuilds it, with a warning that names what is damaged, when a file is missing, cut short or changed, or the
  manifest itself is unreadable;
* for a folder built with other settings, rebuilds it where that is safe (``refuse=None``), or raises
  ``FolderInUse`` with ``refuse``'s message, which names the folder to delete.

A build runs into a temporary folder beside the target, under a file lock, so concurrent jobs build once. Its files are
moved in one at a time (each a rename, so a reader never sees half a file) and the manifest last. Files in the folder
that the manifest does not list are left alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from knexp.io import atomic_write_text
from knexp.user_errors import UserError

log = logging.getLogger(__name__)


class FolderInUse(UserError, FileExistsError):
    """A cache folder holds what was built with other settings, and rebuilding it in place is not safe."""


def _sha1(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def problem(root: Path, manifest: str, settings: dict) -> tuple[str, str]:
    """(state, detail) of the folder: ("ok", ""), ("absent", ""), ("other", the settings it holds) or ("damaged",
    what)."""
    path = root / manifest
    try:
        text = path.read_text()
    except FileNotFoundError:
        return "absent", ""
    except (OSError, UnicodeDecodeError) as exc:
        return "damaged", f"{path} is unreadable ({exc})"
    try:
        held = json.loads(text)
        files, recorded = held["files"], held["settings"]
    except (ValueError, KeyError, TypeError):
        return "damaged", f"{path} is not a knexp manifest (cut short, or written by an older knexp without checksums)"
    if recorded != settings:
        return "other", json.dumps(recorded)
    bad = []
    for rel, entry in files.items():
        file = root / rel
        try:
            if file.stat().st_size != entry["size"] or _sha1(file) != entry["sha1"]:
                bad.append(f"{rel} (changed or cut short)")
        except FileNotFoundError:
            bad.append(f"{rel} (missing)")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return "damaged", f"{', '.join(bad[:3])}{more}"
    return "ok", ""


def built(root: str | Path, manifest: str, settings: dict, build: Callable[[Path], None], what: str,
          refuse: str | None = None) -> Path:
    """``root`` holding, whole, the files ``build(folder)`` writes into an empty ``folder`` for ``settings``
    (JSON-like), with the manifest at ``root / manifest`` (module docstring). ``what`` names the folder's content in
    warnings."""
    root = Path(root)
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as the manifest reads back
    if problem(root, manifest, settings)[0] == "ok":
        return root
    beside = Path(os.path.realpath(root)).parent  # where root really is (it may be a link): renames stay on one disk
    beside.mkdir(parents=True, exist_ok=True)
    with FileLock(str(beside / f".{root.name}.{manifest.replace('/', '_')}.lock")):
        state, detail = problem(root, manifest, settings)  # another job may have built it while this one waited
        if state == "ok":
            return root
        if state == "other" and refuse is not None:
            raise FolderInUse(refuse)
        if state == "damaged":
            log.warning("%s in %s is damaged: %s; rebuilding it", what, root, detail)
        elif state == "other":
            log.warning("%s in %s was built with other settings (%s); rebuilding it", what, root, detail)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-build-", dir=beside))
        try:
            build(tmp)
            files = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha1": _sha1(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            (root / manifest).unlink(missing_ok=True)
            for rel in files:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, root / rel)
            atomic_write_text(root / manifest,
                              json.dumps({"what": what, "settings": settings, "files": files}, indent=1))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
