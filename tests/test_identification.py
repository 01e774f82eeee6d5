"""Identification statistics and methods against direct computations of their formulas (tiny models)."""

import numpy as np
import pytest
import torch

from knexp.identification import methods as M
from knexp.identification.passes import SampleSkipped, TargetNotFound, compute_stats, locate_target
from knexp.identification.thresholds import (
    BudgetRule,
    LayerQuantileRule,
    PaperRule,
    QuantileRule,
    RuleContext,
    allowed_layers,
    stage1_score,
)
from knexp.models.hooks.record import record
from knexp.user_errors import ConfigError

CAPTION = "the image shows a bus and a clock."


@pytest.fixture(scope="module")
def sample(adapter, catalog, random_pair):
    original, inpainted = random_pair(adapter, 11)
    target = locate_target(adapter, CAPTION, adapter.caption_prefix, catalog["bus"])
    return original, inpainted, target, compute_stats(adapter, original, inpainted, target)


def _reference(adapter, original, inpainted, target):
    """Full [L, P, d_f] tensors from the generic recorder, and t*."""
    prep_i = adapter.prepare([inpainted], continuations=[target.context])
    prep_o = adapter.prepare([original], continuations=[target.context])
    with torch.no_grad(), record(adapter, prep_i) as rec_i:
        adapter.forward(prep_i)
    t_star = prep_o.prompt_len - 1
    with torch.enable_grad(), record(adapter, prep_o, with_grad=True) as rec_o:
        adapter.forward(prep_o)[0, t_star, target.token_id].backward()
    return rec_o.stacked()[:, 0], rec_i.stacked()[:, 0], rec_o.stacked("gradients")[:, 0], t_star


def test_target_is_the_first_token_of_the_first_mention(adapter, catalog):
    t = locate_target(adapter, CAPTION, adapter.caption_prefix, catalog["clock"])
    assert t.context == " a bus and a" and t.word == "clock"
    assert t.token_id == adapter.tokenize(" clock")[0]
    with pytest.raises(TargetNotFound, match="banana"):
        locate_target(adapter, CAPTION, adapter.caption_prefix, catalog["banana"])


def test_statistics_equal_their_formulas(adapter, sample):
    original, inpainted, target, stats = sample
    o, i, g, t_star = _reference(adapter, original, inpainted, target)
    assert stats.target_position == t_star and stats.shape == (adapter.num_layers, adapter.d_ff)
    torch.testing.assert_close(stats.diff_max, (o - i).amax(1))
    torch.testing.assert_close(stats.diff_absmax, (o - i).abs().amax(1))
    torch.testing.assert_close(stats.gradcam_max, (o * g).amax(1))
    torch.testing.assert_close(stats.gradcam_mean, (o * g).mean(1))
    torch.testing.assert_close(stats.act_mean, o.mean(1))
    torch.testing.assert_close(stats.act_std, o.std(1, correction=0))
    torch.testing.assert_close(stats.shift_mean, (i - o).mean(1))
    torch.testing.assert_close(stats.attribution, ((i - o) * g).sum(1))  # docs/method.md, "Attribution"
    assert torch.equal(stats.gradcam_argmax, (o * g).argmax(1))
    w_out = torch.stack([adapter.w_out(layer).float() for layer in range(adapter.num_layers)])
    full = adapter.unembedding().float() @ w_out
    # [L, V, d_f] -> row c
    torch.testing.assert_close(stats.wout_dot_wu, full[:, target.token_id], rtol=1e-4, atol=1e-5)
    # docs/method.md: the last layer's gradient at image positions is 0
    assert torch.count_nonzero(stats.gradcam_max[-1]) == 0


def test_pan_authors_variant_uses_act_fn_at_the_predicting_position(adapter, sample):
    original, _, target, stats = sample
    prep = adapter.prepare([original], continuations=[target.context])
    seen = {}
    hooks = [adapter.site("ffn_act", layer)[0].register_forward_hook(
        lambda m, a, out, layer=layer: seen.__setitem__(layer, out[0, -1])) for layer in range(adapter.num_layers)]
    try:
        with torch.no_grad():
            adapter.forward(prep)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(stats.actfn_last, torch.stack([seen[k] for k in sorted(seen)]).float())
    ranked = M.pan(stats, 5, "authors")
    ref = (stats.actfn_last * stats.wout_dot_wu).double()
    np.testing.assert_allclose(ranked.scores, torch.topk(ref.flatten(), 5).values.numpy())


