"""Hydra's composition for knexp: where a job's config came from, a config group's option by name, and composing the
config outside a Hydra run (notebooks, tests).

A config *source* is a folder that Hydra searched: knexp's ``conf/`` and every ``hydra.searchpath`` entry (a user's own
methods, rules or interventions live in such a folder, beside their ``_target_`` classes). ``option_node`` reads one
option of a group, ``<source>/<group>/<name>.yaml``, from the first source that has it, as the command line's
``<group>=<name>`` would choose it. ``run_tags`` are a job's W&B tags, read from its config; ``sweep_tags`` those of a
finished sweep's jobs (what its report is tagged with).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from knexp.config import register_resolvers
from knexp.paths import conf_dir
from knexp.settings import SettingError

log = logging.getLogger(__name__)


def file_sources(config_sources) -> list[Path]:
    """The folders among Hydra's ``hydra.runtime.config_sources`` (its own package sources left out)."""
    return [Path(s["path"]) for s in config_sources if s.get("schema") == "file" and s.get("path")]


def run_sources() -> list[Path]:
    """The config folders of the running Hydra job, or knexp's ``conf/`` alone outside one."""
    from hydra.core.hydra_config import HydraConfig

    try:
        sources = file_sources(OmegaConf.to_container(HydraConfig.get().runtime.config_sources))
    except ValueError:  # not inside a Hydra run
        sources = []
    return sources or [conf_dir()]


def group_options(sources: list[Path], group: str) -> list[str]:
    """Every option of config group ``group`` (e.g. ``method``, ``edit/rule``) over the sources, sorted."""
    return sorted({p.stem for source in sources for p in (source / group).glob("*.yaml")})


def option_node(sources: list[Path], group: str, name: str) -> DictConfig:
    """The yaml of option ``name`` of ``group``, from the first source that has it; ``SettingError`` naming the group's
    key and listing its options where none has it, or where it needs Hydra's composition (a defaults list)."""
    key = group.replace("/", ".")
    for source in sources:
        path = source / group / f"{name}.yaml"
        if path.is_file():
            node = OmegaConf.load(path)
            if "defaults" in node:
                raise SettingError(key, name,
                                   f"{path} has a defaults list: choose it on the command line ({group}={name})")
            return node
    raise SettingError(key, name,
                       f"names no yaml of {group}; the options are {', '.join(group_options(sources, group))}")


class _ConfigDir:
    """Hydra's compose API on knexp's ``conf/`` (re-entrant: inside a running Hydra app it composes from the same
    search path)."""

    def __enter__(self):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        register_resolvers()
        self._ctx = None
        if not GlobalHydra.instance().is_initialized():
            self._ctx = initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3")
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def compose_with_sources(*overrides: str, output_dir: str | Path | None = None) -> tuple[DictConfig, list[Path]]:
    """(the composed config for ``overrides``, as on the command line, outside a Hydra run; its config sources):
    ``paths.output_dir`` is ``output_dir`` or ``runs/session/<time>``."""
    from hydra import compose as hydra_compose

    with _ConfigDir():
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    sources = file_sources(OmegaConf.to_container(cfg.hydra.runtime.config_sources)) or [conf_dir()]
    with_hydra = cfg
    cfg = OmegaConf.masked_copy(with_hydra, [k for k in with_hydra if k != "hydra"])
    OmegaConf.set_struct(cfg, True)  # as Hydra hands a job its config
    out = output_dir or Path(cfg.paths.log_dir) / "session" / time.strftime("%Y-%m-%d_%H-%M-%S")
    cfg.paths.output_dir = str(out)
    return cfg, sources


def compose(*overrides: str, output_dir: str | Path | None = None) -> DictConfig:
    """The composed config for ``overrides`` (``compose_with_sources`` without the sources)."""
    return compose_with_sources(*overrides, output_dir=output_dir)[0]


TAGGED = ("model", "knowledge", "method", "thresholds", "noise_level")  # the groups a run is tagged with


def run_tags(cfg) -> list[str]:
    """A job's W&B tags: ``<group>:<option>`` for each group of ``TAGGED`` its config has, then its ``tags``."""
    return [f"{g}:{cfg[g].name}" for g in TAGGED if g in cfg and "name" in cfg[g]] + list(cfg.get("tags") or [])


def sweep_tags(sweep_dir: str | Path) -> list[str]:
    """Every tag of the jobs under ``sweep_dir`` (``run_tags`` of each job's ``.hydra/config.yaml``), sorted: what a
    report of the sweep is tagged with."""
    tags: set[str] = set()
    for path in Path(sweep_dir).rglob(".hydra/config.yaml"):
        try:
            tags |= set(run_tags(OmegaConf.load(path)))
        except Exception as exc:  # a damaged or foreign file costs its tags, never the report
            log.warning("%s: not read for the report's tags (%s)", path, exc)
    return sorted(tags)
