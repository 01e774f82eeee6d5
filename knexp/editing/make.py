"""Making one object's edit: the ``edit`` group's settings (``EditSettings``, ``conf/edit``; its ``rule``,
``conf/edit/rule/*.yaml``, arrives built) and the timed rule (``make``: the edit with its cost)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from knexp.data.catalog import Catalog, Knowledge
from knexp.editing.prompts import Prompts
from knexp.editing.rules import EditRule
from knexp.editing.target import TARGETS, EditTarget
from knexp.identification.methods import NeuronSet
from knexp.models.weight_edit import WeightEdit
from knexp.settings import Choice, Integer, Many, SettingError, Text, check_fields, from_mapping, prompt_file


@dataclass
class EditSettings:
    """``conf/edit``: the rule, the method whose neurons it edits (``source``, a ``conf/method`` name; null: the job's
    ``method``), erase or swap (and k'), the set size, the images without k the optimized rule's KL term sees
    (``fit_other``), the images of k the fitted rules see besides the identification images (``fit_k``), the
    text-only prompts the fit keeps and the preserved keys include (``fit_texts``, a file; never measured),
    T-locality's text-only prompts (``texts``; ``k_texts`` are templates about k: ``{k}``, ``{a_k}``; never fitted) and
    T-generality's prompts (``prompts``: ``knexp.editing.prompts.Prompts``)."""

    rule: EditRule
    source: str | None = None
    op: str = "erase"
    replacement: str | None = None
    size: int = 30
    fit_other: int = 4
    fit_k: int = 3
    fit_texts: str | None = None  # a file of prompts the fit keeps; null: knexp/editing/fit_texts.txt
    texts: list[str] = field(default_factory=list)
    k_texts: list[str] = field(default_factory=list)
    prompts: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.rule, EditRule):
            raise SettingError("edit.rule", self.rule, "use a rule of conf/edit/rule, e.g. edit/rule=kn")
        check_fields(self, "edit", source=Text(optional=True), op=Choice(tuple(TARGETS)),
                     replacement=Text(optional=True), size=Integer(low=1), fit_other=Integer(low=0),
                     fit_k=Integer(low=0), fit_texts=Text(optional=True), texts=Many(Text(), min_len=0),
                     k_texts=Many(Text(), min_len=0))
        self.fit_prompts = prompt_file(self.fit_texts, "edit.fit_texts", "knexp.editing", "fit_texts.txt")
        if self.op not in self.rule.ops:
            made = " or ".join(self.rule.ops)
            raise SettingError("edit.op", self.op, f"edit/rule={self.rule.name} makes {made} only")
        if not isinstance(self.prompts, Prompts):
            self.prompts = from_mapping(Prompts, self.prompts, "edit.prompts")
        for template in self.k_texts:
            try:
                template.format(k="x", a_k="a x")
            except (KeyError, IndexError, ValueError) as exc:
                raise SettingError("edit.k_texts", template, "use {k} and {a_k} only, e.g. 'A {k} is a'") from exc

    def target(self, catalog: Catalog, k: Knowledge) -> EditTarget:
        """What the edit of ``k`` is for (``edit.op``); a swap's k' is ``replacement`` or k's partner."""
        return TARGETS[self.op].made(catalog, k, self.replacement)

    def about_k(self, k: Knowledge) -> list[str]:
        """The templates of ``k_texts`` filled in for ``k``."""
        return [t.format(k=k.singular, a_k=k.indefinite) for t in self.k_texts]


def make(adapter, rule: EditRule, neurons: NeuronSet, target: EditTarget, context) -> tuple[WeightEdit, float]:
    """(the edit ``rule`` makes of ``neurons`` for ``target`` from its ``context``, the seconds it took, less what
    ``EditRule.prepare`` took, which the provenance records apart as ``prepare_seconds``); provenance filled in."""
    began = time.perf_counter()
    rule.prepare(adapter, neurons, context)
    prepared_s = time.perf_counter() - began
    began = time.perf_counter()
    edit = rule.make(adapter, neurons, target, context)  # closed-form rules compute under no_grad; the fit has its own
    seconds = time.perf_counter() - began
    if type(rule).prepare is not EditRule.prepare:
        edit.provenance["prepare_seconds"] = round(prepared_s, 3)
    edit.provenance.update(op=target.op, knowledge=target.knowledge.name,
                           replacement=target.replacement.name if target.replacement else None,
                           method=neurons.method, variant=neurons.variant,
                           neurons=[[int(a), int(b)] for a, b in zip(neurons.layers, neurons.units, strict=True)])
    return edit, seconds


def making_costs(edit: WeightEdit) -> dict:
    """What an edit's provenance says of its making's cost, where its rule reports it: the fit's steps, whether it met
    its target and how often it regenerated its captions (``steps_run``, ``target_met``, ``checks``), and the seconds
    of ``EditRule.prepare`` (``prepare_seconds``)."""
    reported = ("steps_run", "target_met", "checks", "prepare_seconds")
    return {key: edit.provenance[key] for key in reported if key in edit.provenance}
