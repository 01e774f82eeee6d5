"""Fig. 3, measured (knexp.evaluation.fig3): each method's maps and their layer-matched random counterparts, scored
against the object's tokens; the set's map; the numbers recomputed independently on a tiny model."""

import numpy as np
import pytest

from knexp.evaluation.fig3 import MAPS, Scored, counterpart, localize, map_measures, signs_of, summary, weights_of
from knexp.evaluation.localization import localization, set_map, zscored
from knexp.identification.methods import NeuronSet


def _set(layers, units, scores=None, method="pan", variant="paper") -> NeuronSet:
    n = len(units)
    return NeuronSet(method, variant, np.array(layers, np.int64), np.array(units, np.int64),
                     np.array(scores if scores is not None else np.arange(n, 0, -1), np.float64))


def test_the_set_map_z_scores_each_neuron_so_that_scale_does_not_weigh():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=49), rng.normal(size=49)
    assert set_map(np.stack([a, 1000 * b]), np.array([0.5, 0.5])) == pytest.approx((zscored(a) + zscored(b)) / 2)
    assert zscored(np.full(49, 3.0)).tolist() == [0.0] * 49  # a constant map adds nothing
    assert zscored(a).mean() == pytest.approx(0) and zscored(a).std() == pytest.approx(1)


def test_weights_signs_and_the_random_counterpart():
    ranked = _set([2, 2, 5], [7, 9, 3], scores=[3.0, 1.0, -2.0])
    assert weights_of(ranked, ranked=True).tolist() == [0.75, 0.25, 0.0]  # scores clipped at 0, summing to 1
    assert weights_of(ranked, ranked=False).tolist() == pytest.approx([1 / 3] * 3)  # consensus sets: uniform
    assert weights_of(_set([1, 1], [0, 1], method="ours"), ranked=True).tolist() == [0.5, 0.5]  # thresholded
    assert signs_of(np.array([-0.5, 0.0, 0.2])).tolist() == [1, 1, -1]  # the change O'_o - O'_i = -shift
    control = counterpart(ranked, d_ff=12, rng=np.random.default_rng(1))
    assert control.layers.tolist() == [2, 2, 5]  # rank by rank, the same layer
    assert not control.pairs() & ranked.pairs() and len(control.pairs()) == 3


def test_a_neuron_that_fires_on_the_object_scores_one_and_the_set_map_follows_its_weights():
    p = 16
    inside = np.zeros(p, bool)
    inside[[5, 6, 9, 10]] = True
    on, off = inside.astype(np.float32), np.random.default_rng(2).normal(size=p).astype(np.float32)
    records = {3: np.stack([on, off, -on, off[::-1]], 1)}  # [P, d_ff]: unit 0 on the object, unit 2 off it
    finest = np.ones(p, bool)
    good = Scored(_set([3, 3], [0, 1]), np.array([1, 1]), np.array([1.0, 0.0]))
    scored = map_measures(records, good, inside, finest)
    assert scored["top"] == {"pointing": 1.0, "area_iou": 1.0, "auc": 1.0}
    assert scored["set"] == {"pointing": 1.0, "area_iou": 1.0, "auc": 1.0}  # all weight on unit 0
    assert scored["top10"]["auc"] == pytest.approx((1.0 + localization(off, inside)["auc"]) / 2)
    flipped = Scored(_set([3], [2]), np.array([-1]), np.array([1.0]))  # falls on the object: its sign turns it round
    assert map_measures(records, flipped, inside, finest)["top"]["auc"] == 1.0


