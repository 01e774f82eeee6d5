"""Making one object's edit: the ``edit`` group's settings, the swap partner, and the data a rule is given.

``EditSettings`` is ``conf/edit`` (its ``rule``: ``conf/edit/rule/*.yaml``, by ``_target_``). A swap with no
``edit.replacement`` takes k's *partner*: the next catalog object of k's supercategory, by name, round the list (a
fixed partner per object). ``make`` times a rule on a set and returns the edit with its cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from knexp.data.catalog import Catalog, Knowledge
from knexp.editing.fit import FitData, baseline, forced_caption, target_context
from knexp.editing.rules import OPS, EditRule, EditTarget
from knexp.editing.weights import WeightEdit
from knexp.identification.methods import NeuronSet
from knexp.settings import Choice, Integer, Many, SettingError, Text, check_fields


@dataclass
class EditSettings:
    """``conf/edit`` (built with ``_recursive_=False``: the rule is built here): the rule, the method whose neurons it edits
    (``source``, a ``conf/method`` name; null: the job's ``method``), erase or swap (and k'), the
    set size, the images without k the optimized rule's KL term sees (``fit_other``), T-locality's text-only prompts
    (``texts``; ``k_texts`` are templates about k: ``{k}``, ``{a_k}``) and T-generality's prompts (``prompts``:
    ``knexp.evaluation.edit_measures.Prompts``)."""

    rule: EditRule
    source: str | None = None
    op: str = "erase"
    replacement: str | None = None
    size: int = 30
    fit_other: int = 4
    texts: list[str] = field(default_factory=list)
    k_texts: list[str] = field(default_factory=list)
    prompts: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.rule, dict):  # built here, so that its errors name edit.rule's own keys
            from omegaconf import OmegaConf

            from knexp.config import build

            self.rule = build(OmegaConf.create(self.rule), "edit.rule")
        if not isinstance(self.rule, EditRule):
            raise SettingError("edit.rule", self.rule, "use a rule of conf/edit/rule, e.g. edit/rule=kn")
        check_fields(self, "edit", source=Text(optional=True), op=Choice(OPS), replacement=Text(optional=True), size=Integer(low=1),
                     fit_other=Integer(low=0),
                     texts=Many(Text(), min_len=0), k_texts=Many(Text(), min_len=0))
        from knexp.evaluation.edit_measures import Prompts
        from knexp.settings import from_mapping

        if not isinstance(self.prompts, Prompts):
            self.prompts = from_mapping(Prompts, self.prompts, "edit.prompts")
        for template in self.k_texts:
            try:
                template.format(k="x", a_k="a x")
            except (KeyError, IndexError, ValueError) as exc:
                raise SettingError("edit.k_texts", template, "use {k} and {a_k} only, e.g. 'A {k} is a'") from exc

    def target(self, catalog: Catalog, k: Knowledge) -> EditTarget:
        """What the edit of ``k`` is for; a swap's k' is ``replacement`` or k's partner."""
        if self.op == "erase":
            return EditTarget("erase", k)
        if self.replacement is not None:
            new = catalog.named([self.replacement], "edit.replacement")[0]
            if new.name == k.name:
                raise SettingError("edit.replacement", self.replacement, f"must differ from the edited object {k.name!r}")
            return EditTarget("swap", k, new)
        return EditTarget("swap", k, partner(catalog, k))

    def about_k(self, k: Knowledge) -> list[str]:
        return [t.format(k=k.singular, a_k=k.indefinite) for t in self.k_texts]


def partner(catalog: Catalog, k: Knowledge) -> Knowledge:
    """The next object of ``k``'s supercategory by name, round the list (any other object where k is alone in it)."""
    same = sorted((x for x in catalog if x.supercategory == k.supercategory), key=lambda x: x.name)
    if len(same) < 2:
        same = sorted(catalog, key=lambda x: x.name)
    names = [x.name for x in same]
    return same[(names.index(k.name) + 1) % len(same)]


def fit_data(adapter, knowledge: Knowledge, samples: list[tuple[np.ndarray, str]], locality: list[tuple[np.ndarray, str]],
             texts: list[str], batch: int) -> FitData:
    """The optimized rule's data: each sample (image, unedited caption naming k) teacher-forced up to k, each image without
    k with its unedited caption (every caption position is a KL position), and the text prompts; with the unedited
    model's log-probabilities."""
    contexts = [(image, target_context(adapter, caption, knowledge)) for image, caption in samples]
    forced = [(image, context) for image, context in contexts if context is not None]
    chunks = [forced[i:i + batch] for i in range(0, len(forced), batch)]
    prepared = [adapter.prepare([im for im, _ in c], continuations=[ctx for _, ctx in c]) for c in chunks]
    loc = []
    for image, caption in locality:
        forced_one, start = forced_caption(adapter, image, caption)
        loc.append((forced_one, torch.arange(start - 1, forced_one.prompt_len, device=adapter.device)))  # the caption, and after it
    return baseline(adapter, FitData(prepared, loc, [texts[i:i + batch] for i in range(0, len(texts), batch)]))


def make(adapter, rule: EditRule, neurons: NeuronSet, target: EditTarget, context: dict) -> tuple[WeightEdit, float]:
    """(the edit ``rule`` makes of ``neurons`` for ``target``, the seconds it took); provenance filled in."""
    began = time.perf_counter()
    edit = rule.make(adapter, neurons, target, context)  # closed-form rules compute under no_grad; the fit has its own
    seconds = time.perf_counter() - began
    edit.provenance.update(op=target.op, knowledge=target.knowledge.name,
                           replacement=target.replacement.name if target.replacement else None,
                           method=neurons.method, variant=neurons.variant,
                           neurons=[[int(a), int(b)] for a, b in zip(neurons.layers, neurons.units, strict=True)])
    return edit, seconds

