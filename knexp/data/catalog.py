"""The knowledge catalog: the 30 COCO objects of docs/method.md, "Knowledge catalog", with their word forms.

The YAML files in ``conf/knowledge/`` are the single source of truth. Hydra composes them (``conf/catalog``) and
``knexp.job.spec.build_catalog`` builds the catalog from the composed config, so an override such as
``knowledge.synonyms=[...]`` takes effect; this module answers "does this caption name object k?" (docs/method.md,
"Evaluation": word match with plural and synonyms). Matching is whole-word and case-insensitive, punctuation is
ignored, and multi-word forms ("tennis racket") match as phrases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from knexp.user_errors import ConfigError, UserError


class UnknownKnowledgeError(UserError, KeyError):
    """A knowledge name that is not in the catalog; the message lists the valid names."""


@dataclass(frozen=True)
class Knowledge:
    """One object ``k``: its COCO category and the word forms that count as naming it."""

    name: str
    coco_id: int
    supercategory: str
    singular: str
    plural: tuple[str, ...] = ()
    synonyms: tuple[str, ...] = ()
    phrase: str = ""  # indefinite noun phrase for captions; default "a/an <singular>"

    @property
    def forms(self) -> tuple[str, ...]:
        """All word forms, longest first (so phrases win over their parts when spans are reported)."""
        seen = dict.fromkeys([self.singular, *self.plural, *self.synonyms])
        return tuple(sorted(seen, key=len, reverse=True))

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        alternatives = "|".join(r"\s+".join(map(re.escape, form.split())) for form in self.forms)
        return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])", re.IGNORECASE)

    def mentioned_in(self, caption: str) -> bool:
        """1 if any word form of this object appears as a whole word or phrase in ``caption``."""
        return self.pattern.search(caption) is not None

    def first_mention(self, caption: str) -> tuple[int, int] | None:
        """Character span ``(start, end)`` of the first mention, or None."""
        m = self.pattern.search(caption)
        return (m.start(), m.end()) if m else None

    @property
    def indefinite(self) -> str:
        """The noun phrase a caption uses: "an umbrella", "a banana", "a pair of scissors"."""
        if self.phrase:
            return self.phrase
        return ("an " if self.singular[0].lower() in "aeiou" else "a ") + self.singular


class Catalog:
    """Ordered mapping name -> Knowledge (by COCO id), e.g. of the composed config's ``catalog``."""

    def __init__(self, entries: list[Knowledge]):
        self._by_name = {k.name: k for k in sorted(entries, key=lambda k: k.coco_id)}
        self._by_id = {k.coco_id: k for k in self._by_name.values()}

    def __getitem__(self, name: str) -> Knowledge:
        key = name.replace("_", " ")
        if key not in self._by_name:
            raise UnknownKnowledgeError(
                f"unknown knowledge {name!r}; valid names: {', '.join(n.replace(' ', '_') for n in self.names)}"
            )
        return self._by_name[key]

    def by_coco_id(self, coco_id: int) -> Knowledge:
        return self._by_id[coco_id]

    def name_of(self, coco_id: int) -> str:
        """The catalog name of COCO category ``coco_id``, or the id itself for a category outside the catalog."""
        return self._by_id[coco_id].name if coco_id in self._by_id else str(coco_id)

    def __iter__(self):
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.replace("_", " ") in self._by_name

    @property
    def coco_ids(self) -> set[int]:
        return set(self._by_id)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def named(self, names, key: str) -> list[Knowledge]:
        """The entries ``names`` (a list from the setting ``key``, e.g. ``trace.objects``), or ``SettingError`` naming
        the first that is not in the catalog and the valid names."""
        from knexp.settings import Many, SettingError, Text

        names = Many(Text(), min_len=0)(key, names)
        for name in names:
            if name not in self:
                raise SettingError(key, list(names),
                                   f"{name!r} is not in the catalog; valid names: {', '.join(self.names)}")
        return [self[name] for name in names]

    def mentioned(self, caption: str) -> set[str]:
        """Names of all catalog objects named in ``caption``."""
        return {k.name for k in self if k.mentioned_in(caption)}


def knowledge_from_dict(d: dict, prefix: str = "knowledge") -> Knowledge:
    """Build a Knowledge from a ``conf/knowledge/*.yaml`` mapping (or the composed ``cfg.knowledge``), its settings
    checked as ``<prefix>.*`` (``catalog.<name>`` for the catalog's entries)."""
    from knexp.settings import Integer, Many, Text, check_mapping, unknown

    missing = {"name", "coco_id", "supercategory"} - set(d)
    if missing:
        raise ConfigError(f"knowledge entry {d.get('name', d)!r} lacks {sorted(missing)}; add them to its"
                          " conf/knowledge yaml")
    words = Many(Text(), min_len=0, optional=True)
    unknown(d, prefix, ("name", "coco_id", "supercategory", "singular", "plural", "synonyms", "phrase"))
    d = check_mapping(d, prefix, name=Text(), coco_id=Integer(low=1), supercategory=Text(),
                      singular=Text(optional=True), plural=words, synonyms=words, phrase=Text(optional=True))
    return Knowledge(
        name=d["name"],
        coco_id=d["coco_id"],
        supercategory=d["supercategory"],
        singular=d["singular"] or d["name"],
        plural=tuple(d["plural"] or ()),
        synonyms=tuple(d["synonyms"] or ()),
        phrase=d["phrase"] or "",
    )
