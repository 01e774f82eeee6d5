"""Greedy decoding that reuses the layers below an intervention and drops finished rows gives the model's own tokens."""

import numpy as np
import pytest
import torch

from knexp.models.adapters.vlm import VLMAdapter
from knexp.models.decoding.streaming import greedy_ids
from knexp.models.hooks.intervene import ActivationPatch, intervene


def _rows(adapter, images: int = 2, per_image: int = 3, seed: int = 0):
    """(prepared batch of ``images`` random images, each on ``per_image`` rows; the rows' groups)."""
    size = 60 if isinstance(adapter, VLMAdapter) else 224
    rng = np.random.default_rng(seed)
    pics = [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(images)]
    groups = [i // per_image for i in range(images * per_image)]
    return adapter.prepare([pics[g] for g in groups]), groups


def _same(reference: torch.Tensor, ids: torch.Tensor, pad: int) -> bool:
    """The model's ``generate`` stops when every row has ended; greedy_ids pads to max_new_tokens."""
    n = reference.shape[1]
    return torch.equal(reference, ids[:, :n]) and bool((ids[:, n:] == pad).all())


def _edits(adapter, layers, batch, seed=1, scale=5.0):
    rng = np.random.default_rng(seed)
    units = torch.as_tensor(rng.choice(adapter.d_ff, 6, replace=False))
    noise = torch.tensor(rng.standard_normal((batch, adapter.num_image_tokens)) * scale, dtype=torch.float32)  # [B, P]
    return {layer: ActivationPatch(units, add=noise) for layer in layers}


def test_clean_tokens_are_the_models_own(adapter):
    prepared, _ = _rows(adapter)
    assert _same(adapter.generate_ids(prepared, 10), greedy_ids(adapter, prepared, 10), adapter.pad_token_id)


@pytest.mark.parametrize("span", ["one layer", "every layer from 1"])
def test_reusing_the_layers_below_an_intervention_gives_the_full_recomputes_tokens(adapter, span):
    prepared, groups = _rows(adapter)
    layers = [2] if span == "one layer" else list(range(1, adapter.num_layers))
    with intervene(adapter, prepared, _edits(adapter, layers, prepared.batch_size)):
        full = adapter.generate_ids(prepared, 10)
    with intervene(adapter, prepared, _edits(adapter, layers, prepared.batch_size)) as edits:
        reused = greedy_ids(adapter, prepared, 10, start_layer=layers[0], groups=groups)
    assert all(e.applied == 1 for e in edits.values())  # each edit acted once: on the prompt's pass of its layer
    assert _same(full, reused, adapter.pad_token_id)
    with intervene(adapter, prepared, _edits(adapter, layers, prepared.batch_size, scale=0.0)):
        assert _same(adapter.generate_ids(prepared, 10),
                     greedy_ids(adapter, prepared, 10, start_layer=layers[0], groups=groups),
                     adapter.pad_token_id)  # zero noise: the clean tokens, through the reused layers


def test_finished_rows_leave_the_batch(monkeypatch):
    """With a stop token that some rows emit early, those rows end there (pad after it) and later steps run on fewer
    rows (on the tiny LLaVA, whose rows differ: the tiny spliced models repeat one token)."""
    from knexp.models.tiny.tiny_vlm import tiny_adapter

    adapter = tiny_adapter("llava")
    prepared, _ = _rows(adapter, images=3, per_image=1)
    free = greedy_ids(adapter, prepared, 8)
    stop = int(free[0, 2])  # a token row 0 emits at step 2
    monkeypatch.setattr(type(adapter), "stop_token_ids", property(lambda self: [stop]))
    widths = []
    lm, _ = adapter.language_model()
    # prompt pass and steps
    handle = lm.layers[0].mlp.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[0]))
    try:
        ids = greedy_ids(adapter, prepared, 8)
    finally:
        handle.remove()
    expected = free.clone()
    for row in range(expected.shape[0]):
        hits = (free[row] == stop).nonzero().flatten()
        if len(hits):
            expected[row, int(hits[0]) + 1:] = adapter.pad_token_id
    assert torch.equal(ids, expected)
    assert widths[0] == 3  # the tokens before the image came from the first call's prefix cache: the rest of the prompt
    assert min(widths[1:]) < 3 == max(widths[1:])  # decoding started with every row and dropped the finished ones


