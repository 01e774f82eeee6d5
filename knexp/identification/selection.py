"""Choose identification samples under the paper's three constraints (docs/method.md, "Knowledge catalog").

A candidate is one COCO instance of knowledge k. It is accepted when
  (3) no other annotated instance overlaps the region that will be inpainted (checked first: no model);
  (1) the model's caption of the original image names k;
  (2) the model's caption of the image with the instance inpainted away does not.
Candidates are visited in a seeded random order until ``per_knowledge`` are accepted. Every rejected
candidate keeps its reason; an unreadable image is a rejection, not a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.catalog import Catalog, Knowledge
from knexp.data.coco import CocoScenes, EntryError
from knexp.models.captioning import Captioner

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    image_id: int
    annotation_id: int
    knowledge: str
    accepted: bool = False
    reason: str = ""
    original_caption: str = ""
    inpainted_caption: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Selection:
    knowledge: str
    requested: int
    accepted: list[Candidate]
    rejected: list[Candidate]

    @property
    def message(self) -> str:
        n = len(self.accepted)
        if n >= self.requested:
            return f"{self.knowledge}: {n} sample{'' if n == 1 else 's'} selected"
        reasons: dict[str, int] = {}
        for c in self.rejected:
            key = c.reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        why = ", ".join(f"{v} {k}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "no candidates"
        return (f"{self.knowledge}: only {n} of {self.requested} requested samples satisfy the constraints "
                f"({len(self.rejected)} rejected: {why}); continuing with {n}")

    def to_dict(self) -> dict:
        return {"knowledge": self.knowledge, "requested": self.requested,
                "accepted": [c.to_dict() for c in self.accepted],
                "rejected": [c.to_dict() for c in self.rejected], "message": self.message}


def overlap_reason(data: CocoScenes, catalog: Catalog, image_id: int, annotation_id: int, region: np.ndarray) -> str:
    """Constraint (3): '' if no other instance's mask touches ``region`` (bool [H, W]), else the reason."""
    for other in data.instances(image_id):
        if other.annotation_id != annotation_id and (data.instance_mask(other.annotation_id) & region).any():
            name = catalog.name_of(other.category_id)
            return f"overlap: the inpainted region overlaps {name} (annotation {other.annotation_id})"
    return ""


def select_samples(data: CocoScenes, dataset_id: str, captioner: Callable[[list[np.ndarray], list], list[str]],
                   catalog: Catalog,
                   knowledge: Knowledge, per_knowledge: int, seed: int, opts: InpaintOptions, cache: InpaintCache,
                   batch: int = 8) -> Selection:
    """Walk the instances of ``knowledge`` in a seeded order and keep the first ``per_knowledge`` that meet the
    three constraints of the dataset D (docs/method.md, "Knowledge catalog"). ``captioner(images, image_keys)`` captions
    ``batch`` at a time (``knexp.models.captioning.Captioner``: cached per image)."""
    ids = data.image_ids_with(knowledge.coco_id)
    instances = [inst for i in ids for inst in data.instances(i) if inst.category_id == knowledge.coco_id]
    order = np.random.default_rng([seed, knowledge.coco_id]).permutation(len(instances))
    accepted: list[Candidate] = []
    rejected: list[Candidate] = []
    pending: list[tuple[Candidate, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        originals = captioner([p[1] for p in pending], [[dataset_id, p[0].image_id] for p in pending])
        edited = captioner([p[2] for p in pending],
                           [[dataset_id, p[0].image_id, p[0].annotation_id, opts] for p in pending])
        for (cand, _, _), cap_o, cap_i in zip(pending, originals, edited, strict=True):
            cand.original_caption, cand.inpainted_caption = cap_o, cap_i
            if not knowledge.mentioned_in(cap_o):
                cand.reason = "caption: the original caption does not name it"
            elif knowledge.mentioned_in(cap_i):
                cand.reason = "caption: the inpainted caption still names it"
            elif len(accepted) < per_knowledge:
                cand.accepted = True
            else:
                continue  # surplus: valid but not needed
            (accepted if cand.accepted else rejected).append(cand)
        pending.clear()

    for index in order:
        if len(accepted) >= per_knowledge:
            break
        inst = instances[index]
        cand = Candidate(inst.image_id, inst.annotation_id, knowledge.name)
        try:  # an image or a mask that cannot be used rejects this candidate, with the reason
            image = data.load_image(inst.image_id)
            seg = data.instance_mask(inst.annotation_id)
            region = opts.mask(image.shape[:2], inst.bbox, seg) > 0
            cand.reason = overlap_reason(data, catalog, inst.image_id, inst.annotation_id, region)
        except EntryError as exc:
            cand.reason = f"data: {exc}"
            rejected.append(cand)
            log.warning("skipping annotation %d: %s", inst.annotation_id, exc)
            continue
        if cand.reason:
            rejected.append(cand)
            continue
        pending.append((cand, image,
                        cache.get(dataset_id, inst.image_id, inst.annotation_id, image, inst.bbox, seg, opts)))
        if len(pending) >= max(batch, 2 * (per_knowledge - len(accepted))):
            flush()
    flush()
    selection = Selection(knowledge.name, per_knowledge, accepted, rejected)
    (log.info if len(accepted) >= per_knowledge else log.warning)(selection.message)
    return selection


# Candidates per caption call in ``Selector.first`` (the trace's one sample per object): float32 matrix products round a
# row at 4, 8 or 16+ rows as in a full batch, but not at 1, 2, 3 or 5 (BENCHMARKS.md, measurement notes), so a near-tie
# between two tokens breaks as it would in a full selection.
SMALL_BATCH = 4


@dataclass
class Selector:
    """Selection with fixed settings: ``selector(knowledge)`` selects ``per_knowledge`` samples of it from ``data`` (the
    dataset ``dataset_id``) with ``captioner``'s model, inpainting with ``opts`` through ``inpaint_cache``."""

    data: CocoScenes
    dataset_id: str
    catalog: Catalog
    captioner: Captioner
    opts: InpaintOptions
    inpaint_cache: InpaintCache
    per_knowledge: int
    seed: int

    def __call__(self, knowledge: Knowledge) -> Selection:
        return select_samples(self.data, self.dataset_id, self.captioner, self.catalog, knowledge, self.per_knowledge,
                              self.seed, self.opts, self.inpaint_cache, batch=self.captioner.batch_size)

    def first(self, knowledge: Knowledge, n: int) -> Selection:
        """The first ``min(n, per_knowledge)`` samples of ``selector(knowledge)``, captioning no more candidates than it
        takes: candidates go to the captioner ``SMALL_BATCH`` at a time (or 2 per missing sample), not a full batch.
        The visiting order is the same and the captions do not depend on their batch, so the samples are the same, for
        a fraction of the captions when n is small (the live window's trace takes one per object)."""
        return select_samples(self.data, self.dataset_id, self.captioner, self.catalog, knowledge,
                              min(n, self.per_knowledge), self.seed, self.opts, self.inpaint_cache, batch=SMALL_BATCH)

    def inpainted(self, candidate: Candidate) -> np.ndarray:
        """The candidate's image with its instance inpainted away (from the cache where it holds it)."""
        image = self.data.load_image(candidate.image_id)
        inst = next(i for i in self.data.instances(candidate.image_id) if i.annotation_id == candidate.annotation_id)
        return self.inpaint_cache.get(self.dataset_id, candidate.image_id, candidate.annotation_id, image, inst.bbox,
                                      self.data.instance_mask(candidate.annotation_id), self.opts)