def test_ours_keeps_only_stage1_candidates_and_matches_a_loop(sample):
    *_, stats = sample
    a = float(torch.quantile(stats.diff_max.flatten(), 0.9))
    g = float(torch.quantile(stats.gradcam_max.flatten(), 0.5))
    found = M.ours(stats, a, g)
    expected = {(layer, u) for layer in range(stats.shape[0]) for u in range(stats.shape[1])
                if stats.diff_max[layer, u] > a and stats.gradcam_max[layer, u] > g}
    assert found.pairs() == expected and len(found) > 0
    assert all(stats.diff_max[layer, u] > a for layer, u in found.pairs())
    assert found.info["stage1_size"] == int((stats.diff_max > a).sum())
    assert list(found.scores) == sorted(found.scores, reverse=True)


@pytest.mark.parametrize("method, variant, score", [
    ("stage1_only", None, lambda s: s.diff_max),
    ("stage2_only", None, lambda s: s.gradcam_max),
    ("schwettmann", "paper", lambda s: s.gradcam_mean),
    ("schwettmann", "authors", lambda s: s.gradcam_max),
    ("pan", "paper", lambda s: s.act_mean * s.wout_dot_wu),
])
def test_baselines_return_exactly_n_by_their_score(sample, method, variant, score):
    *_, stats = sample
    for n in (1, 7, 40):
        fn = getattr(M, method)
        found = fn(stats, n) if variant is None else fn(stats, n, variant)
        assert len(found) == n
        s = score(stats).double()
        top = torch.topk(s.flatten(), n).values
        np.testing.assert_allclose(found.scores, top.numpy())  # the n best values (ties broken by index)
        chosen = s[found.layers, found.units]
        assert (chosen >= top[-1]).all() and len(found.pairs()) == n
    authors = M.schwettmann(stats, 5, "authors")
    assert (authors.patches == stats.gradcam_argmax[authors.layers, authors.units].numpy()).all()


def test_empty_sets_say_why(sample):
    *_, stats = sample
    none = M.ours(stats, float("inf"), 0.0)
    assert none.empty and "threshold_a" in none.note
    assert M.pan(stats, 0).empty and "|N_k| = 0" in M.pan(stats, 0).note
    assert M.random_matched(none, stats.shape[1], seed=0).empty


def test_random_control_matches_layers(sample):
    *_, stats = sample
    ref = M.stage2_only(stats, 30)
    rnd = M.random_matched(ref, stats.shape[1], seed=3)
    assert rnd.per_layer(stats.shape[0]) == ref.per_layer(stats.shape[0])
    assert len(rnd.pairs()) == 30
    assert rnd.pairs() == M.random_matched(ref, stats.shape[1], seed=3).pairs()


def _reference_stats(stats, knowledge_names, seed=0):
    from knexp.identification.reference import ReferenceStats

    g = torch.Generator().manual_seed(seed)
    n_layers, d_ff = stats.shape
    std = torch.rand(n_layers, d_ff, generator=g) + 0.1
    diff = torch.randn(len(knowledge_names), n_layers, d_ff, generator=g)
    return ReferenceStats(torch.randn(n_layers, d_ff, generator=g), std, std.median(1).values, diff,
                          list(knowledge_names), [0])


