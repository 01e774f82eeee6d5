"""Identification statistics and methods against direct computations of their formulas (tiny models)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from knexp.identification import methods as M
from knexp.identification.passes import TargetNotFound, compute_stats, locate_target
from knexp.identification.thresholds import thresholds_for
from knexp.models.adapters.llava import LlavaAdapter
from knexp.models.adapters.spliced import SplicedAdapter
from knexp.models.hooks import record
from knexp.models.tiny import tiny_embedded, tiny_llava, tiny_minigpt4

CAPTION = "the image shows a bus and a clock."


@pytest.fixture(scope="module", params=["embedded", "llava", "minigpt4"])
def adapter(request):
    if request.param == "embedded":
        a = SplicedAdapter(tiny_embedded(layers=3))
    elif request.param == "minigpt4":
        a = SplicedAdapter(tiny_minigpt4(layers=3))
    else:
        a = LlavaAdapter(*tiny_llava(grid=4, layers=3), caption_prefix="the image shows")
    a.model.float()
    return a


def _pair(adapter):
    size = 60 if isinstance(adapter, LlavaAdapter) else 224
    rng = np.random.default_rng(11)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(2)]


@pytest.fixture(scope="module")
def sample(adapter, catalog):
    original, inpainted = _pair(adapter)
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
    torch.testing.assert_close(stats.gradcam_max, (o * g).amax(1))
    torch.testing.assert_close(stats.gradcam_mean, (o * g).mean(1))
    torch.testing.assert_close(stats.act_mean, o.mean(1))
    torch.testing.assert_close(stats.act_std, o.std(1, correction=0))
    assert torch.equal(stats.gradcam_argmax, (o * g).argmax(1))
    full = (adapter.unembedding().float() @ torch.stack([adapter.w_out(layer).float() for layer in range(adapter.num_layers)]))
    torch.testing.assert_close(stats.wout_dot_wu, full[:, target.token_id], rtol=1e-4, atol=1e-5)  # [L, V, d_f] -> row c
    assert torch.count_nonzero(stats.gradcam_max[-1]) == 0  # METHOD.md: the last layer's gradient at image positions is 0


def test_pan_authors_variant_uses_act_fn_at_the_predicting_position(adapter, sample):
    original, _, target, stats = sample
    prep = adapter.prepare([original], continuations=[target.context])
    seen = {}
    hooks = [adapter.ffn_act(layer).register_forward_hook(lambda m, a, out, layer=layer: seen.__setitem__(layer, out[0, -1]))
             for layer in range(adapter.num_layers)]
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


def test_threshold_rules(sample):
    *_, stats = sample
    paper = OmegaConf.create({"name": "paper", "per_knowledge": {"bus": {"a": 1.5, "g": 0.0001}}})
    assert thresholds_for(paper, "bus", stats) == (1.5, 0.0001)
    with pytest.raises(KeyError, match="quantile"):
        thresholds_for(paper, "clock", stats)
    q = OmegaConf.create({"name": "quantile", "q_a": 0.99, "q_g": 0.5, "min_g": 0.0})
    a, g = thresholds_for(q, "bus", stats)
    n_c = int((stats.diff_max > a).sum())
    assert abs(n_c - 0.01 * stats.diff_max.numel()) <= 2
    found = M.ours(stats, a, g)
    assert 0 < len(found) <= n_c
