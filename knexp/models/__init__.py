"""Models: the embedded MLLM built from offline packages, real-size LLaVA-1.5 and MiniGPT-4, tiny test models.

``load_model`` returns an adapter (``knexp.models.adapters``): the interface methods and evaluation use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from knexp.models.adapters import Adapter


class ModelWeightsMissing(FileNotFoundError):
    """Weights for a configured model are absent; the message names the config key to set."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when present, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(model_cfg: DictConfig, cache_dir: str | Path) -> Adapter:
    """Build the model a ``conf/model/*.yaml`` describes and wrap it in its adapter."""
    family = model_cfg.family
    device = resolve_device(model_cfg.get("device", "cpu"))
    prefix = model_cfg.prompt.caption_prefix
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
        return SplicedAdapter(mllm.to(device))
    if family == "llava":
        return _load_llava(model_cfg, device)
    if family == "minigpt4":
        from knexp.models.adapters.spliced import SplicedAdapter
        from knexp.models.minigpt4 import load_minigpt4

        return SplicedAdapter(load_minigpt4(model_cfg.converted_dir, model_cfg.llama, dtype=model_cfg.dtype, device=str(device),
                                            vision_dtype=model_cfg.vision_dtype, caption_prefix=prefix, question=model_cfg.question))
    if family == "tiny_llava":
        from knexp.models.adapters.llava import LlavaAdapter
        from knexp.models.tiny import tiny_llava

        model, processor = tiny_llava(grid=model_cfg.grid, patch_size=model_cfg.patch_size, hidden=model_cfg.hidden,
                                      layers=model_cfg.layers, seed=model_cfg.seed)
        return LlavaAdapter(model.to(device), processor, caption_prefix=prefix)
    if family == "tiny_minigpt4":
        from knexp.models.adapters.spliced import SplicedAdapter
        from knexp.models.tiny import tiny_minigpt4

        return SplicedAdapter(tiny_minigpt4(layers=model_cfg.layers, seed=model_cfg.seed).to(device))
    raise ValueError(f"unknown model family {family!r} in model config {model_cfg.get('name')!r}")


def _load_llava(model_cfg: DictConfig, device: torch.device) -> Adapter:
    """HF LLaVA from a hub id or local folder; the processor is told about CLIP's CLS token."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from knexp.models.adapters.llava import LlavaAdapter

    try:
        processor = AutoProcessor.from_pretrained(model_cfg.path)
        model = LlavaForConditionalGeneration.from_pretrained(model_cfg.path, dtype=getattr(torch, model_cfg.dtype))
    except OSError as exc:
        raise ModelWeightsMissing(
            f"LLaVA weights not found at model.path={model_cfg.path!r} ({exc}); point model.path at a local copy "
            "(knexp runs with HF_HUB_OFFLINE=1) or download it first"
        ) from exc
    processor.num_additional_image_tokens = model_cfg.num_additional_image_tokens
    if processor.patch_size is None:
        processor.patch_size = model.config.vision_config.patch_size
    if processor.vision_feature_select_strategy is None:
        processor.vision_feature_select_strategy = model.config.vision_feature_select_strategy
    return LlavaAdapter(model.to(device), processor, question=model_cfg.question, caption_prefix=model_cfg.prompt.caption_prefix)
