"""Fitting on what the user sees (knexp.editing.caption_stop) and the local rule's penalty (knexp.editing.local): the
forced captions' positions, the unlikelihood at every position against a one-row computation, the stop on regenerated
captions, and tr(Delta A Delta^T) against the mean squared change of the FFN output at the preserved positions."""

import json

import numpy as np
import torch
import torch.nn.functional as F
from conftest import run_py

from knexp.editing.caption_stop import CaptionWatch, forced_captions
from knexp.editing.fit import FitData, Penalty, fit_columns
from knexp.editing.forcing import forced_caption
from knexp.editing.preserved import second_moments
from knexp.editing.rules import Optimized
from knexp.editing.target import Erase, word_ids
from knexp.identification.methods import NeuronSet
from knexp.models.hooks.attach import everywhere
from knexp.models.tiny.tiny_vlm import tiny_adapter


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((224, 224, 3)) * 255).astype(np.uint8) for _ in range(n)]


def test_forced_captions_mark_the_positions_that_predict_each_captions_tokens():
    """In one padded batch, each row's marked positions are the one-row prompt's start - 1 .. T - 1 (forcing.py's
    ``forced_caption``), shifted to where the row sits, and the logits there agree with the one-row pass."""
    adapter = tiny_adapter("embedded", layers=2)
    images = _images(3)
    prefix = adapter.caption_prefix
    captions = [prefix + " a banana", prefix + " a cat on a long red sofa near a window", prefix]
    prepared, mask = forced_captions(adapter, images, captions)
    batch_logits = adapter.forward(prepared)  # [B, T, V]
    for row, (image, caption) in enumerate(zip(images, captions, strict=True)):
        one, start = forced_caption(adapter, image, caption)
        assert int(mask[row].sum()) == one.prompt_len - start + 1
        single = adapter.forward(one, positions=torch.arange(start - 1, one.prompt_len))[0]
        torch.testing.assert_close(batch_logits[row][mask[row]], single, atol=1e-4, rtol=1e-4)


def test_the_watch_loss_is_the_unlikelihood_of_k_at_every_caption_position(catalog):
    """The loss over the unedited caption and a current one that differs equals sum_t -log(1 - p_t(k)) over both
    captions' positions, each computed alone."""
    adapter = tiny_adapter("embedded", layers=2)
    k = Erase(catalog["banana"])
    images = _images(1)
    unedited, current = adapter.caption_prefix + " a banana", adapter.caption_prefix + " a cup and a banana"
    watch = CaptionWatch(images, [unedited], batch_size=4, max_new_tokens=4, current=[current])
    expected = 0.0
    for caption in (unedited, current):
        one, start = forced_caption(adapter, images[0], caption)
        logp = F.log_softmax(adapter.forward(one, positions=torch.arange(start - 1, one.prompt_len))[0], -1)
        p_k = logp[:, word_ids(adapter, k.knowledge)].exp().sum(-1)
        expected += float(-torch.log1p(-p_k).sum())
    assert abs(float(watch.loss(adapter, k)) - expected) < 1e-4 * max(1.0, expected)


class _Scripted:
    """Captions that name k until the ``clean``-th regeneration."""

    def __init__(self, clean: int, prefix: str):
        self.calls, self.clean, self.prefix = 0, clean, prefix

    def __call__(self, images, batch_size=16, max_new_tokens=32, **kwargs):
        self.calls += 1
        return [self.prefix + (" a plate" if self.calls >= self.clean else " a banana") for _ in images]


