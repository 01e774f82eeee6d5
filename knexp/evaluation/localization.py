"""Does a map over the image tokens point at the object? Three measures and their chance levels (docs/method.md,
"Localization measures").

A *map* is one score per image token of the finest view, ``scores`` [P] (a neuron's activation, signed as the
heatmap draws it); the *object's tokens* are ``inside`` bool [P] (``PatchGeometry.object_tokens``: the tokens whose box
centre lies in the instance mask, the same tokens the edits take their keys at). With n = |inside| object tokens out of
P, and ties always broken at random (each measure is its expectation over the tie-breaking, so a constant map scores
exactly chance):

  pointing      the map's maximum falls on an object token: |argmax ∩ inside| / |argmax|; chance n / P;
  area IoU      the map's top n tokens against the object's n tokens, IoU = x / (2n - x) with x their overlap (the
                tokens tied at the cut drawn at random: x is hypergeometric there); chance: the same expectation for a
                uniformly random n-subset (about a / (2 - a) for a share a = n / P);
  AUC           ROC AUC of the map as a detector of the object's tokens: the probability that a random object token
                scores above a random other token, ties counting half (Mann-Whitney, from average ranks); chance 0.5.

Each is None where the object covers no token or every token.
"""

from __future__ import annotations

from math import comb

import numpy as np
import pandas as pd

MEASURES = ("pointing", "area_iou", "auc")


def _defined(scores: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    scores, inside = np.asarray(scores, np.float64).ravel(), np.asarray(inside, bool).ravel()
    if scores.shape != inside.shape:
        raise ValueError(f"a map of {scores.size} tokens against a mask of {inside.size}")
    return (scores, inside) if 0 < inside.sum() < inside.size else None


def pointing(scores: np.ndarray, inside: np.ndarray) -> float | None:
    """The chance that the map's maximum, ties broken at random, is an object token."""
    if (pair := _defined(scores, inside)) is None:
        return None
    scores, inside = pair
    top = scores == scores.max()
    return float(inside[top].sum() / top.sum())


def _expected_iou(sure: int, drawn: int, tied: int, tied_inside: int, n: int) -> float:
    """E[x / (2n - x)], x = ``sure`` + the object tokens among ``drawn`` tokens drawn without replacement from
    ``tied`` tokens of which ``tied_inside`` are object tokens."""
    total = comb(tied, drawn)
    low, high = max(0, drawn - (tied - tied_inside)), min(drawn, tied_inside)
    return sum(comb(tied_inside, j) * comb(tied - tied_inside, drawn - j) / total * (sure + j) / (2 * n - sure - j)
               for j in range(low, high + 1))


def area_iou(scores: np.ndarray, inside: np.ndarray) -> float | None:
    """The expected IoU of the map's top n tokens (n = the object's token count) with the object's tokens."""
    if (pair := _defined(scores, inside)) is None:
        return None
    scores, inside = pair
    n = int(inside.sum())
    cut = np.sort(scores)[::-1][n - 1]  # the n-th largest score
    above, at = scores > cut, scores == cut
    return _expected_iou(int(inside[above].sum()), n - int(above.sum()), int(at.sum()), int(inside[at].sum()), n)


def auc(scores: np.ndarray, inside: np.ndarray) -> float | None:
    """ROC AUC of the map as a detector of the object's tokens (ties half), from the average ranks."""
    if (pair := _defined(scores, inside)) is None:
        return None
    scores, inside = pair
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    n_in, n_out = int(inside.sum()), int((~inside).sum())
    return float((ranks[inside].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out))


def localization(scores: np.ndarray, inside: np.ndarray) -> dict[str, float | None]:
    """The three measures of one map."""
    return {"pointing": pointing(scores, inside), "area_iou": area_iou(scores, inside), "auc": auc(scores, inside)}


def chance(inside: np.ndarray) -> dict[str, float | None]:
    """What a map that knows nothing scores: the measures of a constant map."""
    return localization(np.zeros(np.asarray(inside).size), inside)


def zscored(values: np.ndarray) -> np.ndarray:
    """float [P]: (v - mean_p v) / std_p v over one image's tokens; zeros for a map that is constant there."""
    values = np.asarray(values, np.float64)
    spread = values.std()
    return (values - values.mean()) / spread if spread > 0 else np.zeros_like(values)


def set_map(maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float [P]: sum_u w_u z(maps[u]) for ``maps`` float [n, P] (one signed neuron map per row, each ``zscored`` so
    that no neuron weighs by its scale) and ``weights`` float [n] (summing to 1)."""
    return np.asarray(weights, np.float64) @ np.stack([zscored(m) for m in maps])
