"""Collect evaluation jobs into the paper's tables and figures (``python run.py task=report sweep_dir=...``).

Every ``metrics.json`` under the sweep folder that holds a Table II result or a size curve is one row, keyed by
(model, knowledge, method, variant, thresholds, intervention, noise level); a result found twice (a rerun after an
interruption) counts once, the newest file winning. Method labels carry their variant ("pan:authors"). With the
object ``splits`` (conf/splits), every table is given per split, so tuning objects never mix with held-out ones.
The report holds: Table II averaged and per knowledge, Table III, the size curves (S_se, S_re, S_mean against the
set size, and each method's area under S_mean over log n), Fig. 3 measured (``knexp.reporting.fig3_tables``: how
each method's maps point at the object, beside layer-matched random neurons and chance) and its gallery, the causal
trace (``trace.json`` of any job) and Fig. 2 (every method's neurons per layer, side by side). A job that ran but
had no usable sample (``status`` "no_samples" in its metrics.json) has no scores: the report lists it apart, with its
first reasons, and counts it in its summary. It is written as ``report.md`` and as one self-contained
``report.html``.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from knexp.evaluation.localization import MEASURES
from knexp.evaluation.scores import curve_area
from knexp.identification.causal_trace import SampleTrace, span
from knexp.reporting.analysis import curves_png, layer_histogram_png, trace_png
from knexp.reporting.edit_tables import edit_rows, headline, summary
from knexp.reporting.fig3_tables import by_measure, localization_rows, verdicts
from knexp.reporting.fig3_tables import table as fig3_table
from knexp.reporting.tables import METHOD_ORDER, means, ordered, rank_of, shown

# docs/method.md, "Evaluation": the paper's averages on MiniGPT-4 (Tables II and III), for the report's comparison
# column.
PAPER = {
    "table2": {"schwettmann": {"S_se": 0.7459, "S_re": 0.3742, "S_mean": 0.5600},
               "pan": {"S_se": 0.3723, "S_re": 0.7350, "S_mean": 0.5537},
               "ours": {"S_se": 0.7714, "S_re": 0.6957, "S_mean": 0.7335}},
    "table3": {"schwettmann": {"bleu": 0.3024, "rouge1": 0.3910, "rougeL": 0.3529, "bertscore_f1": 0.8727},
               "pan": {"bleu": 0.4615, "rouge1": 0.5034, "rougeL": 0.4392, "bertscore_f1": 0.8971},
               "ours": {"bleu": 0.4607, "rouge1": 0.5032, "rougeL": 0.4374, "bertscore_f1": 0.8971}},
}
KEY = ["model", "knowledge", "method", "thresholds", "intervention", "noise_level"]
SCORES = ["S_se", "S_re", "S_mean"]


def _newest(sweep_dir: str | Path, keep) -> list[dict]:
    """The evaluation jobs under ``sweep_dir`` whose metrics ``keep`` accepts, one per key (newest file wins), in folder
    order; methods labelled with their variant."""
    found: dict[tuple, tuple[float, dict]] = {}
    for path in Path(sweep_dir).rglob("metrics.json"):
        m = json.loads(path.read_text())
        if not keep(m):
            continue
        m["method"] = f"{m['method']}:{m['variant']}" if m.get("variant") and m["variant"] != "paper" else m["method"]
        m.setdefault("intervention", "noise")  # jobs from before interventions existed
        key = tuple(m.get(k) for k in KEY) + ("curve" if m.get("curve") else "table2",)
        mtime = path.stat().st_mtime
        if key not in found or mtime > found[key][0]:
            found[key] = (mtime, {**m, "job_dir": str(path.parent)})
    return [v for _, v in sorted(found.values(), key=lambda kv: kv[1]["job_dir"])]


def collect(sweep_dir: str | Path) -> list[dict]:
    """All evaluation results under ``sweep_dir``, one per key (newest file wins)."""
    return _newest(sweep_dir, lambda m: m.get("table2") or m.get("curve"))


def unusable(sweep_dir: str | Path, results: list[dict]) -> list[dict]:
    """The jobs under ``sweep_dir`` that had no usable sample (``status`` "no_samples"), less those whose key a result
    of ``results`` has (a rerun that found samples)."""
    scored = {tuple(m.get(k) for k in KEY) for m in results}
    empty = _newest(sweep_dir, lambda m: (m.get("status") or {}).get("state") == "no_samples" and "knowledge" in m)
    return [m for m in empty if tuple(m.get(k) for k in KEY) not in scored]


def split_of(knowledge: str, splits: dict | None) -> str:
    for name, objects in (splits or {}).items():
        if knowledge in objects:
            return name
    return "all" if not splits else "other"


def _grouped(df: pd.DataFrame, cols: list[str], extra: list[str] | None = None, intervals: bool = True) -> pd.DataFrame:
    """Means of ``cols`` over objects per method and per every key that varies in ``df`` (never averaged across models,
    rules or interventions), with 95% bootstrap intervals over the objects (``knexp.reporting.tables.means``), in the
    report's order; a job from before a key existed is a group of its own."""
    varied = [c for c in ["split"] + KEY if c not in ("knowledge",
                                                      "method") and c in df and df[c].nunique(dropna=False) > 1]
    by = varied + (extra or []) + ["method"]
    if intervals:
        return means(df, by, cols)
    return ordered(df).groupby(by, dropna=False, sort=False)[cols].mean()


