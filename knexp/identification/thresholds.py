"""Threshold rules for the two stages: (threshold_a, threshold_g) for one sample.

paper     Table IV, per knowledge (MiniGPT-4's activation scale).
fixed     the same explicit pair for every knowledge.
quantile  automatic, no per-object tuning: threshold_a is the ``q_a`` quantile of max_p V over all L x d_f
          neurons of the sample, threshold_g the ``q_g`` quantile of max_p g over the stage-1 set C^k
          (and at least ``min_g``, so a neuron must raise the target logit). The expected sizes are
          |C^k| ~ (1 - q_a) L d_f and |N_k| ~ (1 - q_g) |C^k|, whatever the model's activation scale.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from knexp.identification.passes import SampleStats


def thresholds_for(cfg: DictConfig, knowledge_name: str, stats: SampleStats) -> tuple[float, float]:
    rule = cfg.name
    if rule == "paper":
        table = cfg.per_knowledge
        if knowledge_name not in table:
            raise KeyError(f"thresholds=paper has no entry for {knowledge_name!r}; use thresholds=quantile or thresholds=fixed")
        return float(table[knowledge_name].a), float(table[knowledge_name].g)
    if rule == "fixed":
        return float(cfg.a), float(cfg.g)
    if rule == "quantile":
        a = float(torch.quantile(stats.diff_max.flatten().double(), cfg.q_a))
        candidates = stats.gradcam_max[stats.diff_max > a]
        g = float(torch.quantile(candidates.double(), cfg.q_g)) if candidates.numel() else float("inf")
        return a, max(g, float(cfg.min_g))
    raise ValueError(f"unknown threshold rule {rule!r}; use thresholds=paper, quantile or fixed")
