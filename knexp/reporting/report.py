"""Collect evaluation jobs into the paper's tables and figure (``python run.py task=report sweep_dir=...``).

Every ``metrics.json`` under the sweep folder that holds a Table II result is one row, keyed by (model,
knowledge, method, variant, thresholds, noise level); a result found twice (a rerun after an interruption) counts once,
the newest file winning. Method labels carry their variant ("pan:authors").
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from knexp.reporting.analysis import layer_histogram_png

# METHOD.md: the paper's averages on MiniGPT-4 (Tables II and III), for the report's comparison column.
PAPER = {
    "table2": {"schwettmann": {"S_se": 0.7459, "S_re": 0.3742, "S_mean": 0.5600},
               "pan": {"S_se": 0.3723, "S_re": 0.7350, "S_mean": 0.5537},
               "ours": {"S_se": 0.7714, "S_re": 0.6957, "S_mean": 0.7335}},
    "table3": {"schwettmann": {"bleu": 0.3024, "rouge1": 0.3910, "rougeL": 0.3529, "bertscore_f1": 0.8727},
               "pan": {"bleu": 0.4615, "rouge1": 0.5034, "rougeL": 0.4392, "bertscore_f1": 0.8971},
               "ours": {"bleu": 0.4607, "rouge1": 0.5032, "rougeL": 0.4374, "bertscore_f1": 0.8971}},
}
KEY = ["model", "knowledge", "method", "thresholds", "noise_level"]


def collect(sweep_dir: str | Path) -> list[dict]:
    """All evaluation results under ``sweep_dir``, one per key (newest file wins)."""
    found: dict[tuple, tuple[float, dict]] = {}
    for path in Path(sweep_dir).rglob("metrics.json"):
        m = json.loads(path.read_text())
        if not m.get("table2"):
            continue
        m["method"] = f"{m['method']}:{m['variant']}" if m.get("variant") and m["variant"] != "paper" else m["method"]
        key = tuple(m.get(k) for k in KEY)
        mtime = path.stat().st_mtime
        if key not in found or mtime > found[key][0]:
            found[key] = (mtime, {**m, "job_dir": str(path.parent)})
    return [v for _, v in sorted(found.values(), key=lambda kv: kv[1]["job_dir"])]


def tables(results: list[dict]) -> dict[str, pd.DataFrame]:
    rows2, levels, rows3 = [], [], []
    for m in results:
        base = {k: m.get(k) for k in KEY}
        t2 = m["table2"]
        rows2.append({**base, **{s: t2[s] for s in ("S_se", "S_re", "S_mean")}})
        levels += [{**base, "level": float(lv), **{s: v[s] for s in ("S_se", "S_re", "S_mean")}} for lv, v in t2["per_level"].items()]
        if m.get("table3"):
            rows3.append({**base, **{s: m["table3"][s] for s in ("bleu", "rouge1", "rougeL", "bertscore_f1")}})
    per_knowledge = pd.DataFrame(rows2)
    out = {"table2_per_knowledge": per_knowledge, "table2_per_level": pd.DataFrame(levels)}
    # averages per method, and per setting where the sweep varied one (never averaged across models or thresholds)
    by = [c for c in KEY if c not in ("knowledge", "method") and rows2 and per_knowledge[c].nunique() > 1] + ["method"]
    # dropna=False: a job from before a key existed (None) is its own group, never silently left out
    out["table2"] = per_knowledge.groupby(by, dropna=False)[["S_se", "S_re", "S_mean"]].mean() if rows2 else pd.DataFrame()
    out["table3"] = (pd.DataFrame(rows3).groupby(by, dropna=False)[["bleu", "rouge1", "rougeL", "bertscore_f1"]].mean()
                     if rows3 else pd.DataFrame())
    return out


def write_report(sweep_dir: str | Path, out_dir: str | Path) -> Path:
    """Tables as CSV, Fig. 2 as PNG and ``report.md``; returns the markdown's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = collect(sweep_dir)
    if not results:
        raise FileNotFoundError(f"no evaluation results (metrics.json with table2) under {sweep_dir}; set sweep_dir to a "
                                "multirun folder of task=evaluate jobs")
    t = tables(results)
    for name, df in t.items():
        df.to_csv(out_dir / f"{name}.csv", index=name in ("table2", "table3"))
    per_method: dict[str, list[int]] = {}
    for m in results:
        counts = per_method.setdefault(m["method"], [0] * len(m["per_layer"]))
        per_method[m["method"]] = [a + b for a, b in zip(counts, m["per_layer"], strict=True)]
    layer_histogram_png(per_method, out_dir / "fig2_layers.png", "identified neurons per layer")
    def listed(key: str) -> str:
        return ", ".join(sorted({str(m[key]) for m in results}))

    lines = [f"# knexp report: {Path(sweep_dir)}", "",
             f"{len(results)} evaluation jobs; knowledge: {listed('knowledge')}; models: {listed('model')}; "
             f"thresholds: {listed('thresholds')}.",
             "", "## Table II (averaged over knowledge; the paper's MiniGPT-4 averages beside)", "",
             _beside(t["table2"], PAPER["table2"]), "", "## Table III (perturbed vs masked captions)", "",
             _beside(t["table3"], PAPER["table3"]) if len(t["table3"]) else "no Table III rows", "",
             "## Table II per knowledge", "", t["table2_per_knowledge"].to_markdown(index=False, floatfmt=".4f"), "",
             "## Fig. 2: identified neurons per layer", "", "![layers](fig2_layers.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _beside(ours: pd.DataFrame, paper: dict) -> str:
    df = ours.copy()
    for col in list(df.columns):
        methods = df.index.get_level_values("method")
        df[f"{col} (paper)"] = [paper.get(m, {}).get(col, float("nan")) for m in methods]
    return df.to_markdown(floatfmt=".4f")
