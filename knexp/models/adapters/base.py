"""The adapter protocol: everything methods and evaluation may know about a model.

A neuron ``(l, u)`` is unit ``u`` of layer ``l``'s FFN; its activation ``O^l[t, u]`` is the input of the
FFN's output projection (``down_proj`` in LLaMA-style gated MLPs, METHOD.md "Notation"), so
``down_proj(O^l) == mlp(x)``. An adapter names that module per layer, ``W_out`` and the unembedding,
builds prompts with the model's own template, finds the image-token span in a prepared input (never a
hard-coded offset), tells which image region each image token covers, and generates captions.
Methods, evaluation and hooks use only this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from knexp.models.batching import map_batches

# METHOD.md, "Evaluation": do_sample=False, temperature=1.0, num_beams=1, max_new_tokens=32, min_length=1,
# top_p=0.9, repetition_penalty=1, length_penalty=1 (greedy: temperature and top_p have no effect).
GREEDY = dict(do_sample=False, num_beams=1, min_length=1, repetition_penalty=1.0, length_penalty=1.0)


@dataclass(frozen=True)
class PatchGeometry:
    """Where image tokens sit on the image: token ``t`` covers the box ``boxes[t]``.

    ``boxes`` is float [P, 4] of ``(x0, y0, x1, y1)`` in [0, 1] image coordinates (of the image as the
    model sees it, i.e. after its resize). ``grid`` is the (rows, cols) layout for heatmaps when tokens
    tile a regular grid row-major, else None.
    """

    boxes: np.ndarray
    grid: tuple[int, int] | None

    @classmethod
    def row_major(cls, rows: int, cols: int) -> PatchGeometry:
        """Token t covers cell (t // cols, t % cols) of a rows x cols grid."""
        t = np.arange(rows * cols)
        r, c = t // cols, t % cols
        boxes = np.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], 1).astype(np.float32)
        return cls(boxes, (rows, cols))

    def __len__(self) -> int:
        return len(self.boxes)


@dataclass
class Prepared:
    """A batch ready for the model: forward kwargs plus where the image tokens are.

    ``image_positions``: long [B, P], the sequence index of image token p in row b (ascending; rows may
    differ under left padding). ``prompt_len``: sequence length T of the prefill.
    """

    inputs: dict[str, torch.Tensor]
    input_ids: torch.Tensor  # long [B, T], image tokens included
    image_positions: torch.Tensor
    prompt_len: int

    @property
    def batch_size(self) -> int:
        return self.image_positions.shape[0]


class Adapter(ABC):
    """One model family. Subclasses fill in structure, prompting and the forward pass."""

    caption_prefix: str
    geometry: PatchGeometry

    # ---- structure ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def model(self) -> nn.Module: ...

    @abstractmethod
    def decoder_layers(self) -> list[nn.Module]: ...

    @abstractmethod
    def ffn_out(self, layer: int) -> nn.Linear:
        """The FFN output projection of ``layer``; its input is the neuron activation O^l [B, T, d_f]."""

    @abstractmethod
    def ffn(self, layer: int) -> nn.Module:
        """The whole FFN (MLP) module of ``layer``: ``ffn(x) == ffn_out(O^l)``."""

    def ffn_act(self, layer: int) -> nn.Module:
        """The FFN's activation module (``act_fn``: its output is act(gate(x)), without the ``up`` factor).

        Pan et al.'s own code hooks here; LLaMA-style MLPs (all adapters so far) name it ``act_fn``.
        """
        return self.ffn(layer).act_fn

    @abstractmethod
    def unembedding(self) -> torch.Tensor:
        """W_U [V, d_model]."""

    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def d_ff(self) -> int:
        return self.ffn_out(0).in_features

    @property
    def num_image_tokens(self) -> int:
        return len(self.geometry)

    def w_out(self, layer: int) -> torch.Tensor:
        """W_out^l [d_model, d_f]: column u is what neuron u writes into the residual stream."""
        return self.ffn_out(layer).weight

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- inputs ------------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, images: list[np.ndarray], continuations: list[str] | None = None, prefix: str | None = None) -> Prepared:
        """Prompt + images (+ optional text after the prefix, e.g. a caption for teacher forcing)."""

    @abstractmethod
    def forward(self, prepared: Prepared) -> torch.Tensor:
        """Logits [B, T, V] of one forward pass (no cache)."""

    @abstractmethod
    def _generate_ids(self, prepared: Prepared, max_new_tokens: int) -> torch.Tensor:
        """New token ids [B, N] after the prompt, greedy (``GREEDY``) with the KV cache."""

    @abstractmethod
    def decode(self, ids: torch.Tensor) -> list[str]: ...

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as it appears after other text (no special tokens)."""

    # ---- captioning --------------------------------------------------------------------------------
    @torch.no_grad()
    def caption(self, images: list[np.ndarray], batch_size: int = 16, max_new_tokens: int = 32, prefix: str | None = None) -> list[str]:
        """Greedy captions, caption prefix included, batched."""
        prefix = self.caption_prefix if prefix is None else prefix

        def run(chunk) -> list[str]:
            prepared = self.prepare(list(chunk), prefix=prefix)
            return [join_prefix(prefix, t) for t in self.decode(self._generate_ids(prepared, max_new_tokens))]

        return map_batches(run, images, batch_size, "captioning")

    @torch.no_grad()
    def generate(self, prepared: Prepared, max_new_tokens: int = 32, prefix: str | None = None) -> list[str]:
        """Captions of an already prepared batch (so hooks can be armed on exactly this batch)."""
        prefix = self.caption_prefix if prefix is None else prefix
        return [join_prefix(prefix, t) for t in self.decode(self._generate_ids(prepared, max_new_tokens))]


def join_prefix(prefix: str, continuation: str) -> str:
    """``prefix`` + generated text, with one space between words unless the text starts with one."""
    if not continuation:
        return prefix.strip()
    if continuation[0].isspace() or continuation[0] in ".,;:!?" or not prefix:
        return (prefix + continuation).strip()
    return (prefix + " " + continuation).strip()


def image_positions_from_ids(input_ids: torch.Tensor, image_token_id: int, expected: int) -> torch.Tensor:
    """long [B, P] positions of ``image_token_id`` per row; each row must hold exactly ``expected``."""
    mask = input_ids == image_token_id
    counts = mask.sum(1)
    if not (counts == expected).all():
        raise ValueError(f"expected {expected} image tokens per row, found {counts.tolist()}")
    return mask.nonzero()[:, 1].view(input_ids.shape[0], expected)