def test_the_prefix_is_computed_once_per_model_and_again_after_a_weight_edit(adapter):
    """Batches of one model share the tokens before the image (one pass of one row); an in-place weight edit, as a
    planted neuron makes, computes it again. Turning each saving off gives the same tokens."""
    from knexp.models.decoding.prefix_cache import PREFIXES

    lm, _ = adapter.language_model()
    PREFIXES.pop(lm, None)
    first, _ = _rows(adapter, seed=0)
    second, _ = _rows(adapter, seed=1)
    passes = []  # (rows, positions) of each pass through layer 0

    def seen(module, args, kwargs):
        passes.append(tuple(kwargs.get("hidden_states", args[0] if args else None).shape[:2]))

    handle = lm.layers[0].register_forward_pre_hook(seen, with_kwargs=True)
    try:
        ids = [greedy_ids(adapter, p, 6) for p in (first, second)]
        past = int(first.image_positions[0, 0])
        assert passes.count((1, past)) == 1 and len(PREFIXES[lm]) == 1
        with torch.no_grad():
            lm.layers[0].mlp.down_proj.weight[0, 0] += 1.0
        greedy_ids(adapter, first, 6)
        assert passes.count((1, past)) == 2
        with torch.no_grad():
            lm.layers[0].mlp.down_proj.weight[0, 0] -= 1.0
    finally:
        handle.remove()
    for p, expected in zip((first, second), ids, strict=True):
        assert torch.equal(greedy_ids(adapter, p, 6, share_prefix=False, drop_finished=False), expected)


def test_intervened_captions_equal_the_unreused_path(adapter):
    """perturb.intervened_captions (reuse below the set's lowest layer, grouped by image) against HF generate per
    chunk."""
    from knexp.evaluation.interventions import Noise, SetValues, noise_for, rows_for
    from knexp.evaluation.perturb import intervened_captions
    from knexp.identification.methods import NeuronSet
    from knexp.models.adapters.adapter import join_prefix

    size = 60 if isinstance(adapter, VLMAdapter) else 224
    rng = np.random.default_rng(3)
    images = [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(2)]
    neurons = NeuronSet("t", "", np.array([1, 1, 2]), np.array([3, 7, 5]), np.zeros(3))
    rows = rows_for([10, 11], [50.0], 2)
    how = Noise(levels=(50.0,), draws=2)
    got = intervened_captions(adapter, images, rows, neurons, how, SetValues(), seed=0, batch_size=4, max_new_tokens=8)

    noise = torch.tensor(np.stack([noise_for(r, 0, adapter.num_image_tokens, 3, False) for r in rows]),
                         dtype=torch.float32)
    prepared = adapter.prepare([images[r.image_index] for r in rows])
    edits = {1: ActivationPatch(torch.tensor([3, 7]), add=noise), 2: ActivationPatch(torch.tensor([5]), add=noise)}
    with intervene(adapter, prepared, edits):
        expected = [join_prefix(adapter.caption_prefix, t) for t in adapter.decode(adapter.generate_ids(prepared, 8))]
    assert got == expected


