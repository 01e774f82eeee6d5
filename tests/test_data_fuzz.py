"""Fuzzing the data layer (hypothesis): random annotation JSON, mutated valid COCO files and corrupt image bytes.
Whatever the input, the data layer either works or raises knexp's documented DatasetError."""

import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knexp.data.coco import CocoScenes, DatasetError, ImageError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
FIELDS = ["id", "image_id", "category_id", "bbox", "area", "segmentation", "iscrowd", "file_name", "height", "width",
          "name", "caption"]


def _valid() -> dict:
    poly = [10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]
    return {"images": [{"id": 1, "file_name": "1.png", "height": 64, "width": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 6, "bbox": [10, 10, 30, 30], "area": 900.0,
                             "segmentation": [poly], "iscrowd": 0}],
            "categories": [{"id": 6, "name": "bus", "supercategory": "vehicle"}]}


@st.composite
def mutated_coco(draw):
    """A valid file with a few fields replaced by arbitrary JSON or removed."""
    data = _valid()
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(["images", "annotations", "categories"]))
        field = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            data[section][0][field] = draw(json_values)
        else:
            data[section][0].pop(field, None)
    return data


def _exercise(folder: Path, annotations, image_bytes: bytes | None = None) -> None:
    (folder / "val").mkdir(parents=True, exist_ok=True)
    (folder / "instances_val.json").write_text(annotations if isinstance(annotations, str) else json.dumps(annotations))
    if image_bytes is not None:
        (folder / "val" / "1.png").write_bytes(image_bytes)
    try:
        data = CocoScenes(folder, "val")
        for image_id in data.image_ids:
            for inst in data.instances(image_id):
                data.instance_mask(inst.annotation_id)
            data.category_ids(image_id)
            data.captions(image_id)
            try:
                data.load_image(image_id)
            except DatasetError:
                pass
    except DatasetError:
        pass  # the documented error; anything else fails the test


def _in_tmp(fn):
    folder = Path(tempfile.mkdtemp(prefix="knexp-fuzz-"))
    try:
        fn(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@FUZZ
@given(json_values)
def test_arbitrary_json_gives_dataset_error_or_works(value):
    _in_tmp(lambda f: _exercise(f, value))


@FUZZ
@given(mutated_coco())
def test_mutated_coco_gives_dataset_error_or_works(data):
    _in_tmp(lambda f: _exercise(f, data))


@FUZZ
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_garbage_annotation_files_give_dataset_error(raw):
    def run(folder):
        (folder / "val").mkdir(parents=True)
        path = folder / "instances_val.json"
        path.write_bytes(raw) if isinstance(raw, bytes) else path.write_text(raw)
        try:
            CocoScenes(folder, "val")
        except DatasetError:
            pass
    _in_tmp(run)


@FUZZ
@given(st.binary(max_size=2048), st.integers(0, 400))
def test_corrupt_or_truncated_images_give_dataset_error_or_an_image(noise, cut):
    ok, png = cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))
    for payload in (noise, png.tobytes()[:cut], png.tobytes()[:cut] + noise):
        _in_tmp(lambda f, p=payload: _exercise(f, _valid(), p))


def test_the_valid_file_works_and_a_bad_segmentation_names_its_annotation(tmp_path):
    ok, png = cv2.imencode(".png", np.full((64, 64, 3), 90, np.uint8))
    data = _valid()
    (tmp_path / "a" / "val").mkdir(parents=True)
    (tmp_path / "a" / "val" / "1.png").write_bytes(png.tobytes())
    (tmp_path / "a" / "instances_val.json").write_text(json.dumps(data))
    scenes = CocoScenes(tmp_path / "a", "val")
    assert scenes.instance_mask(1).sum() > 0 and scenes.load_image(1).shape == (64, 64, 3)
    data["annotations"][0]["segmentation"] = {"size": [64, 64], "counts": "\x7f\x00garbage"}
    (tmp_path / "a" / "instances_val.json").write_text(json.dumps(data))
    try:
        CocoScenes(tmp_path / "a", "val").instance_mask(1)
    except DatasetError as exc:
        assert "annotation 1" in str(exc)
    data["images"][0]["height"] = 0
    (tmp_path / "a" / "instances_val.json").write_text(json.dumps(data))
    scenes = CocoScenes(tmp_path / "a", "val")  # the entry and its annotation are dropped and counted
    assert scenes.image_ids == [] and scenes.audit.counts == {"image_fields": 1, "unknown_image": 1}
    assert "was dropped" in scenes.audit.faults[1].detail
    with pytest.raises(DatasetError, match=r"images\[0\].*height.*data.strict=false"):
        CocoScenes(tmp_path / "a", "val", strict=True)


@FUZZ
@given(st.integers(8, 160), st.integers(8, 160), st.sampled_from(["rescale", "reject"]))
def test_an_image_sized_unlike_its_entry_is_rescaled_exactly_or_rejected(height, width, policy):
    """Whatever its decoded size, an image comes back at its entry's size (with masks of that size) or is rejected."""
    def run(folder):
        (folder / "val").mkdir(parents=True)
        cv2.imwrite(str(folder / "val" / "1.png"), np.full((height, width, 3), 90, np.uint8))
        (folder / "instances_val.json").write_text(json.dumps(_valid()))
        data = CocoScenes(folder, "val", size_mismatch=policy)
        try:
            image = data.load_image(1)
        except ImageError as exc:
            assert (height, width) != (64, 64) and exc.kind == "image_size" and data.image_problem(1)
            return
        assert image.shape == (64, 64, 3) and data.instance_mask(1).shape == (64, 64)
        assert (height, width) == (64, 64) or (policy == "rescale" and abs(width / height - 1) <= 0.01)
    _in_tmp(run)


