"""Checks for the settings a config gives. Each object built from a config group runs them when it is built.

A check knows the setting's full key (``thresholds.n``) and what values would work. It returns the value in its proper
type, or raises ``SettingError``, whose one-line message names the key, the value and what to use instead:

    thresholds.n=0: use an integer >= 1

The checks live beside the objects they build (``Rule.__post_init__`` checks ``thresholds.*``, ``Method``'s check
``method.*``, and so on). ``knexp.job.session.build_job`` builds every object of the composed config once, before any
model is loaded. So a setting that cannot work stops the job at once, and never turns into skipped samples or empty
results. Nothing here imports Hydra: the stages use these checks on plain values (``knexp.config.build`` instantiates a
group).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from knexp.user_errors import ConfigError


def _shown(value: Any) -> str:
    """A value as the user would type it on the command line: strings quoted, None as null."""
    if value is None:
        return "null"
    if value == "???":  # OmegaConf's mark of a value left unset
        return value
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


class SettingError(ConfigError):
    """A setting whose value cannot work. ``key`` is its full config key, ``expected`` says what would work."""

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"{key}={_shown(value)}: {expected}")

    def under(self, old: str, new: str) -> SettingError:
        """The same error with the key's prefix ``old`` replaced by ``new``. Used when a group is composed into another
        one: ``task.job`` of ``task=tune`` holds an evaluate task's settings."""
        key = new + self.key[len(old):] if self.key == old or self.key.startswith(old + ".") else self.key
        return SettingError(key, self.value, self.expected)


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    low, high = (None if v is None else f"{v:g}" for v in (low, high))
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


