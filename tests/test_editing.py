"""Weight edits of found neurons (knexp.editing): exactness against the run-time intervention on every adapter, the
weights restored bit for bit, edit files (round trip, refusals, ``model.edit``), the rules, the sets, and ``task=edit``
on the tiny model of every adapter."""

import json

import numpy as np
import pytest
import torch
from conftest import run_py

from knexp.editing.rules import Kn, Mean, Optimized, Zero
from knexp.editing.sets import disjoint_random, object_set, random_columns
from knexp.editing.target import Erase, Swap, word_direction
from knexp.identification.methods import NeuronSet
from knexp.models.adapters.vlm import VLMAdapter
from knexp.models.hooks.attach import everywhere
from knexp.models.hooks.banned import banned
from knexp.models.tiny.tiny_vlm import TINY, tiny_adapter
from knexp.models.weight_edit import EditFileError, LayerDelta, WeightEdit, applied, load, save

KINDS = ["embedded", "minigpt4", *TINY]


def _images(adapter, n=2, seed=0):
    size = 60 if isinstance(adapter, VLMAdapter) else 224
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def _set(layers, units):
    return NeuronSet("test", "", np.array(layers), np.array(units), np.zeros(len(units)))


def _weights(adapter):
    return [p.detach().clone() for p in adapter.model.parameters()]


@pytest.fixture(scope="module", params=KINDS)
def tiny(request):
    return tiny_adapter(request.param, layers=2)


def test_the_zero_weight_edit_equals_the_runtime_zero_at_every_position(tiny):
    """Item 5 of the issue: W_out[:, u] = 0 computes exactly what setting O'[..., u] = 0 at every position of every pass
    does: identical logits (torch.equal) and identical greedy captions; afterwards the weights are bit-identical."""
    images = _images(tiny)
    units = {0: torch.tensor([1, 3, 7]), 1: torch.tensor([0, 2, 5])}
    neurons = _set([0, 0, 0, 1, 1, 1], [1, 3, 7, 0, 2, 5])
    before = _weights(tiny)
    edit = Zero().make(tiny, neurons, None, None)

    def zero(layer):
        def hook(x):
            x = x.clone()
            x[..., units[layer]] = 0
            return x
        return hook

    with torch.no_grad():
        prepared = tiny.prepare(images)
        with applied(tiny, edit):
            logits_edit, caps_edit = tiny.forward(prepared), tiny.caption(images, max_new_tokens=6)
            assert all(bool((tiny.down_proj(layer).weight[:, u] == 0).all()) for layer, u in units.items())
        with everywhere(tiny, {("ffn", layer): zero(layer) for layer in units}):
            logits_hook, caps_hook = tiny.forward(prepared), tiny.caption(images, max_new_tokens=6)
        logits_clean = tiny.forward(prepared)
    assert torch.equal(logits_edit, logits_hook) and caps_edit == caps_hook
    assert not torch.equal(logits_edit, logits_clean)  # the edit changed something
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.model.parameters(), strict=True))


def test_an_edit_is_undone_bit_for_bit_after_an_exception_and_a_created_bias_is_removed():
    adapter = tiny_adapter("embedded", layers=2)
    before = _weights(adapter)
    d_model = adapter.down_proj(1).out_features
    edit = WeightEdit([LayerDelta.columns(1, torch.tensor([2, 4]), torch.randn(d_model, 2), torch.randn(d_model))])
    assert adapter.down_proj(1).bias is None
    with pytest.raises(RuntimeError, match="inside"), applied(adapter, edit):
        assert adapter.down_proj(1).bias is not None
        raise RuntimeError("inside")
    assert adapter.down_proj(1).bias is None
    assert all(torch.equal(a, b) for a, b in zip(before, adapter.model.parameters(), strict=True))


