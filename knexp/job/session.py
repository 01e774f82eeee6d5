"""A job's session: its specification (``spec``) and the resources it shares (``resources``), with the stages on them;
what ``run.py``'s tasks are given, and knexp's Python API.

From a notebook::

    import knexp
    s = knexp.session("model=embedded", "knowledge=banana")
    found = s.identify(method="ours")             # Identification: selection, per-sample neuron sets
    s.caption(images, neurons=found.results[0].neurons, intervention="inpainted")
    s.trace()                                     # Trace: the causal trace and the live window
    s.heatmap(found.results[0])                   # Heatmap: the top neuron over its image
    with s.edit(found, op="erase", rule="kn"):    # the model edited (knexp.editing) for the block, restored after
        s.caption(images)

Results are dataclasses (``Identification``, ``Trace``, ``Heatmap``) with pandas views (``.frame()``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from knexp.config import build, setup_runtime
from knexp.data.catalog import Catalog, Knowledge
from knexp.data.coco import CocoScenes
from knexp.editing.inputs import EditInputs
from knexp.editing.make import make
from knexp.editing.sets import object_set
from knexp.editing.target import EditTarget
from knexp.evaluation.interventions import Intervention, Noise
from knexp.evaluation.perturb import cached_intervened_captions, set_values
from knexp.evaluation.protocol import Evaluation, evaluate_knowledge
from knexp.identification.causal_trace import KINDS, Trace
from knexp.identification.methods import Method, NeuronSet
from knexp.identification.pipeline import Identification, SampleResult, identify_knowledge
from knexp.identification.selection import Selection
from knexp.identification.thresholds import RuleContext
from knexp.job.compose import compose_with_sources, run_sources
from knexp.job.resources import Resources
from knexp.job.spec import JobSpec
from knexp.models.adapters.adapter import Adapter
from knexp.models.weight_edit import WeightEdit, applied
from knexp.reporting.figures import Heatmap, sample_heatmap, sample_panel
from knexp.store import Store


class Session:
    """The stages on a job's ``spec`` and ``resources`` (module docstring)."""

    def __init__(self, spec: JobSpec, resources: Resources | None = None):
        self.spec = spec
        self.resources = resources or Resources(spec)

    @classmethod
    def from_config(cls, cfg: DictConfig, sources: list[Path] | None = None) -> Session:
        """The session of a composed config; ``sources``: its config folders (default: the running Hydra job's, or
        knexp's ``conf/``)."""
        return cls(JobSpec.from_config(cfg, sources or run_sources()))

    def for_knowledge(self, name: str, output_dir: str | Path | None = None) -> Session:
        """The same session for another knowledge of the catalog, writing to ``output_dir``, sharing the resources."""
        return Session(self.spec.for_knowledge(name, output_dir), self.resources)

    def with_edits(self, files: list) -> Session:
        """The same session on the model with the edit files ``files`` applied in order (none: without edits), sharing
        the dataset; the model is loaded anew (``JobSpec.with_edits``)."""
        spec = self.spec.with_edits(files)
        return Session(spec, Resources(spec, self.resources))

    # ---- what a notebook reaches for most ------------------------------------------------------------------------
    @property
    def catalog(self) -> Catalog:
        return self.spec.catalog

    @property
    def knowledge(self) -> Knowledge:
        return self.spec.knowledge

    @property
    def data(self) -> CocoScenes:
        return self.resources.data

    @property
    def adapter(self) -> Adapter:
        return self.resources.adapter

    def _knowledge(self, name: str | None) -> Knowledge:
        return self.catalog[name] if name else self.knowledge

    def _method(self, name: str | None) -> Method:
        """The job's method, or the one ``conf/method/<name>.yaml`` configures."""
        return self.spec.method if name is None or name == self.spec.method.name else self.spec.named("method", name)

    # ---- identification --------------------------------------------------------------------------------------------
    def select(self, knowledge: str | None = None) -> Selection:
        """Identification samples of ``knowledge`` (default the job's) under the paper's three constraints."""
        return self.resources.selector(self._knowledge(knowledge))

    def trace(self, objects: list[str] | None = None, kinds: tuple[str, ...] = KINDS, captions: bool = True) -> Trace:
        """The causal trace of ``objects`` (default ``trace.objects``) and its live window (``Resources.trace``)."""
        return self.resources.trace(objects, kinds, captions)

    def live_window(self) -> Trace:
        """The live window of ``trace.objects``, once per session family."""
        return self.resources.live_window

    def needs_reference(self) -> bool:
        """Whether the rule or the intervention needs the reference statistics."""
        return self.spec.rule.needs_reference or self.spec.intervention.needs_reference

    def rule_context(self, method: Method | None = None, knowledge: Knowledge | None = None) -> RuleContext:
        """What the rule and ``method`` need beyond a sample: the live window's neuron layers and the reference
        statistics, each computed only when needed."""
        method = method or self.spec.method
        window = self.live_window().window if method.needs_live(self.spec.rule) else None
        reference = self.resources.reference if self.needs_reference() else None
        return RuleContext((knowledge or self.knowledge).name, window["neuron_layers"] if window else None, reference)

    def identify(self, method: str | None = None, knowledge: str | None = None) -> Identification:
        """Select samples of ``knowledge`` (default the job's) and identify neurons on each with ``method`` (default the
        configured one); the live window and reference statistics are computed once a sample is selected."""
        k, m = self._knowledge(knowledge), self._method(method)
        selector = self.resources.selector
        selection = selector(k)
        ctx = self.rule_context(m, k) if selection.accepted else RuleContext(k.name)
        return identify_knowledge(selector, k, self.spec.rule, m, self.resources.stats_cache, ctx, selection)

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, found: Identification, k_images: int, other_images: int, sizes: list[int] | None = None,
                 bertscore_model: str | None = None, bertscore_layers: int = 6) -> Evaluation:
        """Captions of the evaluation images under the job's intervention on ``found``'s sets, and their scores."""
        reference = self.resources.reference if self.needs_reference() and found.results else None
        return evaluate_knowledge(found, self.resources.selector, self.spec.rule, self.spec.intervention, reference,
                                  k_images, other_images, self.spec.seed, sizes, bertscore_model, bertscore_layers)

    def caption(self, images: list[np.ndarray], neurons: NeuronSet | None = None,
                intervention: str | Intervention | None = None, level: float | None = None) -> list[str]:
        """Greedy captions of ``images``; with ``neurons``, one per row of ``intervention`` on them (default the job's;
        or the option of ``conf/intervention`` it names, e.g. ``"zero"``). ``level`` makes noise one draw at that level,
        so one caption per image. ``inpainted`` needs per-image counterfactual values, so it applies each neuron's
        identification shift here."""
        cap = self.resources.captioner
        if neurons is None:
            return self.adapter.caption(images, cap.batch_size, cap.max_new_tokens, width=cap.decode_width)
        how = intervention if isinstance(intervention, Intervention) else (
            self.spec.named("intervention", intervention) if intervention else self.spec.intervention)
        if level is not None and isinstance(how, Noise):
            how = dataclasses.replace(how, levels=(float(level),), draws=1)
        values = set_values(how, neurons, self.resources.reference if how.needs_reference else None, {})
        rows = how.rows(list(range(len(images))))
        return cached_intervened_captions(Store(None, "captions"), [], self.adapter, images, rows, neurons, how, values,
                                          seed=self.spec.seed, batch_size=cap.batch_size,
                                          max_new_tokens=cap.max_new_tokens, width=cap.decode_width)

    # ---- what a sample's neurons look like -------------------------------------------------------------------------
    def heatmap(self, result: SampleResult, rank: int = 0) -> Heatmap:
        """The ``rank``-th neuron of a sample's set over its image (Fig. 3), with the q95 IoU against the instance."""
        return sample_heatmap(self.adapter, self.resources.selector, result, rank, self.resources.heatmap_store)

    def figure(self, result: SampleResult, path: str | Path, rank: int = 0) -> Path:
        """Fig. 3's panel for the ``rank``-th neuron of a sample's set: original, inpainted, heatmap, decoded tokens."""
        sample_panel(self.adapter, self.resources.selector, result, path, rank, store=self.resources.heatmap_store)
        return Path(path)

    # ---- editing ---------------------------------------------------------------------------------------------------
    def edit_inputs(self, found: Identification, target: EditTarget, locality: list[np.ndarray] | None = None,
                    measured: set[int] | None = None, more_k: list[int] | None = None) -> EditInputs:
        """What an edit rule may build its context from (``knexp.editing.inputs``), for ``target`` on ``found``'s
        object: ``locality`` images without k, ``more_k`` the ids of images of k besides the identification images, the
        text prompts the fit keeps (``edit.fit_texts``: never the measured ones), the preserved keys, never from the
        ``measured`` images, and the counterfactual of an image of k (every instance inpainted away, cached)."""
        cap, settings, res = self.resources.captioner, self.spec.edit, self.resources

        def preserved(layers: list[int], positions: int, site: str = "ffn_in"):
            return res.preserved_keys(target.knowledge, set(measured or ()), settings.fit_prompts, layers, positions,
                                      site)

        return EditInputs(self.adapter, target, found, self.data, list(locality or []), list(settings.fit_prompts),
                          cap.batch_size, cap.max_new_tokens, lambda: res.reference, preserved, list(more_k or []),
                          lambda image_id: res.inpaint_cache.without(self.data, res.dataset_id, image_id,
                                                                     target.knowledge.coco_id, self.spec.opts))

    def edit_rule(self, name: str | None):
        """The job's edit rule, or the rule ``conf/edit/rule/<name>.yaml`` configures."""
        rule = self.spec.edit.rule
        return rule if name is None or name == rule.name else self.spec.named("edit/rule", name)

    @contextmanager
    def edit(self, found: Identification, op: str | None = None, rule: str | None = None,
             replacement: str | None = None,
             size: int | None = None, locality: list[np.ndarray] | None = None) -> Iterator[WeightEdit]:
        """The model edited for the block by ``rule`` (default ``edit.rule``) on the consensus set of ``size`` neurons
        of ``found`` (``knexp.editing.sets.object_set``), to ``op`` (erase or swap) k; the weights are restored bit for
        bit on exit. Yields the ``WeightEdit`` (``knexp.models.weight_edit.save`` writes it as a file)::

            with s.edit(found, op="erase", rule="kn") as edit:
                s.caption(images)
        """
        changed = {k: v for k, v in {"op": op, "replacement": replacement, "size": size}.items() if v is not None}
        settings = dataclasses.replace(self.spec.edit, **changed)
        how = self.edit_rule(rule)
        target = settings.target(self.catalog, self.catalog[found.knowledge])
        neurons = object_set(found, self.spec.rule, settings.size)
        edit, _ = make(self.adapter, how, neurons, target, how.context(self.edit_inputs(found, target, locality)))
        with applied(self.adapter, edit):
            yield edit


def build_job(cfg: DictConfig, sources: list[Path] | None = None) -> tuple[object, Session]:
    """(the task, its session): everything ``run.py`` runs, built from the composed config with every setting checked,
    before any model is loaded or any data read. A task may check what depends on the job's settings as well
    (``check_session``: ``task=tune``'s split, ``task=report``'s ``sweep_dir``). ``sources``: the config folders
    (default: the running Hydra job's)."""
    task = build(cfg.task, "task", _recursive_=False)  # a task that holds another's settings builds it itself (tune)
    session = Session.from_config(cfg, sources)
    if hasattr(task, "check_session"):
        task.check_session(session)
    return task, session


def session(*overrides: str, output_dir: str | Path | None = None) -> Session:
    """A session for the config that ``overrides`` compose, e.g. ``knexp.session("model=embedded",
    "knowledge=banana")``; seeds and thread count as a job would set them."""
    cfg, sources = compose_with_sources(*overrides, output_dir=output_dir)
    setup_runtime(cfg)
    return Session.from_config(cfg, sources)
