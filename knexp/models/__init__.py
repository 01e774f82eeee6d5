"""Models: the embedded MLLM built from offline packages, and tiny random models for tests.

``load_model`` returns an adapter (``knexp.models.adapters``): the interface methods and evaluation use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from knexp.models.adapters import Adapter


def load_model(model_cfg: DictConfig, cache_dir: str | Path) -> Adapter:
    """Build the model a ``conf/model/*.yaml`` describes and wrap it in its adapter."""
    family = model_cfg.family
    if family == "embedded":
        from knexp.models.adapters.spliced import SplicedAdapter
        from knexp.models.embedded import PromptConfig, load_embedded

        mllm = load_embedded(
            cache_dir=cache_dir,
            projector_path=model_cfg.projector_path,
            projector_kind=model_cfg.projector_kind,
            projector_hidden=model_cfg.projector_hidden,
            dtype=model_cfg.dtype,
            attn_implementation=model_cfg.attn_implementation,
            prompt=PromptConfig(**OmegaConf.to_container(model_cfg.prompt, resolve=True)),
        )
        return SplicedAdapter(mllm.to(torch.device(model_cfg.device)))
    if family == "tiny_llava":
        from knexp.models.adapters.llava import LlavaAdapter
        from knexp.models.tiny import tiny_llava

        model, processor = tiny_llava(grid=model_cfg.grid, patch_size=model_cfg.patch_size, hidden=model_cfg.hidden,
                                      layers=model_cfg.layers, seed=model_cfg.seed)
        return LlavaAdapter(model, processor, caption_prefix=model_cfg.prompt.caption_prefix)
    raise ValueError(f"unknown model family {family!r} in model config {model_cfg.get('name')!r}")
