"""A batch prepared for a model (``Prepared``), and what knexp's passes and decoding need of a model (``Decodable``).

Both sit below the adapters and the decoding modules: an adapter makes ``Prepared`` batches and is a ``Decodable``; the
decoding modules (``prefix_cache``, ``prefill``, ``decode_step``, ``streaming``) take a ``Decodable`` and import no
adapter, so nothing in ``knexp.models`` imports in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass
class Prepared:
    """A batch ready for the model: forward kwargs plus where the image tokens are and which position predicts.

    ``image_positions``: long [B, P], the sequence index of image token p in row b (ascending; rows may differ under
    left padding). ``last_position``: long [B], each row's last real position, whose logits predict the next token
    (t*, docs/method.md, "Stage 2: GradCAM filtering"), under left, right or no padding. ``prompt_len``: sequence length
    T of the prompt.
    """

    inputs: dict[str, torch.Tensor]
    input_ids: torch.Tensor  # long [B, T], image tokens included
    image_positions: torch.Tensor
    prompt_len: int
    last_position: torch.Tensor
    first_image: int = field(init=False)  # the first image token's position in any row

    def __post_init__(self):
        self.first_image = int(self.image_positions.min()) if self.image_positions.numel() else self.prompt_len

    @property
    def batch_size(self) -> int:
        return self.image_positions.shape[0]

    def pass_start(self, length: int, first: int | None = None) -> int | None:
        """Where a pass of this prompt over ``length`` positions starts: ``first`` (its first position, when the layer
        was told its positions), else the pass is taken to end at the prompt's last position. None when the pass is
        no pass of this prompt's image tokens: it does not end at the prompt's end (a shared prefix computed alone, a
        decoding step) or does not cover every image token. Hooks act on the passes this gives a start for."""
        start = self.prompt_len - length if first is None else first
        return start if start + length == self.prompt_len and start <= self.first_image else None


def last_positions(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """long [B]: each row's last position whose attention mask is 1 (T - 1 for every row without a mask)."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long)
    index = torch.arange(length, device=attention_mask.device)
    return torch.where(attention_mask.bool(), index, -1).amax(dim=1).long()


def image_positions_from_ids(input_ids: torch.Tensor, image_token_id: int, expected: int,
                             keep: torch.Tensor | None = None) -> torch.Tensor:
    """long [B, P] positions of ``image_token_id`` per row; each row must hold exactly ``expected`` of them. ``keep``
    (bool [expected]) picks the slots that are image tokens proper (a newline slot covers no patch): then P is its
    count."""
    mask = input_ids == image_token_id
    counts = mask.sum(1)
    if not (counts == expected).all():
        raise ValueError(f"expected {expected} image tokens per row, found {counts.tolist()}")
    positions = mask.nonzero()[:, 1].view(input_ids.shape[0], expected)
    return positions if keep is None else positions[:, keep.to(positions.device)]


class Decodable(Protocol):
    """What ``knexp.models``' passes and greedy decoding use of a model (every ``Adapter`` is one).

    ``fast_paths``: whether knexp may run the model's decoder layer by layer (the shared prefix once, layers below an
    intervention once, its own decoding step). False for a model whose layers need more than a causal mask and 1-D
    positions (multimodal RoPE, bidirectional image attention, a prefix LM): its passes are the model's own forward and
    its captions the model's own ``generate``, under the same hooks."""

    fast_paths: bool

    @property
    def device(self) -> torch.device: ...

    @property
    def stop_token_ids(self) -> list[int]: ...

    @property
    def pad_token_id(self) -> int: ...

    def language_model(self) -> tuple[nn.Module, nn.Module]: ...

    def prompt_embeddings(self, prepared: Prepared) -> torch.Tensor: ...

    def forward(self, prepared: Prepared, positions: torch.Tensor | None = None) -> torch.Tensor: ...

    def generate_ids(self, prepared: Prepared, max_new_tokens: int) -> torch.Tensor: ...
