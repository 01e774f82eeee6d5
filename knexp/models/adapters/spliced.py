"""MLLMs whose image embeddings are spliced into a causal LM at placeholder tokens.

The embedded model and MiniGPT-4 share this shape: an image encoder and a projector give P embeddings,
the prompt text holds an image marker, the marker becomes P placeholder ids, and the placeholders'
embeddings are replaced by the image embeddings before the LM runs. A subclass says how to encode
images, how its prompt reads, and which image region each image token covers. ``SplicedAdapter`` serves
every such model (the embedded model: 49 tokens, 7 x 7 grid; MiniGPT-4: 64 tokens, 16 x 4 strips).
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from torch import nn

from knexp.models.adapters.adapter import GREEDY, LLAMA_SITES, Adapter
from knexp.models.geometry import PatchGeometry
from knexp.models.prepared import Prepared, image_positions_from_ids


class SplicedMLLM(nn.Module):
    lm: nn.Module  # a transformers causal LM (LLaMA family)
    image_marker: str = "<image>"

    def __init__(self, lm: nn.Module, tokenizer, image_token: str, end_token: str, caption_prefix: str):
        super().__init__()
        self.lm, self.tokenizer = lm, tokenizer
        self.caption_prefix = caption_prefix
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.end_token_id = tokenizer.convert_tokens_to_ids(end_token)
        self._prompt_ids: dict[tuple[str | None, str], list[int]] = {}

    # ---- what a subclass provides ---------------------------------------------------------------
    @property
    @abstractmethod
    def geometry(self) -> PatchGeometry: ...

    @abstractmethod
    def image_embeddings(self, images: list[np.ndarray]) -> torch.Tensor:
        """Projected image tokens [B, P, d_model] in the LM's dtype, from RGB uint8 images."""

    @abstractmethod
    def prompt_text(self, prefix: str, question: str | None = None) -> str:
        """The full prompt text, holding ``self.image_marker`` once and ending with ``prefix``; ``question`` in place of
        the model's own question."""

    # ---- shared ---------------------------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        return len(self.geometry)

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def prompt_ids(self, prefix: str | None = None, question: str | None = None) -> list[int]:
        """Token ids of the prompt with P image placeholders, ending with the caption prefix (cached per question and
        prefix)."""
        prefix = self.caption_prefix if prefix is None else prefix
        key = (question, prefix)
        if key not in self._prompt_ids:
            text = self.prompt_text(prefix, question)
            if text.count(self.image_marker) != 1:
                raise ValueError(f"the prompt must contain the image marker {self.image_marker!r} exactly once: "
                                 f"{text!r}")
            text = text.replace(self.image_marker, self.image_token * self.num_image_tokens)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if sum(i == self.image_token_id for i in ids) != self.num_image_tokens:
                raise ValueError(f"image token {self.image_token!r} does not tokenize to one id per image token")
            self._prompt_ids[key] = ids
        return self._prompt_ids[key]

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, d] with the placeholder positions replaced by ``image_embeds`` [B, P, d]."""
        is_image = input_ids == self.image_token_id  # [B, T]
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))


class SplicedAdapter(Adapter):
    sites = LLAMA_SITES  # the spliced models' LM is a transformers LLaMA

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

    def unembedding(self) -> torch.Tensor:
        return self.mllm.lm.lm_head.weight

    def final_norm(self) -> nn.Module:
        return self.mllm.lm.model.norm

    def prompt_length(self) -> int:
        return len(self.mllm.prompt_ids(self.caption_prefix))

    def prepare(self, images: list[np.ndarray], continuations: list[str] | None = None, prefix: str | None = None,
                question: str | None = None) -> Prepared:
        """Same prompt for every row; continuations (teacher forcing) are right-padded, which causal
        attention never sees from earlier positions, so image positions are identical across rows."""
        prefix = self.caption_prefix if prefix is None else prefix
        prompt = self.mllm.prompt_ids(prefix, question)
        rows = [prompt + (self.tokenize(c) if continuations else []) for c in (continuations or [""] * len(images))]
        if len(rows) != len(images):
            raise ValueError(f"{len(images)} images but {len(rows)} continuations")
        width = max(map(len, rows))
        pad = self.mllm.end_token_id
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        with torch.no_grad():
            embeds = self.mllm.embed(input_ids, self._encoded(images))
        positions = image_positions_from_ids(input_ids, self.mllm.image_token_id, self.num_image_tokens)
        last = torch.tensor([len(r) - 1 for r in rows], device=self.device)  # right padding: each row's own end
        return Prepared({"inputs_embeds": embeds, "attention_mask": attention}, input_ids, positions, width, last)

    def _encoded(self, images: list[np.ndarray]) -> torch.Tensor:
        """Projected image tokens [B, P, d_model] of ``images``, each distinct image (the same array object, e.g. one
        image on several noise rows) encoded once. An image standing for several rows is never encoded alone: the
        encoder's kernels round differently at batch 1 than at any larger batch (BENCHMARKS.md), and a row's inputs must
        not depend on its batch."""
        distinct = list({id(im): im for im in images}.values())
        if len(distinct) == len(images):
            return self.mllm.image_embeddings(images)
        index = torch.tensor([[id(d) for d in distinct].index(id(im)) for im in images], device=self.device)
        return self.mllm.image_embeddings(distinct if len(distinct) > 1 else distinct * 2)[index]

    def language_model(self) -> tuple[nn.Module, nn.Module]:
        return self.mllm.lm.model, self.mllm.lm.lm_head

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.mllm.end_token_id]

    @property
    def pad_token_id(self) -> int:
        return self.mllm.end_token_id

    def prompt_embeddings(self, prepared: Prepared) -> torch.Tensor:
        return prepared.inputs["inputs_embeds"]

    def forward(self, prepared: Prepared, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.mllm.lm(**prepared.inputs, use_cache=False,
                            logits_to_keep=0 if positions is None else positions).logits

    def generate_ids(self, prepared: Prepared, max_new_tokens: int) -> torch.Tensor:
        end = self.mllm.end_token_id
        return self.mllm.lm.generate(**prepared.inputs, max_new_tokens=max_new_tokens, eos_token_id=end,
                                     pad_token_id=end, **GREEDY)
