"""Noise-perturbation captioning, Table II scores and Table III metrics."""

import numpy as np
import pandas as pd
import pytest
import torch

from knexp.evaluation.interventions import Inpainted, Mean, Noise, Row, SetValues, Zero, noise_for, rows_for
from knexp.evaluation.perturb import (
    cached_intervened_captions,
    counterfactual_values,
    intervened_captions,
    noise_captions,
    unit_values,
)
from knexp.evaluation.scores import curve_scores, suppression_scores
from knexp.evaluation.text_metrics import caption_metrics
from knexp.identification.methods import NeuronSet
from knexp.models.adapters.spliced import SplicedAdapter
from knexp.models.tiny.tiny_models import tiny_embedded
from knexp.settings import SettingError
from knexp.store import Store, cache_report


@pytest.fixture(scope="module")
def adapter():
    a = SplicedAdapter(tiny_embedded(layers=3))
    a.model.float()
    return a


def _images(n):
    rng = np.random.default_rng(9)
    return [(rng.random((224, 224, 3)) * 255).astype(np.uint8) for _ in range(n)]


def _set(layers, units):
    return NeuronSet("ours", "", np.array(layers), np.array(units), np.zeros(len(units)))


def test_scores_by_hand():
    rows = pd.DataFrame([
        # set 0, level 40: k images hit 1 of 2, other images hit 2 of 2
        (0, 40, "k", 1), (0, 40, "k", 0), (0, 40, "other", 1), (0, 40, "other", 1),
        # set 1, level 40: k 0 of 2, other 1 of 2
        (1, 40, "k", 0), (1, 40, "k", 0), (1, 40, "other", 1), (1, 40, "other", 0),
        # set 0 and 1, level 80: k never, other always
        (0, 80, "k", 0), (0, 80, "other", 1), (1, 80, "k", 0), (1, 80, "other", 1),
    ], columns=["set_id", "level", "group", "hit"])
    s = suppression_scores(rows)
    # level 40: S_k = (0.5 + 0) / 2 = 0.25, S_kbar = (1 + 0.5) / 2 = 0.75; level 80: S_k = 0, S_kbar = 1
    assert s["per_level"][40.0]["S_k"] == pytest.approx(0.25) and s["per_level"][40.0]["S_kbar"] == pytest.approx(0.75)
    assert s["S_k"] == pytest.approx(0.125) and s["S_kbar"] == pytest.approx(0.875)
    assert s["S_se"] == pytest.approx(0.875) and s["S_re"] == pytest.approx(0.875)
    assert s["S_mean"] == pytest.approx(0.875)


def test_caption_metrics_by_hand_and_with_empty_captions():
    same = caption_metrics(["the image shows a bus ."], ["the image shows a bus ."])
    assert same["bleu"] == pytest.approx(1.0) and same["rouge1"] == pytest.approx(1.0)
    assert same["rougeL"] == pytest.approx(1.0)
    assert same["bertscore_f1"] == pytest.approx(1.0, abs=1e-4)
    m = caption_metrics(["the image shows a bus", ""], ["the image shows a bus and a clock", "a clock"])
    # ROUGE-1 F of pair 1: P = 5/5, R = 5/8 -> F = 10/13; pair 2 (empty) -> 0
    assert m["rouge1"] == pytest.approx((10 / 13 + 0) / 2)
    assert 0 < m["bertscore_f1"] < 0.5  # the empty pair counts as 0
    assert m["pairs"] == 2


def test_noise_is_per_row_and_seeded():
    r = Row(0, 17, 1, 80.0, 3)
    a, b = noise_for(r, 5, 49, 4, False), noise_for(r, 5, 49, 4, False)
    assert np.array_equal(a, b) and a.shape == (49,)
    assert abs(a.std() / 80.0 - 1) < 0.35
    assert noise_for(r, 5, 49, 4, True).shape == (49, 4)
    assert not np.array_equal(a, noise_for(Row(0, 17, 1, 80.0, 4), 5, 49, 4, False))
    assert len(rows_for([1, 2], [40, 80, 120], 10)) == 60


def test_zero_noise_reproduces_clean_captions(adapter):
    images = _images(2)
    clean = adapter.caption(images, max_new_tokens=5)
    rows = rows_for([10, 11], [0.0], 2)
    caps = noise_captions(adapter, images, rows, _set([0, 1, 1], [3, 4, 9]), seed=0, max_new_tokens=5)
    assert caps == [clean[0], clean[0], clean[1], clean[1]]


