"""Identification methods as rankings of one sample's statistics (``SampleStats``, all [L, d_f]).

ours          N_k = {(l, u) : max_p V > threshold_a and max_p g > threshold_g}, V = O'_o - O'_i,
              g = O'_o * dy_c/dO'_o (docs/method.md, stages 1 and 2); C^k, the stage-1 set, is kept alongside.
stage1_only   top-|N_k| by max_p V.                 stage2_only  top-|N_k| by max_p g.
schwettmann   paper: top-|N_k| by mean_p g.         authors: (unit, patch) pairs ranked by g; the first
              |N_k| distinct neurons in that order are exactly the top-|N_k| by max_p g, and each keeps
              its best patch.
pan           paper: top-|N_k| by mean_p O'_o * (W_out[:, u] . W_U[c]).
              authors: top-|N_k| by act_fn(gate(x))[t*] * (W_out[:, u] . W_U[c]) at the predicting position.
attribution   top-n by -a, a = sum_p (O'_i - O'_o) * dy_c/dO'_o: the first-order change of y_c when the neuron takes
              its inpainted values, most negative first (docs/method.md, "Attribution"); or every neuron with
              a <= -threshold (its thresholded form).
random        layer-matched control: in each layer, as many random units as the reference set has there.
Baselines take |N_k| from ``ours`` on the same sample; |N_k| = 0 gives an empty set that says why.

Each method is also a class (``Method``: ``Ours``, ``Stage1Only``, ...) that ``conf/method/*.yaml`` names by
``_target_``: ``select`` gives its set at the paper's equal size on a sample whose rule outcome is known, ``ranked`` its
top-n for size curves (docs/method.md, "Size curves"): ours at size n is the ``budget`` form of its rule (same stage-1
score and layers), random is layer-matched to ours at n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from knexp.identification.passes import SampleStats
from knexp.identification.thresholds import LAYERS, Rule, RuleContext, TwoStage, allowed_layers, scalar_pair, top_flat
from knexp.settings import Choice, Integer, Number, check_fields
from knexp.user_errors import ConfigError

VARIANTS = ("paper", "authors")  # Schwettmann's and Pan's: as the paper describes them, or as the authors' code runs
FORMS = ("matched", "top_n", "threshold")


@dataclass
class NeuronSet:
    method: str
    variant: str
    layers: np.ndarray  # int [n]
    units: np.ndarray  # int [n]
    scores: np.ndarray  # float [n], the ranking score (descending)
    patches: np.ndarray | None = None  # int [n], image token of each neuron's best pair (schwettmann authors)
    spread: np.ndarray | None = None  # float [n], each neuron's std_p O' on its sample (unit of relative noise)
    # float [n], mean_p (O'_i - O'_o) on its sample (the inpainted intervention's delta)
    shift: np.ndarray | None = None
    note: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def empty(self) -> bool:
        return len(self) == 0

    def pairs(self) -> set[tuple[int, int]]:
        return set(zip(self.layers.tolist(), self.units.tolist(), strict=True))

    def per_layer(self, num_layers: int) -> list[int]:
        return np.bincount(self.layers, minlength=num_layers).tolist()

    @classmethod
    def union(cls, sets: list[NeuronSet]) -> NeuronSet:
        """Every distinct (layer, unit) of ``sets``, sorted (scores dropped): e.g. to record all of them in one pass."""
        pairs = sorted({pair for s in sets for pair in s.pairs()})
        layers = np.array([lay for lay, _ in pairs], np.int64)
        return cls("union", "", layers, np.array([u for _, u in pairs], np.int64), np.zeros(len(pairs)))

    def frame(self) -> pd.DataFrame:
        """One row per neuron: layer, unit, score (ranking order)."""
        return pd.DataFrame({"layer": self.layers, "unit": self.units, "score": self.scores})

    def to_dict(self) -> dict:
        rows = zip(self.layers, self.units, self.scores, strict=True)
        d = {"method": self.method, "variant": self.variant, "size": len(self), "note": self.note, "info": self.info,
             "neurons": [{"layer": int(layer), "unit": int(u), "score": float(s)} for layer, u, s in rows]}
        if self.patches is not None:
            for n, p in zip(d["neurons"], self.patches, strict=True):
                n["patch"] = int(p)
        return d


def _from_flat(method: str, variant: str, flat_idx: torch.Tensor, scores: torch.Tensor, d_ff: int, note: str = "",
               **kw) -> NeuronSet:
    idx = flat_idx.cpu().numpy().astype(np.int64)
    return NeuronSet(method, variant, idx // d_ff, idx % d_ff, scores.cpu().numpy().astype(np.float64), note=note, **kw)


def top_n(score: torch.Tensor, n: int, method: str, variant: str = "", within: torch.Tensor | None = None,
          **kw) -> NeuronSet:
    """The n highest entries of ``score`` [L, d_f] (inside the bool mask ``within`` when given; ties broken by index,
    so the result is deterministic)."""
    d_ff = score.shape[1]
    if n <= 0:
        return _from_flat(method, variant, torch.empty(0, dtype=torch.long), torch.empty(0), d_ff,
                          note="empty: |N_k| = 0 on this sample, so the baseline picks no neuron")
    order, values = top_flat(score, n, within)
    return _from_flat(method, variant, order, values, d_ff, **kw)


def ours(stats: SampleStats, threshold_a: float, threshold_g: float) -> NeuronSet:
    """Two-stage filtering with the paper's scalar thresholds (``thresholds=paper`` or ``fixed``): N_k of
    ``scalar_pair``."""
    return from_two_stage(scalar_pair(stats, float(threshold_a), float(threshold_g)))


def from_two_stage(ts: TwoStage) -> NeuronSet:
    """N_k of a rule's outcome, ranked by its stage-2 score; ``info`` records |C^k| and what the rule used."""
    flat = ts.keep.flatten().nonzero().flatten()
    scores = ts.stage2.flatten()[flat]
    order = torch.argsort(-scores.double(), stable=True)
    info = {**ts.info, "stage1_size": int(ts.candidates.sum())}
    note = ""
    if not ts.candidates.any():
        note = f"empty: no neuron passes stage 1 ({_described(ts.info, 'threshold_a')})"
    elif not ts.keep.any():
        note = (f"empty: none of the {int(ts.candidates.sum())} stage-1 neurons passes stage 2 "
                f"({_described(ts.info, 'threshold_g')})")
    return _from_flat("ours", "", flat[order], scores[order], ts.keep.shape[1], note=note, info=info)


