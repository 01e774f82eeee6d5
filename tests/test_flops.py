"""The FLOP counts of ``knexp.bench.flops`` against torch's own counter on a tiny LLaMA."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from knexp.bench.flops import DecoderShape, caption_flops, identification_flops
from knexp.models.tiny.tiny_models import tiny_lm, word_tokenizer


def test_decoder_flops_match_torchs_counter():
    torch.manual_seed(0)
    lm = tiny_lm(word_tokenizer(), hidden=32, intermediate=64, layers=3).float().eval()
    lm.config._attn_implementation = "eager"  # attention as two batched products, which the counter sees
    shape = DecoderShape.of(lm.config)
    tokens = 11
    ids = torch.randint(0, lm.config.vocab_size, (2, tokens))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        lm(input_ids=ids, use_cache=False)
    ops = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    linear = sum(n for op, n in ops.items() if op in ("mm", "addmm"))
    # eager attention computes every (query, key) pair and masks afterwards; the formula counts the causal ones
    square = 2 * 2 * shape.heads * shape.head_dim * tokens * tokens * shape.layers * 2
    causal = 2 * 2 * shape.heads * shape.head_dim * sum(range(1, tokens + 1)) * shape.layers * 2
    assert ops["bmm"] == square
    assert linear == 2 * (shape.tokens(tokens) + shape.head(tokens)) - causal  # two rows


def test_caption_and_identification_counts_add_up():
    shape = DecoderShape(d_model=8, d_ff=16, heads=2, kv_heads=1, head_dim=4, layers=3, vocab=10)
    assert shape.token_layer(5) == 2 * 8 * 6 * 4 + 2 * 2 * 2 * 4 * 5 + 2 * 3 * 8 * 16
    assert shape.tokens(3, past=2) == 3 * (shape.token_layer(3) + shape.token_layer(4) + shape.token_layer(5))
    prompt, prefix = 6, 2
    one_row = shape.tokens(prompt - prefix, past=prefix) + shape.head() + shape.tokens(1, past=6) + shape.head()
    first_step = shape.tokens(1, past=6) + shape.head()  # the row of 2 tokens decodes one step; the row of 1 none
    assert caption_flops(shape, prompt, [2, 1], prefix) == shape.tokens(prefix) + one_row + (one_row - first_step)
    assert identification_flops(shape, 5) == 4 * (shape.tokens(5) + shape.head(1))  # the head at t* only
    assert identification_flops(shape, 5, 2) == 4 * (shape.tokens(3, past=2) + shape.head(1))  # after the cached prefix
