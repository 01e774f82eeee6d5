"""Identification methods as rankings of one sample's statistics (``SampleStats``, all [L, d_f]).

ours          N_k = {(l, u) : max_p V > threshold_a and max_p g > threshold_g}, V = O'_o - O'_i,
              g = O'_o * dy_c/dO'_o (METHOD.md, Stages 1-2); C^k, the stage-1 set, is kept alongside.
stage1_only   top-|N_k| by max_p V.                 stage2_only  top-|N_k| by max_p g.
schwettmann   paper: top-|N_k| by mean_p g.         authors: (unit, patch) pairs ranked by g; the first
              |N_k| distinct neurons in that order are exactly the top-|N_k| by max_p g, and each keeps
              its best patch.
pan           paper: top-|N_k| by mean_p O'_o * (W_out[:, u] . W_U[c]).
              authors: top-|N_k| by act_fn(gate(x))[t*] * (W_out[:, u] . W_U[c]) at the predicting position.
random        layer-matched control: in each layer, as many random units as the reference set has there.
Baselines take |N_k| from ``ours`` on the same sample; |N_k| = 0 gives an empty set that says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from knexp.identification.passes import SampleStats


@dataclass
class NeuronSet:
    method: str
    variant: str
    layers: np.ndarray  # int [n]
    units: np.ndarray  # int [n]
    scores: np.ndarray  # float [n], the ranking score (descending)
    patches: np.ndarray | None = None  # int [n], image token of each neuron's best pair (schwettmann authors)
    spread: np.ndarray | None = None  # float [n], each neuron's std_p O' on its sample (unit of relative noise)
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

    def to_dict(self) -> dict:
        rows = zip(self.layers, self.units, self.scores, strict=True)
        d = {"method": self.method, "variant": self.variant, "size": len(self), "note": self.note, "info": self.info,
             "neurons": [{"layer": int(layer), "unit": int(u), "score": float(s)} for layer, u, s in rows]}
        if self.patches is not None:
            for n, p in zip(d["neurons"], self.patches, strict=True):
                n["patch"] = int(p)
        return d


def _from_flat(method: str, variant: str, flat_idx: torch.Tensor, scores: torch.Tensor, d_ff: int, note: str = "", **kw) -> NeuronSet:
    idx = flat_idx.cpu().numpy().astype(np.int64)
    return NeuronSet(method, variant, idx // d_ff, idx % d_ff, scores.cpu().numpy().astype(np.float64), note=note, **kw)


def top_n(score: torch.Tensor, n: int, method: str, variant: str = "", **kw) -> NeuronSet:
    """The n highest entries of ``score`` [L, d_f] (ties broken by index, so the result is deterministic)."""
    d_ff = score.shape[1]
    if n <= 0:
        return _from_flat(method, variant, torch.empty(0, dtype=torch.long), torch.empty(0), d_ff,
                          note="empty: |N_k| = 0 on this sample, so the baseline picks no neuron")
    flat = score.flatten().double()
    order = torch.argsort(-flat, stable=True)[:n]
    return _from_flat(method, variant, order, flat[order], d_ff, **kw)


def ours(stats: SampleStats, threshold_a: float, threshold_g: float) -> NeuronSet:
    """Two-stage filtering; ``info`` records |C^k| and the thresholds used."""
    candidates = stats.diff_max > threshold_a  # C^k
    keep = candidates & (stats.gradcam_max > threshold_g)  # N_k
    flat = keep.flatten().nonzero().flatten()
    scores = stats.gradcam_max.flatten()[flat]
    order = torch.argsort(-scores.double(), stable=True)
    info = {"threshold_a": float(threshold_a), "threshold_g": float(threshold_g), "stage1_size": int(candidates.sum())}
    note = ""
    if not candidates.any():
        note = f"empty: no neuron has max_p V > threshold_a = {threshold_a:g}"
    elif not keep.any():
        note = f"empty: none of the {int(candidates.sum())} stage-1 neurons has max_p g > threshold_g = {threshold_g:g}"
    return _from_flat("ours", "", flat[order], scores[order], stats.shape[1], note=note, info=info)


def stage1_only(stats: SampleStats, n: int) -> NeuronSet:
    return top_n(stats.diff_max, n, "stage1_only")


def stage2_only(stats: SampleStats, n: int) -> NeuronSet:
    return top_n(stats.gradcam_max, n, "stage2_only")


def schwettmann(stats: SampleStats, n: int, variant: str = "paper") -> NeuronSet:
    if variant == "paper":
        return top_n(stats.gradcam_mean, n, "schwettmann", "paper")
    if variant == "authors":
        s = top_n(stats.gradcam_max, n, "schwettmann", "authors")
        s.patches = stats.gradcam_argmax[s.layers, s.units].numpy() if len(s) else np.empty(0, np.int64)
        return s
    raise ValueError(f"unknown schwettmann variant {variant!r}; use 'paper' or 'authors'")


def pan(stats: SampleStats, n: int, variant: str = "paper") -> NeuronSet:
    if variant == "paper":
        return top_n(stats.act_mean * stats.wout_dot_wu, n, "pan", "paper")
    if variant == "authors":
        return top_n(stats.actfn_last * stats.wout_dot_wu, n, "pan", "authors")
    raise ValueError(f"unknown pan variant {variant!r}; use 'paper' or 'authors'")


def random_matched(reference: NeuronSet, d_ff: int, seed: int) -> NeuronSet:
    """In every layer, as many distinct random units as ``reference`` holds there (seeded)."""
    rng = np.random.default_rng(seed)
    layers, units = [], []
    for layer, count in enumerate(np.bincount(reference.layers) if len(reference) else []):
        if count:
            layers += [layer] * int(count)
            units += rng.choice(d_ff, int(count), replace=False).tolist()
    note = "" if layers else "empty: the reference set is empty"
    return NeuronSet("random", f"matched:{reference.method}", np.array(layers, np.int64), np.array(units, np.int64),
                     np.zeros(len(units)), note=note, info={"seed": seed})