def test_threshold_rules(sample):
    *_, stats = sample
    ctx = RuleContext("bus")
    paper = PaperRule(name="paper", per_knowledge={"bus": {"a": 1.5, "g": 0.0001}})
    ts = paper.apply(stats, ctx)
    assert torch.equal(ts.candidates, stats.diff_max > 1.5)
    assert torch.equal(ts.keep, ts.candidates & (stats.gradcam_max > 0.0001))
    assert M.from_two_stage(ts).pairs() == M.ours(stats, 1.5, 0.0001).pairs()
    with pytest.raises(ConfigError, match="quantile"):
        paper.apply(stats, RuleContext("clock"))
    q = QuantileRule(name="quantile", q_a=0.99, q_g=0.5, min_g=0.0, layers="all", stage1="raw")
    ts = q.apply(stats, ctx)
    n_c = int(ts.candidates.sum())
    assert abs(n_c - 0.01 * stats.diff_max.numel()) <= 2
    assert ts.info["threshold_a"] == pytest.approx(float(torch.quantile(stats.diff_max.flatten().double(), 0.99)))
    found = M.from_two_stage(ts)
    assert 0 < len(found) <= n_c and found.info["stage1_size"] == n_c


def test_layer_restrictions(sample):
    *_, stats = sample
    n = stats.shape[0]
    nonzero = allowed_layers(stats, "nonzero", RuleContext("bus"))
    assert not nonzero[-1] and nonzero[:-1].all()  # the last layer's gradient at image positions is 0
    live = allowed_layers(stats, "live", RuleContext("bus", live_layers=[0, n - 1]))
    assert live.tolist() == [True] + [False] * (n - 1)
    with pytest.raises(ConfigError, match="live window"):
        allowed_layers(stats, "live", RuleContext("bus"))
    with pytest.raises(SampleSkipped, match="no layer"):  # a sample-level cause: identification skips the sample
        allowed_layers(stats, "live", RuleContext("bus", live_layers=[n - 1]))


def test_layer_quantile_offers_each_allowed_layer_the_same_share(sample):
    *_, stats = sample
    rule = LayerQuantileRule(name="layer_quantile", q_a=0.9, q_g=0.5, min_g=0.0, layers="nonzero", stage1="raw")
    ts = rule.apply(stats, RuleContext("bus"))
    n, d = stats.shape
    for layer in range(n):
        if layer == n - 1:  # no gradient reaches the last layer's image positions: no candidates there
            expected = torch.zeros(d, dtype=bool)
        else:
            expected = stats.diff_max[layer] > torch.quantile(stats.diff_max[layer].double(), 0.9)
        assert torch.equal(ts.candidates[layer], expected)
    g = float(torch.quantile(stats.gradcam_max[ts.candidates].double(), 0.5))
    assert torch.equal(ts.keep, ts.candidates & (stats.gradcam_max > g))


@pytest.mark.parametrize("kind, second", [("raw", "max"), ("abs", "max"), ("spread", "max"), ("contrastive", "max"),
                                          ("abs", "mean")])
def test_budget_rule_keeps_n_of_the_top_candidates(sample, kind, second):
    *_, stats = sample
    ref = _reference_stats(stats, ["bus", "clock", "bear", "clock"])
    ctx = RuleContext("bus", reference=ref)
    others = ref.removal_diff[1:]
    score = {"raw": stats.diff_max, "abs": stats.diff_absmax, "spread": stats.diff_max / ref.std,
             "contrastive": (stats.diff_max - others.mean(0)) / others.std(0, correction=0)}[kind]
    torch.testing.assert_close(stage1_score(stats, kind, ctx), score)  # the bus removal is left out of bus's null
    rule = BudgetRule(name="budget", n=7, q_g=0.75, layers="nonzero", stage1=kind, stage2=second)
    ts = rule.apply(stats, ctx)
    n_layers, d = stats.shape
    inside = [(layer, u) for layer in range(n_layers - 1) for u in range(d)]
    cand = sorted(inside, key=lambda lu: -float(score[lu]))[:28]  # ceil(7 / (1 - 0.75))
    g = stats.gradcam_max if second == "max" else stats.gradcam_mean
    keep = sorted(cand, key=lambda lu: -float(g[lu]))[:7]
    assert {tuple(x) for x in ts.candidates.nonzero().tolist()} == set(cand)
    found = M.from_two_stage(ts)
    assert found.pairs() == set(keep) and len(found) == 7