@dataclass(frozen=True)
class Integer:
    """An integer in [low, high] (either end may be open-ended); ``optional`` also admits null."""

    low: int | None = None
    high: int | None = None
    optional: bool = False

    @property
    def expected(self) -> str:
        span = _range(self.low, self.high)
        return f"use an integer{' ' + span if span else ''}" + (" or null" if self.optional else "")

    def __call__(self, key: str, value: Any) -> int | None:
        if value is None and self.optional:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():  # 1e3 from the command line
            value, ok = int(value), True
        if not ok or (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise SettingError(key, value, self.expected)
        return int(value)


@dataclass(frozen=True)
class Number:
    """A finite number in the range the ends give (``low_open``/``high_open``: the end itself is excluded). It is
    returned as given (an int stays an int), so that cache keys made from settings keep their form."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    @property
    def expected(self) -> str:
        span = _range(self.low, self.high, self.low_open, self.high_open)
        return f"use a number{' ' + span if span else ''}" + (" or null" if self.optional else "")

    def __call__(self, key: str, value: Any) -> float | None:
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SettingError(key, value, self.expected)
        v = float(value)
        too_low = self.low is not None and (v <= self.low if self.low_open else v < self.low)
        too_high = self.high is not None and (v >= self.high if self.high_open else v > self.high)
        if too_low or too_high:
            raise SettingError(key, value, self.expected)
        return value


@dataclass(frozen=True)
class Choice:
    """One of ``options`` (strings); ``optional`` also admits null."""

    options: tuple[str, ...]
    optional: bool = False

    @property
    def expected(self) -> str:
        return f"use one of {', '.join(self.options)}" + (" or null" if self.optional else "")

    def __call__(self, key: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or value not in self.options:
            raise SettingError(key, value, self.expected)
        return value


@dataclass(frozen=True)
class Flag:
    """true or false."""

    expected: str = "use true or false"

    def __call__(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise SettingError(key, value, self.expected)
        return value


@dataclass(frozen=True)
class Text:
    """A non-empty string (a name, a path, a prompt); ``optional`` also admits null."""

    optional: bool = False

    @property
    def expected(self) -> str:
        return "use a non-empty string" + (" or null" if self.optional else "")

    def __call__(self, key: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, str) or not value:
            raise SettingError(key, value, self.expected)
        return value


@dataclass(frozen=True)
class Many:
    """A list of at least ``min_len`` values, each passing ``item``; ``optional`` also admits null. An item's error
    names its place, e.g. ``noise_level.levels[1]``."""

    item: Any
    min_len: int = 1
    optional: bool = False

    @property
    def expected(self) -> str:
        each = self.item.expected.removeprefix("use ")
        return f"use a list of at least {self.min_len}, each {each}" + (" or null" if self.optional else "")

    def __call__(self, key: str, value: Any) -> list | None:
        if value is None and self.optional:
            return None
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) < self.min_len:
            raise SettingError(key, value if isinstance(value, (str, int, float)) or value is None else list(value),
                               self.expected)
        return [self.item(f"{key}[{i}]", v) for i, v in enumerate(value)]


@dataclass(frozen=True)
class Fields:
    """A mapping whose keys are the given checks' (a nested group such as ``model.prompt``); unknown keys are refused,
    absent ones count as null."""

    checks: dict

    @property
    def expected(self) -> str:
        return f"use a mapping of {', '.join(self.checks)}"

    def __call__(self, key: str, value: Any) -> dict:
        if not isinstance(value, Mapping):
            raise SettingError(key, value, self.expected)
        unknown(value, key, self.checks)
        return check_mapping(dict(value), key, **self.checks)


def unknown(values: Mapping, prefix: str, known) -> None:
    """Refuse a key of ``values`` that is not in ``known`` (a typo such as ``model.generation.batchsize``)."""
    for name in values:
        if name not in known:
            raise SettingError(_key(prefix, name), values[name],
                               f"is not a setting here; the settings are {', '.join(known)}")


def from_mapping(cls, values: Mapping, prefix: str):
    """``cls(**values)`` for a settings dataclass built from the config group ``prefix``: a key that is not one of its
    fields is refused by name, the fields check themselves (``__post_init__``)."""
    unknown(values, prefix, [f.name for f in dataclasses.fields(cls) if f.init])
    return cls(**values)


class Device:
    """A torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``) or ``auto`` (cuda when present)."""

    expected = "use auto, cpu, cuda or cuda:<index>"

    def __call__(self, key: str, value: Any) -> str:
        import torch

        if value == "auto":
            return value
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise SettingError(key, value, self.expected) from None
        return value


DTYPES = ("float32", "float16", "bfloat16")


def takes(**checks):
    """Mark a model loader with the checks of the ``model.*`` settings it reads (``knexp.models.registry.check_model``
    runs them when the session is built, before the loader runs)."""
    def mark(loader):
        loader.settings = checks
        return loader

    return mark


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_fields(obj: Any, prefix: str, **checks) -> None:
    """Check the attributes ``checks`` names on ``obj`` (a dataclass, frozen or not) as the settings
    ``<prefix>.<name>``, and store each back in its proper type."""
    for name, check in checks.items():
        object.__setattr__(obj, name, check(_key(prefix, name), getattr(obj, name)))


def check_mapping(values: dict, prefix: str, **checks) -> dict:
    """``values`` with the keys ``checks`` names checked as ``<prefix>.<key>`` (a key that is absent counts as null;
    ``prefix`` "" for the top level)."""
    return {**values, **{name: check(_key(prefix, name), values.get(name)) for name, check in checks.items()}}


def prompt_file(path: str | None, key: str, package: str, name: str) -> list[str]:
    """The prompts of the text file ``path``, one per line (blank lines and lines starting with # left out); ``path``
    None: the file ``name`` shipped in ``package``. A file that cannot be read is a ``SettingError`` naming ``key``."""
    from importlib import resources
    from pathlib import Path

    source = resources.files(package) / name if path is None else Path(path)
    try:
        text = source.read_text()
    except OSError as exc:
        fix = f"cannot be read ({exc.strerror}): give a text file, one prompt per line"
        raise SettingError(key, path, fix) from exc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
