"""Captioning with transformers' ``LlavaForConditionalGeneration`` (LLaVA-1.5 and the tiny test model).

The prompt is LLaVA-1.5's conversation format, ``USER: <image>\\n{question} ASSISTANT: {prefix}``; the
processor expands ``<image>`` to one token per patch. Batches are left-padded for generation.
"""

from __future__ import annotations

import numpy as np
import torch

from knexp.models.batching import batches


class LlavaCaptioner:
    def __init__(self, model, processor, question: str = "What does this image show?", caption_prefix: str = "The image shows",
                 template: str = "USER: <image>\n{question} ASSISTANT: {prefix}"):
        self.model, self.processor = model, processor
        self.question, self.template = question, template
        self.prompt = type("Prompt", (), {"caption_prefix": caption_prefix})()
        self.processor.tokenizer.padding_side = "left"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def caption(self, images: list[np.ndarray], batch_size: int = 16, max_new_tokens: int = 32, prefix: str | None = None) -> list[str]:
        """Greedy captions (prefix included) with METHOD.md's generation settings."""
        prefix = self.prompt.caption_prefix if prefix is None else prefix
        text = self.template.format(question=self.question, prefix=prefix)
        out: list[str] = []
        for chunk in batches(images, batch_size, "captioning"):
            inputs = self.processor(images=list(chunk), text=[text] * len(chunk), return_tensors="pt", padding=True).to(self.device)
            gen = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_length=1, do_sample=False, num_beams=1,
                                      repetition_penalty=1.0, length_penalty=1.0,
                                      pad_token_id=self.processor.tokenizer.pad_token_id)
            new = gen[:, inputs["input_ids"].shape[1] :]
            out += [(prefix + " " + t).strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]
        return out