def test_localize_on_a_tiny_model_matches_an_independent_recomputation(tmp_path):
    from test_selection import _coco, script_captions
    from test_session import _session

    from knexp.reporting.figures import token_values

    _coco(tmp_path / "data", {i: [(6, (8 * i, 10, 40, 40))] for i in range(1, 5)})
    s = _session(tmp_path, "model=tiny_minigpt4", "knowledge=bus", "data=coco2017", f"data.root={tmp_path}/data",
                 "data.split=val", "data.image_dir=val", "data.per_knowledge=2", "thresholds=budget",
                 "thresholds.n=6", "thresholds.layers=nonzero")
    script_captions(s)
    founds = [s.identify(method="ours"), s.identify(method="pan")]
    seen = {r.candidate.image_id for r in founds[0].results}
    heldout = [i for i in range(1, 5) if i not in seen][:1]
    rows = localize(s.adapter, s.data, founds, s.spec.rule, heldout, 6, seed=0)
    assert set(rows["map"]) == set(MAPS) and set(rows["neurons"]) == {"method", "random"}
    assert set(rows["images"]) == {"identification", "held-out"} and set(rows["method"]) == {"ours", "pan"}
    # the top neuron's map on the first identification image, recomputed from the heatmap's own token values
    res = founds[1].results[0]
    layer, unit, image_id = int(res.neurons.layers[0]), int(res.neurons.units[0]), res.candidate.image_id
    sign = 1 if float(res.stats.shift_mean[layer, unit]) <= 0 else -1
    values = sign * token_values(s.adapter, s.data.load_image(image_id), layer, unit)
    inside = np.zeros(len(values), bool)
    inside[s.adapter.geometry.object_tokens(s.data.object_mask(image_id, 6))] = True
    no_clock = s.data.object_mask(image_id, 85)  # no instance: an empty mask at the image's size
    assert no_clock.shape == (96, 96) and not no_clock.any()
    finest = s.adapter.geometry.finest
    row = rows[(rows.method == "pan") & (rows.neurons == "method") & (rows["map"] == "top")
               & (rows.image_id == image_id) & (rows.images == "identification")].iloc[0]
    expected = localization(values[finest], inside[finest])
    assert {k: row[k] for k in expected} == pytest.approx(expected)
    assert row["chance_auc"] == 0.5 and row["chance_pointing"] == pytest.approx(inside[finest].mean())
    out = summary(rows)
    cell = out["pan"]["identification"]["top"]
    assert cell["n_images"] == 2 and set(cell) >= {"auc", "random_auc", "chance_auc"}
    assert out["ours"]["held-out"]["set"]["n_images"] == 1


def test_task_localize_writes_its_rows_and_means_resumes_and_refuses_an_unknown_method(tmp_path):
    import json

    import pandas as pd
    from test_selection import _coco, script_captions

    from knexp.job.compose import compose
    from knexp.job.session import build_job
    from knexp.settings import SettingError

    _coco(tmp_path / "data", {i: [(6, (8 * i, 10, 40, 40))] for i in range(1, 5)})
    common = [f"paths.cache_dir={tmp_path}/cache", "logger=none", "task=localize", "model=tiny_minigpt4"]
    task, s = build_job(compose(*common, "knowledge=bus", "task.methods=[ours,pan]", "task.k_images=1",
                                "data=coco2017", f"data.root={tmp_path}/data", "data.split=val", "data.image_dir=val",
                                "data.per_knowledge=2", "thresholds=budget", "thresholds.n=6",
                                "thresholds.layers=nonzero", output_dir=tmp_path / "job"))
    script_captions(s)
    metrics = task(s)
    out = s.spec.output_dir
    rows = pd.read_csv(out / "localization.csv")
    assert set(rows["method"]) == {"ours", "pan"} and set(rows["images"]) == {"identification", "held-out"}
    written = json.loads((out / "metrics.json").read_text())
    assert written["localization"] == json.loads(json.dumps(metrics["localization"]))
    held, seen = written["images"]["held-out"], written["images"]["identification"]
    assert len(held) == 1 and not set(held) & set(seen) and len(seen) == 2
    assert task(s) == json.loads((out / "done.json").read_text())["result"]  # finished: skipped on a rerun
    with pytest.raises(SettingError, match=r"task.methods='nope': names no yaml of method; the options are .*ours"):
        build_job(compose(*common, "task.methods=[ours,nope]", output_dir=tmp_path / "bad"))