@pytest.mark.slow
def test_reuse_is_exact_on_the_embedded_model(catalog):
    """Real captions: noise on 40 units in layers 20-29, 0-29 and 12 alone; 4 images x 4 rows each; in one batch, and in
    a stream of prompt batches of 4 with up to 8 rows decoding together."""
    from knexp.data.toyworld.scenes import SceneOptions, make_scene
    from knexp.models.adapters.spliced import SplicedAdapter
    from knexp.models.decoding.streaming import stream_ids
    from knexp.models.zoo.embedded import load_embedded
    from knexp.paths import default_cache_dir, project_root

    adapter = SplicedAdapter(load_embedded(default_cache_dir(),
                                           project_root() / "knexp/models/weights/embedded_projector.safetensors"))
    pics = [make_scene(catalog, np.random.default_rng([77, 5, i]), SceneOptions(gap_px=8)).image for i in range(4)]
    groups = [i // 4 for i in range(16)]
    prepared = adapter.prepare([pics[g] for g in groups])
    named = 0
    for lo, hi in [(20, 30), (0, 30), (12, 13)]:
        rng = np.random.default_rng(lo)
        units = torch.as_tensor(rng.choice(adapter.d_ff, 40, replace=False))
        noise = torch.tensor(rng.standard_normal((16, adapter.num_image_tokens)) * 3, dtype=torch.float32)
        with intervene(adapter, prepared, {layer: ActivationPatch(units, add=noise) for layer in range(lo, hi)}):
            full = adapter.generate_ids(prepared, 32)
        with intervene(adapter, prepared, {layer: ActivationPatch(units, add=noise) for layer in range(lo, hi)}):
            reused = greedy_ids(adapter, prepared, 32, start_layer=lo, groups=groups)
        assert _same(full, reused, adapter.pad_token_id), (lo, hi)
        named += sum(bool(catalog.mentioned(t)) for t in adapter.decode(reused))

        # the evaluation's way: rows' own noise, by cohort
        def prompt_pass(rows, lo=lo, hi=hi, units=units, noise=noise):
            part = adapter.prepare([pics[groups[r]] for r in rows])
            with intervene(adapter, part, {layer: ActivationPatch(units, add=noise[rows]) for layer in range(lo, hi)}):
                return adapter.prefill(part, start_layer=lo, groups=[groups[r] for r in rows])

        streamed = stream_ids(adapter, 16, prompt_pass, 32, batch_size=4, width=8)
        assert _same(full, streamed, adapter.pad_token_id), (lo, hi)
    assert named > 16  # real captions that name objects, not degenerate text


def _early_stop(adapter, monkeypatch, free: torch.Tensor) -> int:
    """Make a stop token of the token of ``free`` (tokens [B, N]) at which the rows would end at the most different
    steps (a row without it runs to the end); returns it."""

    def spread(token: int) -> int:
        return len({int((row == token).nonzero()[0]) if bool((row == token).any()) else -1 for row in free})

    stop = max(sorted(set(free.flatten().tolist())), key=spread)
    monkeypatch.setattr(type(adapter), "stop_token_ids", property(lambda self: [stop]))
    return stop


def _ended_at(free: torch.Tensor, stop: int, pad: int) -> torch.Tensor:
    """``free`` [B, N] with each row padded after its first ``stop``."""
    out = free.clone()
    for row in range(out.shape[0]):
        hits = (free[row] == stop).nonzero().flatten()
        if len(hits):
            out[row, int(hits[0]) + 1:] = pad
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llava", "minigpt4"])
def test_a_stream_of_cohorts_gives_each_rows_own_tokens(family, attention, monkeypatch):
    """Rows decoded with continuous batching (batches of 3 prefilled as places free up, up to 7 rows in flight, so
    several cohorts decode together) get the tokens each row gets alone (which are the model's own ``generate``'s,
    checked here for one row and in the tests above for batches); the MLPs saw rows of several cohorts at once. With
    either attention function (the embedded model's is eager, which ``_attend`` computes without copying the cache)."""
    from knexp.models.decoding.streaming import stream_ids
    from knexp.models.tiny.tiny_vlm import tiny_adapter

    adapter = tiny_adapter(family, layers=3)
    adapter.language_model()[0].config._attn_implementation = attention
    size = 60 if isinstance(adapter, VLMAdapter) else 224
    rng = np.random.default_rng(5)
    pics = [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(11)]
    alone = torch.stack([greedy_ids(adapter, adapter.prepare([p]), 8)[0] for p in pics])  # [11, 8]: each row alone
    assert _same(adapter.generate_ids(adapter.prepare(pics[:1]), 8), alone[:1], adapter.pad_token_id)
    # its rows differ (the tiny spliced models repeat one token): make them end at different steps
    if family == "llava":
        alone = _ended_at(alone, _early_stop(adapter, monkeypatch, alone), adapter.pad_token_id)
    lm, _ = adapter.language_model()
    widths, prefills = [], []
    handle = lm.layers[0].mlp.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[:2]))

    def prompt_pass(rows):
        prefills.append(rows)
        return adapter.prefill(adapter.prepare([pics[r] for r in rows]))

    try:
        ids = stream_ids(adapter, len(pics), prompt_pass, 8, batch_size=3, width=7)
    finally:
        handle.remove()
    assert torch.equal(ids, alone)
    if family == "llava":
        assert 0 < int((ids == adapter.pad_token_id).sum()) and bool((ids[:, -1] != adapter.pad_token_id).any())
    assert sorted(r for rows in prefills for r in rows) == list(range(11)) and max(len(r) for r in prefills) <= 3
    decode_widths = [b for b, t in widths if t == 1]
    assert max(decode_widths) > 3  # one decoding step ran the MLP over rows of more than one prompt batch
    assert max(decode_widths) <= 7