GOOD_POLY = [10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]
FAULTS = {  # a way to spoil an annotation -> whether the spoiled entry is still kept (repaired)
    "degenerate": ({"segmentation": [[1.0, 1.0, 2.0, 2.0]]}, False),
    "unknown category": ({"category_id": 77}, False),
    "zero-area box": ({"bbox": [3, 3, 0, 4]}, False),
    "past the edge": ({"bbox": [50, 50, 40, 40]}, True),
    "outside": ({"bbox": [70, 70, 4, 4]}, False),
    "no image": ({"image_id": 99}, False),
    "nan area": ({"area": float("nan")}, False),
    "extra flat polygon": ({"segmentation": [GOOD_POLY, [0.0, 0.0, 5.0, 5.0, 9.0, 9.0]]}, True),
}


@FUZZ
@given(st.lists(st.none() | st.sampled_from(sorted(FAULTS)), min_size=1, max_size=12))
def test_good_entries_survive_any_mix_of_bad_ones(plan):
    """Annotations that are good (None) or spoiled one way: every good one is used as written, every spoiled one is
    dropped or repaired, and the counts add up."""
    data = _valid()
    base = data["annotations"][0]
    data["annotations"] = [{**base, "id": i + 1, **(FAULTS[f][0] if f else {})} for i, f in enumerate(plan)]
    expected_kept = {i + 1 for i, f in enumerate(plan) if f is None or FAULTS[f][1]}

    def run(folder):
        (folder / "val").mkdir(parents=True)
        (folder / "instances_val.json").write_text(json.dumps(data))
        scenes = CocoScenes(folder, "val")
        assert set(scenes.coco.anns) == expected_kept
        for i, f in enumerate(plan):
            if f is None:
                assert scenes.coco.anns[i + 1]["bbox"] == base["bbox"] and scenes.instance_mask(i + 1).sum() > 0
        assert len(scenes.audit.faults) >= sum(f is not None for f in plan)
        assert scenes.audit.dropped == len(plan) - len(expected_kept)
    _in_tmp(run)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["good", "truncated", "garbage", "empty", "missing", "small"]), min_size=3, max_size=6),
       st.integers(0, 10**6))
def test_selection_and_evaluation_read_a_folder_of_good_and_broken_images(kinds, seed):
    """The data path identification takes (selection with its inpainting, then the evaluation images and their
    counterfactuals) over images that are good or broken: it never fails, uses every good image it reaches and no
    broken one, and gives each rejected one a reason."""
    from knexp.counterfactual.cache import InpaintCache, InpaintOptions
    from knexp.evaluation.protocol import evaluation_images
    from knexp.identification.selection import select_samples
    from knexp.job.spec import default_catalog

    catalog = default_catalog()
    k = catalog["bus"]
    rng = np.random.default_rng(seed)

    def run(folder):
        (folder / "val").mkdir(parents=True)
        data = _valid()
        base_img, base_ann = data["images"][0], data["annotations"][0]
        data["images"] = [{**base_img, "id": i + 1, "file_name": f"{i + 1}.png"} for i in range(len(kinds))]
        data["annotations"] = [{**base_ann, "id": i + 1, "image_id": i + 1} for i in range(len(kinds))]
        (folder / "instances_val.json").write_text(json.dumps(data))
        for i, kind in enumerate(kinds):
            ok, png = cv2.imencode(".png", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
            raw = png.tobytes()
            payload = {"good": raw, "truncated": raw[: int(rng.integers(8, len(raw) // 2))], "garbage": rng.bytes(300),
                       "empty": b"",
                       "small": cv2.imencode(".png", np.zeros((32, 48, 3), np.uint8))[1].tobytes()}.get(kind)
            if payload is not None:
                (folder / "val" / f"{i + 1}.png").write_bytes(payload)
        scenes = CocoScenes(folder, "val")

        def captioner(images, keys):
            return [f"The image shows {k.indefinite}." if len(key) == 2 else "Nothing." for key in keys]

        sel = select_samples(scenes, "fuzz", captioner, catalog, k, per_knowledge=len(kinds), seed=0,
                             opts=InpaintOptions(), cache=InpaintCache(None))
        good = {i + 1 for i, kind in enumerate(kinds) if kind == "good"}
        assert {c.image_id for c in sel.accepted} == good
        assert {c.image_id for c in sel.rejected} == set(range(1, len(kinds) + 1)) - good
        assert all(c.reason.startswith("data: ") for c in sel.rejected)
        skipped = []
        rows = evaluation_images(scenes, catalog, k, [], k_images=len(kinds), other_images=0, seed=0, skipped=skipped)
        assert {i for i, _, _ in rows} == good
        assert {s["image_id"] for s in skipped} == set(range(1, len(kinds) + 1)) - good
        for image_id in good:
            removed = InpaintCache(None).without(scenes, "fuzz", image_id, k.coco_id, InpaintOptions())
            assert removed.shape == (64, 64, 3)
    _in_tmp(run)
