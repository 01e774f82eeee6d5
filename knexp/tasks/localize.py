"""``python run.py task=localize knowledge=banana``: Fig. 3, measured, for every method on one object.

Identifies k's neurons with each method of ``task.methods`` (on the cached statistics: one pass per sample serves them
all), then scores each set's maps over the image tokens against the object's tokens, beside layer-matched random
neurons and chance, on the identification images and on ``k_images`` held-out images of k (``knexp.evaluation.fig3``;
docs/method.md, "Fig. 3, measured"). Writes ``localization.csv`` (one row per image, method, neurons and map) and
``metrics.json`` (the per-object means, which ``task=report`` averages over objects), and resumes like every job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from knexp.evaluation.fig3 import localize, summary
from knexp.evaluation.protocol import evaluation_images
from knexp.job.session import Session
from knexp.resume import finished, mark_finished
from knexp.settings import Flag, Integer, Many, SettingError, Text, check_fields

log = logging.getLogger(__name__)


@dataclass
class LocalizeTask:
    """``conf/task/localize.yaml``: the methods compared and the held-out images of k."""

    name: str = "localize"
    methods: list[str] = field(default_factory=lambda: ["ours", "pan", "schwettmann", "attribution"])
    k_images: int = 6
    cache: bool = True

    def __post_init__(self):
        check_fields(self, "task", methods=Many(Text()), k_images=Integer(low=0), cache=Flag())

    def check_session(self, session: Session) -> None:
        """Every method names a ``conf/method`` option (checked when the job is built, before the model loads)."""
        for name in self.methods:
            try:
                session.spec.named("method", name)
            except SettingError as exc:
                raise SettingError("task.methods", name, exc.expected) from exc

    def __call__(self, session: Session) -> dict:
        t0 = time.time()
        spec = session.spec
        out = spec.output_dir
        if (done := finished(spec.job_key, out)) is not None:
            return done
        founds = [session.identify(method=name) for name in self.methods]
        k = session.knowledge
        seen = [r.candidate.image_id for r in founds[0].results]
        heldout = [i for i, group, _ in evaluation_images(session.data, session.catalog, k, seen, self.k_images, 0,
                                                          spec.seed) if group == "k" and i not in seen]
        rows = localize(session.adapter, session.data, founds, spec.rule, heldout, k.coco_id, spec.seed)
        out.mkdir(parents=True, exist_ok=True)
        rows.to_csv(out / "localization.csv", index=False)
        labels = {key: v for key, v in spec.labels().items() if key not in ("method", "variant")}
        metrics = {**labels, "task": "localize", "methods": list(self.methods),
                   "status": {f.method.name: f.status() for f in founds},
                   "images": {"identification": seen, "held-out": heldout},
                   "localization": summary(rows), "wall_time_s": round(time.time() - t0, 1)}
        logger = spec.logger()
        logger.log_table("localization", rows)
        logger.log_metrics(metrics)  # metrics.json
        logger.finish()
        mark_finished(spec.job_key, out, metrics)
        if not len(rows):
            log.warning("%s: no method gave a set on a usable sample, so nothing was measured", k.name)
        print(f"localization of {k.name}: {out / 'localization.csv'} ({len(seen)} identification images, "
              f"{len(heldout)} held-out)")
        return metrics
