"""Rules that turn one sample's statistics into the two stages' sets C^k and N_k (docs/method.md, "Thresholds").

paper           Table IV per knowledge (MiniGPT-4's activation scale): C^k = {max_p V > a}, N_k = {(l, u) in C^k :
                max_p g > g}, over all layers: exactly the paper.
fixed           the same explicit pair (a, g) for every knowledge, otherwise as ``paper``.
quantile        automatic: a = the ``q_a`` quantile of the stage-1 score over the allowed neurons, g = the ``q_g``
                quantile of max_p g over C^k (and at least ``min_g``).
layer_quantile  automatic: in each allowed layer l, a_l = the ``q_a`` quantile of the stage-1 score in that layer, so
                every layer offers the same share of candidates; g as in ``quantile``.
budget          automatic, a set-size budget: C^k = the ceil(n / (1 - q_g)) allowed neurons of highest stage-1
                score, N_k = the ``n`` of them with the highest max_p g (the two quantiles at a fixed size).

Automatic rules have more settings (``paper`` and ``fixed`` always use the raw score over all layers):
  ``layers``  where candidates may sit. ``nonzero``: layers whose gradient at the image positions is not 0
              everywhere (never the last: nothing reads its image positions); ``live``: those inside the model's
              live window as well (``knexp.identification.causal_trace``); ``all``: no restriction.
  ``stage1``  the stage-1 score. ``raw``: max_p V, the paper's; ``abs``: max_p |V|, a change of either sign;
              ``spread``: max_p V / the neuron's std over
              reference images (V in units of the neuron's own spread); ``contrastive``: (max_p V - m) / s with m, s
              the mean and std of max_p V over reference removals of *other* objects (``knexp.identification.
              reference``): how far k's removal moves the neuron beyond what removing any object does.
  ``stage2``  the stage-2 score: ``max`` (max_p g, g = O'_o * dy_c/dO'_o, the paper's) or ``mean`` (mean_p g, the
              GradCAM averaged over image positions as Schwettmann et al.'s comparison ranks it).
``paper`` and ``fixed`` use the paper's max_p g.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from knexp.identification.passes import SampleSkipped, SampleStats
from knexp.identification.reference import ReferenceStats
from knexp.settings import Choice, Integer, Number, SettingError, check_fields
from knexp.user_errors import ConfigError

STAGE1 = ("raw", "abs", "spread", "contrastive")
LAYERS = ("all", "nonzero", "live")
STAGE2 = ("max", "mean")


@dataclass
class RuleContext:
    """What a rule may need beyond the sample: the live window's neuron layers and the reference statistics."""

    knowledge: str
    live_layers: list[int] | None = None
    reference: ReferenceStats | None = None


@dataclass
class TwoStage:
    """C^k and N_k as bool [L, d_f] masks, the scores they came from, and what the rule used (``info``)."""

    stage1: torch.Tensor
    stage2: torch.Tensor
    candidates: torch.Tensor
    keep: torch.Tensor
    info: dict = field(default_factory=dict)


def stage1_score(stats: SampleStats, kind: str, ctx: RuleContext) -> torch.Tensor:
    """[L, d_f] stage-1 score of ``kind`` (module docstring)."""
    if kind == "raw":
        return stats.diff_max
    if kind == "abs":
        return stats.diff_absmax
    if kind in ("spread", "contrastive") and ctx.reference is None:
        raise ConfigError(f"stage1={kind!r} needs reference statistics (reference.images, reference.removals)")
    tiny = 1e-6
    if kind == "spread":
        return stats.diff_max / ctx.reference.std.clamp_min(tiny)
    if kind == "contrastive":
        mean, std = ctx.reference.null_for(ctx.knowledge)
        return (stats.diff_max - mean) / std.clamp_min(tiny)
    raise ConfigError(f"unknown stage1 score {kind!r}; use one of {STAGE1}")


def stage2_score(stats: SampleStats, kind: str) -> torch.Tensor:
    """[L, d_f] stage-2 score of ``kind``: max_p g (the paper's) or mean_p g."""
    if kind == "max":
        return stats.gradcam_max
    if kind == "mean":
        return stats.gradcam_mean
    raise ConfigError(f"unknown stage2 score {kind!r}; use one of {STAGE2}")


