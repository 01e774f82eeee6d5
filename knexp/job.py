"""A job's session: everything a job needs, built once from the composed config, and knexp's Python API.

``Session.from_config(cfg)`` turns the composed Hydra config into plain objects: the catalog and the job's
knowledge (both from the config, so ``knowledge.synonyms=[...]`` takes effect), the data and its id, the model's
adapter, identity and captioner (with the caption store), the inpainting options and the caches, the threshold
rule and the method (``conf/thresholds`` and ``conf/method`` name their classes by ``_target_``), and the
intervention. Every group's settings are checked while it is built, before any model is loaded or any data read
(``knexp.settings``): a value that cannot work raises ``SettingError`` naming its key. ``build_job`` adds the task.
The stages (``identification``, ``evaluation``) receive these objects, never the config. The
model, the caches, the live window and the reference statistics are shared by every session derived with
``for_knowledge``, so ``task=tune`` loads the model once for all its objects.

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
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf, open_dict

from knexp.config import build, check_top_level
from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.catalog import Catalog, Knowledge
from knexp.data.coco import CocoScenes
from knexp.data.loading import check_data, load_dataset
from knexp.editing.make import EditSettings
from knexp.editing.weights import WeightEdit
from knexp.evaluation.interventions import Intervention, Noise, named
from knexp.evaluation.perturb import cached_intervened_captions, set_values
from knexp.evaluation.protocol import Evaluation, evaluate_knowledge
from knexp.identification.causal_trace import KINDS, SampleTrace, TraceSettings, live_window, span, trace_objects
from knexp.identification.methods import Method, NeuronSet
from knexp.identification.pipeline import Identification, SampleResult, identify_knowledge
from knexp.identification.reference import ReferenceCache, ReferenceSettings, ReferenceStats, compute_reference
from knexp.identification.selection import Selection, Selector
from knexp.identification.stats_cache import StatsCache
from knexp.identification.thresholds import Rule, RuleContext
from knexp.models.adapter import Adapter
from knexp.models.captioning import Captioner, Generation
from knexp.models.registry import check_model, load_model, model_identity
from knexp.paths import conf_dir
from knexp.settings import SettingError, Text, from_mapping
from knexp.store import Store

log = logging.getLogger(__name__)


@dataclass
class Trace:
    """The causal trace of the image tokens: the traced samples and the live window they give."""

    model: str
    window: dict
    samples: list[SampleTrace]

    def to_dict(self) -> dict:
        return {"model": self.model, "window": self.window, "samples": [t.to_dict() for t in self.samples]}

    def frame(self) -> pd.DataFrame:
        """One row per (sample, patch kind, layer): Δy_c and, where traced with captions, whether k is still named."""
        rows = [{"knowledge": t.knowledge, "image_id": t.image_id, "kind": kind, "layer": layer, "delta": d,
                 "named": (t.named.get(kind) or [None] * len(deltas))[layer]}
                for t in self.samples for kind, deltas in t.delta.items() for layer, d in enumerate(deltas)]
        return pd.DataFrame(rows)


@dataclass
class Heatmap:
    """A neuron's activation over the image tokens of one image in the direction of its change, painted onto the image
    (``values``: float [H, W], sign x O'; ``knexp.reporting.figures.change_sign``), and the IoU of its top 5% with the
    instance mask."""

    layer: int
    unit: int
    image_id: int
    values: np.ndarray
    iou_q95: float
    sign: int = 1


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def build_catalog(cfg: DictConfig) -> tuple[Catalog, Knowledge]:
    """The catalog of the composed config (``catalog``), with the job's ``knowledge`` as composed (overrides included)
    in place of its own entry; and that knowledge."""
    from knexp.data.catalog import knowledge_from_dict

    entries = {name: knowledge_from_dict(_plain(entry), f"catalog.{name}") for name, entry in cfg.catalog.items()}
    knowledge = knowledge_from_dict(_plain(cfg.knowledge))
    entries = {k: v for k, v in entries.items() if v.name != knowledge.name} | {knowledge.name: knowledge}
    return Catalog(list(entries.values())), knowledge


def default_catalog() -> Catalog:
    """The catalog of the default config (every ``conf/knowledge`` entry as Hydra composes it), for tools and tests
    that need one outside a job."""
    with _config_dir():
        from hydra import compose as hydra_compose

        return build_catalog(hydra_compose("config"))[0]


def build_intervention(cfg: DictConfig) -> Intervention:
    """The configured intervention (``intervention`` group, by ``_target_``; noise takes its levels from ``noise_level``).
    The ``noise_level`` group is checked whatever the intervention, so that a typo there never waits for a noise job."""
    noise = _plain(cfg.noise_level)
    Text()("noise_level.name", noise.get("name"))  # the report's label of the levels
    Noise(name="noise", levels=noise.get("levels"), draws=noise.get("draws"), per_neuron=noise.get("per_neuron"),
          scale=noise.get("scale", "absolute"))
    try:
        return build(cfg.intervention, "intervention")
    except SettingError as exc:  # a noise setting given to the intervention itself, not through noise_level
        raise exc.under("noise_level", "intervention") from None


@dataclass
class Session:
    """What one job works with (module docstring). ``shared`` holds what derived sessions reuse: the model, the caches,
    the live window and the reference statistics."""

    cfg: DictConfig
    catalog: Catalog
    knowledge: Knowledge
    output_dir: Path
    rule: Rule
    method: Method
    intervention: Intervention
    opts: InpaintOptions
    generation: Generation = field(default_factory=Generation)
    trace_settings: TraceSettings = field(default_factory=TraceSettings)
    reference_settings: ReferenceSettings = field(default_factory=ReferenceSettings)
    log_to: object = None  # the logger group's settings (knexp.reporting.logger.FilesOnly or Wandb)
    edit_settings: EditSettings | None = None  # the edit group (conf/edit): task=edit and Session.edit
    shared: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Session:
        """Build and check every group of the composed config (module docstring); nothing is loaded or read yet."""
        check_top_level(cfg)
        catalog, knowledge = build_catalog(cfg)
        for name, objects in _plain(cfg.splits).items():
            catalog.named(objects, f"splits.{name}")
        rule = build(cfg.thresholds, "thresholds")
        rule.check_knowledge(knowledge.name)
        generation = check_model(_plain(cfg.model))
        trace = from_mapping(TraceSettings, _plain(cfg.trace), "trace")
        catalog.named(trace.objects, "trace.objects")
        check_data(cfg.data, catalog)
        edit = build(cfg.edit, "edit", _recursive_=False) if "edit" in cfg else None
        if edit is not None and edit.replacement is not None:
            catalog.named([edit.replacement], "edit.replacement")
        if edit is not None and edit.source is not None and not (conf_dir() / "method" / f"{edit.source}.yaml").is_file():
            raise SettingError("edit.source", edit.source, "name a method of conf/method (e.g. ours, attribution) or null for the job's")
        return cls(cfg, catalog, knowledge, Path(cfg.paths.output_dir), rule, build(cfg.method, "method"), build_intervention(cfg),
                   from_mapping(InpaintOptions, _plain(cfg.inpaint), "inpaint"), generation, trace,
                   from_mapping(ReferenceSettings, _plain(cfg.reference), "reference"), build(cfg.logger, "logger"), edit)

    def for_knowledge(self, name: str, output_dir: str | Path | None = None) -> Session:
        """The same session for another knowledge of the catalog, writing to ``output_dir`` (sharing the model and the
        caches); its config says so too, so its job key (``knexp.resume``) is that object's."""
        knowledge = self.catalog[name]
        self.rule.check_knowledge(knowledge.name)
        out = Path(output_dir or self.output_dir)
        cfg = self.cfg.copy()
        with open_dict(cfg):
            if knowledge.name != self.knowledge.name:  # the job's own knowledge keeps its overrides
                cfg.knowledge = cfg.catalog[knowledge.name.replace(" ", "_")]
            cfg.paths.output_dir = str(out)
        return dataclasses.replace(self, cfg=cfg, knowledge=knowledge, output_dir=out)

    # ---- what the config builds once ---------------------------------------------------------------------------
    def _once(self, key: str, build):
        if key not in self.shared:
            self.shared[key] = build()
        return self.shared[key]

    @property
    def data(self) -> CocoScenes:
        """The dataset of ``data`` (a toy-world split is generated once into ``data.root``)."""
        return self._dataset()[0]

    @property
    def dataset_id(self) -> str:
        """Names the data in cache keys."""
        return self._dataset()[1]

    def _dataset(self) -> tuple[CocoScenes, str]:
        return self._once("dataset", lambda: load_dataset(self.cfg.data, self.catalog))

    @property
    def model_name(self) -> str:
        return str(self.cfg.model.name)

    @cached_property
    def model_cfg(self) -> dict:
        """The model's config as a plain dict (a missing mandatory value, e.g. ``model.converted_dir``, is named here)."""
        return OmegaConf.to_container(self.cfg.model, resolve=True, throw_on_missing=True)

    @property
    def cache_root(self) -> Path | None:
        """``paths.cache_dir``, or None with ``task.cache=false`` (no disk caches)."""
        return Path(self.cfg.paths.cache_dir) if self.cfg.task.get("cache", True) else None

    @property
    def adapter(self) -> Adapter:
        return self._once("adapter", lambda: load_model(self.model_cfg, self.cfg.paths.cache_dir))

    @property
    def model_key(self) -> str:
        return self._once("model_key", lambda: model_identity(self.model_cfg))

    @property
    def captioner(self) -> Captioner:
        """The model's greedy captioner behind the caption store (``paths.cache_dir``/captions)."""
        gen = self.generation
        return self._once("captioner", lambda: Captioner(self.adapter, self.model_key, Store(self.cache_root, "captions"),
                                                         batch_size=gen.batch_size, max_new_tokens=gen.max_new_tokens,
                                                         decode_width=gen.decode_width))

    @property
    def heatmap_store(self) -> Store:
        """The heatmaps' token values (``paths.cache_dir``/heatmaps, ``knexp.reporting.figures.neuron_heatmap``)."""
        return self._once("heatmap_store", lambda: Store(self.cache_root, "heatmaps"))

    @property
    def inpaint_cache(self) -> InpaintCache:
        return self._once("inpaint_cache", lambda: InpaintCache(self.cache_root))

    @property
    def stats_cache(self) -> StatsCache:
        return self._once("stats_cache", lambda: StatsCache(self.cache_root))

    def damaged_entries(self) -> int:
        """Cache entries this session's caches found damaged and rebuilt (``knexp.checked``), for metrics.json."""
        caches = [self.shared[k] for k in ("captioner", "heatmap_store", "inpaint_cache", "stats_cache") if k in self.shared]
        return sum(getattr(getattr(c, "store", c), "damaged", 0) for c in caches)  # the captioner's count is its store's

    @property
    def selector(self) -> Selector:
        return Selector(self.data, self.dataset_id, self.catalog, self.captioner, self.opts, self.inpaint_cache,
                        int(self.cfg.data.per_knowledge), int(self.cfg.seed))

    def method_named(self, name: str | None) -> Method:
        """The session's method, or the method ``conf/method/<name>.yaml`` configures."""
        if name is None or name == self.method.name:
            return self.method
        from hydra import compose

        with _config_dir():
            return build(compose("config", overrides=[f"method={name}"]).method, "method")

    # ---- stages --------------------------------------------------------------------------------------------------
    def select(self, knowledge: str | None = None) -> Selection:
        """Identification samples of ``knowledge`` (default the session's) under the paper's three constraints."""
        return self.selector(self.catalog[knowledge] if knowledge else self.knowledge)

    def trace(self, objects: list[str] | None = None, kinds: tuple[str, ...] = KINDS, captions: bool = True) -> Trace:
        """The causal trace of ``trace.per_object`` selected samples of each of ``objects`` (default ``trace.objects``)
        and the live window it gives (``knexp.identification.causal_trace``); cached per model, data and sample."""
        tc = self.trace_settings
        names = list(objects if objects is not None else tc.objects)
        samples = trace_objects(self.selector, [self.catalog[n] for n in names], tc.per_object,
                                Store(self.cache_root, "trace"), kinds, captions)
        return Trace(self.model_name, live_window(samples, tc.frac), samples)

    def live_window(self) -> Trace:
        """The live window of ``trace.objects`` (residual patching only, no captions), once per session family."""
        def build() -> Trace:
            t = self.trace(kinds=("resid",), captions=False)
            w = t.window
            log.info("live window: neuron layers %s (residual layers reaching %.0f%% of the counterfactual: %s)",
                     span(w["neuron_layers"]), 100 * w["frac"], span(w["resid_layers"]))
            return t

        return self._once("live_window", build)

    def reference(self) -> ReferenceStats:
        """The model's reference statistics on this data (``knexp.identification.reference``), cached."""
        ref = self.reference_settings
        parts = [self.model_key, self.dataset_id, self.opts, ref.images, ref.removals, ref.seed]
        return self._once("reference", lambda: ReferenceCache(self.cache_root).get(parts, lambda: compute_reference(
            self.adapter, self.data, self.dataset_id, self.catalog, self.opts, self.inpaint_cache, ref.images,
            ref.removals, ref.seed, self.captioner.batch_size)))

    def needs_reference(self) -> bool:
        """Whether the rule or the intervention needs the reference statistics."""
        return self.rule.needs_reference or self.intervention.needs_reference

    def rule_context(self, method: Method | None = None, knowledge: Knowledge | None = None) -> RuleContext:
        """What the rule and ``method`` need beyond a sample: the live window's neuron layers and the reference statistics,
        each computed only when needed."""
        method = method or self.method
        window = self.live_window().window if method.needs_live(self.rule) else None
        reference = self.reference() if self.needs_reference() else None
        return RuleContext((knowledge or self.knowledge).name, window["neuron_layers"] if window else None, reference)

    def identify(self, method: str | None = None, knowledge: str | None = None) -> Identification:
        """Select samples of ``knowledge`` (default the session's) and identify neurons on each with ``method`` (default
        the configured one); the live window and reference statistics are computed once a sample is selected."""
        k = self.catalog[knowledge] if knowledge else self.knowledge
        m = self.method_named(method)
        selection = self.selector(k)
        ctx = self.rule_context(m, k) if selection.accepted else RuleContext(k.name)
        return identify_knowledge(self.selector, k, self.rule, m, self.stats_cache, ctx, selection)

    def evaluate(self, found: Identification, k_images: int, other_images: int, sizes: list[int] | None = None,
                 bertscore_model: str | None = None, bertscore_layers: int = 6) -> Evaluation:
        """Captions of the evaluation images under the session's intervention on ``found``'s sets, and their scores."""
        reference = self.reference() if self.needs_reference() and found.results else None
        return evaluate_knowledge(found, self.selector, self.rule, self.intervention, reference, k_images, other_images,
                                  int(self.cfg.seed), sizes, bertscore_model, bertscore_layers)

    def caption(self, images: list[np.ndarray], neurons: NeuronSet | None = None, intervention: str | Intervention | None = None,
                level: float = 0.0) -> list[str]:
        """Greedy captions of ``images``; with ``neurons``, under ``intervention`` on them (default the session's; a name
        such as ``"zero"`` or ``"noise"``, noise at ``level`` with the session's seed). ``inpainted`` needs per-image
        counterfactual values, so it applies each neuron's identification shift here."""
        if neurons is None:
            return self.adapter.caption(images, self.captioner.batch_size, self.captioner.max_new_tokens, width=self.captioner.decode_width)
        how = intervention if isinstance(intervention, Intervention) else (
            Noise(name="noise", levels=(float(level),), draws=1) if intervention == "noise" else
            named(intervention) if intervention else self.intervention)
        reference = self.reference() if how.needs_reference else None
        rows = how.rows(list(range(len(images))))
        return cached_intervened_captions(Store(None, "captions"), [], self.adapter, images, rows, neurons, how,
                                          set_values(how, neurons, reference, {}), seed=int(self.cfg.seed),
                                          batch_size=self.captioner.batch_size, max_new_tokens=self.captioner.max_new_tokens,
                                          width=self.captioner.decode_width)

    def heatmap(self, result: SampleResult, rank: int = 0) -> Heatmap:
        """The ``rank``-th neuron of a sample's set over its image (Fig. 3), with the q95 IoU against the instance."""
        from knexp.reporting.figures import change_sign, neuron_heatmap

        layer, unit = int(result.neurons.layers[rank]), int(result.neurons.units[rank])
        image, sign = self.data.load_image(result.candidate.image_id), change_sign(result.neurons, rank)
        values, iou = neuron_heatmap(self.adapter, image, layer, unit, self.data.instance_mask(result.candidate.annotation_id),
                                     self.heatmap_store, [self.model_key, self.dataset_id, result.candidate.image_id], sign)
        return Heatmap(layer, unit, result.candidate.image_id, values, iou, sign)

    def figure(self, result: SampleResult, path: str | Path, rank: int = 0) -> Path:
        """Fig. 3's panel for the ``rank``-th neuron of a sample's set: original, inpainted, heatmap, decoded tokens."""
        from knexp.reporting.figures import sample_panel

        sample_panel(self.adapter, self.selector, result, path, rank, store=self.heatmap_store)
        return Path(path)

    # ---- editing ---------------------------------------------------------------------------------------------------
    def edit_rule_named(self, name: str | None):
        """The session's edit rule, or the rule ``conf/edit/rule/<name>.yaml`` configures."""
        if name is None or name == self.edit_settings.rule.name:
            return self.edit_settings.rule
        from hydra import compose

        with _config_dir():
            return build(compose("config", overrides=[f"edit/rule={name}"]).edit.rule, "edit.rule")

    def edit_context(self, rule, found: Identification, target, locality: list[np.ndarray] | None = None) -> dict:
        """What ``rule`` needs beyond the set (``EditRule.needs``): the reference statistics (``mean``), or the fitting data
        (``optimized``: the identification images teacher-forced up to k, ``locality`` images without k with their
        unedited captions, T-locality's text prompts)."""
        from knexp.editing.make import fit_data

        context = {}
        if "reference" in rule.needs:
            context["reference"] = self.reference()
        if "fit" in rule.needs:
            samples = [(self.data.load_image(r.candidate.image_id), r.candidate.original_caption) for r in found.results]
            settings = self.edit_settings
            texts = settings.texts + settings.about_k(target.knowledge)
            images = list(locality or [])
            captions = self.adapter.caption(images, self.captioner.batch_size, self.captioner.max_new_tokens) if images else []
            context["fit"] = fit_data(self.adapter, target.knowledge, samples, list(zip(images, captions, strict=True)), texts,
                                      self.captioner.batch_size)
        return context

    @contextmanager
    def edit(self, found: Identification, op: str | None = None, rule: str | None = None, replacement: str | None = None,
             size: int | None = None, locality: list[np.ndarray] | None = None) -> Iterator[WeightEdit]:
        """The model edited for the block by ``rule`` (default ``edit.rule``) on the consensus set of ``size`` neurons of
        ``found`` (``knexp.editing.sets.object_set``), to ``op`` (erase or swap) k; the weights are restored bit for bit on
        exit. Yields the ``WeightEdit`` (``knexp.editing.weights.save`` writes it as a file)::

            with s.edit(found, op="erase", rule="kn") as edit:
                s.caption(images)
        """
        from knexp.editing.make import make
        from knexp.editing.sets import object_set
        from knexp.editing.weights import applied

        settings = dataclasses.replace(self.edit_settings, **{k: v for k, v in {"op": op, "replacement": replacement,
                                                                                 "size": size}.items() if v is not None})
        how = self.edit_rule_named(rule)
        target = settings.target(self.catalog, self.catalog[found.knowledge])
        neurons = object_set(found, self.rule, settings.size)
        edit, _ = make(self.adapter, how, neurons, target, self.edit_context(how, found, target, locality))
        with applied(self.adapter, edit):
            yield edit

    # ---- what a job reports --------------------------------------------------------------------------------------
    def labels(self) -> dict:
        """How results are keyed in metrics.json and the report."""
        how = self.intervention
        return {"knowledge": self.knowledge.name, "method": self.method.name, "variant": self.method.variant,
                "thresholds": self.rule.label, "intervention": how.kind,
                "noise_level": self.cfg.noise_level.name if how.kind == "noise" else "-", "model": self.model_name}

    def logger(self):
        """The configured logger (``conf/logger``, by ``_target_``) writing into this session's output folder."""
        cfg = self.cfg
        groups = ("model", "knowledge", "method", "thresholds", "noise_level")
        tags = [f"{g}:{cfg[g].name}" for g in groups if g in cfg and "name" in cfg[g]]
        log_to = self.log_to or build(cfg.logger, "logger")
        return log_to.open(self.output_dir, run_config=_plain(cfg), tags=tags + list(cfg.get("tags") or []), job_type=str(cfg.task.name))


def build_job(cfg: DictConfig) -> tuple[object, Session]:
    """(the task, its session): everything ``run.py`` runs, built from the composed config with every setting checked,
    before any model is loaded or any data read. A task may check what depends on the session's config as well
    (``check_session``: ``task=tune``'s split, ``task=report``'s ``sweep_dir``)."""
    task = build(cfg.task, "task", _recursive_=False)  # a task that holds another's settings builds it itself (tune)
    session = Session.from_config(cfg)
    if hasattr(task, "check_session"):
        task.check_session(session)
    return task, session


class _config_dir:
    """Hydra's compose API on knexp's ``conf/`` (re-entrant: inside a running Hydra app it composes from the same
    search path)."""

    def __enter__(self):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from knexp.config import register_resolvers
        from knexp.paths import conf_dir

        register_resolvers()
        self._ctx = None
        if not GlobalHydra.instance().is_initialized():
            self._ctx = initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3")
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def compose(*overrides: str, output_dir: str | Path | None = None) -> DictConfig:
    """The composed config for ``overrides`` (as on the command line), outside a Hydra run: ``paths.output_dir`` is
    ``output_dir`` or ``runs/session/<time>``."""
    from hydra import compose as hydra_compose

    with _config_dir():
        cfg = hydra_compose("config", overrides=list(overrides))
    out = output_dir or Path(cfg.paths.log_dir) / "session" / time.strftime("%Y-%m-%d_%H-%M-%S")
    cfg.paths.output_dir = str(out)
    return cfg


def session(*overrides: str, output_dir: str | Path | None = None) -> Session:
    """A session for the config that ``overrides`` compose, e.g. ``knexp.session("model=embedded", "knowledge=banana")``;
    seeds and thread count as a job would set them."""
    from knexp.config import setup_runtime

    cfg = compose(*overrides, output_dir=output_dir)
    setup_runtime(cfg)
    return Session.from_config(cfg)
