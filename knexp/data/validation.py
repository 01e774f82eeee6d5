"""Checking a COCO-format annotation file entry by entry: what cannot be used is dropped and counted, not fatal.

``audit_coco(data)`` takes the parsed JSON. Damage to the file's shape (not an object, no ``images`` list, ...) raises
``DatasetError``: nothing can be read. Every other fault is one entry's: that entry is dropped (or, for a box past the
image edge, clipped to the image, which is exact) and recorded as a ``Fault`` of a kind in ``FAULT_KINDS``. With
``strict=True`` the first fault raises instead. The checks read the JSON only (no image is decoded), so a
100,000-annotation file takes seconds (BENCHMARKS.md).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from knexp.data.data_errors import DatasetError

MAX_SIDE = 1 << 16

# kind -> what it means and what knexp does with it
FAULT_KINDS = {
    "image_fields": "an image without an int id, a file_name, or int height and width in 1..65536: dropped with its "
                    "annotations",
    "duplicate_image_id": "an image id listed twice: the later entry dropped",
    "category_fields": "a category without an int id and a name: dropped",
    "annotation_fields": "an annotation without an int id, an int category_id, a finite [x, y, w, h] box and a finite "
                         "area: dropped",
    "duplicate_annotation_id": "an annotation id used twice: the later entry dropped",
    "unknown_image": "an annotation whose image_id is not a listed image: dropped",
    "unknown_category": "an annotation whose category_id is not a listed category: dropped",
    "zero_area_box": "a box with width or height <= 0: dropped",
    "box_outside_image": "a box that lies wholly outside its image: dropped",
    "box_clipped": "a box past the image edge: clipped to the image (kept)",
    "degenerate_polygon": "a polygon with fewer than 3 points, an odd or non-finite coordinate list, or no area: "
                          "dropped (the annotation too if none of its polygons is left)",
    "bad_rle": "an RLE segmentation without a valid size and counts, or sized other than its image: dropped",
    "bad_segmentation": "a segmentation that is neither polygons nor RLE: dropped",
    "bad_iscrowd": "iscrowd other than 0 or 1: dropped",
    "caption_fields": "a caption annotation without a caption string: dropped",
    # found by the image pass (knexp.data.images), not in the JSON
    "image_unreadable": "an image file that is missing, truncated or not an image: its image skipped",
    "image_size": "an image whose decoded size differs from its entry's width and height (and is not rescaled): "
                  "skipped",
    "image_rescaled": "an image whose decoded size differs from its entry's in the same aspect ratio: rescaled (kept)",
}


@dataclass(frozen=True)
class Fault:
    kind: str  # a key of FAULT_KINDS
    entry: str  # e.g. "annotations[12] (id 345)"
    detail: str
    kept: bool = False  # repaired and kept (a clipped box, the good polygons of an annotation), not dropped

    def __str__(self) -> str:
        return f"{self.entry}: {self.detail} ({self.kind}{', kept' if self.kept else ''})"


@dataclass
class Audit:
    """The faults found in one dataset, in file order."""

    source: str
    faults: list[Fault] = field(default_factory=list)

    def add(self, fault: Fault, strict: bool) -> None:
        if strict:
            raise DatasetError(f"{self.source}: {fault}; fix the entry, or set data.strict=false to skip such entries")
        self.faults.append(fault)

    def extend(self, other: Audit) -> None:
        self.faults.extend(other.faults)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(f.kind for f in self.faults))

    @property
    def dropped(self) -> int:
        return sum(1 for f in self.faults if not f.kept)

    def summary(self) -> str:
        """One line: how many entries of each kind, or that there were none."""
        if not self.faults:
            return f"{self.source}: no faults"
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"{self.source}: {len(self.faults)} faulty entries ({kinds}); data.strict=true stops on them"

    def to_dict(self, first: int | None = None) -> dict:
        """{"counts", "faults" (by kind: the first ``first`` of each, all if None), "meaning" of each kind found}."""
        by_kind: dict[str, list[dict]] = {}
        for f in self.faults:
            shown = by_kind.setdefault(f.kind, [])
            if first is None or len(shown) < first:
                shown.append(asdict(f))
        return {"counts": self.counts, "faults": by_kind, "meaning": {k: FAULT_KINDS[k] for k in by_kind}}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _polygon_area(poly: list[float]) -> float:
    """The shoelace area of a flat [x0, y0, x1, y1, ...] polygon."""
    xs, ys = poly[0::2], poly[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2


def _segmentation_fault(seg, height: int, width: int) -> tuple[str, str, object]:
    """(fault kind or "", detail, the segmentation to keep: polygons without the degenerate ones)."""
    if isinstance(seg, list):
        good = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_num(v) for v in p)
                and _polygon_area(p) > 0]
        if len(good) == len(seg) and seg:
            return "", "", seg
        detail = f"{len(seg) - len(good)} of {len(seg)} polygons are degenerate" if seg else "no polygon"
        return "degenerate_polygon", detail, good
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and 0 < v <= MAX_SIDE for v in size)):
            return "bad_rle", "no valid size [h, w]", None
        if list(size) != [height, width]:
            return "bad_rle", f"size {size} is not the image's [{height}, {width}]", None
        if isinstance(counts, list):
            if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
                return "bad_rle", "its counts do not cover the image", None
        elif not isinstance(counts, str):
            return "bad_rle", "no valid counts", None
        return "", "", seg
    return "bad_segmentation", f"a {type(seg).__name__}, neither polygons nor RLE", None


def _check_shape(data, captions: bool) -> str:
    """Why the file as a whole cannot be read, or ""."""
    if not isinstance(data, dict):
        return "the top level is not an object"
    for key in ("images", "annotations") + (() if captions else ("categories",)):
        if not isinstance(data.get(key), list):
            return f"{key!r} is missing or not a list"
    return ""


def audit_coco(data, source: str, captions: bool = False, strict: bool = False) -> Audit:
    """Check ``data`` (a parsed COCO annotation file named ``source``) entry by entry, in place: unusable entries are
    removed and boxes past the image edge clipped; the returned ``Audit`` lists each fault (``FAULT_KINDS``). Raises
    ``DatasetError`` if the file's shape is damaged, or at the first fault when ``strict``."""
    if why := _check_shape(data, captions):
        raise DatasetError(f"annotation file {source} is not valid COCO: {why}; check data.root")
    audit = Audit(source)
    images: dict[int, dict] = {}
    dropped: set = set()  # ids of image entries dropped for their faults
    for i, img in enumerate(data["images"]):
        entry = f"images[{i}]" + (f" (id {img['id']})" if isinstance(img, dict) and _is_int(img.get("id")) else "")
        if not (isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)
                and all(_is_int(img.get(k)) and 0 < img[k] <= MAX_SIDE for k in ("height", "width"))):
            audit.add(Fault("image_fields", entry, "needs an int id, a file_name and int height and width in 1..65536"),
                      strict)
            if isinstance(img, dict) and _is_int(img.get("id")):
                dropped.add(img["id"])
        elif img["id"] in images:
            audit.add(Fault("duplicate_image_id", entry, f"image id {img['id']} is listed before"), strict)
        else:
            images[img["id"]] = img
    data["images"] = list(images.values())
    categories: dict[int, dict] = {}
    for i, cat in enumerate(data.get("categories") or []):
        if not (isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)):
            audit.add(Fault("category_fields", f"categories[{i}]", "needs an int id and a name"), strict)
        else:
            categories[cat["id"]] = cat
    if not captions:
        data["categories"] = list(categories.values())
    kept, seen = [], set()
    for i, ann in enumerate(data["annotations"]):
        entry = f"annotations[{i}]" + (f" (id {ann['id']})" if isinstance(ann, dict) and _is_int(ann.get("id")) else "")
        faults = _annotation_faults(ann, images, categories, seen, captions)
        if faults and faults[0]["kind"] == "unknown_image" and ann["image_id"] in dropped:
            faults[0]["detail"] = f"its image (id {ann['image_id']}) was dropped for a faulty entry"
        for fault in faults:
            audit.add(Fault(entry=entry, **fault), strict)
        if not all(f["kept"] for f in faults):
            continue
        seen.add(ann["id"])
        kept.append(ann)
    data["annotations"] = kept
    return audit