def tables(results: list[dict], splits: dict | None = None) -> dict[str, pd.DataFrame]:
    rows2, levels, rows3, curve_rows = [], [], [], []
    for m in results:
        base = {**{k: m.get(k) for k in KEY}, "split": split_of(m["knowledge"], splits)}
        if m.get("curve"):
            curve_rows += [{**base, "size": c["size"], **{s: c[s] for s in SCORES}} for c in m["curve"]]
            continue
        t2 = m["table2"]
        rows2.append({**base, **{s: t2[s] for s in SCORES}})
        levels += [{**base, "level": float(lv), **{s: v[s] for s in SCORES}} for lv, v in t2["per_level"].items()]
        if m.get("table3"):
            rows3.append({**base, **{s: m["table3"][s] for s in ("bleu", "rouge1", "rougeL", "bertscore_f1")}})
    per_knowledge = ordered(pd.DataFrame(rows2))
    out = {"table2_per_knowledge": per_knowledge, "table2_per_level": pd.DataFrame(levels)}
    out["table2"] = _grouped(per_knowledge, SCORES) if rows2 else pd.DataFrame()
    out["table3"] = _grouped(pd.DataFrame(rows3),
                             ["bleu", "rouge1", "rougeL", "bertscore_f1"]) if rows3 else pd.DataFrame()
    curves = pd.DataFrame(curve_rows)
    out["curves"] = _grouped(curves, SCORES, ["size"], intervals=False) if curve_rows else pd.DataFrame()
    out["curve_areas"] = _areas(out["curves"]) if curve_rows else pd.DataFrame()
    return out


def _areas(averaged: pd.DataFrame) -> pd.DataFrame:
    """Each method's area under its averaged S_mean curve (``averaged``: the ``curves`` table) over log n, divided by
    the log range (its mean height)."""
    mean = averaged.reset_index()
    keys = [c for c in mean.columns if c not in SCORES + ["size"]]
    rows = []
    for labels, g in mean.groupby(keys, dropna=False):
        pts = [{"size": int(r["size"]), "S_mean": r["S_mean"]} for _, r in g.iterrows()]
        rows.append({**dict(zip(keys, labels if isinstance(labels, tuple) else (labels,), strict=True)),
                     "sizes": ",".join(str(p["size"]) for p in sorted(pts, key=lambda p: p["size"])),
                     "area_S_mean": curve_area(pts)})
    return ordered(pd.DataFrame(rows)).set_index(keys)


@dataclass
class Report:
    """What ``write_report`` wrote: ``report.md``, the self-contained ``report.html``, the tables and the figures."""

    markdown: Path
    html: Path
    tables: dict[str, pd.DataFrame]
    figures: list[Path]


