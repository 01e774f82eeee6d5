"""Fuzzing the data layer (hypothesis): random annotation JSON, mutated valid COCO files and corrupt image bytes.
Whatever the input, the data layer either works or raises knexp's documented DatasetError."""

import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knexp.data.coco import CocoScenes, DatasetError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
FIELDS = ["id", "image_id", "category_id", "bbox", "area", "segmentation", "iscrowd", "file_name", "height", "width", "name", "caption"]


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
    try:
        CocoScenes(tmp_path / "a", "val")
        raise AssertionError("height 0 was accepted")
    except DatasetError as exc:
        assert "images[0]" in str(exc) and "height" in str(exc) and "data.root" in str(exc)
