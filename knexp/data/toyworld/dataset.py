"""Write a toy-world split in COCO format: ``instances_<split>.json``, ``captions_<split>.json``, PNG images.

Scene ``i`` of a split is drawn from ``np.random.default_rng([seed, DATASET_STREAM, i])``: the split is
the same on every machine, and no scene coincides with a training scene (another stream). Segmentations
are polygons traced from the exact sprite masks (``cv2.findContours``), so ``COCO.annToMask`` gives the
object's region back. A finished split is described by ``<split>/manifest.json``: its settings and every file's sha1,
checked whenever the split is used (``knexp.manifest``). A half-written or damaged split is made again (it is the same
bytes: PNG and JSON of the same scenes), with a warning; a split made with other settings is never overwritten.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np

from knexp.data.catalog import Catalog
from knexp.data.toyworld.scenes import SceneOptions, make_scene
from knexp.manifest import built

DATASET_STREAM = 2
MANIFEST = "manifest.json"


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygon list ``[[x0, y0, x1, y1, ...], ...]`` of a boolean mask's outer contours."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [c.reshape(-1, 2).astype(float) + 0.5 for c in contours if len(c) >= 3]
    return [p.flatten().round(1).tolist() for p in polys]


def generate_split(root: str | Path, split: str, num_images: int, seed: int, catalog: Catalog,
                   opts: SceneOptions | None = None) -> Path:
    """Create (once) the split under ``root``, or check it when it is there; returns ``root``. A damaged split is made
    again, with a warning; one made with other settings raises ``knexp.manifest.FolderInUse`` naming the folder. Safe
    when several jobs race to make it."""
    root = Path(root)
    opts = opts or SceneOptions()
    settings = {"split": split, "num_images": num_images, "seed": seed, "stream": DATASET_STREAM, "scene": asdict(opts)}
    refuse = (f"{root / split} holds a toy-world split made with other settings; choose another data.root, or delete "
              f"{root / split} and {root}/instances_{split}.json to make it again")
    return built(root, f"{split}/{MANIFEST}", settings,
                 lambda folder: _write(folder, split, num_images, seed, catalog, opts),
                 f"toy-world split {split!r}", refuse=refuse)


def _write(folder: Path, split: str, num_images: int, seed: int, catalog: Catalog, opts: SceneOptions) -> None:
    (folder / split).mkdir(parents=True)
    images, annotations, captions = [], [], []
    for i in range(num_images):
        scene = make_scene(catalog, np.random.default_rng([seed, DATASET_STREAM, i]), opts)
        image_id = i + 1
        file_name = f"{split}_{image_id:06d}.png"
        cv2.imwrite(str(folder / split / file_name), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        h, w = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h, "background": scene.background})
        for obj in scene.objects:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": obj.knowledge.coco_id,
                "bbox": [float(v) for v in obj.bbox],
                "segmentation": mask_to_polygons(obj.mask),
                "area": float(obj.mask.sum()),
                "iscrowd": 0,
            })
        captions.append({"id": image_id, "image_id": image_id, "caption": scene.caption})
    categories = [{"id": k.coco_id, "name": k.name, "supercategory": k.supercategory} for k in catalog]
    info = {"description": f"knexp toy world, split {split}, seed {seed}", "version": "1"}
    instances = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    (folder / f"instances_{split}.json").write_text(json.dumps(instances))
    captions_file = {"info": info, "images": images, "annotations": captions}
    (folder / f"captions_{split}.json").write_text(json.dumps(captions_file))