def test_out_of_memory_in_a_stream_halves_it_and_keeps_finished_rows(monkeypatch, caplog):
    """Out of memory in a prompt pass puts the rows in flight back, halves the prompt batch and the width, and keeps the
    rows already finished; the tokens are unchanged. At one row, BatchTooLarge names the settings."""
    from knexp.models.decoding.batching import BatchTooLarge
    from knexp.models.decoding.streaming import stream_ids
    from knexp.models.tiny.tiny_vlm import tiny_adapter

    adapter = tiny_adapter("llava", layers=3)
    rng = np.random.default_rng(6)
    pics = [(rng.random((60, 60, 3)) * 255).astype(np.uint8) for _ in range(9)]
    _early_stop(adapter, monkeypatch, greedy_ids(adapter, adapter.prepare(pics), 8))
    prefill = lambda rows: adapter.prefill(adapter.prepare([pics[r] for r in rows]))  # noqa: E731
    expected = stream_ids(adapter, 9, prefill, 8, batch_size=4, width=8)
    calls = []

    def tight(rows):
        calls.append(list(rows))
        if len(calls) == 3:  # the third prompt pass, with rows in flight and rows finished
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return prefill(rows)

    assert torch.equal(stream_ids(adapter, 9, tight, 8, batch_size=4, width=8), expected)
    assert "out of memory at batch size 4; retrying with 2" in caplog.text
    assert max(len(r) for r in calls[3:]) <= 2
    with pytest.raises(BatchTooLarge, match="max_new_tokens"):
        stream_ids(adapter, 2, lambda rows: (_ for _ in ()).throw(MemoryError()), 8, batch_size=1)

    calls.clear()
    one_by_one = stream_ids(adapter, 9, tight, 8, batch_size=1, width=4)  # out of memory with 2 rows in flight
    assert torch.equal(one_by_one, expected)
    # not BatchTooLarge at once: the decoding narrows
    assert "out of memory at decode width 4; retrying with 2 (set model.generation.decode_width=2" in caplog.text


def test_logits_at_chosen_positions_are_those_of_the_full_pass(adapter):
    """``Adapter.forward(positions=)`` runs the LM head at those positions only: the same logits as the full pass there
    (up to the rounding of a GEMM of another height), [B, K, V]."""
    prepared, _ = _rows(adapter, images=2, per_image=1)
    with torch.no_grad():
        full = adapter.forward(prepared)  # [B, T, V]
        chosen = torch.tensor([0, prepared.prompt_len - 1])
        some = adapter.forward(prepared, positions=chosen)
    assert some.shape == (2, 2, full.shape[-1])
    torch.testing.assert_close(some, full[:, chosen], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["embedded", "minigpt4"])
def test_an_image_on_several_rows_is_encoded_once_with_the_same_inputs(family, monkeypatch):
    """A spliced model's ``prepare`` encodes each distinct image once (one image under several noise draws), never alone
    when it stands for several rows, and the rows' inputs are those of encoding every row."""
    from knexp.models.tiny.tiny_vlm import tiny_adapter

    adapter = tiny_adapter(family, layers=2)
    rng = np.random.default_rng(8)
    pics = [(rng.random((224, 224, 3)) * 255).astype(np.uint8) for _ in range(3)]
    encoded = []
    real = adapter.mllm.image_embeddings
    monkeypatch.setattr(adapter.mllm, "image_embeddings", lambda images: encoded.append(len(images)) or real(images))
    for rows in ([0, 0, 1, 1, 1, 2], [2, 2, 2]):
        shared = adapter.prepare([pics[r] for r in rows]).inputs["inputs_embeds"]
        # distinct arrays: every row encoded
        apart = adapter.prepare([pics[r].copy() for r in rows]).inputs["inputs_embeds"]
        assert torch.equal(shared, apart)
    assert encoded == [3, 6, 2, 3]


@pytest.mark.parametrize("setting, value",
                         [("batch_size", 0), ("batch_size", "8"), ("decode_width", 0), ("decode_width", "wide")])
