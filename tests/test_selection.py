"""Sample selection under the three constraints, and the per-sample statistics cache."""

import json

import cv2
import numpy as np
import pytest
import torch

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.coco import CocoScenes
from knexp.identification import methods as M
from knexp.identification.passes import SampleSkipped
from knexp.identification.pipeline import identify_sample
from knexp.identification.selection import Candidate, Selector, select_samples
from knexp.identification.stats_cache import StatsCache
from knexp.identification.thresholds import QuantileRule
from knexp.models.adapters.spliced import SplicedAdapter
from knexp.models.captioning import Captioner
from knexp.models.tiny.tiny_models import tiny_embedded
from knexp.store import Store

RED = (230, 20, 20)


class RedSquareCaptioner:
    """Names the bus when red pixels are visible: a deterministic stand-in for a captioning model."""

    caption_prefix = "the image shows"

    def __call__(self, images, image_keys):
        red = [(np.abs(im.astype(int) - RED).sum(-1) < 30).sum() > 20 for im in images]
        return ["the image shows a bus." if shown else "the image shows an empty scene." for shown in red]


def script_captions(session):
    """Give a job's session the scripted captioner in place of its model's (as its stages see it); returns the
    session."""
    scripted = RedSquareCaptioner()
    scripted.adapter, scripted.model_key, scripted.store = session.adapter, "t", None
    scripted.batch_size, scripted.max_new_tokens = 8, 8
    scripted.decode_width = None
    session.resources.captioner = scripted
    return session


