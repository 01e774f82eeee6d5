"""``python run.py task=edit_sequence task.objects=[banana,cake,bear]``: objects erased one after another on one model,
each edit made on the model the earlier ones give, every earlier edit measured again after each step (docs/method.md,
"Sequential edits").

Step i runs the edit job (``task.job``: ``task=edit``'s settings) for object k_i on the model with the edit files of
steps 0..i-1 applied (``model.edit``, composed as files), in ``<job dir>/<i>_<object>/``, resumable; the KL term of a
fitted rule also keeps the outputs on the identification images of the earlier objects (what the model now says about
them: AlphaEdit's preserved keys of earlier edits, K_p, in the terms of knexp's fit). After each step, every object
erased so far is captioned again on its identification and held-out images by the model as it now stands:

  reliability_j(i), m_generality_j(i)   the share of those captions that show the erase of k_j, over the images whose
                                        caption before step j named k_j

On the final model, the general-ability guard against the model before the sequence: captions of images that show
none of the sequence's objects (BLEU, BERTScore, the mentions of the other catalog objects kept) and next-token top-1
and KL after the guard's prompts. Writes ``sequence.json`` (every step's measures, the final guard) and
``sequence.csv`` (one row per step and earlier object).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from knexp.config import build
from knexp.editing.target import Erase
from knexp.evaluation.edit_measures import logit_agreement, mentions_kept, similarity, text_logits
from knexp.evaluation.protocol import general_images
from knexp.io import atomic_write_text
from knexp.job.session import Session
from knexp.models.registry import edit_files
from knexp.settings import Flag, Many, SettingError, Text, check_fields

log = logging.getLogger(__name__)


@dataclass
class EditSequence:
    """``conf/task/edit_sequence.yaml``: ``job`` is the edit task built from ``task.job``; ``objects`` are erased in
    their order."""

    job: object
    name: str = "edit_sequence"
    objects: list[str] = field(default_factory=list)
    cache: bool = True

    def __post_init__(self):
        if isinstance(self.job, Mapping):  # built here, as task=tune builds its job
            try:
                self.job = build(OmegaConf.create(dict(self.job)), "task")
            except SettingError as exc:
                raise exc.under("task", "task.job") from None
        check_fields(self, "task", objects=Many(Text(), min_len=1), cache=Flag())
        if not getattr(self.job, "save", False):
            raise SettingError("task.job.save", getattr(self.job, "save", None),
                               "a sequence applies each step's edit file to the next: use task.job.save=true")

    def check_session(self, session: Session) -> None:
        """``task.objects`` are distinct objects of the catalog, and the edit erases."""
        names = [k.name for k in session.catalog.named(self.objects, "task.objects")]
        if len(set(names)) != len(names):
            raise SettingError("task.objects", self.objects, "name each object once")
        op = getattr(session.spec.edit, "op", None)
        if op != "erase":
            raise SettingError("edit.op", op, "a sequence erases: use edit.op=erase")
        self.job.check_session(session)  # each step is an edit job

    def __call__(self, session: Session) -> dict:
        out = session.spec.output_dir
        names = [k.name for k in session.catalog.named(self.objects, "task.objects")]
        files = [Path(f) for f in edit_files(session.spec.model)]  # the model as configured
        base = current = session.with_edits(files)
        probes: list[tuple[str, dict]] = []  # (object, its edit_images.json) of every step that made an edit
        steps, kept = [], []
        for i, name in enumerate(names):
            folder = out / f"{i:02d}_{name.replace(' ', '_')}"
            self.job.keep = kept
            result = self.job(current.for_knowledge(name, folder))
            made = folder / "edit.safetensors"
            if not made.is_file():
                log.warning("sequence step %d (%s): no edit was made (%s); the next step edits the same model", i,
                            name, "; ".join((result.get("status") or {}).get("reasons", [])))
                steps.append({"step": i, "object": name, "edited": False, "earlier": []})
                continue
            files.append(made)
            probe = json.loads((folder / "edit_images.json").read_text())
            probes.append((name, probe))
            kept = kept + [image_id for image_id, _ in probe["ident"]]
            current = session.with_edits(files)  # the model the next step edits, and the one measured now
            earlier = [{"object": k, **self._efficacy(current, k, p)} for k, p in probes]
            steps.append({"step": i, "object": name, "edited": True, "edit": result["variants"].get("edit", {}),
                          "earlier": earlier})
            log.info("sequence step %d (%s): reliability of the %d objects erased so far, mean %s", i, name,
                     len(earlier), _mean([e["reliability"] for e in earlier]))
        final = self._guard(base, current, names, probes) if probes else {}
        last = final_measures(steps)
        summary = {"objects": names, "edits": [str(f) for f in files], "steps": steps, "final": final,
                   "final_reliability": _mean([e["reliability"] for e in last]),
                   "final_m_generality": _mean([e["m_generality"] for e in last])}
        atomic_write_text(out / "sequence.json", json.dumps(summary, indent=1, default=str))
        rows = [{"step": s["step"], "edited_now": s["object"], **e} for s in steps for e in s["earlier"]]
        pd.DataFrame(rows).to_csv(out / "sequence.csv", index=False)
        return summary

    @staticmethod
    def _efficacy(session: Session, name: str, probe: dict) -> dict:
        """Reliability and M-generality of the erase of ``name`` on ``session``'s model: its captions of the images
        of ``probe`` (``edit_images.json``) against the captions before that object's edit."""
        k, data = session.catalog[name], session.data
        erase, out = Erase(k), {}
        for group, measure in (("ident", "reliability"), ("held", "m_generality")):
            rows = [(image_id, before) for image_id, before in probe[group] if k.mentioned_in(before)]
            ids = [image_id for image_id, _ in rows]
            captions = session.resources.captioner([data.load_image(i) for i in ids],
                                                   [[session.resources.dataset_id, i] for i in ids]) if ids else []
            out[measure] = _mean([erase.caption_success(c) for c in captions])
            out[f"{measure}_n"] = len(ids)
        return out

    def _guard(self, base: Session, final: Session, names: list[str], probes: list[tuple[str, dict]]) -> dict:
        """The general-ability guard of the final model against the model before the sequence (module docstring)."""
        edited = [base.catalog[n] for n in names]
        measured = {image_id for _, p in probes for g in ("ident", "held") for image_id, _ in p[g]}
        ids = general_images(base.data, edited, self.job.general_images, measured, base.spec.seed)
        keys = [[base.resources.dataset_id, i] for i in ids]
        images = [base.data.load_image(i) for i in ids]
        before, after = base.resources.captioner(images, keys), final.resources.captioner(images, keys)
        others = [o for o in base.catalog if o not in edited]
        texts, batch = self.job.general_prompts, base.resources.captioner.batch_size
        agreement = logit_agreement(text_logits(base.adapter, texts, batch), text_logits(final.adapter, texts, batch))
        return {"images": len(ids), **similarity(after, before, self.job.bertscore_model, self.job.bertscore_layers),
                **mentions_kept(after, before, others), "texts": agreement}


def _mean(values: list) -> float | None:
    """The mean of the values that are not None (a rate with no input is None), or None when none is left."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def final_measures(steps: list[dict]) -> list[dict]:
    """The measures of every erased object after the last step that made an edit (a later step that made none left the
    model as it was)."""
    edited = [s for s in steps if s["edited"]]
    return edited[-1]["earlier"] if edited else []
