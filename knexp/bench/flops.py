"""FLOPs of a LLaMA-family decoder from its config and the token counts, and the float32 GEMM peak torch reaches here.

Two FLOPs per multiply-add. A token at a position attending to ``context`` positions (itself included) costs, in each
decoder layer: the q, k, v and o projections (2 d (2 h + 2 k) d_h, with h query heads and k key-value heads of size
d_h), the scores and their weighted sum (2 * 2 h d_h context) and the gated MLP's three matrices (2 * 3 d d_ff). Norms,
rotary embeddings, softmax and the activation are left out (a few per cent). The LM head costs 2 d V for each position
whose logits are computed. ``tests/test_flops.py`` checks these counts against ``torch.utils.flop_counter``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecoderShape:
    d_model: int
    d_ff: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, config) -> DecoderShape:
        """The shape of a transformers LLaMA-family config."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim,
                   config.num_hidden_layers, config.vocab_size)

    def token_layer(self, context: int) -> int:
        """One token through one decoder layer, attending to ``context`` positions."""
        projections = 2 * self.d_model * (2 * self.heads + 2 * self.kv_heads) * self.head_dim
        attention = 2 * 2 * self.heads * self.head_dim * context
        return projections + attention + 2 * 3 * self.d_model * self.d_ff

    def tokens(self, count: int, past: int = 0, layers: int | None = None) -> int:
        """``count`` consecutive tokens after ``past`` cached ones, through ``layers`` decoder layers (default all)."""
        per_layer = sum(self.token_layer(past + i + 1) for i in range(count))
        return per_layer * (self.layers if layers is None else layers)

    def head(self, positions: int = 1) -> int:
        """The LM head's logits at ``positions`` positions."""
        return 2 * self.d_model * self.vocab * positions


def prefill_flops(shape: DecoderShape, prompt_len: int, rows: int, prefix: int = 0) -> int:
    """The prompt's pass of greedy captioning (``knexp.models.decoding.prefill``): the ``prefix`` tokens before the
    image once, then each of ``rows`` rows' remaining prompt and the head at its last position."""
    per_row = shape.tokens(prompt_len - prefix, past=prefix) + shape.head()
    return (shape.tokens(prefix) if prefix else 0) + rows * per_row


def decode_flops(shape: DecoderShape, prompt_len: int, generated: list[int]) -> int:
    """The decoding steps after it: for each row ``generated[r] - 1`` steps (a row leaves the batch after its last
    token), each one token at the growing context and its head."""
    return sum(shape.tokens(1, past=prompt_len + step) + shape.head() for n in generated for step in range(n - 1))


def caption_flops(shape: DecoderShape, prompt_len: int, generated: list[int], prefix: int = 0) -> int:
    """The FLOPs greedy captioning of a batch executes: ``prefill_flops`` + ``decode_flops``."""
    return prefill_flops(shape, prompt_len, len(generated), prefix) + decode_flops(shape, prompt_len, generated)


def identification_flops(shape: DecoderShape, context_len: int, prefix: int = 0) -> int:
    """``compute_stats``' two passes on a prompt of ``context_len`` tokens (with the caption before the target): a
    forward on the inpainted image and a forward and backward on the original, each over the tokens after the ``prefix``
    ones (cached once per model), the head at t* only; a backward costs two forwards."""
    forward = shape.tokens(context_len - prefix, past=prefix) + shape.head(1)
    return forward + 3 * forward


@torch.no_grad()
def gemm_peak(shape: DecoderShape, rows: int = 1024, seconds: float = 2.0) -> float:
    """FLOP/s of torch's float32 matrix product at the decoder's MLP and projection shapes ([rows, d] x [d, d_ff],
    [rows, d_ff] x [d_ff, d], [rows, d] x [d, d]), the best of repeated timings over about ``seconds``, on the current
    threads."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(shape.d_model, shape.d_ff), (shape.d_ff, shape.d_model), (shape.d_model, shape.d_model)]
    best = 0.0
    for k, n in shapes:
        a, b = torch.randn(rows, k, generator=gen), torch.randn(k, n, generator=gen)
        a @ b  # warm up
        deadline = time.perf_counter() + seconds / len(shapes)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            for _ in range(5):
                a @ b
            best = max(best, 5 * 2 * rows * k * n / (time.perf_counter() - t))
    return best
