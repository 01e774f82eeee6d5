"""Adapter for MLLMs that splice image embeddings into a LLaMA-family LM (``knexp.models.spliced``).

Serves the embedded model (49 tokens, 7 x 7 grid) and MiniGPT-4 (64 tokens, 16 x 4 strips); the model
object supplies the prompt, the image embeddings and the patch geometry.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from knexp.models.adapters.base import GREEDY, Adapter, PatchGeometry, Prepared, image_positions_from_ids
from knexp.models.spliced import SplicedMLLM


class SplicedAdapter(Adapter):
    def __init__(self, mllm: SplicedMLLM):
        self.mllm = mllm
        self.caption_prefix = mllm.caption_prefix
        self.geometry: PatchGeometry = mllm.geometry

    @property
    def model(self) -> nn.Module:
        return self.mllm

    @property
    def tokenizer(self):
        return self.mllm.tokenizer

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.mllm.lm.model.layers)

    def ffn(self, layer: int) -> nn.Module:
        return self.mllm.lm.model.layers[layer].mlp

    def ffn_out(self, layer: int) -> nn.Linear:
        return self.mllm.lm.model.layers[layer].mlp.down_proj

    def unembedding(self) -> torch.Tensor:
        return self.mllm.lm.lm_head.weight

    def final_norm(self) -> nn.Module:
        return self.mllm.lm.model.norm

    def tokenize(self, text: str) -> list[int]:
        return self.mllm.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.mllm.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def prepare(self, images: list[np.ndarray], continuations: list[str] | None = None, prefix: str | None = None) -> Prepared:
        """Same prompt for every row; continuations (teacher forcing) are right-padded, which causal
        attention never sees from earlier positions, so image positions are identical across rows."""
        prefix = self.caption_prefix if prefix is None else prefix
        prompt = self.mllm.prompt_ids(prefix)
        rows = [prompt + (self.tokenize(c) if continuations else []) for c in (continuations or [""] * len(images))]
        if len(rows) != len(images):
            raise ValueError(f"{len(images)} images but {len(rows)} continuations")
        width = max(map(len, rows))
        pad = self.mllm.end_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        with torch.no_grad():
            embeds = self.mllm.embed(input_ids, self.mllm.image_embeddings(images))
        positions = image_positions_from_ids(input_ids, self.mllm.image_token_id, self.num_image_tokens)
        return Prepared({"inputs_embeds": embeds, "attention_mask": attention}, input_ids, positions, width)

    def forward(self, prepared: Prepared) -> torch.Tensor:
        return self.mllm.lm(**prepared.inputs, use_cache=False).logits

    def _generate_ids(self, prepared: Prepared, max_new_tokens: int) -> torch.Tensor:
        end = self.mllm.end_token_id
        return self.mllm.lm.generate(**prepared.inputs, max_new_tokens=max_new_tokens, eos_token_id=end, pad_token_id=end, **GREEDY)