def test_batched_equals_one_row_at_a_time(adapter):
    images = _images(2)
    rows = rows_for([10, 11], [40.0, 120.0], 2)
    neurons = _set([0, 1, 2], [3, 4, 9])
    for per_neuron in (False, True):
        batched = noise_captions(adapter, images, rows, neurons, seed=1, per_neuron=per_neuron, batch_size=8,
                                 max_new_tokens=5)
        single = [noise_captions(adapter, images, [r], neurons, seed=1, per_neuron=per_neuron, batch_size=1,
                                 max_new_tokens=5)[0]
                  for r in rows]
        assert batched == single


def test_noise_scale_multiplies_each_neurons_noise(adapter):
    images = _images(2)
    rows = rows_for([10, 11], [3.0], 2)
    neurons = _set([0, 1, 2], [3, 4, 9])
    kw = dict(seed=4, max_new_tokens=5)
    unscaled = noise_captions(adapter, images, rows, neurons, **kw)
    assert noise_captions(adapter, images, rows, neurons, scale=np.ones(3), **kw) == unscaled
    clean = adapter.caption(images, max_new_tokens=5)
    zeroed = noise_captions(adapter, images, rows, neurons, scale=np.zeros(3), **kw)
    assert zeroed == [clean[0], clean[0], clean[1], clean[1]]
    # a scale of s at level n is the absolute level n * s (the same seeded draw, scaled)
    scaled = noise_captions(adapter, images, rows_for([10, 11], [3.0], 2), neurons, scale=np.full(3, 40.0), **kw)
    assert scaled == noise_captions(adapter, images, rows_for([10, 11], [120.0], 2), neurons, **kw)
    with pytest.raises(SettingError, match=r"noise_level\.levels=\[\]"):
        Noise(levels=(), draws=1)
    with pytest.raises(SettingError, match="intervention.name='blur'"):
        Zero(name="blur")  # a name is its class's label: another would label one intervention as another


def _hand_patched(adapter, images, neurons, values):
    """Captions with each image's set units replaced by ``values[i]`` [P, U], patched with a plain PyTorch hook."""
    out = []
    for i, image in enumerate(images):
        prepared = adapter.prepare([image])
        pos = prepared.image_positions[0]
        handles = []
        for layer in sorted(set(neurons.layers.tolist())):
            cols = np.flatnonzero(neurons.layers == layer)

            def hook(module, args, cols=cols, length=prepared.prompt_len, pos=pos, new=values[i]):
                x = args[0]
                if x.shape[1] != length:
                    return None
                x = x.clone()
                for c in cols:
                    x[0, pos, int(neurons.units[c])] = torch.as_tensor(new[:, c], dtype=x.dtype)
                return (x,)

            handles.append(adapter.down_proj(layer).register_forward_pre_hook(hook))
        try:
            out += adapter.generate(prepared, 5)
        finally:
            for h in handles:
                h.remove()
    return out


def test_deterministic_interventions_equal_a_hand_patch(adapter):
    images = _images(3)
    neurons = _set([0, 1, 1], [3, 4, 9])
    rows = Zero().rows([10, 11, 12])
    assert len(rows) == 3 and {(r.level, r.draw) for r in rows} == {(0.0, 0)}
    p = adapter.num_image_tokens
    zero = intervened_captions(adapter, images, rows, neurons, Zero(), SetValues(fixed=np.zeros(3)), 0,
                               max_new_tokens=5)
    assert zero == _hand_patched(adapter, images, neurons, [np.zeros((p, 3))] * 3)
    fixed = np.array([5.0, -3.0, 8.0])
    mean = intervened_captions(adapter, images, rows, neurons, Mean(), SetValues(fixed=fixed), 0, max_new_tokens=5)
    assert mean == _hand_patched(adapter, images, neurons, [np.tile(fixed, (p, 1))] * 3)
    # inpainted: images 0 and 2 contain k (set to their counterfactual values); image 1 does not (its values + shift)
    rng = np.random.default_rng(1)
    cf = {0: rng.normal(size=(p, 3)) * 4, 2: rng.normal(size=(p, 3)) * 4}
    shift = np.array([2.0, -1.0, 3.0])
    got = intervened_captions(adapter, images, rows, neurons, Inpainted(), SetValues(shift=shift, counterfactual=cf), 0,
                              batch_size=2, max_new_tokens=5)
    own = unit_values(adapter, images, neurons)  # [N, P, U] each image's own values
    assert got == _hand_patched(adapter, images, neurons, [cf[0], own[1] + shift, cf[2]])
    with pytest.raises(ValueError, match="shift"):
        intervened_captions(adapter, images, rows, neurons, Inpainted(), SetValues(), 0)


