"""Adapters and instrumentation on tiny random models of the real classes (embedded MLLM, HF LLaVA)."""

import numpy as np
import pytest
import torch

from knexp.models.adapters.spliced import SplicedAdapter
from knexp.models.adapters.vlm import VLMAdapter
from knexp.models.geometry import PatchGeometry
from knexp.models.hooks.intervene import ActivationPatch, intervene
from knexp.models.hooks.record import record


def _images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def _size(adapter):
    return 60 if isinstance(adapter, VLMAdapter) else 224


@pytest.fixture()
def prepared(adapter):
    # the second row gets a longer continuation: LLaVA left-pads, so its image span moves
    return adapter.prepare(_images(2, _size(adapter)), continuations=[" a bus", " a clock and a bus"])


def _no_hooks_left(adapter):
    modules = [adapter.down_proj(layer) for layer in range(adapter.num_layers)] + adapter.decoder_layers()
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in modules)


def test_ffn_out_of_the_activation_is_the_mlp_output_exactly(adapter, prepared):
    got = {}
    handles = []
    for layer in range(adapter.num_layers):
        handles.append(adapter.down_proj(layer).register_forward_pre_hook(
            lambda m, a, layer=layer: got.__setitem__(("O", layer), a[0])))
        handles.append(adapter.ffn(layer).register_forward_hook(
            lambda m, a, out, layer=layer: got.__setitem__(("mlp", layer), out)))
    try:
        with torch.no_grad():
            adapter.forward(prepared)
    finally:
        for h in handles:
            h.remove()
    for layer in range(adapter.num_layers):
        with torch.no_grad():
            assert torch.equal(adapter.down_proj(layer)(got[("O", layer)]), got[("mlp", layer)])
        assert got[("O", layer)].shape[-1] == adapter.d_ff
    assert adapter.w_out(0).shape == (adapter.unembedding().shape[1], adapter.d_ff)


def test_every_hook_site_of_the_table_is_the_tensor_it_names(adapter, prepared):
    """Through ``attached``, one (site, layer) key per entry of the adapter's site table, input and output sites alike:
    ffn_act = act(gate(ffn_in)), ffn = ffn_act * up(ffn_in), ffn_out = down(ffn) = mlp(ffn_in), and resid_pre of layer 0
    is the input embeddings; the prefill guard ignores passes of another length."""
    from knexp.models.hooks.attach import attached

    assert set(adapter.sites) == {"resid_pre", "ffn_in", "ffn_act", "ffn", "ffn_out"}
    layer = adapter.num_layers - 1
    got = {}
    hooks = {(site, lay): (lambda x, start, key=(site, lay): got.__setitem__(key, x.detach().clone()))
             for site in adapter.sites for lay in (0, layer)}
    with torch.no_grad(), attached(adapter, hooks, prefill=prepared):
        adapter.forward(prepared)
        short = adapter.prepare(_images(1, _size(adapter)))
        seen = dict(got)
        adapter.forward(short)  # another sequence length: no hook acts
    assert got.keys() == seen.keys() and all(torch.equal(got[k], seen[k]) for k in got)
    mlp = adapter.ffn(layer)
    with torch.no_grad():
        torch.testing.assert_close(got[("ffn_act", layer)], mlp.act_fn(mlp.gate_proj(got[("ffn_in", layer)])))
        torch.testing.assert_close(got[("ffn", layer)], got[("ffn_act", layer)] * mlp.up_proj(got[("ffn_in", layer)]))
        torch.testing.assert_close(got[("ffn_out", layer)], mlp.down_proj(got[("ffn", layer)]))
        torch.testing.assert_close(got[("ffn_out", layer)], mlp(got[("ffn_in", layer)]))
    embeds = prepared.inputs.get("inputs_embeds")
    if embeds is not None:  # the spliced models hand the LM its embeddings
        assert torch.equal(got[("resid_pre", 0)], embeds)
    assert _no_hooks_left(adapter)
    with pytest.raises(ValueError, match="ffn_act"):
        adapter.site("attn_out", 0)


def test_the_predicting_position_is_each_rows_last_real_token(adapter, prepared):
    mask = prepared.inputs["attention_mask"]
    for row in range(prepared.batch_size):
        last = int(prepared.last_position[row])
        assert mask[row, last] == 1 and (last == mask.shape[1] - 1 or not mask[row, last + 1:].any())


