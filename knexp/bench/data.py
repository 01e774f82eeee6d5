"""The dataset doctor's annotation pass on a large synthetic COCO-format file.

``annotation_pass`` writes ``annotations`` instance annotations over ``annotations // 5`` images (polygons of 4 to 8
points, boxes, areas, 80 categories), one in ``fault_every`` of them spoiled one of several ways, and times
``python run.py task=validate_data task.images=false`` on it in a fresh process: the whole command, and the pass itself
as the task reports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from knexp.paths import project_root

SPOILERS = ({"category_id": 999}, {"bbox": [5, 5, 0, 3]}, {"segmentation": [[1.0, 1.0, 2.0, 2.0]]}, {"image_id": -1},
            {"bbox": [600, 10, 100, 10]})


def synthetic_coco(path: Path, annotations: int, fault_every: int = 100, seed: int = 0) -> int:
    """Write the file; returns how many annotations were spoiled."""
    rng = np.random.default_rng(seed)
    images = max(1, annotations // 5)
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640}
                       for i in range(1, images + 1)],
            "categories": [{"id": c, "name": f"object {c}", "supercategory": "thing"} for c in range(1, 81)],
            "annotations": []}
    spoiled = 0
    for a in range(1, annotations + 1):
        x, y = rng.uniform(0, 500), rng.uniform(0, 350)
        w, h = rng.uniform(5, 130), rng.uniform(5, 120)
        points = int(rng.integers(4, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, points))
        poly = np.stack([x + w / 2 + w / 2 * np.cos(angles), y + h / 2 + h / 2 * np.sin(angles)],
                        1).round(2).ravel().tolist()
        ann = {"id": a, "image_id": int(rng.integers(1, images + 1)), "category_id": int(rng.integers(1, 81)),
               "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)], "area": round(w * h * 0.7, 2),
               "segmentation": [poly], "iscrowd": 0}
        if a % fault_every == 0:
            ann.update(SPOILERS[(a // fault_every) % len(SPOILERS)])
            spoiled += 1
        data["annotations"].append(ann)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return spoiled


def annotation_pass(annotations: int = 100_000) -> dict:
    with tempfile.TemporaryDirectory(prefix="knexp-bench-") as tmp:
        root = Path(tmp) / "coco"
        spoiled = synthetic_coco(root / "annotations" / "instances_val2017.json", annotations)
        size_mb = (root / "annotations" / "instances_val2017.json").stat().st_size / 2**20
        (root / "val2017").mkdir()
        began = time.perf_counter()
        r = subprocess.run([sys.executable, "run.py", "task=validate_data", "data=coco2017", f"data.root={root}",
                            "task.images=false",
                            "logger=none", f"hydra.run.dir={Path(tmp) / 'job'}"], cwd=project_root(),
                            capture_output=True, text=True,
                           env=dict(os.environ, WANDB_MODE="offline"))
        wall = time.perf_counter() - began
        if r.returncode:
            raise RuntimeError(f"task=validate_data failed:\n{r.stderr[-3000:]}")
        report = json.loads((Path(tmp) / "job" / "data_report.json").read_text())
    return {"annotations": annotations, "file_mib": round(size_mb, 1), "spoiled": spoiled,
            "faults_found": sum(report["counts"].values()),
            "counts": report["counts"], "annotation_pass_s": report["seconds"]["annotation_pass"],
            "command_s": round(wall, 1), "target": "< 30 s"}