def write_report(sweep_dir: str | Path, out_dir: str | Path, splits: dict | None = None) -> Report:
    """Tables as CSV, figures as PNG, ``report.md`` and ``report.html`` (one page, figures inline) in ``out_dir``: the
    header, Tables II and III, Fig. 3's gallery, the size curves, the causal trace, Fig. 2, the edits, and the jobs with
    no usable sample, each section where the sweep has it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = collect(sweep_dir)
    empty = unusable(sweep_dir, results)
    edits = edit_rows(sweep_dir, lambda k: split_of(k, splits))
    located = localization_rows(sweep_dir, lambda k: split_of(k, splits))
    if not results and not empty and edits.empty and located.empty:
        raise FileNotFoundError("no evaluation results (metrics.json with table2, a size curve, task=edit's "
                                f"variants or task=localize's maps) under {sweep_dir}; set sweep_dir to a multirun "
                                "folder of task=evaluate, task=edit or task=localize jobs")
    t = tables(results, splits)
    if len(edits):
        t["edit_rows"], t["edit_summary"] = edits, summary(edits)
    if len(located):
        t["fig3_rows"], t["fig3"] = located, fig3_table(located)
        t.update({f"fig3_{k}": by_measure(t["fig3"], k) for k in MEASURES})
    for name, df in t.items():
        if len(df):
            df.to_csv(out_dir / f"{name}.csv", index=name in INDEXED)
    blocks = _header(sweep_dir, results, empty, edits, located, splits) + _paper_tables(t)
    blocks += _fig3_section(t) if len(located) else []
    gallery = _fig3_gallery(results, out_dir / "fig3")
    figures = [path for _, items in gallery for path, _ in items]
    blocks += _gallery_section(gallery)
    for section in (_curves_section, _trace_section, _layers_section):
        more, figure = section(sweep_dir, out_dir, results, t)
        blocks += more
        figures += [figure] if figure else []
    blocks += _edit_section(t) if len(edits) else []
    blocks += _unusable_section(sweep_dir, out_dir, empty, t) if empty else []
    markdown = out_dir / "report.md"
    markdown.write_text(_markdown(blocks, out_dir))
    html = out_dir / "report.html"
    html.write_text(_html(blocks, f"knexp report: {Path(sweep_dir).name}"))
    return Report(markdown, html, t, figures)


def _header(sweep_dir, results: list[dict], empty: list[dict], edits: pd.DataFrame, located: pd.DataFrame,
            splits: dict | None) -> list[tuple]:
    """The title, what the sweep holds, and its objects by split."""
    def listed(key: str) -> str:
        return ", ".join(sorted({str(m.get(key)) for m in results}))

    none = f" {len(empty)} more had no usable sample and no scores (listed at the end)." if empty else ""
    held = (f"; knowledge: {listed('knowledge')}; models: {listed('model')}; thresholds: {listed('thresholds')}; "
            f"interventions: {listed('intervention')}" if results else "")
    edited = edits["knowledge"].nunique() if len(edits) else 0
    localized = f", {located['knowledge'].nunique()} objects' maps measured" if len(located) else ""
    blocks: list[tuple] = [("h1", f"knexp report: {Path(sweep_dir)}"),
                           ("p", f"{len(results)} evaluation jobs, {edited} objects edited{localized}" + held
                            + f".{none}")]
    if splits:
        ours = ({str(m["knowledge"]) for m in results} | (set(edits["knowledge"]) if len(edits) else set())
                | (set(located["knowledge"]) if len(located) else set()))
        by_split = {name: sorted(ours & set(objs)) for name, objs in splits.items()}
        by_split["in no split"] = sorted(ours - {o for objs in splits.values() for o in objs})
        blocks.append(("p", "This sweep's objects by split (`splits`): "
                            + "; ".join(f"{name}: {', '.join(objs)}" for name, objs in by_split.items() if objs) + "."))
    return blocks


def _paper_tables(t: dict) -> list[tuple]:
    """Tables II and III beside the paper's averages, and Table II per object."""
    if not len(t["table2"]):
        return []
    return [("h2", "Table II (averaged over objects; the paper's MiniGPT-4 averages beside)"),
            ("p", "Each mean has its 95% bootstrap interval over the objects in brackets (none for one object). The "
                  "paper's columns were measured on MiniGPT-4 under its noise at 40/80/120, whatever the row's model "
                  "and intervention; they are empty for the methods the paper does not have."),
            ("table", _beside(t["table2"], PAPER["table2"]), "table2"),
            ("h2", "Table III (perturbed vs masked captions)"),
            ("table", _beside(t["table3"], PAPER["table3"]), "table3") if len(t["table3"])
            else ("p", "no Table III rows"),
            ("h2", "Table II per object"), ("table", t["table2_per_knowledge"], "table2_per_knowledge")]


