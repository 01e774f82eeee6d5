"""Qualitative analysis (METHOD.md): decoded neurons, activation heatmaps with mask IoU, layer histograms.

decode_neuron   top-k tokens of W_U . W_out[:, u] (optionally through the final norm first).
token_heatmap   a neuron's activation over image tokens painted onto the image by the adapter's geometry,
                each token filling the box it covers (a 7 x 7 grid, LLaVA's 24 x 24, MiniGPT-4's 16 x 4 strips).
mask_iou        IoU of the heatmap's top (1 - q) region (the q-quantile mask, q = 0.95) with an instance mask.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from knexp.models.adapters.base import Adapter, PatchGeometry


@torch.no_grad()
def decode_neuron(adapter: Adapter, layer: int, unit: int, k: int = 10, final_norm: bool = False) -> list[str]:
    column = adapter.w_out(layer)[:, unit].float()  # [d_model]: what the neuron writes
    if final_norm:
        column = adapter.final_norm()(column.to(adapter.w_out(layer).dtype)[None, None])[0, 0].float()
    logits = adapter.unembedding().float() @ column  # [V]
    return [adapter.tokenizer.decode([i]) for i in torch.topk(logits, k).indices.tolist()]


def token_heatmap(values: np.ndarray, geometry: PatchGeometry, height: int, width: int) -> np.ndarray:
    """float [H, W]: token t's value over the pixels of ``geometry.boxes[t]`` (mean where boxes overlap)."""
    values = np.asarray(values, np.float64)
    if len(values) != len(geometry):
        raise ValueError(f"{len(values)} values for {len(geometry)} image tokens")
    total, count = np.zeros((height, width)), np.zeros((height, width))
    for v, (x0, y0, x1, y1) in zip(values, geometry.boxes, strict=True):
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


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8: the image with the heatmap (min-max scaled, JET colours) blended on top."""
    span = np.ptp(heat)
    scaled = ((heat - heat.min()) / span * 255).astype(np.uint8) if span > 0 else np.zeros(heat.shape, np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (alpha * colour + (1 - alpha) * image).round().astype(np.uint8)


def layer_histogram_png(per_method: dict[str, list[int]], path: str | Path, title: str = "") -> Path:
    """Fig. 2: identified neurons per layer, one bar series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    n = len(per_method)
    for i, (method, counts) in enumerate(per_method.items()):
        ax.bar(np.arange(len(counts)) + (i - (n - 1) / 2) * 0.8 / n, counts, width=0.8 / n, label=method)
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
