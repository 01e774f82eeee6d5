"""Caption a held-out toy-world split and score it (``python run.py task=caption_eval data.seed=S``).

1. Generate (once) the split ``data.seed`` and read it back through pycocotools.
2. Caption every image greedily; score object mentions (``knexp.evaluation.mentions``).
3. Inpainting check on the first ``task.inpaint_scenes`` multi-object scenes: remove one object (chosen
   by the seed) by inpainting its dilated box with each method in ``task.inpaint.methods``; score whether
   its word is gone, the others are still named, and no phantom object appears.
Writes ``metrics.json`` and ``captions.csv`` / ``inpainting.csv`` to the job directory and prints the
metrics as JSON.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from knexp.counterfactual.cache import InpaintOptions
from knexp.data.coco import ImageError
from knexp.evaluation.mentions import mention_scores, removal_scores
from knexp.job.session import Session
from knexp.settings import Flag, Integer, Many, SettingError, Text, check_fields, unknown

log = logging.getLogger(__name__)
CHECK_STREAM = 3  # which object the inpainting check removes


@dataclass
class CaptionEvalTask:
    """``conf/task/caption_eval.yaml``: how many scenes to caption, and the inpainting check's scenes and settings."""

    name: str = "caption_eval"
    num_scenes: int = 300
    inpaint_scenes: int = 120
    inpaint: dict = field(default_factory=lambda: {"region": "bbox", "dilation": 4, "radius": 5,
                                                   "methods": ["telea", "ns"]})
    cache: bool = True

    def __post_init__(self):
        check_fields(self, "task", num_scenes=Integer(low=1), inpaint_scenes=Integer(low=0), cache=Flag())
        check = self.inpaint
        if not isinstance(check, dict):
            raise SettingError("task.inpaint", check, "use a mapping of region, dilation, radius, methods")
        unknown(check, "task.inpaint", ("region", "dilation", "radius", "methods"))
        Many(Text())("task.inpaint.methods", check.get("methods"))
        for method in check["methods"]:  # each as the inpaint group's options check it
            try:
                InpaintOptions(region=check.get("region"), dilation=check.get("dilation"), radius=check.get("radius"),
                               method=method)
            except SettingError as exc:
                raise (exc.under("inpaint.method", "task.inpaint.methods") if exc.key == "inpaint.method"
                       else exc.under("inpaint", "task.inpaint")) from None

    def __call__(self, session: Session) -> dict:
        return run(session, self)


def run(session: Session, task: CaptionEvalTask) -> dict:
    spec, catalog, data = session.spec, session.catalog, session.data
    ids, images, skipped = [], [], []  # usable images only, each decoded once; the rest listed with the reason
    for image_id in data.image_ids[: task.num_scenes]:
        try:
            images.append(data.load_image(image_id))
            ids.append(image_id)
        except ImageError as exc:
            skipped.append({"image_id": image_id, "reason": str(exc)})
    model = session.adapter
    logger = spec.logger()
    gen = spec.generation
    # noqa: E731
    names = lambda image_id: {catalog.by_coco_id(c).name for c in data.category_ids(image_id) if c in catalog.coco_ids}

    t0 = time.time()
    captions = model.caption(images, batch_size=gen.batch_size, max_new_tokens=gen.max_new_tokens,
                             width=gen.decode_width)
    log.info("captioned %d scenes in %.0f s", len(ids), time.time() - t0)
    truth = [names(i) for i in ids]
    named = [catalog.mentioned(c) for c in captions]
    metrics: dict = {"captions": mention_scores(truth, named)}
    logger.log_table("captions", pd.DataFrame({
        "image_id": ids, "caption": captions,
        "truth": [", ".join(sorted(t)) for t in truth], "named": [", ".join(sorted(n)) for n in named],
    }))

    multi = [i for i in ids if len(data.instances(i)) >= 2][: task.inpaint_scenes]
    rows = []
    check = task.inpaint
    for method in check["methods"]:
        opts = InpaintOptions(region=check["region"], dilation=check["dilation"], radius=check["radius"], method=method)
        edited, removed, others = [], [], []
        for image_id in multi:
            instances = data.instances(image_id)
            rng = np.random.default_rng([spec.data.get("seed", spec.seed), CHECK_STREAM, image_id])
            pick = instances[int(rng.integers(len(instances)))]
            image = data.load_image(image_id)
            segmentation = data.instance_mask(pick.annotation_id) if check["region"] == "segm" else None
            edited.append(opts.apply(image, pick.bbox, segmentation))
            removed.append(catalog.name_of(pick.category_id))
            others.append(names(image_id) - {removed[-1]})
        caps = model.caption(edited, batch_size=gen.batch_size, max_new_tokens=gen.max_new_tokens,
                             width=gen.decode_width)
        said = [catalog.mentioned(c) for c in caps]
        metrics[f"inpainting_{method}"] = removal_scores(removed, others, said)
        rows += [{"method": method, "image_id": i, "removed": r, "others": ", ".join(sorted(o)), "caption": c}
                 for i, r, o, c in zip(multi, removed, others, caps, strict=True)]
    if rows:
        logger.log_table("inpainting", pd.DataFrame(rows))
    metrics["data"] = {"seed": spec.data.get("seed"), "split": spec.data["split"], "root": str(spec.data["root"]),
                       "faults": data.audit.counts, "skipped_images": skipped}
    metrics["wall_time_s"] = round(time.time() - t0, 1)
    logger.log_metrics(metrics)
    logger.finish()
    summary = {k: v for k, v in metrics["captions"].items() if k != "per_object"}
    summary.update({k: metrics[k] for k in metrics if k.startswith("inpainting_")})
    print(json.dumps({"output_dir": str(spec.output_dir), **summary}, indent=1))
    return metrics