def test_image_span_holds_the_inserted_image_features(adapter, prepared):
    seen = {}
    def grab(module, args, kwargs):
        seen["h"] = kwargs.get("hidden_states", args[0] if args else None)

    h = adapter.decoder_layers()[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            adapter.forward(prepared)
    finally:
        h.remove()
    rows = torch.arange(2)[:, None]
    at_span = seen["h"][rows, prepared.image_positions]  # [B, P, d]
    with torch.no_grad():
        if isinstance(adapter, SplicedAdapter):
            feats = adapter.mllm.image_embeddings(_images(2, _size(adapter)))
        else:
            out = adapter.model.model.get_image_features(pixel_values=prepared.inputs["pixel_values"])
            out = getattr(out, "pooler_output", out)
            feats = torch.stack(list(out)) if isinstance(out, (list, tuple)) else out
    assert at_span.shape == feats.shape
    torch.testing.assert_close(at_span, feats.to(at_span.dtype))
    spans = prepared.image_positions
    assert ((spans.diff(dim=1)) == 1).all(), "one contiguous span per row"
    if isinstance(adapter, VLMAdapter):
        assert spans[0, 0] != spans[1, 0], "left padding moves the span of the shorter row"


def test_geometry_is_row_major_over_the_grid(adapter):
    g = adapter.geometry
    rows, cols = g.grid
    assert len(g) == adapter.num_image_tokens == rows * cols
    t = cols + 1  # second row, second column
    np.testing.assert_allclose(g.boxes[t], [1 / cols, 1 / rows, 2 / cols, 2 / rows])
    assert PatchGeometry.row_major(24, 24).boxes.shape == (576, 4)


def _target(adapter, prepared):
    """y = sum over rows of the logit of the row's last token, at the position that predicts it."""
    if isinstance(adapter, SplicedAdapter):  # right-padded continuations
        last = prepared.inputs["attention_mask"].sum(1) - 1
    else:  # left-padded: every row ends at the last position
        last = torch.full((2,), prepared.prompt_len - 1)
    ids = prepared.input_ids
    return lambda logits: sum(logits[b, last[b] - 1, ids[b, last[b]]] for b in range(2))


def test_recorded_gradient_matches_finite_differences(adapter, prepared):
    adapter.model.float()
    y_of = _target(adapter, prepared)
    with torch.enable_grad(), record(adapter, prepared, with_grad=True) as rec:
        y = y_of(adapter.forward(prepared))
        y.backward()
    assert rec.passes == 1 and set(rec.gradients) == set(range(adapter.num_layers))
    assert torch.count_nonzero(rec.gradients[adapter.num_layers - 1]) == 0  # nothing follows the last FFN
    torch.testing.assert_close(rec.gradcam[0], rec.activations[0] * rec.gradients[0])
    rng = np.random.default_rng(0)
    eps = 1e-2
    for _ in range(4):
        layer = int(rng.integers(adapter.num_layers - 1))
        p, u = int(rng.integers(adapter.num_image_tokens)), int(rng.integers(adapter.d_ff))
        vals = []
        for sign in (1, -1):
            add = torch.zeros(2, adapter.num_image_tokens, 1)
            add[:, p, 0] = sign * eps
            with torch.no_grad(), intervene(adapter, prepared, {layer: ActivationPatch(torch.tensor([u]), add=add)}):
                vals.append(y_of(adapter.forward(prepared)).item())
        fd = (vals[0] - vals[1]) / (2 * eps)
        analytic = rec.gradients[layer][:, p, u].sum().item()
        assert fd == pytest.approx(analytic, rel=2e-2, abs=1e-5)


def test_reduced_recording_keeps_only_the_reduction(adapter, prepared):
    adapter.model.float()
    y_of = _target(adapter, prepared)
    with torch.enable_grad(), record(adapter, prepared, with_grad=True) as full:
        y_of(adapter.forward(prepared)).backward()
    with torch.enable_grad(), record(adapter, prepared, layers=[0, 1], with_grad=True, reduce="max") as red:
        y_of(adapter.forward(prepared)).backward()
    assert set(red.activations) == {0, 1} and not red.gradients
    torch.testing.assert_close(red.activations[1], full.activations[1].amax(1))
    torch.testing.assert_close(red.gradcam[0], full.gradcam[0].amax(1))


def _capture_inputs(adapter, layer, store):
    return adapter.down_proj(layer).register_forward_hook(lambda m, a, out: store.append(a[0].detach().clone()))


def test_intervention_touches_only_chosen_units_at_image_positions_in_prefill(adapter, prepared):
    layer, units = 1, torch.tensor([0, 3, 5])
    base, edited = [], []
    h = _capture_inputs(adapter, layer, base)
    with torch.no_grad():
        adapter.forward(prepared)
    h.remove()
    add = torch.randn(2, adapter.num_image_tokens) * 3
    edit = ActivationPatch(units, add=add)
    h = _capture_inputs(adapter, layer, edited)
    with torch.no_grad(), intervene(adapter, prepared, {layer: edit}):
        adapter.forward(prepared)
    h.remove()
    diff = (edited[0] - base[0]).abs() > 0
    rows = torch.arange(2)[:, None]
    expected = torch.zeros_like(diff)
    expected[rows[:, :, None], prepared.image_positions[:, :, None], units[None, None, :]] = True
    assert torch.equal(diff, expected)
    got = edited[0][rows, prepared.image_positions][:, :, units] - base[0][rows, prepared.image_positions][:, :, units]
    torch.testing.assert_close(got, add[..., None].expand_as(got).to(got.dtype))
    assert edit.applied == 1


def test_intervention_is_prefill_only_during_generation(adapter):
    prepared = adapter.prepare(_images(2, _size(adapter), seed=3))
    edit = ActivationPatch(torch.tensor([1]), add=torch.zeros(2, adapter.num_image_tokens))
    calls = []
    h = adapter.down_proj(0).register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
    try:
        with intervene(adapter, prepared, {0: edit}):
            adapter.generate(prepared, max_new_tokens=4)
    finally:
        h.remove()
    prompt = [c for c in calls if c > 1]  # the prompt's pass: the tokens before the image once, then the rest
    assert 1 <= len(prompt) <= 2 and sum(prompt) == prepared.prompt_len and calls[:len(prompt)] == prompt
    assert len(calls) > len(prompt) and all(c == 1 for c in calls[len(prompt):])  # then one token per decoding step
    assert edit.applied == 1


def test_zero_noise_reproduces_unhooked_captions(adapter):
    images = _images(3, _size(adapter), seed=4)
    clean = adapter.caption(images, max_new_tokens=6)
    prepared = adapter.prepare(images)
    zero = torch.zeros(3, adapter.num_image_tokens)
    edits = {layer: ActivationPatch(torch.arange(adapter.d_ff), add=zero) for layer in range(adapter.num_layers)}
    with intervene(adapter, prepared, edits):
        assert adapter.generate(prepared, max_new_tokens=6) == clean


def test_per_row_interventions_equal_one_row_at_a_time(adapter):
    adapter.model.float()
    images = _images(2, _size(adapter), seed=5)
    conts = [" a bus", " a clock and a bus"]
    noise = torch.randn(2, adapter.num_image_tokens, 2) * 5
    units = torch.tensor([2, 7])
    mask = torch.tensor([[True, False], [True, True]])  # row 0 edits unit 2 only
    both = adapter.prepare(images, continuations=conts)
    with torch.no_grad(), intervene(adapter, both, {1: ActivationPatch(units, add=noise, row_mask=mask)}):
        batched = adapter.forward(both)
    for b in range(2):
        one = adapter.prepare(images[b : b + 1], continuations=conts[b : b + 1])
        keep = mask[b]
        with torch.no_grad(), intervene(adapter, one, {1: ActivationPatch(units[keep], add=noise[b : b + 1, :, keep])}):
            single = adapter.forward(one)
        n = single.shape[1]
        row = batched[b, -n:] if isinstance(adapter, VLMAdapter) else batched[b, :n]
        torch.testing.assert_close(row, single[0], atol=1e-4, rtol=1e-4)


def test_hooks_are_removed_after_exit_and_after_an_exception(adapter, prepared):
    with record(adapter, prepared, with_grad=True):
        assert not _no_hooks_left(adapter)
        assert adapter.decoder_layers()[0]._forward_pre_hooks  # the gradient anchor
    assert _no_hooks_left(adapter)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(adapter, prepared, {0: ActivationPatch(torch.tensor([0]), scale=0.0)}):
            raise RuntimeError("boom")
    assert _no_hooks_left(adapter)
    with pytest.raises(RuntimeError, match="enable_grad"):
        with torch.no_grad(), record(adapter, prepared, with_grad=True):
            adapter.forward(prepared)
    assert _no_hooks_left(adapter)
    with pytest.raises(ValueError, match="out of range"):
        with record(adapter, prepared, layers=[99]):
            pass
    assert _no_hooks_left(adapter)


def test_scale_and_set_edits(adapter, prepared):
    layer, units = 0, torch.tensor([1, 2])
    out = []
    h = _capture_inputs(adapter, layer, out)
    with torch.no_grad():
        adapter.forward(prepared)
        with intervene(adapter, prepared, {layer: ActivationPatch(units, scale=torch.tensor([0.0, 2.0]))}):
            adapter.forward(prepared)
        with intervene(adapter, prepared, {layer: ActivationPatch(units, set_to=7.0)}):
            adapter.forward(prepared)
    h.remove()
    rows = torch.arange(2)[:, None]
    sel = [o[rows, prepared.image_positions][:, :, units] for o in out]
    assert torch.count_nonzero(sel[1][0]) == 0
    torch.testing.assert_close(sel[1][1], 2 * sel[0][1])
    assert torch.all(sel[2] == 7.0)


def test_a_recording_stops_after_its_last_layer_and_equals_the_full_pass(adapter, prepared):
    """``recorded`` runs the decoder only through its last recorded layer: the same tensors as a full pass, no later
    layer called, and the stop hook removed afterwards."""
    from knexp.models.hooks.record import recorded

    calls = []
    last = adapter.decoder_layers()[-1]
    handle = last.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        early = recorded(adapter, prepared, [0])
        assert calls == []  # the last decoder layer never ran
        with torch.no_grad(), record(adapter, prepared, layers=[0]) as rec:
            adapter.run_hooks(prepared)
        assert len(calls) == 1 and torch.equal(early[0], rec.activations[0])
        resid = recorded(adapter, prepared, [1], site="resid_pre")
        with torch.no_grad(), record(adapter, prepared, layers=[1], site="resid_pre") as full:
            adapter.run_hooks(prepared)
        assert torch.equal(resid[1], full.activations[1])
    finally:
        handle.remove()
    assert not adapter.decoder_layers()[1]._forward_pre_hooks  # the stop is gone
