"""Qualitative analysis (docs/method.md, "Qualitative analysis"): decoded neurons, activation heatmaps with mask IoU,
layer histograms.

decode_neuron   top-k tokens of W_U . (s W_out[:, u]), s the sign of the neuron's change (optionally through the
                final norm first).
token_heatmap   a neuron's activation over image tokens painted onto the image by the adapter's geometry,
                each token filling the box it covers (a 7 x 7 grid, LLaVA's 24 x 24, MiniGPT-4's 16 x 4 strips).
mask_iou        IoU of the heatmap's top (1 - q) region (the q-quantile mask, q = 0.95) with an instance mask.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

from knexp.models.adapters.adapter import Adapter
from knexp.models.geometry import PatchGeometry


@torch.no_grad()
def decode_neuron(adapter: Adapter, layer: int, unit: int, k: int = 10, final_norm: bool = False,
                  sign: int = 1) -> list[str]:
    """The top-``k`` tokens of W_U . (sign x W_out[:, u]): what the neuron writes when it moves in the direction
    ``sign`` (+1: as it rises; -1: as it falls, for a neuron whose change V is negative on the object)."""
    column = sign * adapter.w_out(layer)[:, unit].float()  # [d_model]: what the neuron writes
    if final_norm:
        column = adapter.final_norm()(column.to(adapter.w_out(layer).dtype)[None, None])[0, 0].float()
    logits = adapter.unembedding().float() @ column  # [V]
    return [adapter.tokenizer.decode([i]) for i in torch.topk(logits, k).indices.tolist()]


def token_heatmap(values: np.ndarray, geometry: PatchGeometry, height: int, width: int) -> np.ndarray:
    """float [H, W]: token t's value over the pixels of ``geometry.boxes[t]`` (mean where boxes overlap), from the
    tokens of the finest view only (``PatchGeometry.views``: a model's global view is not mixed into its tiles)."""
    values = np.asarray(values, np.float64)
    if len(values) != len(geometry):
        raise ValueError(f"{len(values)} values for {len(geometry)} image tokens")
    total, count = np.zeros((height, width)), np.zeros((height, width))
    keep = geometry.finest
    for v, (x0, y0, x1, y1) in zip(values[keep], geometry.boxes[keep], strict=True):
        r0, r1 = int(round(y0 * height)), max(int(round(y1 * height)), int(round(y0 * height)) + 1)
        c0, c1 = int(round(x0 * width)), max(int(round(x1 * width)), int(round(x0 * width)) + 1)
        total[r0:r1, c0:c1] += v
        count[r0:r1, c0:c1] += 1
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def mask_iou(heat: np.ndarray, instance_mask: np.ndarray, q: float = 0.95) -> float:
    """IoU of {heat >= quantile_q(heat)} with the instance mask (bool [H, W])."""
    top = heat >= np.quantile(heat, q)
    inst = np.asarray(instance_mask, bool)
    union = (top | inst).sum()
    return float((top & inst).sum() / union) if union else 0.0


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (jobs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close ``fig``; the folder is created."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # the saved area grows to hold every title and label
    plt.close(fig)
    return path


def layer_histogram_png(per_method: dict[str, list[int]], path: str | Path, title: str = "") -> Path:
    """Fig. 2: identified neurons per layer, one bar series per method."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 3.2))
    n = len(per_method)
    for i, (method, counts) in enumerate(per_method.items()):
        ax.bar(np.arange(len(counts)) + (i - (n - 1) / 2) * 0.8 / n, counts, width=0.8 / n, label=method)
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside the bars, never over them
    return save_figure(fig, path, dpi=120)


def trace_png(traces, window: dict, path: str | Path, title: str = "") -> Path:
    """The causal trace (``knexp.identification.causal_trace``): per patch kind, the share of the whole counterfactual's
    Δy_c that the patch reaches at each layer (top row) and the share of captions that still name the object
    (bottom row, only where the trace has captions); thin lines per object, the thick line their average, the live
    window shaded. The title is wrapped to the figure's width."""
    plt = pyplot()

    from knexp.identification.causal_trace import KINDS, normalised

    labels = {"resid": "(a) residual entering l", "ffn": "(b) FFN of layer l", "ffn_upto": "(c) FFN of layers 0..l",
              "ffn_from": "(c) FFN of layers l..L-1"}
    objects = sorted({t.knowledge for t in traces})
    kinds = [k for k in KINDS if k in traces[0].delta]
    captioned = {kind: all(kind in t.named for t in traces) for kind in kinds}
    rows = 2 if any(captioned.values()) else 1  # the captions' row only where a trace has them (task=trace draws them)
    fig, axes = plt.subplots(rows, len(kinds), figsize=(max(4 * len(kinds) + 1, 8), 3 * rows + 0.6), sharex=True,
                             squeeze=False)
    layers = np.arange(len(traces[0].delta["resid"]))
    for col, kind in enumerate(kinds):
        top = axes[0, col]
        for obj in objects:
            mine = [t for t in traces if t.knowledge == obj]
            top.plot(layers, normalised(mine, kind), lw=0.8, alpha=0.6, label=obj)
            if captioned[kind]:
                axes[1, col].plot(layers, np.mean([t.named[kind] for t in mine], axis=0), lw=0.8, alpha=0.6)
        top.plot(layers, normalised(traces, kind), lw=2.5, color="black", label="average")
        if captioned[kind]:
            axes[1, col].plot(layers, np.mean([t.named[kind] for t in traces], axis=0), lw=2.5, color="black")
        elif rows == 2:
            axes[1, col].axis("off")
        for ax in axes[:, col]:
            if window["resid_layers"]:
                ax.axvspan(min(window["resid_layers"]) - 0.5, max(window["resid_layers"]) + 0.5, color="tab:green",
                           alpha=0.08)
            ax.grid(alpha=0.3)
        top.set_title(labels[kind], fontsize=10)
        axes[-1, col].set_xlabel("layer l")
    axes[0, 0].set_ylabel("Δy_c / (y_c(inpainted) - y_c(original))", fontsize=9)
    if rows == 2:
        axes[1, 0].set_ylabel("captions still naming the object", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=2)
    span = window["neuron_layers"][:1] + window["neuron_layers"][-1:]
    subtitle = (f"live window (shaded): residual layers reaching {window['frac']:.0%} of the counterfactual; neurons "
                f"act in layers {span[0]}-{span[-1]}" if span else "no live window")
    width = int(fig.get_figwidth() * 11)  # characters that fit the figure's width at this font size
    fig.suptitle("\n".join(textwrap.wrap(title, width) + textwrap.wrap(subtitle, width)), fontsize=10)
    return save_figure(fig, path)


def curves_png(curves, path: str | Path, title: str = "") -> Path:
    """Size curves: S_se, S_re and S_mean against the set size n (log axis), one line per method and setting; one row
    of panels per object split when the table has one (``knexp.reporting.sweep.tables``' ``curves``)."""
    plt = pyplot()

    df = curves.reset_index()
    splits = sorted(df["split"].unique()) if "split" in df else [None]
    series = [c for c in df.columns if c not in ("S_se", "S_re", "S_mean", "size", "split")]
    fig, axes = plt.subplots(len(splits), 3, figsize=(13, 3.6 * len(splits)), squeeze=False)
    for row, split in enumerate(splits):
        part = df if split is None else df[df["split"] == split]
        for labels, g in part.groupby(series, dropna=False):
            name = " / ".join(str(x) for x in (labels if isinstance(labels, tuple) else (labels,)))
            g = g.sort_values("size")
            for col, score in enumerate(("S_se", "S_re", "S_mean")):
                axes[row, col].plot(g["size"], g[score], marker="o", label=name)
        for col, score in enumerate(("S_se", "S_re", "S_mean")):
            ax = axes[row, col]
            ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("set size n")
            ax.set_title(score + (f" ({split} objects)" if split else ""), fontsize=10)
            ax.grid(alpha=0.3)
    axes[0, 2].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