def _described(info: dict, key: str) -> str:
    value = info.get(key)
    return f"{key} = {value:g}" if isinstance(value, float) else f"{key} per layer" if value is not None else "budget"


def stage1_only(stats: SampleStats, n: int, score: torch.Tensor | None = None,
                within: torch.Tensor | None = None) -> NeuronSet:
    """Top-n by the stage-1 score (default the paper's max_p V) inside ``within``: ours without stage 2."""
    return top_n(stats.diff_max if score is None else score, n, "stage1_only", within=within)


def stage2_only(stats: SampleStats, n: int, score: torch.Tensor | None = None,
                within: torch.Tensor | None = None) -> NeuronSet:
    """Top-n by the stage-2 score (default the paper's max_p g) inside ``within``: ours without stage 1."""
    return top_n(stats.gradcam_max if score is None else score, n, "stage2_only", within=within)


def attribution(stats: SampleStats, n: int | None = None, threshold: float | None = None,
                within: torch.Tensor | None = None) -> NeuronSet:
    """Top-n by -a (``n``), or every neuron with a <= -``threshold`` (its thresholded form), inside ``within``."""
    score = -stats.attribution
    if (n is None) == (threshold is None):
        raise ConfigError("attribution takes either n (top-n form) or threshold (thresholded form)")
    if threshold is not None:
        keep = score >= float(threshold)
        within = keep if within is None else keep & within
        n = int(within.sum())
        if n == 0:
            return NeuronSet("attribution", "threshold", np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0),
                             note=f"empty: no neuron has a <= -{threshold:g}", info={"threshold": float(threshold)})
        return top_n(score, n, "attribution", "threshold", within=within, info={"threshold": float(threshold)})
    return top_n(score, n, "attribution", "top_n", within=within)


