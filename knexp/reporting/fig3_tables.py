"""Fig. 3, measured, over a sweep: does each method's map point at the object better than random neurons and chance?

Every ``metrics.json`` under the sweep that holds ``localization`` (``task=localize``'s jobs, one object and every
method each; ``task=evaluate``'s, one object and method each) gives, per (object, method, images kind, map kind), the
mean over that object's images of each measure for the method's neurons, for their layer-matched random counterparts
and at chance (``knexp.evaluation.fig3.summary``); a (model, object, method) found twice counts once, the newest file
winning. ``table`` averages them over objects per split, images kind, map kind and method, each mean with its 95%
bootstrap interval over objects (``knexp.reporting.tables.means``), and the paired difference method - random per
object with its interval: a method's neurons localize where that interval excludes 0, not only where they beat chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from knexp.evaluation.localization import MEASURES
from knexp.reporting.tables import means

KEYS = ["split", "images", "map", "method"]
IMAGES_ORDER, MAPS_ORDER = ["identification", "held-out"], ["top", "top10", "set"]


def localization_rows(sweep_dir: str | Path, split_of) -> pd.DataFrame:
    """One row per (model, object, method, images kind, map kind) of the sweep's jobs (module docstring): each measure,
    ``random_<measure>``, ``chance_<measure>``, ``diff_<measure>`` (method - random) and ``images`` (how many);
    ``split_of`` names an object's split."""
    newest: dict[tuple, tuple[float, list[dict]]] = {}
    for path in Path(sweep_dir).rglob("metrics.json"):
        m = json.loads(path.read_text())
        if not m.get("localization") or "knowledge" not in m:
            continue
        for method, by_images in m["localization"].items():
            key = (m.get("model"), m["knowledge"], method)
            rows = [{"model": m.get("model"), "knowledge": m["knowledge"], "split": split_of(m["knowledge"]),
                     "method": method, "images": kind, "map": map_kind, **cell}
                    for kind, by_map in by_images.items() for map_kind, cell in by_map.items()]
            mtime = path.stat().st_mtime
            if key not in newest or mtime > newest[key][0]:
                newest[key] = (mtime, rows)
    rows = [row for _, found in newest.values() for row in found]
    df = pd.DataFrame(rows)
    for k in MEASURES if len(df) else ():
        df[k], df[f"random_{k}"] = df[k].astype(float), df[f"random_{k}"].astype(float)
        df[f"diff_{k}"] = df[k] - df[f"random_{k}"]
    return df


def table(rows: pd.DataFrame) -> pd.DataFrame:
    """Means over objects per (split, images, map, method) of each measure, its random counterpart, the paired
    difference and chance, with 95% bootstrap intervals over objects (chance without one)."""
    cols = [c for k in MEASURES for c in (k, f"random_{k}", f"diff_{k}")]
    out = means(rows, KEYS, cols)
    chance = rows.groupby(KEYS, sort=False)[[f"chance_{k}" for k in MEASURES]].mean()
    out = out.join(chance)
    flat = out.reset_index()
    flat["__i"] = flat["images"].map(lambda v: IMAGES_ORDER.index(v) if v in IMAGES_ORDER else len(IMAGES_ORDER))
    flat["__m"] = flat["map"].map(lambda v: MAPS_ORDER.index(v) if v in MAPS_ORDER else len(MAPS_ORDER))
    flat = flat.sort_values(["split", "__i", "__m"], kind="stable").drop(columns=["__i", "__m"])
    order = KEYS + [c for k in MEASURES for c in (k, f"{k}_lo", f"{k}_hi", f"random_{k}", f"random_{k}_lo",
                                                 f"random_{k}_hi", f"diff_{k}", f"diff_{k}_lo", f"diff_{k}_hi",
                                                 f"chance_{k}")] + ["objects"]
    return flat[order].set_index(KEYS)


def by_measure(summary: pd.DataFrame, measure: str) -> pd.DataFrame:
    """``summary``'s columns of one measure (the method's mean, its random counterpart's, the paired difference, each
    with its interval, and chance) and the object count: one table per measure for the page."""
    keep = [c for c in summary.columns if c == "objects" or c.removeprefix("random_").removeprefix("diff_")
            .removeprefix("chance_").removesuffix("_lo").removesuffix("_hi") == measure]
    return summary[keep]


def verdicts(summary: pd.DataFrame, measure: str = "auc") -> list[str]:
    """One sentence per (split, images, map): the methods whose paired interval over random on ``measure`` lies above
    0, or that none does."""
    lines = []
    flat = summary.reset_index()
    for (split, images, map_kind), g in flat.groupby(["split", "images", "map"], sort=False):
        above = [str(r["method"]) for _, r in g.iterrows() if r[f"diff_{measure}_lo"] > 0]
        lines.append(f"{split}, {images} images, {map_kind} map: " + (
            f"{', '.join(above)} beat{'s' if len(above) == 1 else ''} layer-matched random neurons on {measure} "
            "(the paired interval excludes 0)" if above else f"no method beats layer-matched random neurons on "
                                                             f"{measure} (every paired interval includes 0 or is "
                                                             "missing)"))
    return lines
