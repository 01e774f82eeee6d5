"""``python run.py task=edit knowledge=banana method=ours edit/rule=kn``: identification, then a weight edit of the
found neurons, scored like multimodal editing benchmarks against baselines on the same footing (docs/method.md,
"Editing with the found neurons").

1. Identify k's neurons (``Session.identify``) and take the consensus set of ``edit.size`` (``knexp.editing.sets``).
2. Images (``knexp.evaluation.protocol.evaluation_images``): the identification images (reliability), ``k_images`` +
   ``edit.fit_k`` held-out images of k, the first ``k_images`` measured (M- and T-generality), the rest seen only by
   the fit, and ``other_images`` + ``edit.fit_other`` images without k; the last ``edit.fit_other`` of those feed only
   the optimized rule's KL term, the rest are M-locality's.
3. The edit (``edit.rule``, its context built from ``Session.edit_inputs``), and the baselines of ``baselines``:
   ``random``, the same rule on layer-matched random neurons scaled to the same ||Delta||_F (a fitted rule with at most
   the steps the edit's fit ran: the same budget); ``finetune``, the optimized
   rule (``conf/edit/rule/optimized.yaml``) on as many random ``down_proj`` columns of any layer; ``rank_one``, a
   ROME-style update of one ``down_proj`` (``knexp.editing.rank_one``; its covariance from
   ``task.rank_one.covariance_images`` more images without k); ``banned``, greedy decoding that never emits the first
   token of any of k's word forms (``knexp.models.hooks.banned``), the trivial bound of an erase; ``alpha_edit``, the
   whole-matrix rule of ``conf/edit/rule/alpha_edit.yaml`` (``knexp.editing.matrix``; erase only), the field's method
   on the same images.
4. Every variant and the unedited model scored by ``knexp.evaluation.edit_measures``, the general-ability guard
   included (``general_images`` images that show neither k nor a swap's k', in one order for every object, and the
   prompts of ``general_texts``); the edit saved as
   ``edit.safetensors`` (``model.edit=<file>`` loads it).
Writes ``metrics.json`` (per variant: the measures and the cost), ``edit_captions.csv``, ``selection.json`` and
``edit_images.json`` (the identification and held-out images' ids with the unedited captions, for measuring the edit
again later: ``task=edit_sequence``). ``keep``: images (ids) whose outputs the optimized rule's KL term also keeps,
those that show k left out (a sequence's earlier objects' images).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from knexp.editing.make import make, making_costs
from knexp.editing.matrix import MatrixEdit
from knexp.editing.rank_one import RankOne, rank_one_data
from knexp.editing.rules import matched_norm
from knexp.editing.sets import disjoint_random, object_set, random_columns
from knexp.evaluation.edit_measures import EditMeasures, Probe, Variant, read_prompts
from knexp.evaluation.protocol import evaluation_images, general_images
from knexp.io import atomic_write_text
from knexp.job.session import Session
from knexp.models.hooks.banned import banned
from knexp.models.registry import edit_files, file_hash
from knexp.models.weight_edit import WeightEdit, applied, save
from knexp.reporting.outputs import write_data_faults, write_identification
from knexp.resume import finished, mark_finished
from knexp.settings import Choice, Flag, Integer, Many, SettingError, Text, check_fields, from_mapping
from knexp.store import stable_key

log = logging.getLogger(__name__)
BASELINES = ("random", "finetune", "rank_one", "banned", "alpha_edit")


def banned_ids(adapter, knowledge) -> list[int]:
    """The first token of each word form of ``knowledge``, after a space and not, lower-case and capitalised."""
    forms = [v for f in knowledge.forms for v in (f, f.capitalize())]
    return sorted({adapter.tokenize(s + f)[0] for f in forms for s in ("", " ")})


@dataclass
class EditImages:
    """The images of one object's edit (module docstring, step 2): the probe's rows and what fitting may see."""

    probe: Probe
    locality: list[np.ndarray]  # images without k for the optimized rule's KL term (never measured)
    more_k: list[int]  # ids of images of k besides the identification images that fitting may see (never measured)
    covariance: list[np.ndarray]  # images without k for the rank-one baseline's covariance
    measured: set[int]  # the ids of the images the probe measures (no rule may fit on them)


@dataclass
class EditTask:
    """``conf/task/edit.yaml`` (module docstring)."""

    name: str = "edit"
    k_images: int = 6
    other_images: int = 9
    general_images: int = 30
    general_texts: str | None = None  # a file of prompts, one per line; null: knexp/evaluation/general_texts.txt
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    rank_one: dict = field(default_factory=dict)  # the rank-one baseline's settings (knexp.editing.rank_one.RankOne)
    save: bool = True
    bertscore_model: str | None = None
    bertscore_layers: int = 6
    cache: bool = True
    keep: list[int] = field(default_factory=list)  # image ids whose outputs the KL term keeps (a sequence's earlier)

    def __post_init__(self):
        check_fields(self, "task", k_images=Integer(low=0), other_images=Integer(low=0), general_images=Integer(low=0),
                     general_texts=Text(optional=True), keep=Many(Integer(low=0), min_len=0),
                     baselines=Many(Choice(BASELINES), min_len=0),
                     save=Flag(), bertscore_model=Text(optional=True), bertscore_layers=Integer(low=1), cache=Flag())
        self.rank_one = from_mapping(RankOne, self.rank_one, "task.rank_one")
        self.general_prompts = read_prompts(self.general_texts, "task.general_texts")

    def check_session(self, session: Session) -> None:
        """A whole-matrix rule's layers (the job's rule, or the ``alpha_edit`` baseline) fit the model: checked when
        the model loads, before any pass."""
        rule = session.spec.edit.rule
        if isinstance(rule, MatrixEdit):
            rule.window(session.adapter)
        self._matrix(session)

    def __call__(self, session: Session) -> dict:
        t0 = time.time()
        spec, resources = session.spec, session.resources
        out = spec.output_dir
        if (done := finished(spec.job_key, out)) is not None:
            return done
        settings, adapter, k = spec.edit, resources.adapter, spec.knowledge
        found = session.identify(method=settings.source)  # the set's source: edit.source, or the job's method
        status = found.status()
        write_identification(out, found, adapter.num_layers)
        target = settings.target(spec.catalog, k)
        metrics = {**spec.labels(), "method": found.method.name, "variant": found.method.variant, "task": "edit",
                   "status": status, "op": target.op, "rule": settings.rule.name, "rule_label": settings.rule.label,
                   "replacement": target.replacement.name if target.replacement else None, "size": settings.size,
                   "selection": found.selection.message, "skipped": found.skipped, "variants": {}}
        if found.results:
            metrics["variants"], table, edit = self._edit(session, found, target)
            table.to_csv(out / "edit_captions.csv", index=False)
            if self.save:
                earlier = [file_hash(f) for f in edit_files(spec.model)]  # made on the model these files give
                save(edit, out / "edit.safetensors", adapter, resources.model_key, earlier)
        else:
            log.warning("%s: no usable sample, so no edit (metrics.json status): %s", k.name,
                        "; ".join(status["reasons"]))
        metrics["data_faults"] = write_data_faults(out, resources.data.audit)
        metrics["wall_time_s"] = round(time.time() - t0, 1)
        logger = spec.logger()
        logger.log_metrics(metrics)
        logger.finish()
        mark_finished(spec.job_key, out, metrics)
        shown = {name: {m: v.get(m) for m in ("reliability", "m_generality")}
                 for name, v in metrics["variants"].items()}
        print(json.dumps({"output_dir": str(out), "knowledge": k.name, "op": target.op, "rule": settings.rule.name,
                          **shown}, indent=1))
        return metrics

    def _images(self, session: Session, found, target) -> EditImages:
        """The probe (identification images, held-out images of k, measured images without k, text prompts) and the
        images only fitting sees; the images without k come first for measuring, whatever their count."""
        spec, data = session.spec, session.data
        settings, k = spec.edit, spec.knowledge
        ident_ids = [r.candidate.image_id for r in found.results]
        extra = self.rank_one.covariance_images if "rank_one" in self.baselines else 0
        rows = evaluation_images(data, spec.catalog, k, ident_ids, self.k_images + settings.fit_k,
                                 self.other_images + settings.fit_other + extra, spec.seed)
        others = [r for r in rows if r[1] == "other"]  # the first ones are the same whatever the count
        measured, fitting = others[:self.other_images], others[self.other_images:self.other_images + settings.fit_other]
        covariance = others[self.other_images + settings.fit_other:]

        def probe_rows(part):
            return [([session.resources.dataset_id, image_id], data.load_image(image_id), spec.catalog[own])
                    for image_id, _, own in part]

        k_rows = [r for r in rows if r[1] == "k"]
        held_out = [r for r in k_rows if r[0] not in ident_ids]  # the first ones are the same whatever the count
        held_out, more_k = held_out[:self.k_images], held_out[self.k_images:]
        probe = Probe(target, probe_rows([r for r in k_rows if r[0] in ident_ids]), probe_rows(held_out),
                      probe_rows(measured), list(settings.texts), settings.about_k(k), settings.prompts)
        general = general_images(data, target.asked, self.general_images, {i for i, _, _ in rows}, spec.seed)
        probe.general = [([session.resources.dataset_id, i], data.load_image(i), None) for i in general]
        probe.general_texts = self.general_prompts
        probe.objects = [o for o in spec.catalog if o not in target.asked]
        measured_ids = set(ident_ids) | {i for i, _, _ in held_out + measured} | set(general)
        kept = [(i, "keep", "") for i in self.keep if i not in measured_ids and k.coco_id not in data.category_ids(i)]
        locality, covariance = ([data.load_image(i) for i, _, _ in part] for part in (fitting + kept, covariance))
        return EditImages(probe, locality, [i for i, _, _ in more_k], covariance, measured_ids)

    def _plan(self, session: Session, found, target, neurons, images: EditImages,
              matrix) -> tuple[list[tuple[Variant, dict]], WeightEdit]:
        """(every variant to measure with its cost, the edit of ``neurons``): the edit and the baselines of
        ``baselines`` (``matrix``: the ``alpha_edit`` baseline's rule, or None), each rule's context built once (the
        edit, its random control and the fine-tuning share one where they read the same)."""
        spec, adapter, model_key = session.spec, session.adapter, session.resources.model_key
        inputs = session.edit_inputs(found, target, images.locality, images.measured, images.more_k)
        contexts: dict = {}

        def made(rule, chosen):
            if type(rule).context not in contexts:
                contexts[type(rule).context] = rule.context(inputs)
            return make(adapter, rule, chosen, target, contexts[type(rule).context])

        def edited(name, e, secs):
            variant = Variant(name, stable_key(model_key, "edit", e.digest()), lambda: applied(adapter, e))
            return variant, {"seconds": round(secs, 3), "relative_norm": e.relative_norm(adapter), "norm": e.norm(),
                             "parameters_changed": e.parameters_changed, "neurons": e.units_changed,
                             **making_costs(e)}

        rule = spec.edit.rule
        edit, seconds = made(rule, neurons)
        plan = [edited("edit", edit, seconds)]
        if "random" in self.baselines and not rule.edits_neurons:
            log.info("no random control: edit/rule=%s does not edit the set's neurons", rule.name)
        elif "random" in self.baselines:  # a fitted rule gets the edit's steps: the same budget, not more
            budget = replace(rule, steps=max(int(edit.provenance["steps_run"]), 1)) if "steps_run" in edit.provenance \
                else rule
            control, secs = made(budget, disjoint_random(neurons, adapter.d_ff, spec.seed))
            plan.append(edited("random", matched_norm(control, edit.norm()), secs))
        if "finetune" in self.baselines:
            columns = random_columns(len(neurons), adapter.num_layers, adapter.d_ff, spec.seed)
            plan.append(edited("finetune", *made(session.edit_rule("optimized"), columns)))
        if "rank_one" in self.baselines:
            plan.append(edited("rank_one", *self._rank_one(session, found, neurons, target, images.covariance)))
        if matrix is not None and target.op not in matrix.ops:
            log.info("no alpha_edit baseline: it makes %s only", " or ".join(matrix.ops))
        elif matrix is not None and not rule.edits_neurons:
            log.info("no alpha_edit baseline: edit/rule=%s already edits whole matrices", rule.name)
        elif matrix is not None:
            plan.append(edited("alpha_edit", *made(matrix, neurons)))
        if "banned" in self.baselines:
            ids = banned_ids(adapter, spec.knowledge)
            plan.append((Variant("banned", stable_key(model_key, "banned", ids), lambda: banned(adapter, ids)),
                         {"seconds": 0.0, "banned_tokens": len(ids)}))
        return plan, edit

    def _matrix(self, session: Session):
        """The ``alpha_edit`` baseline's rule (``conf/edit/rule/alpha_edit.yaml``), its layers checked against the
        model; None where ``baselines`` leaves it out."""
        if "alpha_edit" not in self.baselines:
            return None
        matrix = session.edit_rule("alpha_edit")
        try:
            matrix.window(session.adapter)
        except SettingError as exc:
            raise SettingError("task.baselines", self.baselines, f"the alpha_edit baseline's {exc.key[5:]}="
                               f"{matrix.layers} (conf/edit/rule/alpha_edit.yaml) does not fit this model: "
                               f"{exc.expected}; or leave alpha_edit out") from exc
        return matrix

    def _edit(self, session: Session, found, target) -> tuple[dict, pd.DataFrame, WeightEdit]:
        """Every variant's measures (``variants`` of metrics.json), their captions, and the edit."""
        k = session.knowledge
        matrix = self._matrix(session)  # checked before any edit is made
        images = self._images(session, found, target)
        measures = EditMeasures(session.resources.captioner, images.probe, self.bertscore_model, self.bertscore_layers)
        neurons = object_set(found, session.spec.rule, session.spec.edit.size)
        plan, edit = self._plan(session, found, target, neurons, images, matrix)
        log.info("%s: measuring the unedited model and %d variants (%s)", k.name, len(plan),
                 ", ".join(v.name for v, _ in plan))
        results = {"unedited": measures.score(Variant("unedited", session.resources.captioner.model_key, None))}
        for i, (variant, cost) in enumerate(plan):
            log.info("%s: measuring %s (%d/%d)", k.name, variant.name, i + 1, len(plan))
            results[variant.name] = {**measures.score(variant), "cost": cost}
        unedited = results["unedited"]["captions"]
        probed = {group: [[key[1], caption] for (key, _, _), caption in zip(getattr(images.probe, group),
                                                                             unedited[group], strict=True)]
                  for group in ("ident", "held")}
        atomic_write_text(session.spec.output_dir / "edit_images.json", json.dumps(probed, indent=1))
        frames = [pd.DataFrame({"variant": name, "group": group, "caption": captions})
                  for name, scores in results.items() for group, captions in scores.pop("captions").items()]
        results["edit"]["set"] = {"method": neurons.method, "size": len(neurons),
                                  "per_layer": neurons.per_layer(session.adapter.num_layers)}
        return results, pd.concat(frames, ignore_index=True), edit

    def _rank_one(self, session: Session, found, neurons, target,
                  covariance: list[np.ndarray]) -> tuple[WeightEdit, float]:
        """The rank-one baseline's edit (``knexp.editing.rank_one``) and its seconds, at ``task.rank_one.layer`` or the
        layer holding most of ``neurons``."""
        adapter, data = session.adapter, session.data
        layer = self.rank_one.layer if self.rank_one.layer is not None else int(np.bincount(neurons.layers).argmax())
        if layer == adapter.num_layers - 1:
            log.warning("rank_one: layer %d is the last: its output at the image positions feeds nothing a caption "
                        "reads, so the edit cannot act there; set task.rank_one.layer to an earlier one", layer)
        inputs = rank_one_data(adapter, data, found.results, target.knowledge, covariance)
        began = time.perf_counter()
        edit = self.rank_one.make(adapter, layer, target, inputs, session.resources.captioner.batch_size)
        return edit, time.perf_counter() - began