def allowed_layers(stats: SampleStats, layers: str, ctx: RuleContext) -> torch.Tensor:
    """bool [L]: the layers where an automatic rule may place candidates."""
    if layers == "all":
        return torch.ones(stats.shape[0], dtype=torch.bool)
    if layers not in LAYERS:
        raise ConfigError(f"unknown layers {layers!r}; use one of {LAYERS}")
    allowed = (stats.gradcam_max != 0).any(dim=1) | (stats.gradcam_mean != 0).any(dim=1)  # a gradient reaches the layer
    if layers == "live":
        if ctx.live_layers is None:
            raise ConfigError("layers='live' needs the model's live window (run task=trace, or it is computed on first "
                              "use)")
        window = torch.zeros_like(allowed)
        window[list(ctx.live_layers)] = True
        allowed &= window
    if not allowed.any():
        raise SampleSkipped(f"layers={layers!r} leaves no layer for candidates on this sample")
    return allowed


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q)) if values.numel() else float("inf")


@dataclass
class Rule:
    """A threshold rule (``conf/thresholds/*.yaml`` names one by ``_target_``): ``apply`` gives C^k and N_k on one
    sample.

    ``layers``, ``stage1``, ``stage2`` and ``q_g`` are the automatic rules' settings (module docstring); the paper's
    rules always use every layer, the raw stage-1 score and max_p g."""

    name: str = ""
    layers: str = "all"
    stage1: str = "raw"
    stage2: str = "max"
    q_g: float = 0.5

    automatic: ClassVar[bool] = True

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Check the settings (``thresholds.*``) when the rule is built: each raises ``SettingError`` naming the key."""
        check_fields(self, "thresholds", layers=Choice(LAYERS), stage1=Choice(STAGE1), stage2=Choice(STAGE2),
                     q_g=Number(0.0, 1.0))

    def check_knowledge(self, name: str) -> None:
        """Raise ``ConfigError`` when the rule has nothing for knowledge ``name`` (checked when a job's session is
        built)."""

    def apply(self, stats: SampleStats, ctx: RuleContext) -> TwoStage:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The rule as the report shows it: ``paper``, or e.g. ``budget(abs, live)`` (stage-1 score, layers; the stage-2
        score too when it is not the paper's max)."""
        if not self.automatic:
            return self.name
        second = "" if self.stage2 == "max" else f", {self.stage2}"
        return f"{self.name}({self.stage1}{second}, {self.layers})"

    @property
    def needs_live(self) -> bool:
        """Whether the rule needs the model's live window."""
        return self.automatic and self.layers == "live"

    @property
    def needs_reference(self) -> bool:
        """Whether the rule needs reference statistics (``knexp.identification.reference``)."""
        return self.automatic and self.stage1 in ("spread", "contrastive")

    def at_size(self, n: int) -> BudgetRule:
        """This rule at a fixed size n: the ``budget`` form with the same stage-1 score, layers, stage 2 and q_g (the
        paper's rules give the raw score over all layers): ours' set at every rung of a size curve."""
        if not self.automatic:
            return BudgetRule(name="budget", n=int(n), q_g=float(self.q_g))
        return BudgetRule(name="budget", n=int(n), q_g=float(self.q_g), layers=self.layers, stage1=self.stage1,
                          stage2=self.stage2)

    def _scores(self, stats: SampleStats, ctx: RuleContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """(stage-1 score, stage-2 score, bool [L, d_f] of the allowed layers, what the rule used)."""
        s1, g_score = stage1_score(stats, self.stage1, ctx), stage2_score(stats, self.stage2)
        layers = allowed_layers(stats, self.layers, ctx)
        info = {"stage1": self.stage1, "stage2": self.stage2, "layers": self.layers,
                "allowed_layers": layers.nonzero().flatten().tolist()}
        return s1, g_score, layers[:, None].expand_as(s1), info


def scalar_pair(stats: SampleStats, a: float, g: float) -> TwoStage:
    """C^k = {max_p V > a}, N_k = {(l, u) in C^k : max_p g > g}, over all layers: exactly the paper (docs/method.md,
    "Stage 1: activation differences by inpainting", "Stage 2: GradCAM filtering")."""
    cand = stats.diff_max > a
    return TwoStage(stats.diff_max, stats.gradcam_max, cand, cand & (stats.gradcam_max > g),
                    {"threshold_a": a, "threshold_g": g})


@dataclass
class PaperRule(Rule):
    """``thresholds=paper``: Table IV per knowledge (MiniGPT-4's activation scale)."""

    per_knowledge: dict = field(default_factory=dict)
    automatic: ClassVar[bool] = False

    def check(self) -> None:
        super().check()
        if not isinstance(self.per_knowledge, dict):
            raise SettingError("thresholds.per_knowledge", self.per_knowledge,
                               "use a mapping of knowledge name -> {a: ..., g: ...}")
        for name, entry in self.per_knowledge.items():
            key = f"thresholds.per_knowledge.{name.replace(' ', '_')}"
            if not isinstance(entry, dict) or set(entry) != {"a", "g"}:
                raise SettingError(key, entry, "use {a: <stage-1 threshold>, g: <stage-2 threshold>}")
            self.per_knowledge[name] = {t: Number()(f"{key}.{t}", entry[t]) for t in ("a", "g")}

    def check_knowledge(self, name: str) -> None:
        if name not in self.per_knowledge:
            raise ConfigError(f"thresholds=paper has no entry for {name!r}; use an automatic rule (thresholds=budget "
                              "or thresholds=quantile) or thresholds=fixed")

    def apply(self, stats: SampleStats, ctx: RuleContext) -> TwoStage:
        self.check_knowledge(ctx.knowledge)
        entry = self.per_knowledge[ctx.knowledge]
        return scalar_pair(stats, float(entry["a"]), float(entry["g"]))


@dataclass
class FixedRule(Rule):
    """``thresholds=fixed``: the same explicit pair (a, g) for every knowledge."""

    a: float = 0.0
    g: float = 0.0
    automatic: ClassVar[bool] = False

    def check(self) -> None:
        super().check()
        check_fields(self, "thresholds", a=Number(), g=Number())

    def apply(self, stats: SampleStats, ctx: RuleContext) -> TwoStage:
        return scalar_pair(stats, float(self.a), float(self.g))


@dataclass
class QuantileRule(Rule):
    """``thresholds=quantile``: a = the ``q_a`` quantile of the stage-1 score over the allowed neurons, g = the ``q_g``
    quantile of the stage-2 score over C^k (and at least ``min_g``)."""

    q_a: float = 0.999
    min_g: float = 0.0

    def check(self) -> None:
        super().check()
        check_fields(self, "thresholds", q_a=Number(0.0, 1.0), min_g=Number())

    def candidates(self, s1: torch.Tensor, inside: torch.Tensor, info: dict) -> torch.Tensor:
        a = _quantile(s1[inside], float(self.q_a))
        info["threshold_a"] = a
        return inside & (s1 > a)

    def apply(self, stats: SampleStats, ctx: RuleContext) -> TwoStage:
        s1, g_score, inside, info = self._scores(stats, ctx)
        cand = self.candidates(s1, inside, info)
        g = max(_quantile(g_score[cand], float(self.q_g)), float(self.min_g))
        info["threshold_g"] = g
        return TwoStage(s1, g_score, cand, cand & (g_score > g), info)


@dataclass
class LayerQuantileRule(QuantileRule):
    """``thresholds=layer_quantile``: in each allowed layer l, a_l = the ``q_a`` quantile of the stage-1 score in that
    layer, so every layer offers the same share of candidates; g as in ``QuantileRule``."""

    def candidates(self, s1: torch.Tensor, inside: torch.Tensor, info: dict) -> torch.Tensor:
        a_l = torch.full((s1.shape[0], 1), float("inf"))
        for layer in inside[:, 0].nonzero().flatten().tolist():
            a_l[layer] = _quantile(s1[layer], float(self.q_a))
        info["threshold_a"] = [None if math.isinf(v) else v for v in a_l.flatten().tolist()]
        return s1 > a_l


@dataclass
class BudgetRule(Rule):
    """``thresholds=budget``: C^k = the ceil(n / (1 - q_g)) allowed neurons of highest stage-1 score, N_k = the ``n`` of
    them with the highest stage-2 score (the two quantiles at a fixed size)."""

    n: int = 1000

    def check(self) -> None:
        super().check()
        check_fields(self, "thresholds", n=Integer(low=1), q_g=Number(0.0, 1.0, high_open=True))  # C^k = n / (1 - q_g)

    def apply(self, stats: SampleStats, ctx: RuleContext) -> TwoStage:
        s1, g_score, inside, info = self._scores(stats, ctx)
        n = int(self.n)
        n_cand = math.ceil(n / (1 - float(self.q_g)))
        cand = _top_mask(s1, n_cand, inside)
        return TwoStage(s1, g_score, cand, _top_mask(g_score, n, cand), {**info, "n": n, "candidates": n_cand})


def top_flat(score: torch.Tensor, n: int, within: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices [m], their scores [m] in float64) of the m = min(n, |within|) highest entries of ``score``
    [L, d_f], inside the bool mask ``within`` when given; ties broken by index, so the result is deterministic."""
    flat = score.flatten().double()
    if within is not None:
        flat = flat.masked_fill(~within.flatten(), float("-inf"))
        n = min(n, int(within.sum()))
    order = torch.argsort(-flat, stable=True)[:n]
    return order, flat[order]


def _top_mask(score: torch.Tensor, n: int, within: torch.Tensor) -> torch.Tensor:
    """bool mask of the ``n`` entries of ``score`` with the highest values inside ``within`` (ties by index)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[top_flat(score, n, within)[0]] = True
    return mask.view_as(score)
