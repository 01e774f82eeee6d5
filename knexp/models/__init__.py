"""Models: the embedded MLLM built from offline packages, real-size LLaVA-1.5 and MiniGPT-4, tiny test models.

Each ``conf/model/*.yaml`` names its ``loader``, a function ``(model_cfg, device, cache_dir) -> Adapter``;
``load_model`` calls it. A new model family is one module (adapter + loader) and one yaml.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from knexp.models.adapters import Adapter
from knexp.store import stable_key


class ModelWeightsMissing(FileNotFoundError):
    """Weights for a configured model are absent; the message names the config key to set."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_LAST: dict[str, Adapter] = {}  # the last model loaded in this process, by identity (a sweep's jobs share one process)


def load_model(model_cfg: DictConfig, cache_dir: str | Path) -> Adapter:
    """Build the model a ``conf/model/*.yaml`` describes, wrapped in its adapter.

    The adapter is kept for the next call with the same identity and cache folder: the jobs of a multirun on Hydra's
    basic launcher run in one process, and adapters hold no state between calls (every hook is removed on exit)."""
    key = stable_key(model_identity(model_cfg), str(cache_dir), model_cfg.get("device", "cpu"))
    if key in _LAST:
        return _LAST[key]
    try:
        loader = get_method(model_cfg.loader)
    except Exception as exc:
        raise ValueError(f"model {model_cfg.get('name')!r}: cannot import model.loader={model_cfg.loader!r} ({exc})") from exc
    adapter = loader(model_cfg, resolve_device(model_cfg.get("device", "cpu")), Path(cache_dir))
    _LAST.clear()  # one model at a time: a sweep over models must not hold them all
    _LAST[key] = adapter
    return adapter


def model_identity(model_cfg: DictConfig) -> str:
    """Hash of what a model computes: its resolved config (less ``generation.batch_size``, which no output depends
    on), with the projector file's bytes in place of its path. Keys of every cache entry derived from the model."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True)
    cfg.get("generation", {}).pop("batch_size", None)
    projector = cfg.get("projector_path")
    if projector and Path(projector).exists():  # its bytes, not where the checkout happens to be
        cfg["projector_path"] = hashlib.sha1(Path(projector).read_bytes()).hexdigest()
    return stable_key(cfg)
