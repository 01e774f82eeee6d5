"""The editing tables of a sweep of ``task=edit`` jobs: one row per (object, set source, rule, op, variant), and their
means over objects with bootstrap intervals.

A job's ``metrics.json`` holds every variant it scored (the edit, its baselines, the unedited model); each becomes a
row of the measures in ``MEASURES`` (``knexp.evaluation.edit_measures``), flattened, its rule named with its settings
(``EditRule.label``); a fitted edit's ``one_step`` is 1 where its fit stopped after its first step (the mean: the share
of such fits). ``summary`` averages them over objects per split, set source, rule, op and variant, with a 95%
interval from ``draws`` bootstrap resamples of the objects (seeded), so an interval says how much the mean rests on
which objects were drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from knexp.reporting.tables import means, shown

MEASURES = {
    "reliability": ("reliability",), "m_generality": ("m_generality",), "t_gen_what": ("t_generality", "what"),
    "t_gen_rephrased": ("t_generality", "rephrased"), "t_gen_yes_no": ("t_generality", "yes_no"),
    "t_gen_mean": ("t_generality", "mean"),
    "m_loc_S_re": ("m_locality", "S_re"), "m_loc_bleu": ("m_locality", "bleu"),
    "m_loc_bertscore": ("m_locality", "bertscore_f1"),
    "m_loc_top1": ("m_locality", "top1"), "t_loc_top1": ("t_locality", "other", "top1"),
    "t_loc_kl": ("t_locality", "other", "kl"),
    "t_loc_about_k_top1": ("t_locality", "about_k", "top1"), "entropy": ("fluency", "ngram_entropy"),
    "repetition": ("fluency", "repetition"),
    "general_bleu": ("general", "bleu"), "general_bertscore": ("general", "bertscore_f1"),
    "general_mentions": ("general", "mentions_kept"), "general_leak": ("general", "leak"),
    "general_top1": ("general", "texts", "top1"),
    "general_kl": ("general", "texts", "kl"),
    "relative_norm": ("cost", "relative_norm"), "seconds": ("cost", "seconds"), "steps_run": ("cost", "steps_run"),
    "one_step": ("cost", "one_step"),
}
KEYS = ["split", "op", "method", "rule", "size", "variant"]
# the rates whose inputs are counted (``*_n``): pooled over objects, their binomial 95% half-width
POOLED = {"reliability": ("reliability_n",), "m_generality": ("m_generality_n",), "m_loc_S_re": ("m_locality", "n")}


def _get(d: dict, path: tuple):
    for part in path:
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def edit_rows(sweep_dir: str | Path, split_of) -> pd.DataFrame:
    """Every variant of every ``task=edit`` job under ``sweep_dir`` (newest file per job key), flattened; ``split_of``
    names an object's split."""
    newest: dict[tuple, tuple[float, dict]] = {}
    for path in Path(sweep_dir).rglob("metrics.json"):
        m = json.loads(path.read_text())
        if m.get("task") != "edit" or not m.get("variants"):
            continue
        key = (m.get("model"), m["knowledge"], m["method"], m.get("rule_label", m["rule"]), m["op"], m.get("size"),
               m.get("replacement"))
        if key not in newest or path.stat().st_mtime > newest[key][0]:
            newest[key] = (path.stat().st_mtime, m)
    rows = []
    for _, m in sorted(newest.values(), key=lambda v: str(v[1].get("knowledge"))):
        for variant, scores in m["variants"].items():
            if "steps_run" in scores.get("cost", {}):  # a fit: whether it stopped after its first step
                scores["cost"]["one_step"] = float(scores["cost"]["steps_run"] <= 1)
            rows.append({"split": split_of(m["knowledge"]), "knowledge": m["knowledge"], "op": m["op"],
                         "method": m["method"],
                         "rule": m.get("rule_label", m["rule"]), "size": m.get("size"), "variant": variant,
                         **{name: _get(scores, path) for name, path in MEASURES.items()},
                         **{f"{name}_n": _get(scores, path) for name, path in POOLED.items()}})
    return pd.DataFrame(rows)


def summary(rows: pd.DataFrame, draws: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (split, op, method, rule, size, variant), in the report's order: the mean of each measure over objects,
    ``<measure>_lo`` and ``<measure>_hi`` its 95% bootstrap interval over objects, and ``objects``
    (``knexp.reporting.tables.means``); for the counted rates of ``POOLED``, ``<rate>_n`` the inputs pooled over
    objects and ``<rate>_hw`` the binomial 95% half-width of the pooled rate, 1.96 sqrt(p (1 - p) / n): how finely
    that many inputs can tell two rates apart."""
    if rows.empty:
        return pd.DataFrame()
    table = means(rows, KEYS, list(MEASURES), seed, draws)
    for name in POOLED:
        count = rows[f"{name}_n"].astype(float).fillna(0) if f"{name}_n" in rows else pd.Series(0.0, index=rows.index)
        hits = (rows[name].astype(float).fillna(0) * count).groupby([rows[k] for k in KEYS], dropna=False).sum()
        total = count.groupby([rows[k] for k in KEYS], dropna=False).sum()
        pooled = hits / total.where(total > 0)
        table[f"{name}_n"] = total.reindex(table.index).to_numpy()
        table[f"{name}_hw"] = (1.96 * np.sqrt(pooled * (1 - pooled) / total.where(total > 0))).reindex(
            table.index).to_numpy()
    return table


HEADLINE = ("reliability", "reliability_hw", "m_generality", "m_generality_hw", "t_gen_mean", "t_gen_yes_no",
            "m_loc_S_re", "m_loc_S_re_hw", "m_loc_top1", "t_loc_top1", "general_bertscore", "general_mentions",
            "general_top1", "relative_norm")


def headline(table: pd.DataFrame, measures: tuple[str, ...] = HEADLINE) -> pd.DataFrame:
    """The summary's main measures as the page prints them: labels as columns, "mean [lo, hi]" cells."""
    cols = [c for name in measures if name in table for c in (name, f"{name}_lo", f"{name}_hi") if c in table]
    return shown(table[cols + ["objects"]], digits=3)
