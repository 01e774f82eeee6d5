"""Identification of one sample: target token -> cached statistics -> thresholds -> the method's neuron set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.data.catalog import Knowledge
from knexp.data.coco import CocoScenes
from knexp.identification import methods as M
from knexp.identification.cache import StatsCache
from knexp.identification.passes import SampleStats, compute_stats, locate_target
from knexp.identification.selection import Candidate
from knexp.identification.thresholds import thresholds_for
from knexp.models.adapters.base import Adapter
from knexp.store import stable_key

METHODS = ("ours", "stage1_only", "stage2_only", "schwettmann", "pan", "random")


def method_set(method: DictConfig, stats: SampleStats, reference: M.NeuronSet, d_ff: int) -> M.NeuronSet:
    """The neuron set ``method`` picks on a sample whose two-stage set is ``reference`` (|N_k| = its size)."""
    name, n = method.name, len(reference)
    if name == "ours":
        return reference
    if name in ("stage1_only", "stage2_only"):
        return getattr(M, name)(stats, n)
    if name in ("schwettmann", "pan"):
        return getattr(M, name)(stats, n, method.get("variant", "paper"))
    if name == "random":
        return M.random_matched(reference, d_ff, seed=int(method.get("seed", 0)))
    raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")


@dataclass
class SampleResult:
    candidate: Candidate
    target_word: str
    target_id: int
    thresholds: tuple[float, float]
    reference: M.NeuronSet  # ours on this sample
    neurons: M.NeuronSet  # the configured method's set

    def to_dict(self, num_layers: int) -> dict:
        return {
            "knowledge": self.candidate.knowledge, "image_id": self.candidate.image_id, "annotation_id": self.candidate.annotation_id,
            "captions": {"original": self.candidate.original_caption, "inpainted": self.candidate.inpainted_caption},
            "target": {"word": self.target_word, "token_id": self.target_id},
            "thresholds": {"a": self.thresholds[0], "g": self.thresholds[1]},
            "reference_size": len(self.reference), "stage1_size": self.reference.info.get("stage1_size"),
            "per_layer": self.neurons.per_layer(num_layers), "neuron_set": self.neurons.to_dict(),
        }


def identify_sample(adapter: Adapter, model_key: str, data: CocoScenes, dataset_id: str, candidate: Candidate, knowledge: Knowledge,
                    opts: InpaintOptions, inpaint_cache: InpaintCache, stats_cache: StatsCache, thresholds_cfg: DictConfig,
                    method: DictConfig) -> SampleResult:
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
    a, g = thresholds_for(thresholds_cfg, knowledge.name, stats)
    reference = M.ours(stats, a, g)
    chosen = method_set(method, stats, reference, adapter.d_ff)
    chosen.spread = stats.act_std[chosen.layers, chosen.units].numpy() if len(chosen) else np.empty(0)
    return SampleResult(candidate, target.word, target.token_id, (a, g), reference, chosen)