def test_a_bad_generation_setting_is_named_with_its_fix(setting, value):
    from knexp.models.decoding.streaming import stream_ids
    from knexp.models.tiny.tiny_vlm import tiny_adapter
    from knexp.user_errors import ConfigError

    adapter = tiny_adapter("llava", layers=2)
    sizes = {"batch_size": 4, "width": None} | ({"batch_size": value} if setting == "batch_size" else {"width": value})
    with pytest.raises(ConfigError, match=f"model.generation.{setting}=.*use an integer >= 1"):
        stream_ids(adapter, 2, lambda rows: pytest.fail("no prompt pass before the check"), 8, **sizes)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_one_position_attention_is_the_configured_functions(implementation):
    """``_attend`` (one query position over a cache, grouped-query heads: 6 query heads on 2 key/value heads, one
    masked key) gives what transformers' attention function of that name gives; the eager one to the last bit here."""
    from types import SimpleNamespace

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from knexp.models.decoding.decode_step import _attend

    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(shape, generator=gen) for shape in ([3, 6, 1, 8], [3, 2, 5, 8], [3, 2, 5, 8]))
    mask = torch.zeros(3, 1, 1, 5)
    mask[1, ..., 2] = torch.finfo(torch.float32).min  # row 1 may not see key 2
    attn = SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation), scaling=8 ** -0.5,
                           num_key_value_groups=3, training=False, is_causal=True)
    reference = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    expected = reference(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)[0].reshape(3, 1, 48)
    got = _attend(attn, query, key, value, mask)
    assert got.shape == (3, 1, 48)
    if implementation == "eager":
        assert torch.equal(got, expected)
    torch.testing.assert_close(got, expected)
    masked = value.clone()
    masked[1, :, 2] += 100.0  # a masked key's value does not reach the output
    assert torch.equal(_attend(attn, query, key, masked, mask)[1], got[1])


def test_a_caches_spare_positions_hold_what_concatenation_holds():
    """``_append`` grows a layer's keys and values in place (copying only when its spare room is full or the rows were
    selected anew) and ends with the tensors ``DynamicCache.update`` makes by concatenation."""
    from transformers import DynamicCache

    from knexp.models.decoding.decode_step import _ROOM, Cohort, _append, keep_rows

    gen = torch.Generator().manual_seed(1)
    first = [torch.randn(4, 2, 3, 8, generator=gen) for _ in range(2)]  # keys, values of a 3-token prompt
    ours = Cohort(torch.arange(4), DynamicCache(), None, torch.zeros(4, dtype=torch.bool))
    theirs = DynamicCache()
    ours.cache.update(*first, 0)
    theirs.update(*first, 0)
    stores = []
    for step in range(2 * _ROOM + 3):
        new = [torch.randn(4, 2, 1, 8, generator=gen) for _ in range(2)]
        if step == 5:  # a row ended: the others stay
            keep_rows(ours, torch.tensor([0, 2, 3]))
            theirs.batch_select_indices(torch.tensor([0, 2, 3]))
        new = [t[:3] if step >= 5 else t for t in new]
        got = _append(ours, 0, *new)
        expected = theirs.update(*new, 0)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        if not stores or stores[-1] != ours.cache.layers[0].keys.data_ptr():
            stores.append(ours.cache.layers[0].keys.data_ptr())
    assert ours.cache.get_seq_length() == theirs.get_seq_length() == 3 + 2 * _ROOM + 3
    # buffers: the first; the rows kept with their room (no second copy to grow them); full after _ROOM steps, twice
    assert len(stores) == 4


def test_hooks_guarded_to_the_prompt_pass_keep_the_steps_products_and_other_hooks_are_called():
    """An intervention's hooks (``attached`` with the prompt's pass as guard) cannot act on a decoding step, so the step
    keeps its merged layer loop; a hook without that guard on a layer makes the step take the model's own forward
    (``_merged``)."""
    from knexp.models.decoding.decode_step import _hooked, _merged
    from knexp.models.tiny.tiny_vlm import tiny_adapter

    adapter = tiny_adapter("llava", layers=2)
    lm, _ = adapter.language_model()
    prepared, _ = _rows(adapter, images=1, per_image=2)
    down, layer = adapter.site("ffn", 0)[0], lm.layers[1]
    assert not _hooked(down) and _merged(lm)
    with intervene(adapter, prepared,
                   {0: ActivationPatch(torch.tensor([1]), add=torch.zeros(2, adapter.num_image_tokens))}):
        assert down._forward_pre_hooks and not _hooked(down)
    handles = [down.register_forward_pre_hook(lambda m, args: None),
               layer.register_forward_hook(lambda m, args, out: None)]
    try:
        assert _hooked(down) and not _merged(lm)
    finally:
        for h in handles:
            h.remove()
    assert not _hooked(down) and _merged(lm)