def _fig3_section(t: dict) -> list[tuple]:
    """Fig. 3, measured: each method's maps against the object's tokens, beside random neurons and chance."""
    return [("h2", "Fig. 3, measured: do the maps point at the object?"),
            ("p", "Each method's map over the image tokens of the original image (top: its top neuron, signed by its "
                  "change; top10: its top 10 neurons measured apart and averaged; set: its neurons' z-scored signed "
                  "maps, weighted by their scores), scored against the object's tokens: the pointing game, the "
                  "area-matched IoU and the ROC AUC. random_*: the same maps of random neurons of the same layers; "
                  "diff_*: method - random per object (the paired interval: the method localizes where it excludes "
                  "0); chance_*: a constant map. On the identification images each sample's own set; on held-out "
                  "images of the object, the samples' consensus set. Means over objects, 95% bootstrap intervals "
                  "over objects."),
            *[("p", line + ".") for line in verdicts(t["fig3"])],
            *[block for k in ("auc", "pointing", "area_iou")
              for block in (("h3", MEASURE_NAMES[k]), ("table", t[f"fig3_{k}"], f"fig3_{k}"))]]


def _gallery_section(gallery: list) -> list[tuple]:
    """Fig. 3's panels, by method."""
    if not gallery:
        return []
    blocks = [("h2", "Fig. 3: each method's top neuron on each object"),
              ("p", "The top neuron of each job's first sample: the image, the image with the object inpainted away, "
                    "the neuron's activation over the image tokens in the direction of its change (signed: a neuron "
                    "that falls on the object is shown negated, and its title says so) with the object outlined, and "
                    "the tokens it writes in that direction. Under each panel: the pointing game (the map's maximum "
                    "on the object) and the area-matched IoU (its top tokens, as many as the object covers, against "
                    "the object's tokens), and the q95 IoU (the overlap of the map's top 5% with the object). Where "
                    "the set's map points at the object better than each of its top 10 neurons, its panel follows.")]
    for method, items in gallery:
        blocks += [("h3", method), ("gallery", items)]
    return blocks


def _curves_section(sweep_dir, out_dir: Path, results: list[dict], t: dict) -> tuple[list[tuple], Path | None]:
    """The size curves and their areas (blocks, figure)."""
    if not len(t["curves"]):
        return [], None
    figure = curves_png(t["curves"], out_dir / "size_curves.png", "scores against the set size (top-n of each ranking)")
    return [("h2", "Size curves (every ranking method at each set size n)"),
            ("p", "Area under S_mean over log n, divided by the log range (the curve's mean height):"),
            ("table", t["curve_areas"], "curve_areas"), ("table", t["curves"], "curves"),
            ("img", figure, "size curves")], figure


def _trace_section(sweep_dir, out_dir: Path, results: list[dict], t: dict) -> tuple[list[tuple], Path | None]:
    """The fullest causal trace among the sweep's jobs and its live window (blocks, figure)."""
    trace = _fullest_trace(sweep_dir)
    if trace is None:
        return [], None
    data = json.loads(trace.read_text())
    figure = trace_png([SampleTrace(**s) for s in data["samples"]], data["window"], out_dir / "trace.png",
                       f"causal trace: {data['model']}")
    w = data["window"]
    traced = sorted({s["knowledge"] for s in data["samples"]})
    return [("h2", "Causal trace of the image tokens"),
            ("p", f"Live window: neurons of layers {span(w['neuron_layers'])} of {len(w['resid_share'])} (residual "
                  f"patching there reaches {w['frac']:.0%} of the whole counterfactual), from {w['samples']} traced "
                  f"samples of {', '.join(traced)} (`{trace.relative_to(sweep_dir).as_posix()}`)."),
            ("img", figure, "trace")], figure


