"""The dataset a config names: a toy-world split (generated once) or a local COCO copy; and the check of the ``data``
group, which the job runs before any image is read or generated. The group arrives as a plain mapping."""

from __future__ import annotations

from collections.abc import Mapping

from knexp.data.catalog import Catalog
from knexp.data.coco import SIZE_POLICIES, CocoScenes
from knexp.data.toyworld.dataset import generate_split
from knexp.data.toyworld.scenes import SceneOptions
from knexp.settings import Choice, Flag, Integer, SettingError, Text, check_mapping, from_mapping


def scene_options(data_cfg: Mapping) -> SceneOptions:
    """The toy world's ``data.scene`` settings, checked (``SceneOptions``)."""
    scene = data_cfg.get("scene")
    if not isinstance(scene, dict):
        raise SettingError("data.scene", scene, "use a mapping of size, min_objects, max_objects, object_px, gap_px")
    return from_mapping(SceneOptions, scene, "data.scene")


def check_data(data_cfg: Mapping, catalog: Catalog) -> None:
    """Check the ``data`` group (each bad value raises ``SettingError`` naming its key): where the data is, how many
    samples per object, what to do with faulty entries, and for the toy world its seed, size and scenes."""
    values = check_mapping(dict(data_cfg), "data", name=Text(), root=Text(), split=Text(),
                           image_dir=Text(optional=True),
                           per_knowledge=Integer(low=1), strict=Flag(), size_mismatch=Choice(SIZE_POLICIES))
    if values["name"] == "toyworld":
        check_mapping(values, "data", seed=Integer(low=0), num_images=Integer(low=1))
        scene = scene_options(values)
        if scene.max_objects > len(catalog) - 1:  # objects are distinct catalog entries (and training may add a ghost)
            raise SettingError("data.scene.max_objects", scene.max_objects,
                               f"use at most {len(catalog) - 1} (the catalog's size less one)")


def load_dataset(data_cfg: Mapping, catalog: Catalog) -> tuple[CocoScenes, str]:
    """(dataset, id) of the ``data`` group's settings; the id names the data in cache keys."""
    d = data_cfg
    if d["name"] == "toyworld":
        generate_split(d["root"], d["split"], d["num_images"], d["seed"], catalog, scene_options(d))
    data = CocoScenes(d["root"], d["split"], image_dir=d.get("image_dir"), strict=bool(d.get("strict", False)),
                      size_mismatch=d.get("size_mismatch", "rescale"))
    return data, f"{d['name']}:{d['root']}:{d['split']}"
