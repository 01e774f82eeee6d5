"""Real datasets' faults: per-entry skips with counts (or strict), image integrity and formats, the dataset doctor, and
expected errors without tracebacks."""

import json

import cv2
import numpy as np
import pytest
from conftest import INJECTED, faulty_coco_folder
from conftest import run_py as _run
from PIL import Image

from knexp.data.coco import CocoScenes, DatasetError, ImageError
from knexp.data.images import read_rgb
from knexp.data.validation import FAULT_KINDS, audit_coco


def _file() -> dict:
    """Two good images and annotations, then one entry per annotation-level fault kind."""
    poly = [10.0, 10.0, 40.0, 10.0, 40.0, 40.0, 10.0, 40.0]
    good = {"image_id": 1, "category_id": 6, "bbox": [10, 10, 30, 30], "area": 900.0, "segmentation": [poly],
            "iscrowd": 0}
    return {
        "images": [{"id": 1, "file_name": "1.png", "height": 64, "width": 64},
                   {"id": 2, "file_name": "2.png", "height": 64, "width": 64},
                   {"id": 3, "file_name": "3.png", "height": 0, "width": 64},
                   {"id": 2, "file_name": "again.png", "height": 8, "width": 8}],
        "categories": [{"id": 6, "name": "bus"}, {"id": "7", "name": "train"}],
        "annotations": [
            {**good, "id": 1}, {**good, "id": 2, "image_id": 2},
            {**good, "id": 3, "segmentation": [[1, 1, 2, 2]]},  # degenerate: 2 points
            {**good, "id": 4, "segmentation": [poly, [1, 1, 2, 2, 3, 3]]},  # one good, one with no area: kept
            {**good, "id": 5, "category_id": 99},
            {**good, "id": 6, "bbox": [10, 10, 0, 5]},
            {**good, "id": 7, "bbox": [50, 50, 30, 30]},  # past the edge: clipped to [50, 50, 14, 14]
            {**good, "id": 8, "bbox": [70, 70, 5, 5]},  # outside the 64 x 64 image
            {**good, "id": 9, "image_id": 3},  # its image was dropped
            {**good, "id": 1},  # duplicate id
            {**good, "id": 10, "segmentation": {"size": [32, 32], "counts": "abc"}},  # RLE of another size
            {**good, "id": 11, "iscrowd": 2},
            {**good, "id": 12, "bbox": [1, 2, float("inf"), 3]},
            {**good, "id": 13, "segmentation": "polygon"},
        ],
    }


def test_each_faulty_entry_is_dropped_or_repaired_and_counted():
    data = _file()
    audit = audit_coco(data, "instances_val.json")
    assert audit.counts == {"image_fields": 1, "duplicate_image_id": 1, "category_fields": 1, "degenerate_polygon": 2,
                            "unknown_category": 1, "zero_area_box": 1, "box_clipped": 1, "box_outside_image": 1,
                            "unknown_image": 1,
                            "duplicate_annotation_id": 1, "bad_rle": 1, "bad_iscrowd": 1, "annotation_fields": 1,
                            "bad_segmentation": 1}
    assert set(audit.counts) <= set(FAULT_KINDS)
    kept = {a["id"]: a for a in data["annotations"]}
    assert sorted(kept) == [1, 2, 4, 7]
    assert kept[7]["bbox"] == [50, 50, 14, 14] and len(kept[4]["segmentation"]) == 1
    assert [i["id"] for i in data["images"]] == [1, 2] and [c["id"] for c in data["categories"]] == [6]
    assert audit.dropped == len(audit.faults) - 2  # the clipped box and the annotation that kept its good polygon
    shown = audit.to_dict(first=1)
    assert shown["faults"]["degenerate_polygon"] == [{"kind": "degenerate_polygon", "entry": "annotations[2] (id 3)",
                                                      "detail": "1 of 1 polygons are degenerate", "kept": False}]
    assert "15 faulty entries" in audit.summary() and "data.strict=true" in audit.summary()


def test_reading_a_file_names_its_faulty_entries_in_the_log(tmp_path, caplog):
    (tmp_path / "val").mkdir()
    (tmp_path / "instances_val.json").write_text(json.dumps(_file()))
    with caplog.at_level("WARNING", logger="knexp.data.coco"):
        CocoScenes(tmp_path, "val")
    assert "annotations[4] (id 5): category_id 99 is not a listed category (unknown_category, skipped)" in caplog.text
    assert "annotations[6] (id 7)" in caplog.text and "box_clipped, kept" in caplog.text
    assert "15 faulty entries" in caplog.text and "task=validate_data lists every one" in caplog.text


