"""Identification of one sample: target token -> cached statistics -> the rule's two stages -> the method's neuron set.

``method_set`` gives the configured method's set at the paper's equal size (|N_k| of ``ours`` on the sample);
``ranked_set`` gives any ranking method's top-n, for size curves (METHOD.md, "Size curves"): ours at size n is
the ``budget`` form of its rule (same stage-1 score and layers), random is layer-matched to ours at n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig, OmegaConf

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.catalog import Knowledge
from knexp.data.coco import CocoScenes
from knexp.identification import methods as M
from knexp.identification.cache import StatsCache
from knexp.identification.passes import SampleStats, compute_stats, locate_target
from knexp.identification.selection import Candidate
from knexp.identification.thresholds import RuleContext, TwoStage, allowed_layers, two_stage
from knexp.models.adapters.base import Adapter
from knexp.store import stable_key

METHODS = ("ours", "stage1_only", "stage2_only", "schwettmann", "pan", "attribution", "random")


def _within(stats: SampleStats, layers: str | None, ctx: RuleContext):
    """bool [L, d_f] of the neurons in the ``layers`` setting's layers (None: everywhere)."""
    return None if layers is None else allowed_layers(stats, layers, ctx)[:, None].expand(stats.shape)


def _rule_layers(rule: DictConfig) -> str | None:
    """The layers setting of ours' rule (None for the paper's rules, which use every layer)."""
    return None if rule.name in ("paper", "fixed") else rule.get("layers", "all")


def method_set(method: DictConfig, stats: SampleStats, ts: TwoStage, rule: DictConfig, ctx: RuleContext, d_ff: int) -> M.NeuronSet:
    """The neuron set ``method`` picks on a sample whose rule outcome is ``ts`` (|N_k| = the size of ours).

    The ablations keep ours' stage-1 score and layers and drop one stage; the baselines rank all layers, as the
    paper's comparison did; attribution takes its own form (``matched``: |N_k|, ``top_n``, ``threshold``)."""
    name = method.name
    reference = M.from_two_stage(ts)
    n = len(reference)
    if name == "ours":
        return reference
    if name == "stage1_only":
        return M.stage1_only(stats, n, score=ts.stage1, within=_within(stats, _rule_layers(rule), ctx))
    if name == "stage2_only":
        return M.stage2_only(stats, n, score=ts.stage2, within=_within(stats, _rule_layers(rule), ctx))
    if name in ("schwettmann", "pan"):
        return getattr(M, name)(stats, n, method.get("variant", "paper"))
    if name == "attribution":
        form = method.get("form", "matched")
        within = _within(stats, method.get("layers", "all"), ctx)
        if form == "matched":
            return M.attribution(stats, n=n, within=within)
        if form == "top_n":
            return M.attribution(stats, n=int(method.n), within=within)
        if form == "threshold":
            return M.attribution(stats, threshold=float(method.threshold), within=within)
        raise ValueError(f"unknown attribution form {form!r}; use matched, top_n or threshold")
    if name == "random":
        return M.random_matched(reference, d_ff, seed=int(method.get("seed", 0)))
    raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")


def budget_rule(rule: DictConfig, n: int) -> DictConfig:
    """Ours' rule at a fixed size n: the ``budget`` form with the rule's stage-1 score, layers and q_g."""
    automatic = rule.name not in ("paper", "fixed")
    return OmegaConf.create({"name": "budget", "n": int(n), "q_g": float(rule.get("q_g", 0.5)),
                             "layers": rule.get("layers", "all") if automatic else "all",
                             "stage1": rule.get("stage1", "raw") if automatic else "raw",
                             "stage2": rule.get("stage2", "max") if automatic else "max"})


def ranked_set(method: DictConfig, stats: SampleStats, rule: DictConfig, ctx: RuleContext, n: int, d_ff: int) -> M.NeuronSet:
    """``method``'s n best neurons on the sample (the size-curve form of every ranking method)."""
    if method.name == "attribution":
        return M.attribution(stats, n=n, within=_within(stats, method.get("layers", "all"), ctx))
    budget = budget_rule(rule, n)
    return method_set(method, stats, two_stage(budget, stats, ctx), budget, ctx, d_ff)


@dataclass
class SampleResult:
    candidate: Candidate
    target_word: str
    target_id: int
    rule: dict  # what the rule used: thresholds, layers, stage-1 score
    reference: M.NeuronSet  # ours on this sample
    neurons: M.NeuronSet  # the configured method's set
    stats: SampleStats | None = None  # the sample's statistics (for size curves; not written out)

    def to_dict(self, num_layers: int) -> dict:
        return {
            "knowledge": self.candidate.knowledge, "image_id": self.candidate.image_id, "annotation_id": self.candidate.annotation_id,
            "captions": {"original": self.candidate.original_caption, "inpainted": self.candidate.inpainted_caption},
            "target": {"word": self.target_word, "token_id": self.target_id}, "rule": self.rule,
            "reference_size": len(self.reference), "stage1_size": self.reference.info.get("stage1_size"),
            "per_layer": self.neurons.per_layer(num_layers), "neuron_set": self.neurons.to_dict(),
        }


def annotate(neurons: M.NeuronSet, stats: SampleStats) -> M.NeuronSet:
    """Attach each neuron's spread (std_p O'_o) and shift (mean_p (O'_i - O'_o)) on its identification sample."""
    neurons.spread = stats.act_std[neurons.layers, neurons.units].numpy() if len(neurons) else np.empty(0)
    neurons.shift = stats.shift_mean[neurons.layers, neurons.units].numpy() if len(neurons) else np.empty(0)
    return neurons


def identify_sample(adapter: Adapter, model_key: str, data: CocoScenes, dataset_id: str, candidate: Candidate, knowledge: Knowledge,
                    opts: InpaintOptions, inpaint_cache: InpaintCache, stats_cache: StatsCache, thresholds_cfg: DictConfig,
                    method: DictConfig, ctx: RuleContext | None = None) -> SampleResult:
    target = locate_target(adapter, candidate.original_caption, adapter.caption_prefix, knowledge)
    key = stable_key(model_key, dataset_id, candidate.image_id, candidate.annotation_id, opts, candidate.original_caption)

    def compute() -> SampleStats:
        image = data.load_image(candidate.image_id)
        inst = next(i for i in data.instances(candidate.image_id) if i.annotation_id == candidate.annotation_id)
        edited = inpaint_cache.get(dataset_id, candidate.image_id, candidate.annotation_id, image, inst.bbox,
                                   data.instance_mask(candidate.annotation_id), opts)
        return compute_stats(adapter, image, edited, target)

    stats = stats_cache.get(key, compute)
    stats.check_finite()
    ctx = ctx or RuleContext(knowledge.name)
    ts = two_stage(thresholds_cfg, stats, ctx)
    reference = M.from_two_stage(ts)
    chosen = annotate(method_set(method, stats, ts, thresholds_cfg, ctx, adapter.d_ff), stats)
    return SampleResult(candidate, target.word, target.token_id, ts.info, reference, chosen, stats)
