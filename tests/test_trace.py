"""The causal trace (``knexp.identification.causal_trace``) against residual patching written out by hand (tiny
models)."""

import numpy as np
import pytest
import torch

from knexp.identification.causal_trace import KINDS, SampleTrace, live_window, normalised, trace_sample
from knexp.identification.passes import locate_target
from knexp.models.adapters.spliced import SplicedAdapter

CAPTION = "the image shows a bus and a clock."


ADAPTER_LAYERS = 4  # the conftest's tiny adapters, one layer deeper than elsewhere


def _hidden_states(adapter, prepared):
    """HF's own hidden states: entry l is the residual stream entering decoder layer l."""
    model = adapter.mllm.lm if isinstance(adapter, SplicedAdapter) else adapter.model
    with torch.no_grad():
        out = model(**prepared.inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states, out.logits


def _by_hand(adapter, original, inpainted, target):
    """Δy_c of patching the residual entering each layer at the image positions, with a plain PyTorch hook."""
    prep_i = adapter.prepare([inpainted], continuations=[target.context])
    prep_o = adapter.prepare([original], continuations=[target.context])
    hs_i, logits_i = _hidden_states(adapter, prep_i)
    _, logits_o = _hidden_states(adapter, prep_o)
    t = prep_o.prompt_len - 1
    y_o, y_i = float(logits_o[0, t, target.token_id]), float(logits_i[0, t, target.token_id])
    pos_o, pos_i = prep_o.image_positions[0], prep_i.image_positions[0]
    deltas = []
    for layer in range(adapter.num_layers):
        def swap(module, args, kwargs, layer=layer):
            h = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()
            h[0, pos_o] = hs_i[layer][0, pos_i]
            return (args, {**kwargs, "hidden_states": h}) if "hidden_states" in kwargs else ((h, *args[1:]), kwargs)

        handle = adapter.decoder_layers()[layer].register_forward_pre_hook(swap, with_kwargs=True)
        try:
            with torch.no_grad():
                deltas.append(float(adapter.forward(prep_o)[0, t, target.token_id]) - y_o)
        finally:
            handle.remove()
    return y_o, y_i, np.array(deltas)


@pytest.fixture(scope="module")
def traced(adapter, catalog, random_pair):
    original, inpainted = random_pair(adapter, 5)
    target = locate_target(adapter, CAPTION, adapter.caption_prefix, catalog["bus"])
    tr = trace_sample(adapter, original, inpainted, target, catalog["bus"], batch_size=5, max_new_tokens=4)
    return tr, _by_hand(adapter, original, inpainted, target)


def test_residual_patching_matches_a_hand_written_patch(adapter, traced):
    tr, (y_o, y_i, deltas) = traced
    assert tr.y_original == pytest.approx(y_o, abs=1e-4) and tr.y_inpainted == pytest.approx(y_i, abs=1e-4)
    np.testing.assert_allclose(tr.delta["resid"], deltas, atol=1e-4)
    # the residual entering layer 0 at the image positions is the image itself: patching it is feeding i
    assert tr.delta["resid"][0] == pytest.approx(y_i - y_o, abs=1e-4)


def test_trace_kinds_agree_where_they_coincide(adapter, traced):
    tr, _ = traced
    n = adapter.num_layers
    assert all(len(tr.delta[k]) == n and len(tr.named[k]) == n for k in KINDS)
    assert tr.delta["ffn_upto"][n - 1] == pytest.approx(tr.delta["ffn_from"][0], abs=1e-4)  # both patch every FFN
    assert tr.delta["ffn_upto"][0] == pytest.approx(tr.delta["ffn"][0], abs=1e-4)
    assert tr.delta["ffn_from"][n - 1] == pytest.approx(tr.delta["ffn"][n - 1], abs=1e-4)
    # the last FFN's output at the image positions feeds nothing (the residual entering the last layer still
    # feeds that layer's attention): patching it cannot move y_c, beyond the rounding of the batch it runs in (the
    # patched rows run batched, y_o alone: on some CPUs the kernels round differently by batch size, -4e-8 on an AMD
    # EPYC)
    assert tr.delta["ffn"][n - 1] == pytest.approx(0, abs=1e-6)


def test_live_window_is_where_hand_patching_reaches_the_fraction(adapter, traced):
    tr, (y_o, y_i, deltas) = traced
    for frac in (0.05, 0.3, 0.7):
        window = live_window([tr], frac)
        share = deltas / (y_i - y_o)
        assert window["resid_layers"] == [layer for layer in range(adapter.num_layers) if share[layer] >= frac]
        assert window["neuron_layers"] == [layer for layer in range(adapter.num_layers - 1) if share[layer + 1] >= frac]
        assert adapter.num_layers - 1 not in window["neuron_layers"]


def test_window_averages_effects_over_samples():
    def fake(deltas, full):
        n = len(deltas)
        return SampleTrace("bus", 0, 0, 10.0, 10.0 + full, {k: list(deltas) for k in KINDS},
                           {k: [True] * n for k in KINDS})

    a, b = fake([-8.0, -6.0, -1.0, 0.0], -8.0), fake([-4.0, -4.0, -3.0, 0.0], -4.0)
    # ratio of means: (-12, -10, -4, 0) / -12
    np.testing.assert_allclose(normalised([a, b]), [1.0, 10 / 12, 4 / 12, 0.0])
    w = live_window([a, b], frac=0.3)
    assert w["resid_layers"] == [0, 1, 2] and w["neuron_layers"] == [0, 1]
    with pytest.raises(ValueError, match="at least one"):
        live_window([])


def test_cached_trace_stores_each_kind_and_a_window_reuses_a_full_trace(tmp_path):
    from knexp.identification.causal_trace import cached_trace
    from knexp.store import Store

    calls = []

    def compute(kinds, captions):
        calls.append((kinds, captions))
        return SampleTrace("bus", 1, 2, 5.0, 1.0, {k: [float(i)] * 3 for i, k in enumerate(kinds)},
                           {k: [True] * 3 for k in kinds} if captions else {})

    store = Store(tmp_path, "trace")
    window = cached_trace(store, ["m", "d", 1], ("bus", 1, 2), compute, ("resid",), captions=False)
    assert calls == [(("resid",), False)] and window.named == {} and window.delta == {"resid": [0.0] * 3}
    full = cached_trace(store, ["m", "d", 1], ("bus", 1, 2), compute)  # captions wanted: everything is computed
    assert calls[-1] == (KINDS, True) and set(full.named) == set(KINDS)
    again = cached_trace(store, ["m", "d", 1], ("bus", 1, 2), compute, ("resid",), captions=False)
    assert len(calls) == 2 and again.named == {"resid": [True] * 3}  # the full trace served the window
    assert (again.knowledge, again.image_id, again.annotation_id, again.y_original) == ("bus", 1, 2, 5.0)


@pytest.mark.slow
def test_live_window_of_the_embedded_model_agrees_with_residual_patching(catalog):
    """On the embedded model's real weights: the trace's residual kind equals hand patching at every layer, and the
    window starts at layer 0 and ends where the object leaves the image positions, well before the last layers (one
    sample ends at layer 17 on CI; the six tuning samples together end at layer 22 of 30)."""
    from knexp.counterfactual.inpaint import inpaint, region_mask
    from knexp.data.toyworld.scenes import SceneOptions, make_scene
    from knexp.models.zoo.embedded import load_embedded
    from knexp.paths import default_cache_dir, project_root

    adapter = SplicedAdapter(load_embedded(default_cache_dir(),
                                           project_root() / "knexp/models/weights/embedded_projector.safetensors"))
    scene = make_scene(catalog, np.random.default_rng([31, 5, 0]), SceneOptions(gap_px=8))
    obj = scene.objects[0]
    edited = inpaint(scene.image, region_mask(scene.image.shape[:2], bbox=obj.bbox, dilation=2), 3, "telea")
    target = locate_target(adapter, f"{adapter.caption_prefix} {obj.knowledge.indefinite}.", adapter.caption_prefix,
                           obj.knowledge)
    tr = trace_sample(adapter, scene.image, edited, target, obj.knowledge, kinds=("resid",), captions=False)
    y_o, y_i, deltas = _by_hand(adapter, scene.image, edited, target)
    np.testing.assert_allclose(tr.delta["resid"], deltas, atol=2e-3)
    window = live_window([tr], 0.5)
    share = deltas / (y_i - y_o)
    assert window["neuron_layers"] == [layer for layer in range(29) if share[layer + 1] >= 0.5]
    assert window["neuron_layers"][0] == 0 and 10 <= window["neuron_layers"][-1] <= 26, window


@pytest.mark.slow
def test_trace_task_writes_the_window_and_the_figure(tmp_path):
    import json
    import subprocess
    import sys

    from knexp.paths import default_cache_dir, project_root

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(default_cache_dir() / "smollm2-135m-instruct")
    r = subprocess.run([sys.executable, "run.py", "task=trace", "trace.objects=[clock]", "data.num_images=60",
                        "data.per_knowledge=1",
                        f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job", "logger=none",
                        f"paths.cache_dir={cache}"],
                       cwd=project_root(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "job" / "trace.json").read_text())
    (sample,) = result["samples"]
    assert sample["knowledge"] == "clock" and set(sample["delta"]) == set(KINDS) and set(sample["named"]) == set(KINDS)
    assert sample["named"]["resid"][0] is False and sample["named"]["resid"][-1] is True  # feeding i drops the word
    assert result["window"]["neuron_layers"] and (tmp_path / "job" / "figures" / "trace.png").stat().st_size > 10_000
    assert "live window of embedded" in r.stdout


def test_trace_task_on_a_tiny_model_with_a_scripted_captioner(tmp_path, monkeypatch):
    """task=trace end to end on tiny MiniGPT-4 (its random captions never name an object, so a scripted captioner
    that names the bus while its red square is visible stands in for selection's captions)."""
    import json

    from test_selection import _coco, script_captions

    from knexp.job.compose import compose
    from knexp.job.session import Session
    from knexp.tasks.trace import TraceTask

    _coco(tmp_path / "data", {i: [(6, (8 * i, 10, 40, 40))] for i in range(1, 5)})
    cfg = compose("task=trace", "model=tiny_minigpt4", "data=coco2017", f"data.root={tmp_path}/data", "data.split=val",
                  "data.image_dir=val", "trace.objects=[bus]", "trace.per_object=2",
                  f"paths.cache_dir={tmp_path}/cache", "logger=none", output_dir=tmp_path / "job")
    session = script_captions(Session.from_config(cfg))
    result = TraceTask()(session)
    saved = json.loads((tmp_path / "job" / "trace.json").read_text())
    assert len(saved["samples"]) == 2 and saved["window"] == result["window"]
    assert all(set(s["delta"]) == set(KINDS) and len(s["delta"]["ffn"]) == 3 for s in saved["samples"])
    share = saved["window"]["resid_share"]
    assert saved["window"]["neuron_layers"] == [layer for layer in range(2) if share[layer + 1] >= 0.5]
    assert (tmp_path / "job" / "figures" / "trace.png").exists()


def test_the_trace_runs_the_lm_head_at_one_position_only(adapter, catalog, random_pair, monkeypatch):
    """Logits at every position cost rows x positions x vocabulary (30 rows x 600 x 262k floats: 19 GB on Gemma 3):
    every forward of a trace asks for the one position it reads."""
    original, inpainted = random_pair(adapter, 5)
    target = locate_target(adapter, CAPTION, adapter.caption_prefix, catalog["bus"])
    shapes, forward = [], type(adapter).forward

    def spy(self, prepared, positions=None):
        logits = forward(self, prepared, positions)
        shapes.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(type(adapter), "forward", spy)
    trace_sample(adapter, original, inpainted, target, catalog["bus"], kinds=("resid",), batch_size=5, captions=False)
    assert shapes and all(k == 1 for _, k, _ in shapes), shapes