def schwettmann(stats: SampleStats, n: int, variant: str = "paper") -> NeuronSet:
    if variant == "paper":
        return top_n(stats.gradcam_mean, n, "schwettmann", "paper")
    if variant == "authors":
        s = top_n(stats.gradcam_max, n, "schwettmann", "authors")
        s.patches = stats.gradcam_argmax[s.layers, s.units].numpy() if len(s) else np.empty(0, np.int64)
        return s
    raise ConfigError(f"unknown schwettmann variant {variant!r}; use 'paper' or 'authors'")


def pan(stats: SampleStats, n: int, variant: str = "paper") -> NeuronSet:
    if variant == "paper":
        return top_n(stats.act_mean * stats.wout_dot_wu, n, "pan", "paper")
    if variant == "authors":
        return top_n(stats.actfn_last * stats.wout_dot_wu, n, "pan", "authors")
    raise ConfigError(f"unknown pan variant {variant!r}; use 'paper' or 'authors'")


def layer_matched_units(reference: NeuronSet, d_ff: int, rng: np.random.Generator,
                        disjoint: bool) -> tuple[list[int], list]:
    """(layers, units): in every layer of ``reference`` (ascending), as many distinct random units as it holds there,
    drawn by ``rng`` from all of the layer's ``d_ff`` units, or with ``disjoint`` from those the reference does not
    hold. The draw of each layer is an int array in ``rng``'s order."""
    layers, units = [], []
    for layer in sorted(set(reference.layers.tolist())):
        here = reference.layers == layer
        taken = set(reference.units[here].tolist()) if disjoint else set()
        pool = np.array([u for u in range(d_ff) if u not in taken])
        layers += [layer] * int(here.sum())
        units.append(rng.choice(pool, size=int(here.sum()), replace=False))
    return layers, units


def random_matched(reference: NeuronSet, d_ff: int, seed: int) -> NeuronSet:
    """The ``random`` method's control (docs/method.md, "Baselines"): in every layer, as many distinct random units as
    ``reference`` holds there, drawn from all of the layer's units (so it may share some with ``reference``), seeded."""
    layers, draws = layer_matched_units(reference, d_ff, np.random.default_rng(seed), disjoint=False)
    units = [int(u) for draw in draws for u in draw]
    note = "" if layers else "empty: the reference set is empty"
    return NeuronSet("random", f"matched:{reference.method}", np.array(layers, np.int64), np.array(units, np.int64),
                     np.zeros(len(units)), note=note, info={"seed": seed})


# ---- methods as configurable objects (conf/method/*.yaml) -----------------------------------------------------------
def _within(stats: SampleStats, layers: str | None, ctx: RuleContext) -> torch.Tensor | None:
    """bool [L, d_f] of the neurons in the ``layers`` setting's layers (None: everywhere)."""
    return None if layers is None else allowed_layers(stats, layers, ctx)[:, None].expand(stats.shape)


@dataclass
class Method:
    """A way of choosing neurons from one sample's statistics. ``select``: the set at |N_k| of ours on the sample (the
    paper's equal-size comparison), given the rule's outcome ``ts``; ``ranked``: the method's n best neurons."""

    name: str = ""
    variant: str = ""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Check the method's settings (``method.*``) when it is built: each raises ``SettingError`` naming the key."""

    def select(self, stats: SampleStats, ts: TwoStage, rule: Rule, ctx: RuleContext, d_ff: int) -> NeuronSet:
        raise NotImplementedError

    def ranked(self, stats: SampleStats, rule: Rule, ctx: RuleContext, n: int, d_ff: int) -> NeuronSet:
        budget = rule.at_size(n)
        return self.select(stats, budget.apply(stats, ctx), budget, ctx, d_ff)

    def needs_live(self, rule: Rule) -> bool:
        """Whether the method, under ``rule``, needs the model's live window."""
        return rule.needs_live


