"""``load_model``: the adapter a model config describes, and ``model_identity``: the hash of what a model computes.

Each ``conf/model/*.yaml`` names its ``loader``, a function ``(model_cfg: dict, device, cache_dir) -> Adapter``
given as ``module.function``. A new model family is one module (adapter + loader) and one yaml. The config
arrives here as a plain dict (``knexp.job.spec`` resolves it), so this module needs no Hydra.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
from pathlib import Path

import torch

from knexp.models import memory
from knexp.models.adapters.adapter import Adapter
from knexp.models.captioning import Generation
from knexp.models.memory import Estimate, ModelShape
from knexp.models.weight_edit import load, permanent
from knexp.settings import SettingError, Text, check_mapping, from_mapping
from knexp.store import stable_key

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_LAST: dict[str, Adapter] = {}  # the last model loaded in this process, by identity (a sweep's jobs share one process)


def _loader(model_cfg: dict):
    path = model_cfg.get("loader")
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise SettingError("model.loader", path,
                           f"cannot be imported ({exc}); name a function as module.function, e.g. "
                           "knexp.models.zoo.embedded.load_adapter") from exc


def check_model(model_cfg: dict) -> Generation:
    """Check the ``model`` group before anything is loaded: its name and loader, ``model.generation`` (returned, built),
    ``model.prompt.caption_prefix``, and every setting the loader declares it reads (``knexp.settings.takes``). A loader
    that declares none gets only these."""
    check_mapping(model_cfg, "model", name=Text())
    loader = _loader(model_cfg)
    generation = from_mapping(Generation, model_cfg.get("generation") or {}, "model.generation")
    prompt = model_cfg.get("prompt") or {}
    if not isinstance(prompt, dict):
        raise SettingError("model.prompt", prompt, "use a mapping with at least caption_prefix")
    check_mapping(prompt, "model.prompt", caption_prefix=Text())
    for key, check in getattr(loader, "settings", {}).items():
        check(f"model.{key}", model_cfg.get(key))
    edit_files(model_cfg)
    return generation


def edit_files(model_cfg: dict) -> list[str]:
    """The edit files of ``model.edit``, in the order they are applied: none (null), one (a path) or a list of paths
    (edits made one after another, each on the model the files before it give); each must be a file."""
    given = model_cfg.get("edit")
    paths = list(given) if isinstance(given, (list, tuple)) else [] if given is None else [given]
    for i, path in enumerate(paths):
        key = edit_key(model_cfg, i)
        Text()(key, path)
        if not Path(path).is_file():
            raise SettingError(key, path,
                               "is no file; give an edit file written by task=edit (its job folder's edit.safetensors)")
    return [str(path) for path in paths]


def edit_key(model_cfg: dict, i: int) -> str:
    """How messages name the ``i``-th edit file: ``model.edit[i]`` in a list, ``model.edit`` alone."""
    return f"model.edit[{i}]" if isinstance(model_cfg.get("edit"), (list, tuple)) else "model.edit"


def file_hash(path: str | Path) -> str:
    """sha1 of a file's bytes: how an edit file is named in a model's identity and in the files made after it."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def load_model(model_cfg: dict, cache_dir: str | Path) -> Adapter:
    """Build the model a ``conf/model/*.yaml`` describes (resolved to a dict), wrapped in its adapter.

    The adapter is kept for the next call with the same identity and cache folder: the jobs of a multirun on Hydra's
    basic launcher run in one process, and adapters hold no state between calls (every hook is removed on exit)."""
    key = stable_key(model_identity(model_cfg), str(cache_dir), model_cfg.get("device", "cpu"))
    if key in _LAST:
        return _LAST[key]
    check_memory(model_cfg, cache_dir)
    adapter = _loader(model_cfg)(model_cfg, resolve_device(model_cfg.get("device", "cpu")), Path(cache_dir))
    files = edit_files(model_cfg)
    hashes = [file_hash(f) for f in files]
    for i, path in enumerate(files):  # each checked against the model it was made on, then applied in memory only
        base = model_identity({**model_cfg, "edit": files[:i] or None})
        permanent(adapter, load(path, adapter, base, edit_key(model_cfg, i), hashes[:i]))
    _LAST.clear()  # one model at a time: a sweep over models must not hold them all
    _LAST[key] = adapter
    return adapter


def check_memory(model_cfg: dict, cache_dir: str | Path) -> Estimate | None:
    """The job's memory estimate (``knexp.models.memory``) from the adapter its loader builds without weights (the
    loader's ``without_weights``, same arguments); ``NotEnoughMemory`` in one line, before any weight is read, where
    the device has too little free. None, with a line in the log, for a loader that cannot build one."""
    loader = _loader(model_cfg)
    build = getattr(loader, "without_weights", None)
    if build is None:
        log.info("no memory estimate for model=%s: its loader has no without_weights", model_cfg.get("name"))
        return None
    device = resolve_device(model_cfg.get("device", "cpu"))
    generation = from_mapping(Generation, model_cfg.get("generation") or {}, "model.generation")
    rows = generation.decode_width or generation.batch_size
    shape = ModelShape.of(build(model_cfg, device, Path(cache_dir)))
    rows_setting = f"model.generation.{'decode_width' if generation.decode_width else 'batch_size'}"
    est = memory.check(str(model_cfg.get("name")), shape, rows, generation.max_new_tokens, device, rows_setting,
                       "model.dtype" if "dtype" in model_cfg else None)
    log.info("memory estimate for model=%s: %.2f GiB at its largest step (%s)", model_cfg.get("name"),
             est.peak() / memory.GIB, est.largest)
    return est


def model_identity(model_cfg: dict) -> str:
    """Hash of what a model computes: its resolved config (less ``generation.batch_size`` and ``decode_width``, which no
    output depends on), with the bytes of the projector file and of the edit files (``model.edit``) in place of their
    paths. Keys of every cache entry derived from the model."""
    cfg = copy.deepcopy(dict(model_cfg))
    for setting in ("batch_size", "decode_width"):
        cfg.get("generation", {}).pop(setting, None)
    files = edit_files(cfg)
    if files:  # an edited model computes what its edit files' bytes say (one file: its hash alone, as before lists)
        hashes = [file_hash(f) for f in files]
        cfg["edit"] = hashes[0] if len(hashes) == 1 else hashes
    else:
        cfg.pop("edit", None)  # no edit: the identity of the model as it was before edits existed
    projector = cfg.get("projector_path")
    if projector and Path(projector).exists():  # its bytes, not where the checkout happens to be
        cfg["projector_path"] = hashlib.sha1(Path(projector).read_bytes()).hexdigest()
    return stable_key(cfg)
