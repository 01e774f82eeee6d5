"""Object-mention scores of captions against the objects really in the image.

For scenes ``i`` with true object sets ``G_i`` and named sets ``N_i`` (catalog word match):
recall = sum |G_i & N_i| / sum |G_i|, precision = sum |G_i & N_i| / sum |N_i| (micro averages),
exact-set rate = mean [G_i == N_i], and per object k: recall_k over the scenes that contain k.
"""

from __future__ import annotations

from collections import Counter


def mention_scores(truth: list[set[str]], named: list[set[str]]) -> dict:
    if len(truth) != len(named):
        raise ValueError(f"{len(truth)} truth sets but {len(named)} caption sets")
    tp = sum(len(g & n) for g, n in zip(truth, named, strict=True))
    n_true, n_named = sum(map(len, truth)), sum(map(len, named))
    present, hit = Counter(), Counter()
    for g, n in zip(truth, named, strict=True):
        present.update(g)
        hit.update(g & n)
    per_object = {k: {"scenes": present[k], "recall": hit[k] / present[k]} for k in sorted(present)}
    return {
        "scenes": len(truth),
        "recall": tp / n_true if n_true else float("nan"),
        "precision": tp / n_named if n_named else float("nan"),
        "exact_set": sum(g == n for g, n in zip(truth, named, strict=True)) / len(truth) if truth else float("nan"),
        "min_object_recall": min((v["recall"] for v in per_object.values()), default=float("nan")),
        "per_object": per_object,
    }


def removal_scores(removed: list[str], others: list[set[str]], named: list[set[str]]) -> dict:
    """After inpainting object ``removed[i]`` away from scene ``i`` whose other objects are ``others[i]``:

    removed_gone = mean [removed_i not in N_i]; others_named = sum |others_i & N_i| / sum |others_i|;
    phantom = mean [N_i - others_i - {removed_i} non-empty] (an object named that was never there).
    """
    n = len(removed)
    if not (n == len(others) == len(named)):
        raise ValueError("removed, others and named must have one entry per scene")
    kept = sum(len(o & s) for o, s in zip(others, named, strict=True))
    total_others = sum(map(len, others))
    return {
        "scenes": n,
        "removed_gone": sum(r not in s for r, s in zip(removed, named, strict=True)) / n if n else float("nan"),
        "others_named": kept / total_others if total_others else float("nan"),
        "phantom": sum(bool(s - o - {r}) for r, o, s in zip(removed, others, named, strict=True)) / n if n
        else float("nan"),
    }