@dataclass
class Ours(Method):
    """Two-stage filtering: N_k of the rule."""

    def select(self, stats, ts, rule, ctx, d_ff):
        return from_two_stage(ts)


@dataclass
class Stage1Only(Method):
    """Ablation: ours' stage-1 score and layers, without stage 2."""

    def select(self, stats, ts, rule, ctx, d_ff):
        return stage1_only(stats, len(from_two_stage(ts)), score=ts.stage1,
                           within=_within(stats, _rule_layers(rule), ctx))


@dataclass
class Stage2Only(Method):
    """Ablation: ours' stage-2 score and layers, without stage 1."""

    def select(self, stats, ts, rule, ctx, d_ff):
        return stage2_only(stats, len(from_two_stage(ts)), score=ts.stage2,
                           within=_within(stats, _rule_layers(rule), ctx))


def _rule_layers(rule: Rule) -> str | None:
    """The layers setting of ours' rule (None for the paper's rules, which use every layer)."""
    return rule.layers if rule.automatic else None


@dataclass
class Schwettmann(Method):
    """Schwettmann et al. 2023 over all layers, as the paper's comparison ran it (variant ``paper`` or ``authors``)."""

    variant: str = "paper"

    def check(self) -> None:
        check_fields(self, "method", variant=Choice(VARIANTS))

    def select(self, stats, ts, rule, ctx, d_ff):
        return schwettmann(stats, len(from_two_stage(ts)), self.variant)


@dataclass
class Pan(Method):
    """Pan et al. 2024 over all layers (variant ``paper`` or ``authors``)."""

    variant: str = "paper"

    def check(self) -> None:
        check_fields(self, "method", variant=Choice(VARIANTS))

    def select(self, stats, ts, rule, ctx, d_ff):
        return pan(stats, len(from_two_stage(ts)), self.variant)


@dataclass
class Attribution(Method):
    """Inpainting attribution patching in its ``form``: ``matched`` (|N_k|), ``top_n`` (``n``) or ``threshold``, inside
    ``layers`` (all | nonzero | live)."""

    form: str = "matched"
    n: int = 300
    threshold: float = 0.02
    layers: str = "all"

    def check(self) -> None:
        check_fields(self, "method", form=Choice(FORMS), n=Integer(low=1), threshold=Number(low=0.0),
                     layers=Choice(LAYERS))

    def select(self, stats, ts, rule, ctx, d_ff):
        within = _within(stats, self.layers, ctx)
        if self.form == "matched":
            return attribution(stats, n=len(from_two_stage(ts)), within=within)
        if self.form == "top_n":
            return attribution(stats, n=int(self.n), within=within)
        if self.form == "threshold":
            return attribution(stats, threshold=float(self.threshold), within=within)
        raise ConfigError(f"unknown method.form={self.form!r}; use matched, top_n or threshold")

    def ranked(self, stats, rule, ctx, n, d_ff):
        return attribution(stats, n=n, within=_within(stats, self.layers, ctx))

    def needs_live(self, rule: Rule) -> bool:
        return rule.needs_live or self.layers == "live"


@dataclass
class RandomControl(Method):
    """The layer-matched random control of ours' set (seeded)."""

    seed: int = 0

    def check(self) -> None:
        check_fields(self, "method", seed=Integer(low=0))

    def select(self, stats, ts, rule, ctx, d_ff):
        return random_matched(from_two_stage(ts), d_ff, seed=int(self.seed))