def test_attribution_ranks_the_most_negative_first(sample):
    *_, stats = sample
    top = M.attribution(stats, n=9)
    np.testing.assert_allclose(top.scores, torch.topk(-stats.attribution.flatten().double(), 9).values.numpy())
    assert torch.equal(-stats.attribution[top.layers, top.units].double(), torch.as_tensor(top.scores))
    # nothing outside the set beats its last member
    assert int((-stats.attribution.double() > top.scores[-1]).sum()) == 8
    cut = float(-top.scores[4])  # a <= cut keeps exactly the 5 most negative (no ties at random values)
    thr = M.attribution(stats, threshold=-cut)
    assert thr.pairs() == {tuple(x) for x in (stats.attribution <= cut).nonzero().tolist()} and len(thr) == 5
    within = torch.zeros(stats.shape, dtype=torch.bool)
    within[0] = True
    assert set(M.attribution(stats, n=4, within=within).layers.tolist()) == {0}
    assert M.attribution(stats, threshold=1e9).empty
    with pytest.raises(ConfigError, match="either"):
        M.attribution(stats)


def test_the_passes_after_the_cached_prefix_give_the_full_passes_statistics(adapter, sample, monkeypatch):
    """``compute_stats`` runs its passes after the tokens before the image (``logits_after_prefix``: they come from the
    prefix cache); every statistic is the one the full passes give (the function swapped for ``Adapter.forward``)."""
    from knexp.identification import passes

    original, inpainted, target, stats = sample
    prep = adapter.prepare([original], continuations=[target.context])
    assert int(prep.image_positions[0, 0]) > 0  # there is a prefix to skip
    monkeypatch.setattr(passes, "logits_after_prefix", lambda a, prepared, positions,
                        recompute=False: a.forward(prepared, positions=positions))
    full = compute_stats(adapter, original, inpainted, target)
    assert full.target_position == stats.target_position
    for name in stats.TENSORS:
        torch.testing.assert_close(getattr(stats, name), getattr(full, name), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_cached_prefix_changes_no_statistic_on_the_embedded_model(catalog, monkeypatch):
    """On the embedded model (real weights, a toy-world scene and its inpainting), the passes after the cached prefix
    give every statistic of the full passes to float32 rounding (bit for bit on one CPU; within 3e-6 of the statistic's
    scale on another, where the attention's products over the cached prefix round differently), and the neurons that
    stage 1, stage 2 and the attribution rank first are the same."""
    from knexp.counterfactual.inpaint import inpaint, region_mask
    from knexp.data.toyworld.scenes import SceneOptions, make_scene
    from knexp.identification import passes
    from knexp.models.adapters.spliced import SplicedAdapter
    from knexp.models.zoo.embedded import load_embedded
    from knexp.paths import default_cache_dir, project_root

    adapter = SplicedAdapter(load_embedded(default_cache_dir(),
                                           project_root() / "knexp/models/weights/embedded_projector.safetensors"))
    scene = make_scene(catalog, np.random.default_rng([31, 5, 0]), SceneOptions(gap_px=8))
    obj = scene.objects[0]
    edited = inpaint(scene.image, region_mask(scene.image.shape[:2], bbox=obj.bbox, dilation=2), 3, "telea")
    target = locate_target(adapter, f"{adapter.caption_prefix} {obj.knowledge.indefinite}.", adapter.caption_prefix,
                           obj.knowledge)
    cached = compute_stats(adapter, scene.image, edited, target)
    monkeypatch.setattr(passes, "logits_after_prefix", lambda a, prepared, positions,
                        recompute=False: a.forward(prepared, positions=positions))
    full = compute_stats(adapter, scene.image, edited, target)
    for name in cached.TENSORS:
        a, b = getattr(cached, name), getattr(full, name)
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()), msg=name)
        else:
            assert torch.equal(a, b), name
    for name in ("diff_absmax", "gradcam_max", "attribution"):
        top = [set(torch.argsort(-getattr(s, name).flatten().double(), stable=True)[:1000].tolist())
               for s in (cached, full)]
        assert top[0] == top[1], name