def _annotation_faults(ann, images: dict, categories: dict, seen: set, captions: bool) -> list[dict]:
    """The faults of one annotation ({kind, detail, kept}); none kept: the first that drops it. Repairs in place what
    can be repaired exactly (those are ``kept``): a box past the image edge is clipped to it; degenerate polygons are
    dropped when others remain."""

    def fault(kind: str, detail: str, kept: bool = False) -> list[dict]:
        return [{"kind": kind, "detail": detail, "kept": kept}]

    if not (isinstance(ann, dict) and _is_int(ann.get("id")) and _is_int(ann.get("image_id"))):
        return fault("caption_fields" if captions else "annotation_fields", "needs an int id and an int image_id")
    if ann["id"] in seen:
        return fault("duplicate_annotation_id", f"annotation id {ann['id']} is used before")
    if ann["image_id"] not in images:
        return fault("unknown_image", f"image_id {ann['image_id']} is not a listed image")
    if captions:
        return [] if isinstance(ann.get("caption"), str) else fault("caption_fields", "has no caption string")
    box = ann.get("bbox")
    if not (_is_int(ann.get("category_id")) and isinstance(box, list) and len(box) == 4 and all(_is_num(v) for v in box)
            and _is_num(ann.get("area"))):
        return fault("annotation_fields", "needs an int category_id, a finite bbox [x, y, w, h] and a finite area")
    if ann["category_id"] not in categories:
        return fault("unknown_category", f"category_id {ann['category_id']} is not a listed category")
    if ann.setdefault("iscrowd", 0) not in (0, 1):
        return fault("bad_iscrowd", f"iscrowd is {ann['iscrowd']!r}")
    img = images[ann["image_id"]]
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return fault("zero_area_box", f"bbox {box} has no area")
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, img["width"]), min(y + h, img["height"])
    if x1 <= x0 or y1 <= y0:
        return fault("box_outside_image", f"bbox {box} is outside the {img['width']}x{img['height']} image")
    repaired = []
    if "segmentation" in ann:
        kind, detail, seg = _segmentation_fault(ann["segmentation"], img["height"], img["width"])
        if kind and not seg:
            return fault(kind, detail)
        if kind:  # some polygons are degenerate, others are not
            ann["segmentation"] = seg
            repaired += fault(kind, f"{detail}; the other {len(seg)} kept", kept=True)
    if (x0, y0, x1, y1) != (x, y, x + w, y + h):
        ann["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        repaired += fault("box_clipped",
                          f"bbox {box} clipped to {ann['bbox']} at the {img['width']}x{img['height']} image's edge",
                          kept=True)
    return repaired
