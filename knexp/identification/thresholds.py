"""Rules that turn one sample's statistics into the two stages' sets C^k and N_k (METHOD.md, Stages 1-2, "Thresholds").

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
              live window as well (``knexp.identification.trace``); ``all``: no restriction.
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

import torch
from omegaconf import DictConfig

from knexp.identification.passes import SampleStats
from knexp.identification.reference import ReferenceStats

AUTOMATIC = ("quantile", "layer_quantile", "budget")
RULES = ("paper", "fixed", *AUTOMATIC)
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
        raise ValueError(f"stage1={kind!r} needs reference statistics (reference.images, reference.removals)")
    tiny = 1e-6
    if kind == "spread":
        return stats.diff_max / ctx.reference.std.clamp_min(tiny)
    if kind == "contrastive":
        mean, std = ctx.reference.null_for(ctx.knowledge)
        return (stats.diff_max - mean) / std.clamp_min(tiny)
    raise ValueError(f"unknown stage1 score {kind!r}; use one of {STAGE1}")


def stage2_score(stats: SampleStats, kind: str) -> torch.Tensor:
    """[L, d_f] stage-2 score of ``kind``: max_p g (the paper's) or mean_p g."""
    if kind == "max":
        return stats.gradcam_max
    if kind == "mean":
        return stats.gradcam_mean
    raise ValueError(f"unknown stage2 score {kind!r}; use one of {STAGE2}")


def allowed_layers(stats: SampleStats, layers: str, ctx: RuleContext) -> torch.Tensor:
    """bool [L]: the layers where an automatic rule may place candidates."""
    if layers == "all":
        return torch.ones(stats.shape[0], dtype=torch.bool)
    if layers not in LAYERS:
        raise ValueError(f"unknown layers {layers!r}; use one of {LAYERS}")
    allowed = (stats.gradcam_max != 0).any(dim=1) | (stats.gradcam_mean != 0).any(dim=1)  # a gradient reaches the layer
    if layers == "live":
        if ctx.live_layers is None:
            raise ValueError("layers='live' needs the model's live window (run task=trace, or it is computed on first use)")
        window = torch.zeros_like(allowed)
        window[list(ctx.live_layers)] = True
        allowed &= window
    if not allowed.any():
        raise ValueError(f"layers={layers!r} leaves no layer for candidates on this sample")
    return allowed


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q)) if values.numel() else float("inf")


def two_stage(cfg: DictConfig, stats: SampleStats, ctx: RuleContext) -> TwoStage:
    """C^k and N_k under the rule ``cfg`` (one of ``RULES``) on one sample."""
    rule = cfg.name
    g_score = stats.gradcam_max
    if rule in ("paper", "fixed"):
        if rule == "paper":
            table = cfg.per_knowledge
            if ctx.knowledge not in table:
                raise KeyError(f"thresholds=paper has no entry for {ctx.knowledge!r}; use thresholds=quantile or thresholds=fixed")
            a, g = float(table[ctx.knowledge].a), float(table[ctx.knowledge].g)
        else:
            a, g = float(cfg.a), float(cfg.g)
        cand = stats.diff_max > a
        return TwoStage(stats.diff_max, g_score, cand, cand & (g_score > g), {"threshold_a": a, "threshold_g": g})
    if rule not in AUTOMATIC:
        raise ValueError(f"unknown threshold rule {rule!r}; use one of {', '.join(RULES)}")
    s1 = stage1_score(stats, cfg.get("stage1", "raw"), ctx)
    g_score = stage2_score(stats, cfg.get("stage2", "max"))
    layers = allowed_layers(stats, cfg.get("layers", "all"), ctx)
    inside = layers[:, None].expand_as(s1)
    info = {"stage1": cfg.get("stage1", "raw"), "stage2": cfg.get("stage2", "max"), "layers": cfg.get("layers", "all"),
            "allowed_layers": layers.nonzero().flatten().tolist()}
    if rule == "budget":
        n = int(cfg.n)
        n_cand = math.ceil(n / (1 - float(cfg.q_g)))
        cand = _top_mask(s1, n_cand, inside)
        keep = _top_mask(g_score, n, cand)
        return TwoStage(s1, g_score, cand, keep, {**info, "n": n, "candidates": n_cand})
    if rule == "quantile":
        a = _quantile(s1[inside], float(cfg.q_a))
        cand = inside & (s1 > a)
        info["threshold_a"] = a
    else:  # layer_quantile
        a_l = torch.full((s1.shape[0], 1), float("inf"))
        for layer in layers.nonzero().flatten().tolist():
            a_l[layer] = _quantile(s1[layer], float(cfg.q_a))
        cand = s1 > a_l
        info["threshold_a"] = [None if math.isinf(v) else v for v in a_l.flatten().tolist()]
    g = max(_quantile(g_score[cand], float(cfg.q_g)), float(cfg.min_g))
    info["threshold_g"] = g
    return TwoStage(s1, g_score, cand, cand & (g_score > g), info)


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
