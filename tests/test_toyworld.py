import json

import numpy as np
import pytest

from knexp.data.coco import CocoScenes, DatasetError
from knexp.data.toyworld.dataset import generate_split
from knexp.data.toyworld.scenes import EMPTY_CAPTION, SceneOptions, caption_for, make_scene
from knexp.data.toyworld.sprites import SPRITES, render_sprite


def test_every_catalog_object_has_a_sprite(catalog):
    assert set(SPRITES) == set(catalog.names)


@pytest.mark.parametrize("size", [60, 120])
def test_sprites_render_at_the_requested_size(catalog, size):
    rng = np.random.default_rng(0)
    for name in catalog.names:
        img, alpha = render_sprite(name, size, rng, max_rotation=0)
        assert img.shape[:2] == alpha.shape
        assert max(alpha.shape) == size
        assert (alpha > 127).mean() > 0.15, name  # a solid object, not a few strokes


def test_sprites_are_distinct_in_colour(catalog):
    """Mean colours of the 30 sprites differ: a crude check that no two objects look alike."""
    rng = np.random.default_rng(1)
    means = {}
    for name in catalog.names:
        img, alpha = render_sprite(name, 100, rng, max_rotation=0)
        means[name] = img[alpha > 127].mean(0)
    names = list(means)
    gaps = [np.abs(means[a] - means[b]).sum() for i, a in enumerate(names) for b in names[i + 1 :]]
    assert len(gaps) == 435 and np.quantile(gaps, 0.05) > 15


def test_scene_is_deterministic_by_seed(catalog):
    a = make_scene(catalog, np.random.default_rng([7, 2, 3]))
    b = make_scene(catalog, np.random.default_rng([7, 2, 3]))
    c = make_scene(catalog, np.random.default_rng([7, 2, 4]))
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_scenes_have_1_to_3_separate_objects_and_truthful_captions(catalog):
    for i in range(40):
        s = make_scene(catalog, np.random.default_rng([0, 9, i]), SceneOptions(gap_px=8))
        assert s.image.shape == (224, 224, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.objects) <= 3
        assert catalog.mentioned(s.caption) == {o.knowledge.name for o in s.objects}
        boxes = [o.bbox for o in s.objects]
        for j, (x, y, w, h) in enumerate(boxes):
            assert 60 * 0.5 <= max(w, h) <= 120 * 1.5
            for x2, y2, w2, h2 in boxes[j + 1 :]:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, "objects overlap"


def test_ghost_objects_are_inpainted_and_left_out_of_the_caption(catalog):
    opts = SceneOptions(ghost_prob=1.0)
    seen = 0
    for i in range(10):
        s = make_scene(catalog, np.random.default_rng([1, 9, i]), opts)
        for g in s.ghosts:
            seen += 1
            assert not g.knowledge.mentioned_in(s.caption)
            x, y, w, h = g.bbox
            # the sprite's saturated colours are gone: the region is now smooth background
            assert s.image[y : y + h, x : x + w].astype(float).std(axis=(0, 1)).max() < 45
    assert seen >= 8


def test_captions_use_articles_and_lists(catalog):
    cat = catalog
    assert caption_for([cat["banana"], cat["umbrella"]]) == "The image shows a banana and an umbrella."
    assert caption_for([cat["bus"], cat["clock"],
                        cat["scissors"]]) == "The image shows a bus, a clock and a pair of scissors."
    assert caption_for([]) == EMPTY_CAPTION


def test_split_is_coco_format_and_reads_back_through_pycocotools(catalog, tmp_path):
    root = generate_split(tmp_path / "tw", "val", 12, seed=5, catalog=catalog, opts=SceneOptions(gap_px=8))
    inst = json.loads((root / "instances_val.json").read_text())
    assert {c["id"] for c in inst["categories"]} == {k.coco_id for k in catalog}
    data = CocoScenes(root, "val")
    assert data.image_ids == list(range(1, 13))
    for image_id in data.image_ids:
        img = data.load_image(image_id)
        assert img.shape == (224, 224, 3)
        caps = data.captions(image_id)
        assert len(caps) == 1
        names = {catalog.by_coco_id(c).name for c in data.category_ids(image_id)}
        assert catalog.mentioned(caps[0]) == names
        for ins in data.instances(image_id):
            mask = data.instance_mask(ins.annotation_id)
            x, y, w, h = ins.bbox
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1 and ys.max() <= y + h
            assert abs(mask.sum() - ins.area) / ins.area < 0.15  # polygon vs pixel mask
    again = generate_split(tmp_path / "tw", "val", 12, seed=5, catalog=catalog, opts=SceneOptions(gap_px=8))
    assert again == root  # second call reuses the finished split
    with pytest.raises(FileExistsError, match="data.root"):
        generate_split(tmp_path / "tw", "val", 13, seed=5, catalog=catalog)


def test_missing_dataset_files_name_the_path_and_key(tmp_path):
    with pytest.raises(DatasetError, match="data.root"):
        CocoScenes(tmp_path / "nowhere", "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="instances_val.json"):
        CocoScenes(tmp_path / "empty", "val")


def test_a_held_out_split_covers_all_30_objects(catalog, tmp_path):
    data = CocoScenes(generate_split(tmp_path / "tw", "val", 150, seed=1234, catalog=catalog,
                                     opts=SceneOptions(gap_px=8)), "val")
    seen = {catalog.by_coco_id(c).name for i in data.image_ids for c in data.category_ids(i)}
    assert seen == set(catalog.names)
