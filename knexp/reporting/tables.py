"""How the report's tables are averaged, ordered and shown.

- ``means``: the mean of each score over the objects of a group, with a 95% bootstrap interval over those objects
  (``interval``): the objects are drawn with replacement ``draws`` times (seeded), and the interval is the 2.5% and
  97.5% quantiles of the resampled means. It says how much the mean rests on which objects were drawn.
- ``ordered``: rows by split (the order of ``conf/splits``), then object, then method in the paper's order (ours,
  schwettmann, pan), then attribution, the stage ablations and the random control; any other label after them, by name.
- ``shown``: a table as the page prints it: every label a column of its own (never a Python tuple), each mean with its
  interval as "0.7000 [0.61, 0.79]", and an empty cell where a value is missing (the paper has no number there).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

METHOD_ORDER = ["ours", "schwettmann", "pan", "attribution", "stage1_only", "stage2_only", "random"]
VARIANT_ORDER = ["unedited", "edit", "random", "finetune", "rank_one", "banned"]
SPLIT_ORDER = ["tuning", "heldout"]


def interval(values: np.ndarray, rng: np.random.Generator, draws: int = 1000) -> tuple[float, float] | None:
    """The 95% bootstrap interval (lo, hi) of the mean of ``values`` (float [n]); None for fewer than two values."""
    values = np.asarray(values, float)
    if len(values) < 2:
        return None
    means = rng.choice(values, size=(draws, len(values))).mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def means(df: pd.DataFrame, by: list[str], cols: list[str], seed: int = 0, draws: int = 1000) -> pd.DataFrame:
    """Per group of ``by``: the mean of each of ``cols`` over the group's rows (one per object), ``<col>_lo`` and
    ``<col>_hi`` its bootstrap interval (``interval``; empty for a group of one object) and ``objects``; rows ordered
    (``ordered``). ``dropna=False``: a row without a key (a job from before the key existed) is a group of its own."""
    rng = np.random.default_rng(seed)
    rows = []
    for labels, group in ordered(df).groupby(by, dropna=False, sort=False):
        entry = dict(zip(by, labels if isinstance(labels, tuple) else (labels,), strict=True))
        for col in cols:
            values = group[col].astype(float).dropna().to_numpy()
            entry[col] = float(values.mean()) if len(values) else np.nan
            bounds = interval(values, rng, draws)
            entry[f"{col}_lo"], entry[f"{col}_hi"] = bounds if bounds else (np.nan, np.nan)
        entry["objects"] = int(group["knowledge"].nunique()) if "knowledge" in group else len(group)
        rows.append(entry)
    return pd.DataFrame(rows).set_index(by)


def rank_of(order: list[str], label) -> tuple[int, str]:
    base = str(label).split(":")[0]
    return (order.index(base) if base in order else len(order), str(label))


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """``df``'s rows sorted by split, knowledge, method and variant where it has them (index levels or columns), in the
    order of the module docstring; other columns keep their relative order."""
    if df.empty:
        return df
    flat = df.reset_index() if any(name is not None for name in df.index.names) else df.copy()
    keys = []
    for col, order in (("split", SPLIT_ORDER), ("op", ["erase", "swap"]), ("knowledge", None), ("method", METHOD_ORDER),
                       ("variant", VARIANT_ORDER)):
        if col in flat:
            key = f"__{col}"
            flat[key] = [rank_of(order, v) if order else (0, str(v)) for v in flat[col]]
            keys.append(key)
    flat = flat.sort_values(keys, kind="stable").drop(columns=keys) if keys else flat
    names = [n for n in df.index.names if n is not None]
    return flat.set_index(names) if names else flat.reset_index(drop=True)


def shown(df: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """``df`` as the page prints it (module docstring): labels as columns, "mean [lo, hi]" cells, empty cells for
    missing values, strings throughout."""
    flat = df.reset_index() if any(name is not None for name in df.index.names) else df.copy()
    out = {}
    for col in flat.columns:
        if col.endswith(("_lo", "_hi")) and col[:-3] in flat:
            continue
        values = flat[col]
        if pd.api.types.is_float_dtype(values):
            lo, hi = flat.get(f"{col}_lo"), flat.get(f"{col}_hi")
            out[col] = [_cell(v, None if lo is None else lo.iloc[i], None if hi is None else hi.iloc[i], digits)
                        for i, v in enumerate(values)]
        else:
            out[col] = ["" if _missing(v) else str(v) for v in values]
    return pd.DataFrame(out)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _cell(v, lo, hi, digits: int) -> str:
    if _missing(v):
        return ""
    if lo is None or _missing(lo):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.2f}, {hi:.2f}]"