def _layers_section(sweep_dir, out_dir: Path, results: list[dict], t: dict) -> tuple[list[tuple], Path | None]:
    """Fig. 2: every method's neurons per layer, summed over its jobs (blocks, figure)."""
    per_method: dict[str, list[int]] = {}
    for m in results:
        if m.get("table2"):
            counts = per_method.setdefault(m["method"], [0] * len(m["per_layer"]))
            per_method[m["method"]] = [a + b for a, b in zip(counts, m["per_layer"], strict=True)]
    if not per_method:
        return [], None
    per_method = dict(sorted(per_method.items(), key=lambda kv: rank_of(METHOD_ORDER, kv[0])))
    figure = layer_histogram_png(per_method, out_dir / "fig2_layers.png", "identified neurons per layer, by method")
    return [("h2", "Fig. 2: identified neurons per layer"), ("img", figure, "layers")], figure


def _edit_section(t: dict) -> list[tuple]:
    """The edits' headline table."""
    return [("h2", "Editing (task=edit): means over objects, 95% bootstrap intervals over objects"),
            ("p", "One row per split, op, set source, rule, set size and variant (the edit, its baselines on the same "
                  "images, the unedited model). Rates count only inputs on which the unedited model showed the "
                  "knowledge; edit_summary.csv has every measure, edit_rows.csv every object."),
            ("table", headline(t["edit_summary"]), "edit_summary")]


def _unusable_section(sweep_dir, out_dir: Path, empty: list[dict], t: dict) -> list[tuple]:
    """The jobs with no usable sample, also as ``unusable_jobs.csv``."""
    rows = [{"job": Path(m["job_dir"]).relative_to(sweep_dir).as_posix(), "knowledge": m["knowledge"],
             "method": m["method"], "why": " / ".join(m["status"]["reasons"])} for m in empty]
    t["unusable_jobs"] = pd.DataFrame(rows)
    t["unusable_jobs"].to_csv(out_dir / "unusable_jobs.csv", index=False)
    return [("h2", "Jobs with no usable sample"),
            ("p", "These jobs ran but no selected sample could be used, so they have no scores and the tables above "
                  "leave them out. Each row gives the selection's message and the first reasons."),
            ("table", t["unusable_jobs"], "unusable_jobs")]


# the tables whose CSV keeps the index (their labels)
INDEXED = ("table2", "table3", "curves", "curve_areas", "edit_summary", "fig3", "fig3_auc", "fig3_pointing",
           "fig3_area_iou")
MEASURE_NAMES = {"auc": "ROC AUC (chance 0.5)", "pointing": "Pointing game", "area_iou": "Area-matched IoU"}


def _fig3_gallery(results: list[dict], out: Path) -> list[tuple[str, list[tuple[Path, str]]]]:
    """Fig. 3's panels for the report, by method in the report's order: per object, the panel of the top neuron of the
    job's first sample (``neurons.json`` and ``figures/`` of each evaluation job), copied to ``out`` as
    ``<method>__<object>.png``; [(method, [(panel, caption)])]."""
    by_method: dict[str, list[tuple[str, Path, str]]] = {}
    for m in results:
        listed = Path(m["job_dir"]) / "neurons.json"
        rows = json.loads(listed.read_text()) if m.get("table2") and listed.exists() else []
        panel = Path(m["job_dir"]) / "figures" / rows[0]["figure"] if rows else None
        if panel is None or not panel.exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        copy = out / f"{m['method'].replace(':', '-')}__{m['knowledge'].replace(' ', '_')}.png"
        shutil.copyfile(panel, copy)
        layer, unit = rows[0]["top_neuron"]
        items = by_method.setdefault(m["method"], [])
        items.append((m["knowledge"], copy, f"{m['knowledge']}: L{layer} U{unit}, {_pointed(rows[0])}"))
        set_panel = rows[0].get("set_panel")
        if set_panel and (Path(m["job_dir"]) / "figures" / set_panel["figure"]).exists():
            set_copy = copy.with_name(copy.stem + "__set.png")
            shutil.copyfile(Path(m["job_dir"]) / "figures" / set_panel["figure"], set_copy)
            items.append((m["knowledge"], set_copy,
                          f"{m['knowledge']}: the set's map, {_pointed(set_panel['scores'])} (its best single neuron: "
                          f"area IoU {set_panel['best_single']['area_iou']:.2f})"))
    return [(method, [(path, caption) for _, path, caption in sorted(items, key=lambda x: x[0])])
            for method, items in sorted(by_method.items(), key=lambda kv: rank_of(METHOD_ORDER, kv[0]))]