def test_counterfactual_values_of_each_set_come_from_one_union_pass_run_on_the_first_read(adapter, monkeypatch):
    images = _images(3)
    sets = [_set([2, 0, 2], [5, 1, 7]), _set([0, 1], [1, 9]), _set([], [])]
    passes = []
    run_hooks = type(adapter).run_hooks
    monkeypatch.setattr(type(adapter), "run_hooks", lambda self, *a,
                        **kw: passes.append(1) or run_hooks(self, *a, **kw))
    got = counterfactual_values(adapter, {4: images[0], 7: images[2]}, sets)
    assert [sorted(v) for v in got] == [[4, 7]] * 3 and 7 in got[1] and 5 not in got[1]
    assert SetValues(counterfactual=got[0]).key()[-1] == [4, 7]  # the caption store's key reads no value
    assert not passes, "no pass before a value is read"
    read = [{i: v[i] for i in v} for v in got]
    assert len(passes) == 1, "one pass (one batch) for every set"
    for neurons, values in zip(sets[:2], got[:2], strict=True):
        direct = unit_values(adapter, [images[0], images[2]], neurons)
        assert set(values) == {4, 7}
        np.testing.assert_allclose(values[4], direct[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(values[7], direct[1], rtol=1e-5, atol=1e-6)
    assert read[2][4].shape == (adapter.num_image_tokens, 0)
    with pytest.raises(KeyError):
        got[0][5]


def test_curve_scores_by_hand():
    rows = pd.DataFrame([
        # rung 10: two sets of sizes 10 and 8; rung 100: one set of size 100
        (0, 10, 10, 0, "k", 1), (0, 10, 10, 0, "other", 1), (1, 10, 8, 0, "k", 0), (1, 10, 8, 0, "other", 1),
        (2, 100, 100, 0, "k", 0), (2, 100, 100, 0, "other", 0),
    ], columns=["set_id", "rung", "size", "level", "group", "hit"])
    c10, c100 = curve_scores(rows, [10, 100])
    assert (c10["size"], c10["mean_set_size"], c10["S_se"], c10["S_re"]) == (10, 9.0, 0.5, 1.0)
    assert (c100["S_se"], c100["S_re"], c100["S_mean"]) == (1.0, 0.0, 0.5)


def test_unit_values_are_the_recorded_activations(adapter):
    from knexp.models.hooks.record import record

    images = _images(3)
    neurons = _set([2, 0, 2], [5, 1, 7])
    got = unit_values(adapter, images, neurons, batch_size=2)
    prepared = adapter.prepare(images)
    with torch.no_grad(), record(adapter, prepared) as rec:
        adapter.forward(prepared)
    for c, (layer, unit) in enumerate(zip(neurons.layers, neurons.units, strict=True)):
        np.testing.assert_allclose(got[:, :, c], rec.activations[int(layer)][:, :, int(unit)].numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_cached_intervened_captions_equal_fresh_ones_and_resume_from_finished_chunks(adapter, tmp_path):
    images = _images(2)
    rows = rows_for([10, 11], [40.0, 120.0], 3)  # 12 rows
    neurons = _set([0, 1, 2], [3, 4, 9])
    how, values = Noise(levels=(40.0, 120.0), draws=3), SetValues()
    kw = dict(seed=2, batch_size=2, max_new_tokens=5)
    fresh = intervened_captions(adapter, images, rows, neurons, how, values, **kw)
    store = Store(tmp_path, "captions")
    # a job killed after its first chunk (4 * batch_size = 8 rows): those 8 are kept
    calls = []
    original = intervened_captions

    def dies_after_one_chunk(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    import knexp.evaluation.perturb as P
    P.intervened_captions = dies_after_one_chunk
    try:
        with pytest.raises(KeyboardInterrupt):
            cached_intervened_captions(store, ["m", "d"], adapter, images, rows, neurons, how, values, **kw)
    finally:
        P.intervened_captions = original
    assert calls == [8] and store.misses == 12
    resumed = Store(tmp_path, "captions")
    assert cached_intervened_captions(resumed, ["m", "d"], adapter, images, rows, neurons, how, values, **kw) == fresh
    assert (resumed.hits, resumed.misses) == (8, 4)
    # another set, namespace, intervention or set values is another entry
    other = Store(tmp_path, "captions")
    cached_intervened_captions(other, ["m", "d"], adapter, images, rows, _set([0, 1, 2], [3, 4, 8]), how, values, **kw)
    cached_intervened_captions(other, ["m2", "d"], adapter, images, rows, neurons, how, values, **kw)
    cached_intervened_captions(other, ["m", "d"], adapter, images, rows, neurons, how, SetValues(scale=np.full(3, 2.0)),
                               **kw)
    assert other.hits == 0


def test_store_detects_truncated_edited_and_foreign_entries(tmp_path, caplog):
    store = Store(tmp_path, "captions")
    store.put("abcdef", "a caption")
    store.put("abxyz0", "another entry's caption")
    path = next((tmp_path / "captions").rglob("abcdef.json"))
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # torn
    with caplog.at_level("WARNING"):
        assert store.get("abcdef") is None and store.damaged == 1
    assert str(path) in caplog.text and "rebuilding" in caplog.text  # the warning names the entry
    path.write_text(text.replace("a caption", "another caption"))  # edited: checksum fails
    assert store.get("abcdef") is None and store.damaged == 2
    path.write_bytes(next((tmp_path / "captions").rglob("abxyz0.json")).read_bytes())  # another entry's file, intact
    assert store.get("abcdef") is None and store.damaged == 3
    path.write_bytes(b"\x89PNG not json")
    assert store.get("abcdef") is None and store.damaged == 4
    assert store.get_many(["abcdef"],
                          lambda idx: ["recomputed"]) == ["recomputed"] and store.get("abcdef") == "recomputed"
    assert Store(None, "captions").get_many(["x"], lambda idx: ["y"]) == ["y"]  # disabled: computes, keeps nothing
    assert cache_report(tmp_path)["captions"]["files"] == 2


def test_out_of_memory_halves_the_batch_keeps_the_captions_and_leaves_no_hook(adapter, monkeypatch, caplog):
    from knexp.models.decoding.batching import BatchTooLarge, map_batches

    images = _images(2)
    rows = rows_for([10, 11], [40.0, 120.0], 2)  # 8 rows
    neurons = _set([0, 1, 2], [3, 4, 9])
    expected = noise_captions(adapter, images, rows, neurons, seed=1, batch_size=8, max_new_tokens=5)
    real = adapter.prefill  # each prompt pass of the captions' stream
    seen = []

    def tight_memory(prepared, *args, **kwargs):
        rows_in = prepared.batch_size
        seen.append(rows_in)
        if rows_in > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(prepared, *args, **kwargs)

    monkeypatch.setattr(adapter, "prefill", tight_memory)
    assert noise_captions(adapter, images, rows, neurons, seed=1, batch_size=8, max_new_tokens=5) == expected
    assert seen[:3] == [8, 4, 2] and set(seen[3:]) == {2}  # halved twice, then kept at 2
    assert "out of memory at batch size 8" in caplog.text and "model.generation.batch_size=4" in caplog.text
    modules = [m for layer in adapter.decoder_layers() for m in layer.modules()]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in modules)
    with pytest.raises(BatchTooLarge, match="max_new_tokens"):
        map_batches(lambda chunk: (_ for _ in ()).throw(MemoryError()), [1, 2, 3], 2)
    with pytest.raises(KeyError):  # other errors pass through untouched
        map_batches(lambda chunk: {}["x"], [1], 1)


def test_atomic_path_replaces_on_success_and_leaves_the_old_file_on_failure(tmp_path):
    from knexp.io import atomic_path, atomic_write_text

    target = atomic_write_text(tmp_path / "sub" / "a.png", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == target.parent
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["a.png"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and len(list(target.parent.iterdir())) == 1