def test_the_mean_rule_gives_the_neurons_their_mean_output_through_a_bias():
    """W_out[:, u] = 0 and b = sum_u W_out[:, u] m_u: the FFN's output is what it is with O'[..., u] = m_u
    everywhere."""
    adapter = tiny_adapter("embedded", layers=2)
    d_ff = adapter.d_ff

    class Reference:
        mean = torch.linspace(-1, 1, 2 * d_ff).reshape(2, d_ff)

    neurons = _set([0, 1, 1], [3, 1, 6])
    edit = Mean().make(adapter, neurons, None, Reference)
    units = {0: [3], 1: [1, 6]}

    def to_mean(layer):
        def hook(x):
            x = x.clone()
            x[..., units[layer]] = Reference.mean[layer, units[layer]].to(x.dtype)
            return x
        return hook

    images = _images(adapter)
    with torch.no_grad():
        prepared = adapter.prepare(images)
        with applied(adapter, edit):
            edited = adapter.forward(prepared)
        with everywhere(adapter, {("ffn", layer): to_mean(layer) for layer in units}):
            hooked = adapter.forward(prepared)
    torch.testing.assert_close(edited, hooked, rtol=1e-5, atol=1e-5)  # a bias sums in another order: not bit-exact


def test_the_kn_rule_moves_each_column_by_its_own_norm_along_the_unembedding_of_the_word(catalog):
    adapter = tiny_adapter("embedded", layers=2)
    k = catalog["banana"]
    neurons = _set([0, 1], [4, 9])
    edit = Kn(lam_erase=0.5).make(adapter, neurons, Erase(k), None)
    e = word_direction(adapter, k)
    assert abs(float(e.norm()) - 1) < 1e-5
    for layer, unit in ((0, 4), (1, 9)):
        w = adapter.down_proj(layer).weight[:, unit].float()
        delta = edit.at(layer).delta[:, 0]
        torch.testing.assert_close(delta, -0.5 * w.norm() * e)
    negative = _set([0, 1], [4, 9])
    negative.info["act_mean"] = [-0.3, 0.2]  # unit 4 fires negative on k: its column moves the other way
    signed = Kn(lam_erase=0.5).make(adapter, negative, Erase(k), None)
    torch.testing.assert_close(signed.at(0).delta[:, 0], -edit.at(0).delta[:, 0])
    torch.testing.assert_close(signed.at(1).delta[:, 0], edit.at(1).delta[:, 0])
    literal = Kn(lam_erase=0.5, signed=False).make(adapter, negative, Erase(k), None)
    torch.testing.assert_close(literal.at(0).delta[:, 0], edit.at(0).delta[:, 0])
    swap = Kn(lam_erase=0.5, lam_swap=2.0).make(adapter, neurons, Swap(k, catalog["cake"]), None)
    assert float(swap.at(0).delta[:, 0] @ word_direction(adapter, catalog["cake"])) > 0


def test_the_optimized_rule_lowers_the_objects_probability_and_touches_only_its_columns(catalog):
    """The fit (hooks adding O'[..., u] @ Delta^T) and the applied edit (W_out[:, u] += Delta) compute the same thing,
    and the fitted edit lowers p(k) at the fitting samples' target position."""
    from knexp.editing.fit import fit_data, with_columns
    from knexp.editing.forcing import last_logits
    from knexp.editing.sets import by_layer

    adapter = tiny_adapter("embedded", layers=2)
    k = catalog["banana"]
    images = _images(adapter, 3)
    samples = [(im, adapter.caption_prefix + " a banana") for im in images[:2]]
    data = fit_data(adapter, k, samples, [(images[2], adapter.caption_prefix + " a cat")], ["hello there"], batch=4,
                    max_new_tokens=8)
    goal = Erase(k).goal_ids(adapter)

    def p_goal():
        with torch.no_grad():
            return float(torch.softmax(last_logits(adapter, data.samples[0]), -1)[:, goal].sum(-1).mean())

    before, weights = p_goal(), _weights(adapter)
    neurons = _set([0] * 12 + [1] * 12, list(range(12)) * 2)
    # the tiny O' are ~0.005: no penalty
    rule = Optimized(steps=30, lr=1.0, kl_weight=0.0, norm_weight=0.0, target_prob=1e-4)
    edit = rule.make(adapter, neurons, Erase(k), data)
    # fitting left W alone
    assert all(torch.equal(a, b) for a, b in zip(weights, adapter.model.parameters(), strict=True))
    with with_columns(adapter, {d.layer: d.delta for d in edit.deltas}, by_layer(neurons)):
        hooked = p_goal()
    with applied(adapter, edit):
        after = p_goal()
    # a tiny random LM saturates near 0.68x (its final norm caps the change)
    assert after < 0.75 * before, (before, after)
    assert abs(after - hooked) < 1e-6 * max(1.0, before)
    assert set(edit.layers) == {0, 1} and edit.at(1).delta.shape == (adapter.down_proj(1).out_features, 12)