def _pointed(scores: dict) -> str:
    """A panel's caption: the pointing game and the area-matched IoU, then the q95 IoU (only that for a job from before
    the measures existed, or where the object covers no token)."""
    q95 = f"q95 IoU {scores['iou_q95']:.2f}"
    if scores.get("pointing") is None:
        return q95
    return f"pointing {scores['pointing']:.2f}, area IoU {scores['area_iou']:.2f}, {q95}"


def _markdown(blocks: list[tuple], out_dir: Path) -> str:
    out = []
    for kind, value, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {value}")
        elif kind == "p":
            out.append(value)
        elif kind == "table":
            out.append(shown(value).to_markdown(index=False, disable_numparse=True))
        elif kind == "gallery":
            out.append("\n\n".join(f"![{caption}]({path.relative_to(out_dir).as_posix()})\n*{caption}*"
                                   for path, caption in value))
        else:
            out.append(f"![{rest[0]}]({Path(value).name})")
    return "\n\n".join(out) + "\n"


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _html(blocks: list[tuple], title: str) -> str:
    """One self-contained page: tables as HTML (each ``id`` the name of its CSV), figures inline as base64 PNG (no file
    beside it is needed)."""
    body = []
    for kind, value, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            # markdown's code spans
            body.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(value)) + "</p>")
        elif kind == "table":
            table = shown(value).to_html(index=False, border=0, classes="t", table_id=rest[0])
            body.append('<div class="wide">' + table + "</div>")
        elif kind == "gallery":
            body.append('<div class="gallery">' + "".join(
                f'<figure><img alt="{html.escape(caption)}" '
                f'src="{_png(path)}"><figcaption>{html.escape(caption)}</figcaption>'
                f"</figure>" for path, caption in value) + "</div>")
        else:
            body.append(f'<figure><img alt="{html.escape(rest[0])}" src="{_png(value)}"></figure>')
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table.t{border-collapse:collapse;font-size:13px;margin:1em 0}"
             ".t th,.t td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}"
             ".wide{overflow-x:auto}"
             "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:12px;color:#444}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style>"
            f"</head><body>{''.join(body)}</body></html>\n")


def _fullest_trace(sweep_dir: str | Path) -> Path | None:
    """The ``trace.json`` under the sweep with the most patch kinds and captions (``task=trace``'s beats an evaluate
    job's window-only trace), the first in path order among equals."""
    def richness(path: Path) -> tuple[int, int]:
        samples = json.loads(path.read_text())["samples"]
        return (len(samples[0]["delta"]), len(samples[0]["named"])) if samples else (0, 0)

    found = sorted(Path(sweep_dir).rglob("trace.json"))
    return max(found, key=richness) if found else None  # max keeps the first of equals


def _beside(ours: pd.DataFrame, paper: dict) -> pd.DataFrame:
    """``ours`` with a "(paper)" column after each score (and its interval), holding the paper's value for the method
    (missing for a method the paper does not have: an empty cell on the page)."""
    methods = ours.index.get_level_values("method")
    scores = [c for c in ours.columns if not c.endswith(("_lo", "_hi")) and c != "objects"]
    df = pd.DataFrame(index=ours.index)
    for col in scores:
        for c in (col, f"{col}_lo", f"{col}_hi"):
            if c in ours:
                df[c] = ours[c]
        df[f"{col} (paper)"] = [paper.get(m, {}).get(col, float("nan")) for m in methods]
    if "objects" in ours:
        df["objects"] = ours["objects"]
    return df
