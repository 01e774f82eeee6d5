"""The dataset a config names: a toy-world split (generated once) or a local COCO copy."""

from __future__ import annotations

from omegaconf import DictConfig

from knexp.data.catalog import Catalog
from knexp.data.coco import CocoScenes
from knexp.data.toyworld.dataset import generate_split
from knexp.data.toyworld.scenes import SceneOptions


def scene_options(data_cfg: DictConfig) -> SceneOptions:
    s = data_cfg.scene
    return SceneOptions(size=s.size, min_objects=s.min_objects, max_objects=s.max_objects, object_px=tuple(s.object_px), gap_px=s.gap_px)


def load_dataset(data_cfg: DictConfig, catalog: Catalog) -> tuple[CocoScenes, str]:
    """(dataset, id); the id names the data in cache keys."""
    if data_cfg.name == "toyworld":
        generate_split(data_cfg.root, data_cfg.split, data_cfg.num_images, data_cfg.seed, catalog, scene_options(data_cfg))
    data = CocoScenes(data_cfg.root, data_cfg.split, image_dir=data_cfg.get("image_dir"), strict=bool(data_cfg.get("strict", False)),
                      size_mismatch=data_cfg.get("size_mismatch", "rescale"))
    return data, f"{data_cfg.name}:{data_cfg.root}:{data_cfg.split}"
