import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def run_py(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python run.py *args`` in a fresh process from the project root: W&B offline, tracebacks as Hydra shortens them,
    ``env`` on top."""
    full = {**os.environ, "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "run.py", *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout, env=full)


@pytest.fixture(scope="session")
def catalog():
    from knexp.job.spec import default_catalog

    return default_catalog()


@pytest.fixture(scope="module", params=["embedded", "llava", "minigpt4"])
def adapter(request):
    """Each tiny model family in its adapter (float32), with the test module's ``ADAPTER_LAYERS`` decoder layers (3)."""
    from knexp.models.tiny.tiny_vlm import tiny_adapter

    return tiny_adapter(request.param, layers=getattr(request.module, "ADAPTER_LAYERS", 3))


def _random_pair(adapter, seed: int):
    """Two random uint8 RGB images ("original", "inpainted") at the adapter's input size (60 px for the tiny LLaVA)."""
    import numpy as np

    from knexp.models.adapters.vlm import VLMAdapter

    size = 60 if isinstance(adapter, VLMAdapter) else 224
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(2)]


@pytest.fixture(scope="session")
def random_pair():
    """(adapter, seed) -> [original, inpainted]: random images for the formula tests on tiny models."""
    return _random_pair


def _job_files(job: Path, also: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every result file of a job directory, minus logs, Hydra's copy of the config (it names the folder), W&B
    and wall times (``wall_time_s``, ``timing``), which are the only things allowed to differ between two runs of one
    config; ``also``: metrics.json keys left out too (``cache``: what the caches held, when their contents differ on
    purpose)."""
    files = {}
    for path in sorted(job.rglob("*")):
        rel = path.relative_to(job).as_posix()
        if not path.is_file() or rel.endswith(".log") or rel.startswith((".hydra/", "wandb/")) or rel == "done.json":
            continue
        data = path.read_bytes()
        if rel == "metrics.json":
            m = json.loads(data)
            m.pop("wall_time_s")
            for key in ("timing", *also):  # seconds too
                m.pop(key, None)
            data = json.dumps(m, sort_keys=True).encode()
        files[rel] = data
    return files


@pytest.fixture
def job_files():
    """job folder -> {relative path: bytes} of its results (for byte-for-byte determinism checks)."""
    return _job_files


# every fault knexp.data must survive, injected by ``faulty_coco_folder`` (kind -> how many)
INJECTED = {"image_rescaled": 1, "image_size": 1, "image_unreadable": 3, "degenerate_polygon": 1, "unknown_category": 1,
            "zero_area_box": 1, "box_clipped": 1, "unknown_image": 1}


def faulty_coco_folder(base: Path, root: Path, spare: set[int] = frozenset()) -> dict:
    """Copy the toy-world split at ``base`` (``instances_val.json`` and ``val/``) to ``root`` and inject ``INJECTED``'s
    faults into images and entries whose ids are not in ``spare``, plus images in every format a viewer reads
    (grayscale, palette, RGBA, 16-bit, EXIF-rotated JPEG) that must stay usable. Returns {"bad_images", "odd_formats":
    {id: RGB}, "good_annotations"}: the image ids that must be skipped, the readable odd images with the pixels they
    must read as, and the ids of the original annotations that must all survive."""
    import shutil

    import cv2
    import numpy as np
    from PIL import Image

    shutil.copytree(base / "val", root / "val", ignore=shutil.ignore_patterns("*.json"))
    data = json.loads((base / "instances_val.json").read_text())
    images = {img["id"]: img for img in data["images"]}
    free = [i for i in sorted(images) if i not in spare]
    path = lambda i: root / "val" / images[i]["file_name"]  # noqa: E731
    rgb = lambda i: cv2.cvtColor(cv2.imread(str(path(i))), cv2.COLOR_BGR2RGB)  # noqa: E731

    bigger, squashed, truncated, garbage, missing = free[:5]
    cv2.imwrite(str(path(bigger)), cv2.resize(cv2.imread(str(path(bigger))), (448, 448)))  # same aspect: rescaled
    cv2.imwrite(str(path(squashed)), cv2.resize(cv2.imread(str(path(squashed))), (224, 150)))  # other aspect: rejected
    ok, jpeg = cv2.imencode(".jpg", cv2.imread(str(path(truncated))))
    path(truncated).unlink()
    images[truncated]["file_name"] = f"{truncated}.jpg"
    path(truncated).write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    path(garbage).write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    path(missing).unlink()

    gray, palette, rgba, deep, rotated = free[5:10]
    odd = {}
    img = rgb(gray)[:, :, 0]
    Image.fromarray(img).save(path(gray))
    odd[gray] = np.repeat(img[:, :, None], 3, axis=2)
    pal = Image.fromarray(rgb(palette)).quantize(64)
    pal.save(path(palette))
    odd[palette] = np.asarray(pal.convert("RGB"))
    px = rgb(rgba)
    Image.fromarray(np.dstack([px, np.full(px.shape[:2], 255, np.uint8)]), "RGBA").save(path(rgba))
    odd[rgba] = px
    px = rgb(deep)
    cv2.imwrite(str(path(deep)), cv2.cvtColor(px.astype(np.uint16) * 257, cv2.COLOR_RGB2BGR))  # 16-bit PNG
    odd[deep] = px
    px = rgb(rotated)
    on_side = Image.fromarray(np.ascontiguousarray(np.rot90(px, 1)))  # stored turned left; EXIF 6 turns it right again
    exif = on_side.getexif()
    exif[0x0112] = 6
    path(rotated).unlink()
    images[rotated]["file_name"] = f"{rotated}.jpg"
    on_side.save(path(rotated), quality=100, exif=exif)
    odd[rotated] = np.asarray(Image.open(path(rotated)).transpose(Image.Transpose.ROTATE_270).convert("RGB"))

    good = [a["id"] for a in data["annotations"]]
    anns = {a["id"]: a for a in data["annotations"]}
    target = next(a for a in data["annotations"] if a["image_id"] in free[10:])
    x, y, w, h = target["bbox"]
    target["bbox"] = [x, y, w + 500, h]  # past the right edge: clipped
    top = max(good) + 1
    host = anns[good[0]]
    poly = [[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]  # three points on a line: no area
    data["annotations"] += [
        {**host, "id": top, "segmentation": poly},
        {**host, "id": top + 1, "category_id": 999},
        {**host, "id": top + 2, "bbox": [5, 5, 0, 10]},
        {**host, "id": top + 3, "image_id": 10**9},
    ]
    (root / "instances_val.json").write_text(json.dumps(data))
    return {"bad_images": {squashed, truncated, garbage, missing}, "odd_formats": odd, "good_annotations": good,
            "rescaled": bigger}
