"""Adapter for transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5, and the tiny test model).

Prompt: LLaVA-1.5's ``USER: <image>\\n{question} ASSISTANT: {prefix}``; the processor expands ``<image>``
to one token per patch (it needs ``num_additional_image_tokens=1`` for CLIP's CLS, which the default
feature strategy then drops). Image tokens tile the (image_size / patch_size)^2 grid row-major:
24 x 24 for LLaVA-1.5 at 336 px. Batches are left-padded, so image positions differ per row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from knexp.models.adapter import GREEDY, LLAMA_SITES, Adapter
from knexp.models.errors import ModelWeightsMissing
from knexp.models.geometry import PatchGeometry
from knexp.models.prepared import Prepared, image_positions_from_ids, last_positions
from knexp.settings import DTYPES, Choice, Device, Flag, Integer, Text, takes

LLAVA15_TEMPLATE = "USER: <image>\n{question} ASSISTANT: {prefix}"


class LlavaAdapter(Adapter):
    sites = LLAMA_SITES  # transformers' LLaVA wraps a LLaMA decoder
    def __init__(self, model, processor, question: str = "What does this image show?", caption_prefix: str = "The image shows",
                 template: str = LLAVA15_TEMPLATE):
        self._model, self.processor = model.eval(), processor
        self.question, self.template, self.caption_prefix = question, template, caption_prefix
        self.processor.tokenizer.padding_side = "left"
        vision = model.config.vision_config
        grid = vision.image_size // vision.patch_size
        if model.config.vision_feature_select_strategy == "default":
            self.geometry = PatchGeometry.row_major(grid, grid)
        else:  # "full": CLS first, covering the whole image, then the grid
            g = PatchGeometry.row_major(grid, grid)
            self.geometry = PatchGeometry(np.vstack([[0, 0, 1, 1], g.boxes]).astype(np.float32), None)

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _lm(self):
        return self._model.model.language_model

    def decoder_layers(self) -> list[nn.Module]:
        return list(self._lm().layers)

    def unembedding(self) -> torch.Tensor:
        return self._model.lm_head.weight

    def final_norm(self) -> nn.Module:
        return self._lm().norm

    def prepare(self, images: list[np.ndarray], continuations: list[str] | None = None, prefix: str | None = None) -> Prepared:
        prefix = self.caption_prefix if prefix is None else prefix
        base = self.template.format(question=self.question, prefix=prefix)
        texts = [base + c for c in continuations] if continuations else [base] * len(images)
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} continuations")
        inputs = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True).to(self.device)
        ids = inputs["input_ids"]
        positions = image_positions_from_ids(ids, self._model.config.image_token_id, self.num_image_tokens)
        last = last_positions(inputs.get("attention_mask"), ids.shape[0], ids.shape[1])
        return Prepared(dict(inputs), ids, positions, ids.shape[1], last)

    def language_model(self) -> tuple[nn.Module, nn.Module]:
        return self._lm(), self._model.lm_head

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self._model.generation_config.eos_token_id
        return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None]

    @property
    def pad_token_id(self) -> int:
        return self.processor.tokenizer.pad_token_id

    @torch.no_grad()
    def prompt_embeddings(self, prepared: Prepared) -> torch.Tensor:
        """Token embeddings with CLIP's projected patch features at the image tokens, as ``LlavaModel.forward`` builds them."""
        llava, cfg = self._model.model, self._model.config
        ids = prepared.inputs["input_ids"]
        embeds = llava.get_input_embeddings()(ids)
        features = llava.get_image_features(pixel_values=prepared.inputs["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
                                            vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
        features = torch.cat(features.pooler_output, dim=0).to(embeds.device, embeds.dtype)
        return embeds.masked_scatter(llava.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=features), features)

    def forward(self, prepared: Prepared, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self._model(**prepared.inputs, use_cache=False, logits_to_keep=0 if positions is None else positions).logits

    def generate_ids(self, prepared: Prepared, max_new_tokens: int) -> torch.Tensor:
        pad = self.processor.tokenizer.pad_token_id
        gen = self._model.generate(**prepared.inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **GREEDY)
        return gen[:, prepared.prompt_len :]


@takes(path=Text(), dtype=Choice(DTYPES), trust_remote_code=Flag(), device=Device(), num_additional_image_tokens=Integer(low=0),
       question=Text())
def load_adapter(model_cfg: dict, device: torch.device, cache_dir: Path) -> LlavaAdapter:
    """``model=llava15_7b``: HF LLaVA from a hub id or local folder; the processor is told about CLIP's CLS."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    trust = bool(model_cfg.get("trust_remote_code", False))  # code shipped with the weights runs only when asked
    try:
        processor = AutoProcessor.from_pretrained(model_cfg["path"], trust_remote_code=trust)
        model = LlavaForConditionalGeneration.from_pretrained(model_cfg["path"], dtype=getattr(torch, model_cfg["dtype"]),
                                                              trust_remote_code=trust)
    except OSError as exc:
        raise ModelWeightsMissing(
            f"LLaVA weights not found at model.path={model_cfg['path']!r} ({exc}); point model.path at a local copy "
            "(knexp runs with HF_HUB_OFFLINE=1) or download it first"
        ) from exc
    processor.num_additional_image_tokens = model_cfg["num_additional_image_tokens"]
    if processor.patch_size is None:
        processor.patch_size = model.config.vision_config.patch_size
    if processor.vision_feature_select_strategy is None:
        processor.vision_feature_select_strategy = model.config.vision_feature_select_strategy
    return LlavaAdapter(model.to(device), processor, question=model_cfg["question"], caption_prefix=model_cfg["prompt"]["caption_prefix"])
