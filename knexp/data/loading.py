"""The dataset a config names: a toy-world split (generated once) or a local COCO copy; and the check of the ``data``
group, which the session runs before any image is read or generated."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from knexp.data.catalog import Catalog
from knexp.data.coco import SIZE_POLICIES, CocoScenes
from knexp.data.toyworld.dataset import generate_split
from knexp.data.toyworld.scenes import SceneOptions
from knexp.settings import Choice, Flag, Integer, SettingError, Text, check_mapping, from_mapping


def _plain(cfg: Mapping) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def scene_options(data_cfg: Mapping) -> SceneOptions:
    """The toy world's ``data.scene`` settings, checked (``SceneOptions``)."""
    scene = _plain(data_cfg).get("scene")
    if not isinstance(scene, dict):
        raise SettingError("data.scene", scene, "use a mapping of size, min_objects, max_objects, object_px, gap_px")
    return from_mapping(SceneOptions, scene, "data.scene")


def check_data(data_cfg: Mapping, catalog: Catalog) -> None:
    """Check the ``data`` group (each bad value raises ``SettingError`` naming its key): where the data is, how many
    samples per object, what to do with faulty entries, and for the toy world its seed, size and scenes."""
    values = check_mapping(_plain(data_cfg), "data", name=Text(), root=Text(), split=Text(), image_dir=Text(optional=True),
                           per_knowledge=Integer(low=1), strict=Flag(), size_mismatch=Choice(SIZE_POLICIES))
    if values["name"] == "toyworld":
        check_mapping(values, "data", seed=Integer(low=0), num_images=Integer(low=1))
        scene = scene_options(values)
        if scene.max_objects > len(catalog) - 1:  # objects are distinct catalog entries (and training may add a ghost)
            raise SettingError("data.scene.max_objects", scene.max_objects, f"use at most {len(catalog) - 1} (the catalog's size less one)")


def load_dataset(data_cfg: DictConfig, catalog: Catalog) -> tuple[CocoScenes, str]:
    """(dataset, id); the id names the data in cache keys."""
    if data_cfg.name == "toyworld":
        generate_split(data_cfg.root, data_cfg.split, data_cfg.num_images, data_cfg.seed, catalog, scene_options(data_cfg))
    data = CocoScenes(data_cfg.root, data_cfg.split, image_dir=data_cfg.get("image_dir"), strict=bool(data_cfg.get("strict", False)),
                      size_mismatch=data_cfg.get("size_mismatch", "rescale"))
    return data, f"{data_cfg.name}:{data_cfg.root}:{data_cfg.split}"
