"""``python run.py task=validate_data data=coco2017 data.root=/data/coco``: a dataset doctor, before any model runs.

Reads the COCO-format folder the config names and reports every fault it finds, by kind, with the first few entries of
each (``knexp.data.validation.FAULT_KINDS``), in two passes:

* the annotation pass reads the JSON only (every entry checked; seconds for 100,000 annotations);
* the image pass (``task.images=true``, the default) decodes every image, with progress in the log: missing, truncated
  or corrupt files, and sizes that disagree with the entry. With it, each object's selection candidates are counted: its
  instances in usable images whose inpainted region overlaps no other instance (docs/method.md, "Knowledge catalog":
  constraint 3; the caption constraints need the model and are left to ``task=select``).

It also counts, for each catalog object, its usable instances and images. Writes ``data_report.json`` into the job
directory and prints the summary. Loads no model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from knexp.data.coco import CocoScenes, EntryError
from knexp.data.loading import load_dataset
from knexp.identification.selection import overlap_reason
from knexp.io import atomic_write_text
from knexp.job.session import Session
from knexp.settings import Flag, Integer, check_fields

log = logging.getLogger(__name__)
progress = logging.getLogger("knexp.progress")


@dataclass
class ValidateDataTask:
    """``conf/task/validate_data.yaml``."""

    name: str = "validate_data"
    images: bool = True  # decode every image too (progress in the log); false: the annotation pass only
    first: int = 5  # entries shown per fault kind (data_report.json lists them all)
    progress_every: int = 500  # images between progress lines

    def __post_init__(self):
        check_fields(self, "task", images=Flag(), first=Integer(low=0), progress_every=Integer(low=1))

    def __call__(self, session: Session) -> dict:
        began = time.perf_counter()
        data, _ = load_dataset({**session.spec.data, "strict": False}, session.catalog)  # every fault, strict or not
        annotation_s = time.perf_counter() - began
        annotations = len(data.coco.anns)
        log.info("annotation pass: %d images, %d annotations checked in %.1f s", len(data.image_ids), annotations,
                 annotation_s)
        unusable: set[int] = set()
        image_s = None
        if self.images:
            t = time.perf_counter()
            unusable = self._image_pass(data)
            image_s = time.perf_counter() - t
        objects = {k.name: self._object(data, session, k, unusable) for k in session.catalog}
        report = {
            "root": str(data.root), "split": data.split, "images": len(data.image_ids), "annotations": annotations,
            "image_pass": self.images, "unusable_images": len(unusable), "summary": data.audit.summary(),
            **data.audit.to_dict(),
            "objects": objects, "seconds": {"annotation_pass": round(annotation_s, 2),
                                            "image_pass": None if image_s is None else round(image_s, 2)},
        }
        atomic_write_text(session.spec.output_dir / "data_report.json", json.dumps(report, indent=1))
        shown = {**report, **data.audit.to_dict(first=self.first)}
        print(_text(shown, self.first))
        print(f"full report: {session.spec.output_dir / 'data_report.json'}")
        return report

    def _image_pass(self, data: CocoScenes) -> set[int]:
        """Decode every image (``CocoScenes.image_problem``); the ids that cannot be used."""
        ids, began, bad = data.image_ids, time.perf_counter(), set()
        for n, image_id in enumerate(ids, 1):
            if data.image_problem(image_id):
                bad.add(image_id)
            if n % self.progress_every == 0 or n == len(ids):
                progress.info("images: %d/%d (%.0f/s), %d unusable", n, len(ids),
                              n / max(time.perf_counter() - began, 1e-9), len(bad))
        return bad

    def _object(self, data: CocoScenes, session: Session, k, unusable: set[int]) -> dict:
        """Usable instances and images of catalog object ``k``; with the image pass, its selection candidates."""
        anns = data.coco.loadAnns(data.coco.getAnnIds(catIds=[k.coco_id],
                                                      iscrowd=False)) if k.coco_id in data.coco.cats else []
        row = {"coco_id": k.coco_id, "instances": len(anns), "images": len({a["image_id"] for a in anns})}
        if self.images:
            row["candidates"] = sum(1 for a in anns if a["image_id"] not in unusable and _free(data, session, a))
        return row


def _free(data: CocoScenes, session: Session, ann: dict) -> bool:
    """Constraint 3 of the dataset D (docs/method.md, "Knowledge catalog"): the instance's inpainted region (the job's
    inpainting options, as selection draws it) overlaps no other instance's mask."""
    entry = data.coco.imgs[ann["image_id"]]
    try:
        region = session.spec.opts.mask((entry["height"], entry["width"]), tuple(ann["bbox"]),
                                        data.instance_mask(ann["id"])) > 0
        return not overlap_reason(data, session.catalog, ann["image_id"], ann["id"], region)
    except EntryError:
        return False


def _text(report: dict, first: int) -> str:
    """The console summary: faults by kind with their first entries, then the objects."""
    passes = (f", image pass {report['seconds']['image_pass']} s" if report["image_pass"]
              else " (task.images=true decodes the images)")
    lines = [f"{report['root']} ({report['split']}): {report['images']} images, {report['annotations']} usable "
             f"annotations; annotation pass {report['seconds']['annotation_pass']} s" + passes, report["summary"]]
    for kind, faults in report["faults"].items():
        lines.append(f"  {kind}: {report['counts'][kind]} ({report['meaning'][kind]})")
        lines += [f"    {f['entry']}: {f['detail']}" for f in faults[:first]]
    lines.append("objects (usable instances / images" + (" / selection candidates)" if report["image_pass"] else ")"))
    for name, row in report["objects"].items():
        candidates = f" / {row['candidates']}" if "candidates" in row else ""
        lines.append(f"  {name}: {row['instances']} / {row['images']}{candidates}")
    return "\n".join(lines)
