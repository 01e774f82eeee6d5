"""Reference statistics (knexp.identification.reference) against their formulas on full tensors (tiny model)."""

import numpy as np
import torch
from test_selection import _coco

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.evaluation.interventions import Mean, Noise
from knexp.evaluation.perturb import set_values
from knexp.identification.methods import NeuronSet
from knexp.identification.reference import ReferenceCache, compute_reference
from knexp.models.hooks.record import record
from knexp.models.tiny.tiny_vlm import tiny_adapter


def _acts(adapter, images):
    prepared = adapter.prepare(images)
    with torch.no_grad(), record(adapter, prepared) as rec:
        adapter.forward(prepared)
    return rec.stacked()  # [L, N, P, d_f]


def test_reference_statistics_equal_their_formulas(tmp_path, catalog):
    adapter = tiny_adapter("minigpt4", layers=3)
    data = _coco(tmp_path / "data", {i: [(6, (4 * i, 10, 30, 30)), (85, (60, 60, 20, 20))] for i in range(1, 6)})
    opts = InpaintOptions()
    ref = compute_reference(adapter, data, "t", catalog, opts, InpaintCache(None), images=4, removals=6, seed=0,
                            batch_size=3)
    images = [data.load_image(i) for i in ref.images]
    assert len(images) == 4
    o = _acts(adapter, images)  # [L, N, P, d_f]
    flat = o.permute(0, 3, 1, 2).flatten(2).double()  # [L, d_f, N * P]
    torch.testing.assert_close(ref.mean, flat.mean(-1).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ref.std, flat.std(-1, correction=0).float(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(ref.layer_spread, ref.std.median(dim=1).values)
    # 6 removals drawn from the 10 instances (5 buses, 5 clocks); the null of bus is over the clock removals only
    assert len(ref.removal_objects) == 6 and set(ref.removal_objects) == {"bus", "clock"}
    mean, std = ref.null_for("bus")
    clocks = [r for r, name in enumerate(ref.removal_objects) if name == "clock"]
    torch.testing.assert_close(mean, ref.removal_diff[clocks].mean(0))
    torch.testing.assert_close(std, ref.removal_diff[clocks].std(0, correction=0))


def test_removal_diff_is_max_over_positions_of_the_change(tmp_path, catalog):
    adapter = tiny_adapter("minigpt4", layers=3)
    data = _coco(tmp_path / "data", {1: [(6, (10, 10, 30, 30))], 2: [(85, (50, 50, 30, 30))]})
    opts = InpaintOptions(dilation=2)
    ref = compute_reference(adapter, data, "t", catalog, opts, InpaintCache(None), images=2, removals=2, seed=1)
    for r, name in enumerate(ref.removal_objects):
        image_id = 1 if name == "bus" else 2
        image = data.load_image(image_id)
        (inst,) = data.instances(image_id)
        edited = opts.apply(image, inst.bbox, data.instance_mask(inst.annotation_id))
        o, i = _acts(adapter, [image])[:, 0], _acts(adapter, [edited])[:, 0]  # [L, P, d_f]
        torch.testing.assert_close(ref.removal_diff[r], (o - i).amax(1), rtol=1e-4, atol=1e-5)


def test_reference_cache_round_trip_and_calibrated_noise_uses_layer_spreads(tmp_path, catalog):
    adapter = tiny_adapter("minigpt4", layers=3)
    data = _coco(tmp_path / "data", {i: [(6, (4 * i, 10, 30, 30))] for i in range(1, 4)})
    calls = []

    def compute():
        calls.append(1)
        return compute_reference(adapter, data, "t", catalog, InpaintOptions(), InpaintCache(None), images=3,
                                 removals=3, seed=0)

    first = ReferenceCache(tmp_path / "cache").get(["m", "t"], compute)
    again = ReferenceCache(tmp_path / "cache").get(["m", "t"], compute)
    assert len(calls) == 1 and torch.equal(first.std, again.std) and again.removal_objects == first.removal_objects
    neurons = NeuronSet("ours", "", np.array([0, 2, 2]), np.array([1, 5, 9]), np.zeros(3))
    values = set_values(Noise(levels=(8.0,), draws=1, scale="calibrated"), neurons, again)
    np.testing.assert_allclose(values.scale, again.layer_spread[[0, 2, 2]].numpy())
    mean = set_values(Mean(), neurons, again)
    np.testing.assert_allclose(mean.fixed, again.mean[[0, 2, 2], [1, 5, 9]].numpy())