def test_strict_stops_at_the_first_fault_and_damage_to_the_file_always_stops():
    with pytest.raises(DatasetError, match=r"images\[2\] \(id 3\).*data.strict=false"):
        audit_coco(_file(), "instances_val.json", strict=True)
    for broken, why in (([], "top level"), ({"images": {}, "annotations": [], "categories": []}, "'images'")):
        with pytest.raises(DatasetError, match=why):
            audit_coco(broken, "instances_val.json")


def test_images_read_as_a_viewer_shows_them(tmp_path):
    rng = np.random.default_rng(0)
    px = (rng.random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(px[:, :, 1]).save(tmp_path / "gray.png")
    assert np.array_equal(read_rgb(tmp_path / "gray.png"), np.repeat(px[:, :, 1:2], 3, axis=2))
    pal = Image.fromarray(px).quantize(16)
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(read_rgb(tmp_path / "pal.png"), np.asarray(pal.convert("RGB")))
    alpha = np.zeros((20, 30), np.uint8)
    alpha[:, 15:] = 255
    Image.fromarray(np.dstack([px, alpha]), "RGBA").save(tmp_path / "rgba.png")
    got = read_rgb(tmp_path / "rgba.png")
    assert (got[:, :15] == 255).all() and np.array_equal(got[:, 15:], px[:, 15:])  # transparent over a white page
    cv2.imwrite(str(tmp_path / "deep.png"), px[:, :, ::-1].astype(np.uint16) * 257)  # 16 bits per channel
    assert np.array_equal(read_rgb(tmp_path / "deep.png"), px)
    cv2.imwrite(str(tmp_path / "gray16.png"), px[:, :, 0].astype(np.uint16) * 257)
    assert np.array_equal(read_rgb(tmp_path / "gray16.png"), np.repeat(px[:, :, :1], 3, axis=2))
    yy, xx = np.mgrid[0:20, 0:30]
    smooth = np.dstack([xx * 8, yy * 12, 255 - xx * 8]).astype(np.uint8)  # JPEG keeps gradients, not noise
    side = Image.fromarray(np.ascontiguousarray(np.rot90(smooth)))
    exif = side.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    side.save(tmp_path / "exif.jpg", quality=100, exif=exif)
    upright = read_rgb(tmp_path / "exif.jpg")
    # upright, JPEG's loss only
    assert upright.shape == smooth.shape and np.abs(upright.astype(int) - smooth).mean() < 5
    ok, jpeg = cv2.imencode(".jpg", px)
    (tmp_path / "cut.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name, why in (("cut.jpg", "truncated"), ("junk.png", "not an image"), ("none.png", "missing")):
        with pytest.raises(ImageError, match=why):
            read_rgb(tmp_path / name)


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory, catalog):
    from knexp.data.toyworld.dataset import generate_split
    from knexp.data.toyworld.scenes import SceneOptions

    return generate_split(tmp_path_factory.mktemp("tw"), "val", 40, seed=5, catalog=catalog,
                          opts=SceneOptions(gap_px=8))


def test_a_faulty_folder_keeps_its_good_entries_and_skips_the_rest_with_reasons(toy_split, tmp_path):
    facts = faulty_coco_folder(toy_split, tmp_path)
    data = CocoScenes(tmp_path, "val")
    assert set(facts["good_annotations"]) <= set(data.coco.anns)  # every good annotation is used
    for image_id in data.image_ids:
        entry = data.coco.imgs[image_id]
        if image_id in facts["bad_images"]:
            with pytest.raises(ImageError):
                data.load_image(image_id)
            assert data.image_problem(image_id)
            continue
        image = data.load_image(image_id)
        assert image.shape == (entry["height"], entry["width"], 3) and not data.image_problem(image_id)
        for inst in data.instances(image_id):
            assert data.instance_mask(inst.annotation_id).shape == image.shape[:2]
        if image_id in facts["odd_formats"]:
            assert np.array_equal(image, facts["odd_formats"][image_id]), f"image {image_id} reads unlike a viewer"
    assert data.audit.counts == INJECTED
    assert "rescaled" in next(f.detail for f in data.audit.faults if f.kind == "image_rescaled")
    strict = CocoScenes(tmp_path, "val", size_mismatch="reject")
    with pytest.raises(ImageError, match="size_mismatch=reject"):
        strict.load_image(facts["rescaled"])
    with pytest.raises(DatasetError, match="data.strict=false"):
        CocoScenes(tmp_path, "val", strict=True)


def test_selection_and_evaluation_pass_over_bad_images_with_reasons(toy_split, tmp_path, catalog):
    """Selection rejects a candidate on an unreadable image with the reason and takes the next; evaluation images skip
    bad ones and list them (a stub captioner that names the object unless it was inpainted)."""
    from knexp.counterfactual.cache import InpaintCache, InpaintOptions
    from knexp.evaluation.protocol import evaluation_images
    from knexp.identification.selection import select_samples

    facts = faulty_coco_folder(toy_split, tmp_path)
    data = CocoScenes(tmp_path, "val")
    k = max(catalog, key=lambda k: len(set(data.image_ids_with(k.coco_id)) & facts["bad_images"]))
    bad_with_k = set(data.image_ids_with(k.coco_id)) & facts["bad_images"]
    assert bad_with_k, "the faults hit no object's image"

    def captioner(images, keys):
        return [f"The image shows {k.indefinite}." if len(key) == 2 else "The image shows nothing." for key in keys]

    sel = select_samples(data, "faulty", captioner, catalog, k, per_knowledge=50, seed=0, opts=InpaintOptions(),
                         cache=InpaintCache(None))
    rejected = {c.image_id: c.reason for c in sel.rejected}
    assert bad_with_k <= set(rejected) and all(rejected[i].startswith("data: ") for i in bad_with_k)
    assert sel.accepted and not {c.image_id for c in sel.accepted} & facts["bad_images"]
    skipped = []
    rows = evaluation_images(data, catalog, k, [], k_images=50, other_images=50, seed=0, skipped=skipped)
    assert not {i for i, _, _ in rows} & facts["bad_images"]
    assert {s["image_id"] for s in skipped} >= bad_with_k and all(s["reason"] for s in skipped)


def test_strict_stops_at_a_bad_image_that_selection_would_skip(toy_split, tmp_path, catalog):
    from knexp.counterfactual.cache import InpaintCache, InpaintOptions
    from knexp.identification.selection import select_samples

    (tmp_path / "val").mkdir()
    for f in (toy_split / "val").glob("*.png"):
        # every image truncated; the annotations are clean
        (tmp_path / "val" / f.name).write_bytes(f.read_bytes()[:200])
    (tmp_path / "instances_val.json").write_text((toy_split / "instances_val.json").read_text())
    data = CocoScenes(tmp_path, "val", strict=True)
    k = next(k for k in catalog if data.image_ids_with(k.coco_id))
    with pytest.raises(DatasetError, match="data.strict=false") as stopped:
        select_samples(data, "strict", lambda images, keys: ["x"] * len(images), catalog, k, 3, 0, InpaintOptions(),
                       InpaintCache(None))
    assert not isinstance(stopped.value, ImageError)  # not the per-image error that stages skip


def test_expected_errors_print_one_line_and_no_traceback(tmp_path):
    args = ("task=identify", "data=coco2017", f"data.root={tmp_path / 'nowhere'}", "logger=none",
            f"hydra.run.dir={tmp_path / 'job'}")
    quiet = _run(*args)
    out = quiet.stdout + quiet.stderr
    assert quiet.returncode == 1 and "Traceback" not in out
    assert "dataset root" in out and "data.root" in out and "HYDRA_FULL_ERROR=1" in out
    assert "data.root" in (tmp_path / "job" / "run.log").read_text()  # the job's log has it too
    full = _run(*args, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr and "DatasetError" in full.stderr
    bad_setting = _run("task=tune", "task.split=nope", "logger=none", f"hydra.run.dir={tmp_path / 'tune'}")
    assert bad_setting.returncode == 1 and "Traceback" not in bad_setting.stderr
    assert "task.split" in bad_setting.stdout + bad_setting.stderr


def test_unexpected_errors_keep_their_traceback(tmp_path):
    """An error knexp does not expect (here a model loader that is some other function: it imports, so no setting check
    can tell, and fails when it is called) shows where it happened."""
    r = _run("task=identify", "model=tiny_llava", "model.loader=knexp.paths.project_root", "logger=none",
             f"hydra.run.dir={tmp_path}",
             f"paths.cache_dir={tmp_path}/cache", f"data.root={tmp_path}/tw", "data.num_images=2")
    assert r.returncode == 1 and "Traceback" in r.stderr and "TypeError" in r.stderr


def test_the_dataset_doctor_reports_every_fault_kind(toy_split, tmp_path):
    facts = faulty_coco_folder(toy_split, tmp_path / "data")
    r = _run("task=validate_data", "data=coco2017", f"data.root={tmp_path / 'data'}", "data.split=val",
             "data.image_dir=val", "logger=none", f"hydra.run.dir={tmp_path / 'job'}")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "job" / "data_report.json").read_text())
    assert report["counts"] == INJECTED and report["unusable_images"] == len(facts["bad_images"])
    for kind in INJECTED:
        assert f"  {kind}: {INJECTED[kind]}" in r.stdout
    assert set(report["objects"]) and all(row["candidates"] <= row["instances"] for row in report["objects"].values())
    quick = _run("task=validate_data", "data=coco2017", f"data.root={tmp_path / 'data'}", "data.split=val",
                 "data.image_dir=val", "logger=none", "task.images=false", f"hydra.run.dir={tmp_path / 'quick'}")
    quick_report = json.loads((tmp_path / "quick" / "data_report.json").read_text())
    assert quick.returncode == 0 and quick_report["seconds"]["image_pass"] is None
    assert set(quick_report["counts"]) == {k for k in INJECTED if not k.startswith("image_")}


