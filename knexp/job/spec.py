"""A job's specification: every group of the composed config built into plain, checked objects.

``JobSpec.from_config`` turns the composed Hydra config into plain objects: the catalog and the job's knowledge (both
from the config, so ``knowledge.synonyms=[...]`` takes effect), the threshold rule, the method, the intervention, the
inpainting options, the generation, trace, reference, logger and edit settings (each group names its class by
``_target_``), and the plain settings of the data, the model and the paths. Every value is checked while it is built,
before any model is loaded or any data read (``knexp.settings``): a value that cannot work raises ``SettingError``
naming its key. Nothing below the job reads the config; ``named`` builds any group's option by name against it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from knexp.config import build, build_with, check_top_level
from knexp.counterfactual.cache import InpaintOptions
from knexp.data.catalog import Catalog, Knowledge, knowledge_from_dict
from knexp.data.loading import check_data
from knexp.editing.make import EditSettings
from knexp.evaluation.interventions import Intervention, Noise
from knexp.identification.causal_trace import TraceSettings
from knexp.identification.methods import Method
from knexp.identification.reference import ReferenceSettings
from knexp.identification.thresholds import Rule
from knexp.job.compose import compose, group_options, option_node, run_tags
from knexp.models.captioning import Generation
from knexp.models.registry import check_model, model_identity
from knexp.settings import SettingError, Text, from_mapping
from knexp.store import stable_key

PRESENTATION = ("paths", "logger", "tags", "num_threads", "sweep_dir")  # keys that change where results go, not what


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


def build_catalog(cfg: DictConfig) -> tuple[Catalog, Knowledge]:
    """The catalog of the composed config (``catalog``), with the job's ``knowledge`` as composed (overrides included)
    in place of its own entry; and that knowledge."""
    entries = {name: knowledge_from_dict(plain(entry), f"catalog.{name}") for name, entry in cfg.catalog.items()}
    knowledge = knowledge_from_dict(plain(cfg.knowledge))
    entries = {k: v for k, v in entries.items() if v.name != knowledge.name} | {knowledge.name: knowledge}
    return Catalog(list(entries.values())), knowledge


def default_catalog() -> Catalog:
    """The catalog of the default config (every ``conf/knowledge`` entry as Hydra composes it), for tools and tests
    that need one outside a job."""
    return build_catalog(compose())[0]


def built(cfg: DictConfig, group: str, sources: list[Path], **kwargs):
    """The object config group ``group`` (e.g. ``method``, ``edit/rule``) configures (``knexp.config.build``); a
    ``_target_`` that does not import is named with the group's options."""
    key = group.replace("/", ".")
    try:
        return build(OmegaConf.select(cfg, key), key, **kwargs)
    except SettingError as exc:
        if exc.key != f"{key}._target_":
            raise
        options = ", ".join(group_options(sources, group))
        raise SettingError(exc.key, exc.value, f"{exc.expected}; the options of {group} are {options}") from None


def build_intervention(cfg: DictConfig, sources: list[Path]) -> Intervention:
    """The configured intervention (``intervention`` group, by ``_target_``; noise takes its levels from
    ``noise_level``). The ``noise_level`` group is checked whatever the intervention, so that a typo there never waits
    for a noise job."""
    noise = plain(cfg.noise_level)
    Text()("noise_level.name", noise.get("name"))  # the report's label of the levels
    Noise(name="noise", levels=noise.get("levels"), draws=noise.get("draws"), per_neuron=noise.get("per_neuron"),
          scale=noise.get("scale", "absolute"))
    try:
        return built(cfg, "intervention", sources)
    except SettingError as exc:  # a noise setting given to the intervention itself, not through noise_level
        raise exc.under("noise_level", "intervention") from None


def build_edit(cfg: DictConfig, sources: list[Path]) -> EditSettings | None:
    """The ``edit`` group with its rule built first (so that the rule's errors name ``edit.rule.*``)."""
    if "edit" not in cfg:
        return None
    return build_with(cfg.edit, "edit", rule=built(cfg, "edit/rule", sources))


def job_key(cfg: DictConfig) -> str:
    """Hash of the config less its presentation keys, with the model as ``model_identity`` sees it (so the projector's
    bytes count, and the generation batch size, which no result depends on, does not)."""
    content = plain(cfg)
    for name in PRESENTATION:
        content.pop(name, None)
    content["model"] = model_identity(plain(cfg.model))
    return stable_key(content)