def _coco(tmp_path, boxes: dict[int, list[tuple[int, list[int]]]], missing: tuple[int, ...] = ()):
    """One 96 x 96 image per key, with (category, box) instances drawn as coloured squares."""
    (tmp_path / "val").mkdir(parents=True)
    images, anns = [], []
    for image_id, insts in boxes.items():
        img = np.full((96, 96, 3), 128, np.uint8)
        for cat, (x, y, w, h) in insts:
            img[y : y + h, x : x + w] = RED if cat == 6 else (20, 20, 230)
            poly = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "segmentation": [poly], "area": w * h, "iscrowd": 0})
        if image_id not in missing:
            cv2.imwrite(str(tmp_path / "val" / f"{image_id}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 96, "height": 96})
    cats = [{"id": 6, "name": "bus", "supercategory": "vehicle"},
            {"id": 85, "name": "clock", "supercategory": "indoor"}]
    coco = {"images": images, "annotations": anns, "categories": cats}
    (tmp_path / "instances_val.json").write_text(json.dumps(coco))
    return CocoScenes(tmp_path, "val")


def test_selection_applies_the_three_constraints_with_reasons(tmp_path, catalog):
    data = _coco(tmp_path, {
        1: [(6, (10, 10, 30, 30)), (85, (35, 35, 20, 20))],   # the clock overlaps the bus's box
        2: [(6, (10, 10, 30, 30)), (85, (60, 60, 20, 20))],   # clean
        3: [(6, (50, 10, 30, 30))],                           # clean
        4: [(6, (10, 10, 30, 30))],                           # image file missing
    }, missing=(4,))
    sel = select_samples(data, "t", RedSquareCaptioner(), catalog, catalog["bus"], per_knowledge=5, seed=0,
                         opts=InpaintOptions(dilation=2, radius=3), cache=InpaintCache(tmp_path / "cache"))
    reasons = {c.image_id: c.reason for c in sel.rejected}
    assert reasons[1].startswith("overlap") and "clock" in reasons[1]
    assert reasons[4].startswith("data: image") and "4.png" in reasons[4]
    assert {c.image_id for c in sel.accepted} == {2, 3}
    assert all(c.original_caption.endswith("bus.") and "bus" not in c.inpainted_caption for c in sel.accepted)
    assert "only 2 of 5" in sel.message and "continuing with 2" in sel.message


def test_selection_is_deterministic_and_stops_at_the_requested_number(tmp_path, catalog):
    data = _coco(tmp_path, {i: [(6, (10 + i, 10, 30, 30))] for i in range(1, 9)})
    kw = dict(per_knowledge=3, opts=InpaintOptions(dilation=2), cache=InpaintCache(None))
    a = select_samples(data, "t", RedSquareCaptioner(), catalog, catalog["bus"], seed=1, **kw)
    b = select_samples(data, "t", RedSquareCaptioner(), catalog, catalog["bus"], seed=1, **kw)
    c = select_samples(data, "t", RedSquareCaptioner(), catalog, catalog["bus"], seed=2, **kw)
    assert len(a.accepted) == 3 and [x.image_id for x in a.accepted] == [x.image_id for x in b.accepted]
    assert [x.image_id for x in a.accepted] != [x.image_id for x in c.accepted]


def test_first_gives_a_full_selections_first_samples_for_fewer_captions(tmp_path, catalog):
    """``Selector.first`` (the live window's trace) visits candidates in the same order but captions them
    ``SMALL_BATCH`` at a time, so it stops long before a full batch."""
    from knexp.identification.selection import SMALL_BATCH

    # 20 buses, every third one too small to be named in its caption (rejected by the caption constraint)
    boxes = {i: [(6, (10, 10, 30, 30) if i % 3 else (10, 10, 3, 3))] for i in range(1, 21)}
    data = _coco(tmp_path, boxes)

    class Counting(RedSquareCaptioner):
        batch_size = 16
        calls: list[int] = []

        def __call__(self, images, image_keys):
            self.calls.append(len(images))
            return super().__call__(images, image_keys)

    def selector(per_knowledge):
        return Selector(data, "t", catalog, Counting(), InpaintOptions(dilation=2), InpaintCache(None), per_knowledge,
                        seed=3)

    full = selector(3)(catalog["bus"])
    for n in (1, 2, 3):
        Counting.calls = []
        first = selector(3).first(catalog["bus"], n)
        assert [(c.image_id, c.original_caption, c.inpainted_caption) for c in first.accepted] == \
               [(c.image_id, c.original_caption, c.inpainted_caption) for c in full.accepted[:n]]
        assert max(Counting.calls) <= max(SMALL_BATCH, 2 * n) < 16  # never a full batch of candidates
    assert len(selector(1).first(catalog["bus"], 3).accepted) == 1  # no more than per_knowledge


def test_a_second_method_reuses_the_passes(tmp_path, catalog, monkeypatch):
    from knexp.identification import passes

    data = _coco(tmp_path, {1: [(6, (10, 10, 30, 30))]})
    adapter = SplicedAdapter(tiny_embedded(layers=3))
    adapter.model.float()
    calls = []
    real_pass = passes.logits_after_prefix  # compute_stats' passes
    monkeypatch.setattr(passes, "logits_after_prefix", lambda *args: calls.append(1) or real_pass(*args))
    cand = Candidate(1, 1, "bus", True, "", "the image shows a bus and a clock.", "the image shows a clock.")
    thresholds = QuantileRule(name="quantile", q_a=0.99, q_g=0.5, min_g=0.0)
    captioner = Captioner(adapter, "tiny", Store(None, "captions"))
    selector = Selector(data, "t", catalog, captioner, InpaintOptions(), InpaintCache(tmp_path / "c"), per_knowledge=1,
                        seed=0)
    args = (selector, cand, catalog["bus"])
    stats_cache = StatsCache(tmp_path / "c")
    ours = identify_sample(*args, stats_cache, thresholds, M.Ours(name="ours"))
    assert len(calls) == 2  # inpainted forward + original forward/backward
    pan = identify_sample(*args, stats_cache, thresholds, M.Pan(name="pan", variant="paper"))
    assert len(calls) == 2, "the second method ran a forward pass"
    assert len(pan.neurons) == len(ours.neurons) == len(ours.ours)
    fresh = StatsCache(tmp_path / "c")  # a new job: statistics come from disk
    again = identify_sample(*args, fresh, thresholds, M.Ours(name="ours"))
    assert len(calls) == 2 and fresh.loaded == 1 and fresh.computed == 0
    assert again.neurons.pairs() == ours.neurons.pairs()
    assert ours.neurons.spread is not None and len(ours.neurons.spread) == len(ours.neurons)
    from safetensors.torch import load_file, save_file

    for f in (tmp_path / "c" / "stats").glob("*.safetensors"):
        old = load_file(str(f))
        del old["act_std"]  # a file from before act_std existed
        save_file(old, str(f), metadata={"meta": '{"target_id": 0, "target_position": 0, "forward_passes": 2}'})
    older = StatsCache(tmp_path / "c")
    identify_sample(*args, older, thresholds, M.Ours(name="ours"))
    assert older.computed == 1 and len(calls) == 4
    for f in (tmp_path / "c" / "stats").glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])  # torn file
    torn = StatsCache(tmp_path / "c")
    identify_sample(*args, torn, thresholds, M.Ours(name="ours"))
    assert torn.computed == 1 and len(calls) == 6


def test_nan_statistics_are_reported(tmp_path, catalog):
    from knexp.identification.passes import SampleStats

    z = torch.zeros(2, 4)
    tensors = {name: z.clone() for name in SampleStats.TENSORS}
    tensors["gradcam_max"].fill_(float("nan"))
    tensors["gradcam_argmax"] = z.long()
    stats = SampleStats(**tensors, target_id=0, target_position=0)
    with pytest.raises(SampleSkipped, match="gradcam_max"):
        stats.check_finite()