def test_an_edit_file_round_trips_and_a_foreign_or_broken_file_is_refused_in_one_line(tmp_path, catalog):
    adapter = tiny_adapter("embedded", layers=2)
    edit = Kn().make(adapter, _set([0, 1], [4, 9]), Erase(catalog["banana"]), None)
    edit.provenance.update(rule="kn", knowledge="banana")
    path = save(edit, tmp_path / "e.safetensors", adapter, "model-a")
    back = load(path, adapter, "model-a")
    assert back.digest() == edit.digest() and back.provenance["knowledge"] == "banana"
    with pytest.raises(EditFileError, match="made for another model"):
        load(path, adapter, "model-b")
    with pytest.raises(EditFileError, match="shape"):
        load(path, tiny_adapter("embedded", layers=3), "model-a")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(EditFileError, match="not a knexp edit file"):
        load(tmp_path / "bad.safetensors", adapter, "model-a")
    for err in (pytest.raises(EditFileError, match="no such file"),):
        with err:
            load(tmp_path / "missing.safetensors", adapter, "model-a")


@pytest.mark.parametrize("fault, found", [
    ("nan", "NaN or Inf"), ("unit out of range", "outside 0..63"), ("repeated unit", "not distinct"),
    ("wrong width", r"its delta is \(32, 3\)"), ("layer out of range", "layer 7 is outside"),
    ("unknown tensor", "no edit writes"), ("old format", "another version of knexp"),
])
def test_a_damaged_edit_file_is_refused_whole_before_anything_is_applied(tmp_path, catalog, fault, found):
    """Every tensor is checked against the model and the file's own names before the edit is applied: a fault is one
    ``EditFileError`` line naming the file and the fault, and the model's weights are untouched."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adapter = tiny_adapter("embedded", layers=2)
    edit = Kn().make(adapter, _set([0, 1, 1], [4, 9, 11]), Erase(catalog["banana"]), None)
    path = save(edit, tmp_path / "e.safetensors", adapter, "model-a")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["knexp_edit"])
    tensors = load_file(str(path))
    if fault == "nan":
        tensors["1.down_proj.delta"][0, 0] = float("nan")
    elif fault == "unit out of range":
        tensors["1.down_proj.columns"][0] = 64
    elif fault == "repeated unit":
        tensors["1.down_proj.columns"][1] = tensors["1.down_proj.columns"][0]
    elif fault == "wrong width":
        tensors["1.down_proj.delta"] = torch.zeros(32, 3)
    elif fault == "layer out of range":
        tensors["7.down_proj.delta"] = tensors.pop("1.down_proj.delta")
        tensors["7.down_proj.columns"] = tensors.pop("1.down_proj.columns")
    elif fault == "unknown tensor":
        tensors["1.units"] = torch.tensor([4])
    else:
        meta.pop("format")
    save_file(tensors, str(path), metadata={"knexp_edit": json.dumps(meta)})
    before = _weights(adapter)
    with pytest.raises(EditFileError, match=found) as err:
        load(path, adapter, "model-a")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, adapter.model.parameters(), strict=True))


def test_an_edit_of_rows_and_of_a_whole_matrix_applies_and_restores_bit_for_bit(tmp_path):
    """The file format holds ``gate_proj``/``up_proj`` rows and whole matrices beside ``down_proj`` columns: each
    round-trips through a file, changes exactly its part of the weights, and is undone bit for bit."""
    adapter = tiny_adapter("embedded", layers=2)
    gate, down = adapter.ffn_linear(0, "gate_proj"), adapter.ffn_linear(1, "down_proj")
    rows = torch.tensor([2, 5])
    edit = WeightEdit([LayerDelta(0, "gate_proj", "rows", torch.randn(2, gate.in_features), rows),
                       LayerDelta(1, "down_proj", "whole", torch.randn_like(down.weight))])
    back = load(save(edit, tmp_path / "rows.safetensors", adapter, "m"), adapter, "m")
    assert back.digest() == edit.digest() and edit.units_changed == 2 + adapter.d_ff
    before, gate_before, down_before = _weights(adapter), gate.weight.clone(), down.weight.clone()
    with applied(adapter, back):
        assert torch.equal(gate.weight[rows], gate_before[rows] + edit.at(0, "gate_proj").delta)
        others = [i for i in range(gate.out_features) if i not in rows.tolist()]
        assert torch.equal(gate.weight[others], gate_before[others])
        assert torch.equal(down.weight, down_before + edit.at(1).delta)
    assert all(torch.equal(a, b) for a, b in zip(before, adapter.model.parameters(), strict=True))


def test_the_banned_filter_never_emits_a_banned_token_and_is_removed_after(tiny):
    images = _images(tiny)
    with torch.no_grad():
        free = tiny.prepare(images)
        # the first token it would emit
        ids = tiny.forward(free, positions=free.last_position[:1])[:, -1].argmax(-1).tolist()
        with banned(tiny, ids):
            caps = tiny.caption(images, max_new_tokens=5)
            first = tiny.forward(free, positions=free.last_position[:1])[:, -1].argmax(-1).tolist()
        again = tiny.forward(free, positions=free.last_position[:1])[:, -1].argmax(-1).tolist()
    assert not set(first) & set(ids) and again == ids
    for caption in caps:
        body = tiny.tokenize(caption[len(tiny.caption_prefix):]) if caption.startswith(tiny.caption_prefix) else []
        assert not set(body) & set(ids) or len(set(ids)) == 0


def test_text_logits_are_the_lms_own_after_the_text_alone(tiny):
    decoder, head = tiny.language_model()
    ids = tiny.tokenizer("the image shows a cat")["input_ids"]
    with torch.no_grad():
        direct = head(decoder(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state)[0, -1].float()
        batch = tiny.text_logits(["the image shows a cat", "a"])
    torch.testing.assert_close(batch[0], direct, rtol=1e-5, atol=1e-5)


def test_another_question_changes_the_prompt_and_the_default_does_not(tiny):
    images = _images(tiny, 1)
    own = tiny.prepare(images)
    asked = tiny.prepare(images, question="is there a dog here?")
    assert not torch.equal(own.input_ids[:, -own.input_ids.shape[1]:], asked.input_ids[:, -own.input_ids.shape[1]:]) \
        or own.input_ids.shape != asked.input_ids.shape
    assert torch.equal(tiny.prepare(images, question=None).input_ids, own.input_ids)


def test_the_consensus_set_ranks_neurons_found_on_more_samples_first():
    class Stats:
        shape = (2, 16)
        act_mean = torch.arange(32, dtype=torch.float32).reshape(2, 16) - 20  # negative except (1, 4..15)

    class Method:
        name = "stub"

        def __init__(self, ranked):
            self._ranked = iter(ranked)

        def ranked(self, stats, rule, context, n, d_ff):
            return next(self._ranked)

    class Result:
        stats = Stats()

    class Found:
        results = [Result(), Result()]
        context = None

    found = Found()
    found.method = Method([_set([0, 1, 1], [5, 2, 3]), _set([1, 0, 0], [3, 7, 8])])
    chosen = object_set(found, rule=None, size=3)
    assert list(zip(chosen.layers.tolist(), chosen.units.tolist(), strict=True)) == [(1, 3), (0, 5), (0, 7)]
    assert chosen.info["act_mean"] == [-1.0, -15.0, -13.0]  # mean_p O'_o of each, for the kn rule's sign


def test_random_controls_match_the_layers_and_avoid_the_set():
    neurons = _set([0, 0, 2], [1, 2, 3])
    control = disjoint_random(neurons, d_ff=8, seed=0)
    assert sorted(control.layers.tolist()) == [0, 0, 2]
    assert not neurons.pairs() & control.pairs()
    assert disjoint_random(neurons, 8, 0).pairs() == control.pairs()  # seeded
    columns = random_columns(5, num_layers=3, d_ff=8, seed=1)
    assert len(columns.pairs()) == 5 and columns.layers.max() < 3 and columns.units.max() < 8


# ---- through run.py on the tiny model of every adapter
# ----------------------------------------------------------------
SETUPS = {
    "llava": ("cell_phone", 60, 0), "qwen2_5_vl": ("cell_phone", 60, 0), "qwen2_vl": ("pizza", 60, 0),
    "qwen3_vl": ("bear", 60, 0),
    "gemma3": ("pizza", 60, 0), "llava_next": ("suitcase", 60, 2), "llava_onevision": ("horse", 60, 0),
    "idefics3": ("horse", 60, 0), "smolvlm": ("horse", 60, 0), "internvl": ("bear", 150, 1),
}


def _edit_job(family: str, tmp_path, *extra: str):
    knowledge, scenes, seed = SETUPS[family]
    return run_py("task=edit", f"model=tiny_{family}", f"model.seed={seed}", f"knowledge={knowledge}",
                  f"data.num_images={scenes}",
                  "thresholds.n=20", "thresholds.layers=nonzero", "task.k_images=1", "task.other_images=2",
                  "edit.size=8",
                  # a tiny model's live window may be empty: attribution (the default) would find nothing
                  "edit.source=ours",
                  "edit.fit_other=1", "edit/rule=optimized", "edit.rule.steps=3", "logger=none", "num_threads=1",
                  f"data.root={tmp_path}/tw", f"paths.cache_dir={tmp_path}/cache", *extra, timeout=300)


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_task_edit_runs_on_a_family_and_its_file_reloads_to_the_same_captions(family, tmp_path):
    r = _edit_job(family, tmp_path, f"hydra.run.dir={tmp_path}/job")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert metrics["status"]["state"] == "ok"
    assert set(metrics["variants"]) == {"unedited", "edit", "random", "finetune", "rank_one", "banned"}
    edit = metrics["variants"]["edit"]
    assert edit["cost"]["neurons"] == 8 and edit["cost"]["parameters_changed"] > 0 and edit["reliability_n"] > 0
    assert metrics["variants"]["unedited"]["reliability"] == 0.0  # the identification captions name k
    general = edit["general"]  # the guard: images that show no edited object, and 102 prompts
    assert general["images"] > 0 and general["texts"]["prompts"] >= 100
    assert metrics["variants"]["unedited"]["general"]["texts"]["top1"] == 1.0
    if family != "llava":
        return
    # the saved edit, loaded by model.edit with no hook attached, captions as the in-memory edit did
    import pandas as pd

    from knexp.job.session import session

    path = tmp_path / "job" / "edit.safetensors"
    s = session(f"model=tiny_{family}", f"model.edit={path}", f"data.num_images={SETUPS[family][1]}",
                f"data.root={tmp_path}/tw",
                f"paths.cache_dir={tmp_path}/cache2", "thresholds.n=20", output_dir=tmp_path / "api")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in s.adapter.model.modules())
    table = pd.read_csv(tmp_path / "job" / "edit_captions.csv").fillna("")
    ident = json.loads((tmp_path / "job" / "selection.json").read_text())
    ids = [c["image_id"] for c in ident["accepted"]]
    reloaded = s.caption([s.data.load_image(i) for i in ids])
    assert reloaded == table[(table.variant == "edit") & (table.group == "ident")]["caption"].tolist()


def test_a_foreign_edit_file_exits_1_with_one_line(tmp_path):
    r = _edit_job("llava", tmp_path, f"hydra.run.dir={tmp_path}/job")
    assert r.returncode == 0, r.stderr[-2000:]
    other = run_py("task=identify", "model=tiny_qwen2_vl", f"model.edit={tmp_path}/job/edit.safetensors", "logger=none",
                   f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/other", timeout=120)
    lines = [line for line in other.stderr.splitlines() if line.strip()]
    assert other.returncode == 1 and len(lines) == 1 and "another model" in lines[0], other.stderr[-2000:]
    missing = run_py("task=identify", "model=tiny_llava", f"model.edit={tmp_path}/nothing.safetensors", "logger=none",
                     f"paths.cache_dir={tmp_path}/cache3", f"hydra.run.dir={tmp_path}/missing", timeout=120)
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.returncode == 1 and len(lines) == 1, missing.stderr[-2000:]
    assert lines[0].startswith("knexp: error: model.edit="), missing.stderr[-2000:]
    assert not (tmp_path / "cache3").exists()  # refused before anything was computed


@pytest.mark.parametrize("fault, found", [("nan", "NaN or Inf"), ("unit out of range", "outside 0..")])
def test_a_damaged_edit_file_stops_run_py_with_one_line_before_any_model_pass(tmp_path, fault, found):
    """An edit file made for this very model but damaged after (a NaN in a delta, a unit index past the FFN's width)
    stops the job with one line naming the file and the fault, and no caption is computed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from knexp.job.session import session

    common = ["model=tiny_llava", "logger=none", f"paths.cache_dir={tmp_path}/cache"]
    s = session(*common, output_dir=tmp_path / "api")
    path = save(Zero().make(s.adapter, _set([0, 1], [3, 5]), None, None), tmp_path / "e.safetensors", s.adapter,
                s.resources.model_key)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    if fault == "nan":
        tensors["1.down_proj.delta"][0, 0] = float("nan")
    else:
        tensors["1.down_proj.columns"][0] = 10_000
    save_file(tensors, str(path), metadata=meta)
    r = run_py("task=identify", *common, f"model.edit={path}", f"data.root={tmp_path}/tw", "data.num_images=60",
               f"hydra.run.dir={tmp_path}/job", timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert str(path) in lines[0] and found in lines[0], lines[0]
    assert not (tmp_path / "cache" / "captions").exists()  # refused before the model captioned anything


def test_session_edit_changes_the_model_for_the_block_only(tmp_path):
    """``Session.edit`` through the Python API: the consensus set's columns changed inside, the weights bit-identical
    after."""
    from knexp.job.session import session

    knowledge, scenes, seed = SETUPS["llava"]
    s = session("model=tiny_llava", f"model.seed={seed}", f"knowledge={knowledge}", f"data.num_images={scenes}",
                "thresholds.n=20",
                "thresholds.layers=nonzero", "logger=none", f"data.root={tmp_path}/tw",
                f"paths.cache_dir={tmp_path}/cache", output_dir=tmp_path / "api")
    found = s.identify()
    assert found.results
    before = _weights(s.adapter)
    with s.edit(found, rule="zero", size=6) as edit:
        assert edit.units_changed == 6
        for d in edit.deltas:
            assert bool((s.adapter.down_proj(d.layer).weight[:, d.index] == 0).all())
        assert edit.provenance["rule"] == "zero" and edit.provenance["knowledge"] == found.knowledge
    assert all(torch.equal(a, b) for a, b in zip(before, s.adapter.model.parameters(), strict=True))
    with s.edit(found, op="swap", rule="kn", size=6) as edit:  # k's partner in its supercategory
        assert edit.provenance["replacement"] == "keyboard" and edit.provenance["rule"] == "kn"
    assert all(torch.equal(a, b) for a, b in zip(before, s.adapter.model.parameters(), strict=True))


def test_the_rank_one_update_maps_the_objects_key_to_the_learned_value(catalog):
    """W' k* = W k* + delta* (u . k* = 1) and the update is rank one."""
    from knexp.editing.rank_one import RankOne, RankOneData

    adapter = tiny_adapter("embedded", layers=2)
    k = catalog["banana"]
    images = _images(adapter, 6)
    mask = np.zeros((224, 224), bool)
    mask[60:160, 60:160] = True
    patches = adapter.geometry.object_tokens(mask)
    assert 0 < len(patches) < len(adapter.geometry)
    samples = [adapter.prepare([im], continuations=[" a"]) for im in images[:2]]
    rule = RankOne(steps=20, lr=0.5, norm_weight=0.0, covariance_images=4, target_prob=1e-6)  # a tiny LM gives k 0.013
    # layer 0: the last layer's output at the image positions feeds nothing the last position reads
    edit = rule.make(adapter, 0, Erase(k), RankOneData(samples, [patches, patches], images[2:]), batch=4)
    update = edit.at(0).delta  # [d_model, d_f]
    assert torch.linalg.matrix_rank(update).item() == 1 and edit.provenance["delta_norm"] > 0
    key, _ = rule._key_and_covariance(adapter, 0, RankOneData(samples, [patches, patches], images[2:]), 4)
    delta_dir = update @ key  # = delta*, since u . k* = 1
    assert abs(float(delta_dir.norm()) - edit.provenance["delta_norm"]) < 1e-3 * max(1.0, edit.provenance["delta_norm"])
    # where the update's other tokens take it is the baseline's business (measured by task=edit), not checked here


def test_the_report_averages_edit_jobs_over_objects_with_bootstrap_intervals(tmp_path):
    from knexp.reporting.sweep import write_report

    def job(name, knowledge, reliability, s_re, steps=1):
        folder = tmp_path / "sweep" / name
        folder.mkdir(parents=True)
        variant = {"reliability": reliability, "reliability_n": 3 if knowledge == "banana" else 1,
                   "m_generality": reliability / 2,
                   "t_generality": {"what": 0.5, "yes_no": None, "mean": 0.5},
                   "m_locality": {"S_re": s_re, "top1": 0.9}, "t_locality": {"other": {"top1": 1.0, "kl": 0.01}},
                   "general": {"bertscore_f1": s_re, "mentions_kept": 1.0, "texts": {"top1": 0.99, "kl": 0.01}},
                   "fluency": {"ngram_entropy": 3.0, "repetition": 0.0},
                   "cost": {"relative_norm": 0.01, "seconds": 0.1, "steps_run": steps}}
        unedited = {**variant, "reliability": 0.0}
        metrics = {"task": "edit", "model": "embedded", "knowledge": knowledge, "method": "ours", "rule": "zero",
                   "op": "erase", "size": 30, "replacement": None, "variants": {"edit": variant, "unedited": unedited}}
        (folder / "metrics.json").write_text(json.dumps(metrics))

    job("0", "banana", 1.0, 0.8)
    job("1", "cake", 0.5, 1.0, steps=12)
    job("2", "pizza", 0.0, 1.0)
    report = write_report(tmp_path / "sweep", tmp_path / "report", {"tuning": ["pizza"], "heldout": ["banana", "cake"]})
    table = report.tables["edit_summary"]
    held = table.loc[("heldout", "erase", "ours", "zero", 30, "edit")]
    assert held["objects"] == 2 and held["reliability"] == pytest.approx(0.75)
    assert held["m_loc_S_re"] == pytest.approx(0.9) and held["general_bertscore"] == pytest.approx(0.9)
    assert held["one_step"] == pytest.approx(0.5) and held["steps_run"] == pytest.approx(6.5)  # fits of 1 and 12 steps
    # pooled over the inputs: 3 of 3 (banana) and 0.5 of 1 (cake) -> 3.5 / 4, half-width 1.96 sqrt(p (1 - p) / 4)
    assert held["reliability_n"] == 4 and held["reliability_hw"] == pytest.approx(1.96 * (0.875 * 0.125 / 4) ** 0.5)
    assert 0.5 <= held["reliability_lo"] <= held["reliability"] <= held["reliability_hi"] <= 1.0
    assert table.loc[("tuning", "erase", "ours", "zero", 30, "edit")]["reliability"] == 0.0  # the splits never mix
    text = report.markdown.read_text()
    assert "Editing (task=edit)" in text and "0.750 [0.50, 1.00]" in text
    assert (tmp_path / "report" / "edit_rows.csv").exists()


def test_edit_files_compose_in_the_order_they_were_made_and_a_wrong_list_is_refused(tmp_path):
    """b made on the model that a gives: model.edit=[a, b] applies both (each column moved by its own delta); [b, a]
    and [b] alone are refused in one line that names the entry and asks for the order they were made in, also
    through run.py, before anything is computed."""
    from knexp.job.session import session
    from knexp.models.registry import file_hash, model_identity

    _, scenes, seed = SETUPS["llava"]
    common = ["model=tiny_llava", f"model.seed={seed}", f"data.num_images={scenes}", "logger=none",
              f"data.root={tmp_path}/tw", f"paths.cache_dir={tmp_path}/cache"]
    base = session(*common, output_dir=tmp_path / "base")
    adapter = base.adapter
    before = [adapter.down_proj(layer).weight.detach().clone() for layer in (0, 1)]
    g = torch.Generator().manual_seed(0)
    a = WeightEdit([LayerDelta.columns(0, torch.tensor([1, 2]), torch.randn(before[0].shape[0], 2, generator=g))])
    b = WeightEdit([LayerDelta.columns(1, torch.tensor([2, 5]), torch.randn(before[1].shape[0], 2, generator=g))])
    path_a, path_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save(a, path_a, adapter, base.resources.model_key)
    save(b, path_b, adapter, model_identity({**base.spec.model, "edit": str(path_a)}), [file_hash(path_a)])
    both = session(*common, f"model.edit=[{path_a},{path_b}]", output_dir=tmp_path / "both").adapter
    expected = [w.clone() for w in before]
    expected[0][:, [1, 2]] += a.deltas[0].delta
    expected[1][:, [2, 5]] += b.deltas[0].delta
    for layer in (0, 1):
        torch.testing.assert_close(both.down_proj(layer).weight, expected[layer])
    for wrong, entry in (([path_b, path_a], "model.edit[0]"), ([path_b], "model.edit[0]")):
        with pytest.raises(EditFileError) as caught:
            _ = session(*common, f"model.edit=[{','.join(map(str, wrong))}]", output_dir=tmp_path / "wrong").adapter
        message = str(caught.value)
        assert message.startswith(entry) and "made after 1 other edit file" in message
        assert "in the order they were made" in message and "\n" not in message
    r = run_py("task=identify", *common[:-1], f"paths.cache_dir={tmp_path}/cache2", f"model.edit=[{path_b}]",
               f"hydra.run.dir={tmp_path}/job", timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "in the order they were made" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "cache2").exists()
