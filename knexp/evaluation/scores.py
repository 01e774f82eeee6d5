"""Suppression and retention scores (docs/method.md, "Evaluation: captions under noise").

Input: one row per perturbed caption with columns ``set_id`` (which neuron set of k), ``level``, ``group``
("k": an image containing k; "other": an image of other knowledge), and ``hit`` (1 if the caption names the
image's own object: k for group "k", that image's object for "other").
S_k = mean hit over group-k rows, S_kbar = mean hit over other rows, per (set, level); averaged over the sets
of k, then over levels. S_se = 1 - S_k, S_re = S_kbar, S_mean = (S_se + S_re) / 2.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def suppression_scores(rows: pd.DataFrame) -> dict:
    missing = {"set_id", "level", "group", "hit"} - set(rows.columns)
    if missing:
        raise ValueError(f"score rows lack columns {sorted(missing)}")
    per = rows.groupby(["set_id", "level", "group"])["hit"].mean().unstack("group")  # [(set, level), group]
    for g in ("k", "other"):
        if g not in per:
            per[g] = float("nan")
    by_level = per.groupby(level="level").mean()  # average over the sets of k
    table = pd.DataFrame({"S_k": by_level["k"], "S_kbar": by_level["other"]})
    table["S_se"] = 1 - table["S_k"]
    table["S_re"] = table["S_kbar"]
    table["S_mean"] = (table["S_se"] + table["S_re"]) / 2
    avg = table.mean()
    return {"per_level": {float(lv): {c: float(v) for c, v in r.items()} for lv, r in table.iterrows()},
            **{c: float(avg[c]) for c in ("S_k", "S_kbar", "S_se", "S_re", "S_mean")}}


def curve_scores(rows: pd.DataFrame, sizes: list[int]) -> list[dict]:
    """Table II at each rung of a size ladder: ``rows`` as for ``suppression_scores`` plus ``rung`` (the ladder's n)
    and ``size`` (the set's actual size); one dict per n with S_k ... S_mean and the mean actual size."""
    curve = []
    for n in sizes:
        at = rows[rows["rung"] == n]
        scores = {k: v for k, v in suppression_scores(at).items() if k != "per_level"}
        curve.append({"size": n, "mean_set_size": float(at.drop_duplicates("set_id")["size"].mean()), **scores})
    return curve


def curve_area(curve: list[dict], key: str = "S_mean") -> float | None:
    """Area under ``key`` over log n, divided by the log range: the curve's mean height (docs/method.md, "Size
    curves")."""
    pts = sorted((c["size"], c[key]) for c in curve if c.get(key) is not None)
    if len(pts) < 2:
        return pts[0][1] if pts else None
    x, y = np.log([p[0] for p in pts]), np.array([p[1] for p in pts])
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))