def test_a_fit_on_captions_stops_at_the_first_check_whose_captions_show_the_edit(monkeypatch, catalog):
    """Captions regenerated every 3 steps name k twice, then no more: the fit runs 9 steps, checks 3 times, and
    reports the target met; captions that never clean up run every step and report it not met. A watch left by an
    earlier fit (the edit's, before its random control's) starts again from the unedited captions."""
    adapter = tiny_adapter("embedded", layers=2)
    target = Erase(catalog["banana"])
    images = _images(2)
    neurons = NeuronSet("test", "", np.array([0, 1]), np.array([3, 5]), np.zeros(2))
    rule = Optimized(steps=12, lr=0.01, kl_weight=0.0, stop="captions", check_every=3)
    for clean, steps, met in ((3, 9, True), (99, 12, False)):
        monkeypatch.setattr(adapter, "caption", _Scripted(clean, adapter.caption_prefix))
        watch = CaptionWatch(images, [adapter.caption_prefix + " a banana"] * 2, 4, 4)
        watch.current, watch.checks = [adapter.caption_prefix + " a plate"] * 2, 7  # as another fit left them
        edit = fit_columns(adapter, neurons, target, FitData([], watch=watch), rule)
        assert (edit.provenance["steps_run"], edit.provenance["target_met"]) == (steps, met)
        assert edit.provenance["checks"] == (3 if met else 4)  # steps 3, 6, 9 (and 12, the last)


def test_the_penalty_is_the_mean_squared_change_of_the_ffn_output_at_preserved_positions():
    """tr(Delta A Delta^T), A the preserved second moment of the set's activations (site ffn), equals the mean over the
    preserved positions of ||Delta O_t[units]||^2; the penalty divides it by tr(W A W^T) and multiplies by lam."""
    adapter = tiny_adapter("embedded", layers=2)
    texts = ["the image shows a cat", "two plus two", "a red bus near a tree"]
    units = torch.tensor([2, 9, 17])
    moments = second_moments(adapter, texts, [1], site="ffn")
    seen = []
    with torch.no_grad(), everywhere(adapter, {("ffn", 1): lambda o: seen.append(o[0][:, units].double())}):
        for text in texts:
            adapter.text_logits([text])
    activations = torch.cat(seen)  # [n, U]
    assert moments.positions == len(activations)
    delta = torch.as_tensor(np.random.default_rng(1).standard_normal((adapter.down_proj(1).out_features, 3)))
    direct = float((activations @ delta.T).pow(2).sum(-1).mean())
    a = moments.second[1][units][:, units]
    assert abs(float(torch.trace(delta @ a @ delta.T)) - direct) < 1e-8 * direct
    w = adapter.down_proj(1).weight[:, units].double()
    value = Penalty({1: a}, 2.5)({1: delta}, {1: w})
    assert abs(float(value) - 2.5 * direct / float(torch.trace(w @ a @ w.T))) < 1e-6 * float(value)


def test_the_local_rule_through_run_py_stops_on_captions_and_reports_its_checks(tmp_path):
    """task=edit with edit/rule=local on a tiny model: the edit's provenance has the checks, the preserved positions
    (at least per_unit x d_ff) and the preserved activations' seconds apart; the cache holds them. The random control's
    fit runs no more steps than the edit's."""
    common = ["task=edit", "model=tiny_llava", "knowledge=cell_phone", "data.num_images=60", "thresholds.n=20",
              "thresholds.layers=nonzero", "task.k_images=1", "task.other_images=2", "edit.size=8",
              "edit.source=ours", "edit.fit_other=1", "edit.fit_k=2", "edit/rule=local", "edit.rule.steps=4",
              "edit.rule.check_every=1", "edit.rule.per_unit=0.5", "task.baselines=[random]", "logger=none",
              "num_threads=1", f"data.root={tmp_path}/tw", f"paths.cache_dir={tmp_path}/cache"]
    r = run_py(*common, f"hydra.run.dir={tmp_path}/job", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    cost = metrics["variants"]["edit"]["cost"]
    assert metrics["rule"] == "local" and cost["neurons"] == 8 and cost["prepare_seconds"] > 0
    assert cost["checks"] >= 1 and 0 <= cost["steps_run"] <= 4
    assert 1 <= metrics["variants"]["random"]["cost"]["steps_run"] <= max(cost["steps_run"], 1)
    assert len(list((tmp_path / "cache" / "preserved").glob("*.safetensors"))) >= 1