@dataclass
class JobSpec:
    """What one job is (module docstring). ``cfg`` is the composed config: only ``named``, the job key and the logger's
    record of the run read it. ``sources`` are the config folders it was composed from (``knexp.job.compose``)."""

    cfg: DictConfig
    sources: list[Path]
    catalog: Catalog
    knowledge: Knowledge
    output_dir: Path
    rule: Rule
    method: Method
    intervention: Intervention
    opts: InpaintOptions
    generation: Generation
    trace: TraceSettings
    reference: ReferenceSettings
    log_to: object  # the logger group's settings (knexp.reporting.logger.FilesOnly or Wandb)
    edit: EditSettings | None
    seed: int
    data: dict  # the data group's settings, resolved (knexp.data.loading)
    splits: dict[str, list[str]]
    sweep_dir: str | None
    task_name: str
    cache: bool  # task.cache: false keeps no disk cache

    @classmethod
    def from_config(cls, cfg: DictConfig, sources: list[Path]) -> JobSpec:
        """Build and check every group of the composed config (module docstring); nothing is loaded or read yet."""
        top = check_top_level(cfg)
        catalog, knowledge = build_catalog(cfg)
        splits = plain(cfg.splits)
        for name, objects in splits.items():
            catalog.named(objects, f"splits.{name}")
        rule = built(cfg, "thresholds", sources)
        rule.check_knowledge(knowledge.name)
        generation = check_model(plain(cfg.model))
        trace = from_mapping(TraceSettings, plain(cfg.trace), "trace")
        catalog.named(trace.objects, "trace.objects")
        data = plain(cfg.data)
        check_data(data, catalog)
        edit = build_edit(cfg, sources)
        if edit is not None and edit.replacement is not None:
            catalog.named([edit.replacement], "edit.replacement")
        methods = group_options(sources, "method")
        if edit is not None and edit.source is not None and edit.source not in methods:
            raise SettingError("edit.source", edit.source,
                               f"name a method of conf/method ({', '.join(methods)}) or null for the job's")
        method, intervention = built(cfg, "method", sources), build_intervention(cfg, sources)
        opts = from_mapping(InpaintOptions, plain(cfg.inpaint), "inpaint")
        reference = from_mapping(ReferenceSettings, plain(cfg.reference), "reference")
        return cls(cfg, sources, catalog, knowledge, Path(cfg.paths.output_dir), rule, method, intervention, opts,
                   generation, trace, reference, built(cfg, "logger", sources), edit, seed=top["seed"], data=data,
                   splits=splits, sweep_dir=top["sweep_dir"], task_name=str(cfg.task.name),
                   cache=bool(cfg.task.get("cache", True)))

    def for_knowledge(self, name: str, output_dir: str | Path | None = None) -> JobSpec:
        """The same job for another knowledge of the catalog, writing to ``output_dir``; its config says so too, so its
        job key is that object's. The job's own knowledge keeps its overrides."""
        knowledge = self.catalog[name]
        self.rule.check_knowledge(knowledge.name)
        out = Path(output_dir or self.output_dir)
        cfg = copy.deepcopy(self.cfg)
        with open_dict(cfg):
            if knowledge.name != self.knowledge.name:
                cfg.knowledge = cfg.catalog[knowledge.name.replace(" ", "_")]
            cfg.paths.output_dir = str(out)
        return replace(self, cfg=cfg, knowledge=knowledge, output_dir=out)

    def with_edits(self, files: list[str | Path]) -> JobSpec:
        """The same job on the model with the edit files ``files`` applied in order (``model.edit``; none: the model
        as configured without edits); its config says so too, so its job key and model identity are that model's."""
        cfg = copy.deepcopy(self.cfg)
        with open_dict(cfg):
            cfg.model.edit = [str(f) for f in files] if files else None
        check_model(plain(cfg.model))
        return replace(self, cfg=cfg)

    def named(self, group: str, name: str):
        """The object that option ``name`` of config group ``group`` (e.g. ``method``, ``edit/rule``) configures, its
        interpolations resolved against this job's config (``intervention/noise`` reads ``${noise_level.levels}``)."""
        cfg = copy.deepcopy(self.cfg)
        with open_dict(cfg):
            OmegaConf.update(cfg, group.replace("/", "."), option_node(self.sources, group, name), merge=False)
        return built(cfg, group, self.sources)

    @cached_property
    def model(self) -> dict:
        """The model's settings as a plain dict (a missing mandatory value, e.g. ``model.converted_dir``, is named
        here)."""
        return OmegaConf.to_container(self.cfg.model, resolve=True, throw_on_missing=True)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.paths.cache_dir)

    @property
    def cache_root(self) -> Path | None:
        """``paths.cache_dir``, or None with ``task.cache=false`` (no disk caches)."""
        return self.cache_dir if self.cache else None

    @property
    def job_key(self) -> str:
        """What ``knexp.resume`` compares: ``job_key`` of this job's config."""
        return job_key(self.cfg)

    def settings_of(self, group: str) -> dict:
        """The resolved settings of config group ``group`` as a plain dict (for records such as ``tune.json``)."""
        return plain(self.cfg[group])

    def labels(self) -> dict:
        """How results are keyed in metrics.json and the report."""
        how = self.intervention
        return {"knowledge": self.knowledge.name, "method": self.method.name, "variant": self.method.variant,
                "thresholds": self.rule.label, "intervention": how.kind,
                "noise_level": self.cfg.noise_level.name if how.kind == "noise" else "-",
                "model": str(self.cfg.model.name)}

    def logger(self, group: str | None = None, tags: list[str] | None = None):
        """The configured logger (``conf/logger``, by ``_target_``) writing into this job's output folder, tagged with
        ``run_tags`` of the job's config (or ``tags``: a report carries its sweep's), in ``group`` where given (a
        report: its sweep's group)."""
        return self.log_to.open(self.output_dir, run_config=plain(self.cfg),
                                tags=run_tags(self.cfg) if tags is None else tags, job_type=self.task_name, group=group)