@pytest.mark.slow
def test_identify_and_evaluate_run_through_a_faulty_folder(tmp_path, catalog):
    """The embedded model on a COCO-format folder whose bed images include every image fault, and whose annotation file
    has every entry fault: both tasks finish (status 0, no traceback), use the clean samples and list each bad one."""
    from knexp.data.toyworld.dataset import generate_split
    from knexp.data.toyworld.scenes import SceneOptions

    base = generate_split(tmp_path / "base", "val", 300, seed=1234, catalog=catalog, opts=SceneOptions(gap_px=8))
    bed = catalog["bed"].coco_id
    spare = {img["id"] for img in json.loads((base / "instances_val.json").read_text())["images"]}
    spare -= set(CocoScenes(base, "val").image_ids_with(bed))  # the faults go into bed's images
    facts = faulty_coco_folder(base, tmp_path / "data", spare)
    common = ("data=coco2017", f"data.root={tmp_path / 'data'}", "data.split=val", "data.image_dir=val",
              "model=embedded", "knowledge=bed",
              "method=ours", "thresholds=budget", "thresholds.layers=all", "logger=none",
              f"paths.cache_dir={tmp_path / 'cache'}")
    for task in ("identify", "evaluate"):
        extra = ("task.k_images=2", "task.other_images=3") if task == "evaluate" else ()
        r = _run(f"task={task}", *common, *extra, f"hydra.run.dir={tmp_path / task}")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        job = tmp_path / task
        faults = json.loads((job / "data_faults.json").read_text())
        assert {k: v for k, v in faults["counts"].items() if not k.startswith("image_")} == \
            {k: v for k, v in INJECTED.items() if not k.startswith("image_")}
        selection = json.loads((job / "selection.json").read_text())
        used = {c["image_id"] for c in selection["accepted"]}
        assert len(used) == 3 and not used & facts["bad_images"]
        rejected = {c["image_id"]: c["reason"] for c in selection["rejected"]}
        met = {int(f["entry"].split()[-1]) for kind in ("image_unreadable", "image_size")
               for f in faults["faults"].get(kind, [])}
        assert met and met <= facts["bad_images"]
        assert all(rejected[i].startswith("data: ") for i in met if i in rejected)
    metrics = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert metrics["table2"] is not None and metrics["data_faults"] == faults["counts"]


def test_caption_eval_captions_the_readable_images_and_lists_the_rest(toy_split, tmp_path):
    facts = faulty_coco_folder(toy_split, tmp_path / "data")
    r = _run("task=caption_eval", "model=tiny_llava", "data=coco2017", f"data.root={tmp_path / 'data'}",
             "data.split=val",
             "data.image_dir=val", "task.num_scenes=12", "task.inpaint_scenes=2", "logger=none",
             f"hydra.run.dir={tmp_path / 'job'}")
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    first = sorted(json.loads((tmp_path / "data" / "instances_val.json").read_text())["images"],
                   key=lambda i: i["id"])[:12]
    bad = {i["id"] for i in first} & facts["bad_images"]
    assert bad and {s["image_id"] for s in metrics["data"]["skipped_images"]} == bad
    assert all(s["reason"] for s in metrics["data"]["skipped_images"])
