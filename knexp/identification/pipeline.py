"""Identification of one knowledge: select samples -> per sample, target token -> cached statistics -> the rule's two
stages -> the method's neuron set (docs/method.md, stages 1 and 2).

Every object here is plain: the selector (``knexp.identification.selection.Selector``), the rule
(``knexp.identification.thresholds.Rule``) and the method (``knexp.identification.methods.Method``) are built from the
config by ``knexp.job``; nothing here reads a config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from knexp.data.catalog import Knowledge
from knexp.data.data_errors import EntryError
from knexp.identification import methods as M
from knexp.identification.passes import SampleSkipped, SampleStats, compute_stats, locate_target
from knexp.identification.selection import Candidate, Selection, Selector
from knexp.identification.stats_cache import StatsCache
from knexp.identification.thresholds import Rule, RuleContext
from knexp.store import stable_key

log = logging.getLogger(__name__)


@dataclass
class SampleResult:
    candidate: Candidate
    target_word: str
    target_id: int
    rule: dict  # what the rule used: thresholds, layers, stage-1 score
    ours: M.NeuronSet  # N_k of ours' rule on this sample: the size the baselines match
    neurons: M.NeuronSet  # the configured method's set
    stats: SampleStats | None = None  # the sample's statistics (for size curves; not written out)

    def to_dict(self, num_layers: int) -> dict:
        return {
            "knowledge": self.candidate.knowledge, "image_id": self.candidate.image_id,
            "annotation_id": self.candidate.annotation_id,
            "captions": {"original": self.candidate.original_caption, "inpainted": self.candidate.inpainted_caption},
            "target": {"word": self.target_word, "token_id": self.target_id}, "rule": self.rule,
            "reference_size": len(self.ours), "stage1_size": self.ours.info.get("stage1_size"),
            "per_layer": self.neurons.per_layer(num_layers), "neuron_set": self.neurons.to_dict(),
        }


@dataclass
class Identification:
    """What identifying one knowledge produced; ``results`` keeps the samples that gave a neuron set, ``skipped`` the
    selected samples that could not be used, each with its reason."""

    knowledge: str
    method: M.Method
    selection: Selection
    results: list[SampleResult]
    skipped: list[dict] = field(default_factory=list)
    context: RuleContext | None = None

    def frame(self) -> pd.DataFrame:
        """One row per identified neuron of every sample: image_id, annotation_id, layer, unit, score."""
        frames = [r.neurons.frame().assign(image_id=r.candidate.image_id, annotation_id=r.candidate.annotation_id)
                  for r in self.results]
        columns = ["image_id", "annotation_id", "layer", "unit", "score"]
        return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)

    def per_layer(self, num_layers: int) -> list[int]:
        """Identified neurons per layer, summed over samples (L zeros when no sample gave a set)."""
        return np.sum([r.neurons.per_layer(num_layers) for r in self.results],
                      axis=0).tolist() if self.results else [0] * num_layers

    def status(self, first: int = 3) -> dict:
        """``{"state": "ok" | "no_samples", "usable": n, "reasons": [...]}``. With no usable sample, ``reasons`` holds
        the selection's message and the first ``first`` distinct reasons of the skipped samples and rejected candidates.
        Written to metrics.json; the sweep report marks such a job."""
        if self.results:
            return {"state": "ok", "usable": len(self.results), "reasons": []}
        reasons = [s["reason"] for s in self.skipped] + [c.reason for c in self.selection.rejected]
        return {"state": "no_samples", "usable": 0,
                "reasons": [self.selection.message, *list(dict.fromkeys(reasons))[:first]]}


def annotate(neurons: M.NeuronSet, stats: SampleStats) -> M.NeuronSet:
    """Attach each neuron's spread (std_p O'_o) and shift (mean_p (O'_i - O'_o)) on its identification sample."""
    neurons.spread = stats.act_std[neurons.layers, neurons.units].numpy() if len(neurons) else np.empty(0)
    neurons.shift = stats.shift_mean[neurons.layers, neurons.units].numpy() if len(neurons) else np.empty(0)
    return neurons


def sample_stats(selector: Selector, candidate: Candidate, knowledge: Knowledge,
                 stats_cache: StatsCache) -> tuple[SampleStats, str, int]:
    """(the sample's statistics, from the cache where it holds them; the target word; its token id). Raises
    ``SampleSkipped`` for a sample that cannot be used (no target in its caption, an unreadable image, statistics that
    are not finite)."""
    adapter = selector.captioner.adapter
    target = locate_target(adapter, candidate.original_caption, adapter.caption_prefix, knowledge)
    key = stable_key(selector.captioner.model_key, selector.dataset_id, candidate.image_id, candidate.annotation_id,
                     selector.opts, candidate.original_caption)

    def compute() -> SampleStats:
        try:
            original, inpainted = selector.data.load_image(candidate.image_id), selector.inpainted(candidate)
        except EntryError as exc:  # with data.strict the data layer raises a DatasetError instead, which stops the job
            raise SampleSkipped(f"unusable image: {exc}") from exc
        return compute_stats(adapter, original, inpainted, target)

    stats = stats_cache.get(key, compute)
    stats.check_finite()
    return stats, target.word, target.token_id


def identify_sample(selector: Selector, candidate: Candidate, knowledge: Knowledge, stats_cache: StatsCache, rule: Rule,
                    method: M.Method, ctx: RuleContext | None = None) -> SampleResult:
    """The method's neuron set on one selected sample (and ours', whose size the baselines match)."""
    stats, word, token_id = sample_stats(selector, candidate, knowledge, stats_cache)
    ctx = ctx or RuleContext(knowledge.name)
    ts = rule.apply(stats, ctx)
    chosen = annotate(method.select(stats, ts, rule, ctx, stats.shape[1]), stats)
    return SampleResult(candidate, word, token_id, ts.info, M.from_two_stage(ts), chosen, stats)


def identify_knowledge(selector: Selector, knowledge: Knowledge, rule: Rule, method: M.Method, stats_cache: StatsCache,
                       ctx: RuleContext, selection: Selection | None = None) -> Identification:
    """Select samples of ``knowledge`` (unless ``selection`` is given) and identify neurons on each. A sample that
    cannot be used (``SampleSkipped``: no target token in its caption, statistics that are not finite, an unreadable
    image, no layer left) is skipped with its reason; any other error, a setting that cannot work among them, stops the
    job."""
    selection = selection or selector(knowledge)
    results, skipped = [], []
    for cand in selection.accepted:
        try:
            res = identify_sample(selector, cand, knowledge, stats_cache, rule, method, ctx)
        except SampleSkipped as exc:
            skipped.append({"image_id": cand.image_id, "annotation_id": cand.annotation_id, "reason": str(exc)})
            log.warning("skipping image %d annotation %d: %s", cand.image_id, cand.annotation_id, exc)
            continue
        results.append(res)
        note = f" ({res.neurons.note})" if res.neurons.note else ""
        log.info("image %d: %s found %d neurons%s", cand.image_id, method.name, len(res.neurons), note)
    return Identification(knowledge.name, method, selection, results, skipped, ctx)
