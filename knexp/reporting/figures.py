"""A job's figures of its neurons, as the paper's Fig. 3 shows them, and its layer histogram (Fig. 2).

One panel per neuron (the top neuron of each sample's set): the original image, the inpainted image, the neuron's
activation over the image tokens as a heatmap with a colour bar and the instance's outline, and the top tokens the
neuron writes (``decode_neuron``). The object is every instance of k in the image (``CocoScenes.object_mask``); the
title names the layer, the unit, the method and how well the map points at the object (docs/method.md, "Localization
measures": the pointing game and the area-matched IoU over the image tokens, beside the IoU of the heatmap's top 5%
with the object, q95 IoU). ``neurons.json`` lists the same with the five best neurons of each set decoded. Where the
set's map (``knexp.evaluation.fig3``: its neurons' z-scored signed maps, weighted) points at the object better than
each of its top 10 neurons alone, a second panel shows it.

Everything follows the sign s of the neuron's change on its sample (``change_sign``: the sign of mean_p V, V = O'_o -
O'_i, docs/method.md, "Stage 1"): the heatmap shows s x O', the IoU thresholds its top 5%, and the decoded tokens are
those of s x W_out[:, u]. A neuron that falls where the object is (s = -1) is shown as one that rises there, and its
title says "falls on the object".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from knexp.evaluation.fig3 import TOP, image_records, signed_maps, signs_of, weights_of
from knexp.evaluation.localization import localization, set_map
from knexp.identification.methods import NeuronSet
from knexp.identification.pipeline import SampleResult
from knexp.identification.selection import Selector
from knexp.io import atomic_write_text
from knexp.models.adapters.adapter import Adapter
from knexp.models.hooks.record import recorded
from knexp.reporting.analysis import decode_neuron, layer_histogram_png, mask_iou, pyplot, save_figure, token_heatmap
from knexp.store import Store, stable_key


@torch.no_grad()
def token_values(adapter: Adapter, image: np.ndarray, layer: int, unit: int) -> np.ndarray:
    """float32 [P]: O'^l[p, u] at each image token p of ``image`` (one pass, recorded at ``layer``)."""
    prepared = adapter.prepare([image])
    return recorded(adapter, prepared, [layer])[layer][0, :, unit].numpy()


def change_sign(neurons: NeuronSet, rank: int) -> int:
    """+1 when the ``rank``-th neuron's mean change on its sample, mean_p V = mean_p (O'_o - O'_i) = -shift, is >= 0
    (it is higher with the object there), else -1; +1 for a set without shifts."""
    if neurons.shift is None or rank >= len(neurons.shift):
        return 1
    return int(signs_of(neurons.shift[rank]))


def token_scores(adapter: Adapter, values: np.ndarray, heat: np.ndarray, object_mask: np.ndarray) -> dict:
    """How a map points at the object: {"iou_q95": the IoU of the heatmap's top 5% with ``object_mask``, and the
    pointing game, area-matched IoU and AUC of the token values ``values`` float [P] against the object's tokens
    (``knexp.evaluation.localization``, over the finest view)}."""
    geometry = adapter.geometry
    inside = np.zeros(len(geometry), bool)
    inside[geometry.object_tokens(object_mask)] = True
    return {"iou_q95": mask_iou(heat, object_mask),
            **localization(np.asarray(values)[geometry.finest], inside[geometry.finest])}


def neuron_heatmap(adapter: Adapter, image: np.ndarray, layer: int, unit: int, object_mask: np.ndarray,
                   store: Store | None = None, image_key: list | None = None,
                   sign: int = 1) -> tuple[np.ndarray, dict]:
    """(float [H, W]: sign x O'^l[p, u] over the pixels each image token p covers, how that map points at the object
    ``object_mask``: ``token_scores``). With ``store``, the token values are read from it under ``image_key`` (the
    model's, the data's and the image's identity) or computed once and stored, unsigned (float32 values round-trip
    exactly through JSON)."""
    if store is None:
        values = token_values(adapter, image, layer, unit)
    else:
        if not image_key:
            raise ValueError("neuron_heatmap with a store needs image_key (the model's, the data's and the image's "
                             "identity)")
        key = stable_key("token_values", image_key, layer, unit)
        stored = store.get_many([key], lambda _: [token_values(adapter, image, layer, unit).tolist()])[0]
        values = np.asarray(stored, np.float32)
    heat = token_heatmap(sign * values, adapter.geometry, *image.shape[:2])
    return heat, token_scores(adapter, sign * values, heat, object_mask)


@dataclass
class Heatmap:
    """A neuron's activation over the image tokens of one image in the direction of its change, painted onto the image
    (``values``: float [H, W], sign x O'; ``change_sign``), and how it points at the object (``scores``:
    ``token_scores``)."""

    layer: int
    unit: int
    image_id: int
    values: np.ndarray
    scores: dict
    sign: int = 1

    @property
    def iou_q95(self) -> float:
        return self.scores["iou_q95"]


def sample_heatmap(adapter: Adapter, selector: Selector, result: SampleResult, rank: int = 0,
                   store: Store | None = None) -> Heatmap:
    """The ``rank``-th neuron of a sample's set over its image (Fig. 3), with how it points at the object."""
    cand = result.candidate
    layer, unit = int(result.neurons.layers[rank]), int(result.neurons.units[rank])
    image, sign = selector.data.load_image(cand.image_id), change_sign(result.neurons, rank)
    values, scores = neuron_heatmap(adapter, image, layer, unit, _object_mask(selector, result), store,
                                    [selector.captioner.model_key, selector.dataset_id, cand.image_id], sign)
    return Heatmap(layer, unit, cand.image_id, values, scores, sign)


def _object_mask(selector: Selector, result: SampleResult) -> np.ndarray:
    """bool [H, W]: every instance of the sample's object in its image."""
    cand = result.candidate
    return selector.data.object_mask(cand.image_id, selector.catalog[cand.knowledge].coco_id)


def _titled(scores: dict) -> str:
    return (f"pointing {scores['pointing']:.2f} · area IoU {scores['area_iou']:.2f} · q95 IoU {scores['iou_q95']:.2f}"
            if scores.get("pointing") is not None else f"q95 IoU {scores['iou_q95']:.2f}")


def neuron_panel(original: np.ndarray, inpainted: np.ndarray, heat: np.ndarray, object_mask: np.ndarray,
                 tokens: list[str], title: str, path: str | Path) -> Path:
    """Fig. 3 for one neuron (or a set): original | inpainted | heatmap (colour bar, object outline) | decoded tokens
    (none for a set)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.2, 0.8]})
    axes[0].imshow(original)
    axes[0].set_title("original", fontsize=9)
    axes[1].imshow(inpainted)
    axes[1].set_title("object inpainted away", fontsize=9)
    axes[2].imshow(original, alpha=0.45)
    shown = axes[2].imshow(heat, cmap="jet", alpha=0.55)
    axes[2].contour(np.asarray(object_mask, float), levels=[0.5], colors="white", linewidths=1.5)
    axes[2].set_title("activation over image tokens (object outlined)", fontsize=9)
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
    for ax in axes[:3]:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[3].axis("off")
    axes[3].set_title("top tokens it writes" if tokens else "", fontsize=9)
    axes[3].text(0.02, 0.95, "\n".join(f"{i + 1:>2}. {t!r}" for i, t in enumerate(tokens)), va="top",
                 family="monospace", fontsize=9, transform=axes[3].transAxes)
    fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def sample_panel(adapter: Adapter, selector: Selector, result: SampleResult, path: str | Path, rank: int = 0,
                 tokens: list[str] | None = None, store: Store | None = None) -> tuple[np.ndarray, dict]:
    """Fig. 3's panel for the ``rank``-th neuron of a sample's set, written to ``path`` (``tokens``: its decoded top
    tokens, decoded here when not given; ``store``: the heatmaps' token values, ``neuron_heatmap``); returns (the
    heatmap float [H, W], how it points at the object: ``token_scores``)."""
    cand = result.candidate
    image, mask = selector.data.load_image(cand.image_id), _object_mask(selector, result)
    layer, unit = int(result.neurons.layers[rank]), int(result.neurons.units[rank])
    sign = change_sign(result.neurons, rank)
    heat, scores = neuron_heatmap(adapter, image, layer, unit, mask, store,
                                  [selector.captioner.model_key, selector.dataset_id, cand.image_id], sign)
    direction = "rises on the object" if sign > 0 else "falls on the object (map negated)"
    neuron_panel(image, selector.inpainted(cand), heat, mask,
                 decode_neuron(adapter, layer, unit, sign=sign) if tokens is None else tokens,
                 f"L{layer} U{unit} · {result.neurons.method} · {cand.knowledge} · {direction} · {_titled(scores)}",
                 path)
    return heat, scores


@torch.no_grad()
def set_panel(adapter: Adapter, selector: Selector, result: SampleResult, path: str | Path) -> dict | None:
    """The set's map on its sample's image (``knexp.evaluation.fig3``: sum_u w_u z(s_u O'[:, u])), drawn to ``path``
    only where it points at the object better than each of the set's top 10 neurons alone (a higher area-matched IoU,
    ties to the higher AUC); returns {"figure": the file name, the set's and the best single neuron's scores}, or None
    where no panel was drawn."""
    cand, neurons = result.candidate, result.neurons
    image, mask = selector.data.load_image(cand.image_id), _object_mask(selector, result)
    records = image_records(adapter, image, sorted(set(neurons.layers.tolist())))
    signs = np.array([change_sign(neurons, i) for i in range(len(neurons))])
    maps = signed_maps(records, neurons, signs)  # [n, P]
    values = set_map(maps, weights_of(neurons, ranked=True))  # [P]
    heat = token_heatmap(values, adapter.geometry, *image.shape[:2])
    scores = token_scores(adapter, values, heat, mask)
    singles = [token_scores(adapter, m, token_heatmap(m, adapter.geometry, *image.shape[:2]), mask) for m in maps[:TOP]]

    def key(s: dict) -> tuple:
        return (s["area_iou"] if s["area_iou"] is not None else -1.0, s["auc"] if s["auc"] is not None else -1.0)

    best = max(singles, key=key)
    if key(scores) <= key(best):
        return None
    neuron_panel(image, selector.inpainted(cand), heat, mask, [],
                 f"the set's map ({len(neurons)} neurons) · {neurons.method} · {cand.knowledge} · {_titled(scores)}",
                 path)
    return {"figure": Path(path).name, "scores": scores, "best_single": best}


def neuron_figures(adapter: Adapter, selector: Selector, results: list[SampleResult], out: str | Path,
                   store: Store | None = None) -> list[dict]:
    """A panel for the top neuron of each sample's set (``figures/neuron_<image>_L<l>_U<u>.png``), one for the set's map
    where it points at the object better than any of its top 10 neurons (``figures/set_<image>.png``, ``set_panel``),
    and ``neurons.json`` (that neuron, how it points at the object, the set's panel and the decoded top-10 tokens of
    the set's five best neurons); returns the summary rows. ``store`` keeps the heatmaps' token values, so a rerun
    draws them without a pass."""
    fig_dir = Path(out) / "figures"
    rows = []
    for res in results:
        if res.neurons.empty:
            continue
        cand = res.candidate
        layer, unit = int(res.neurons.layers[0]), int(res.neurons.units[0])
        best = [(int(lay), int(u), change_sign(res.neurons, i))
                for i, (lay, u) in enumerate(zip(res.neurons.layers[:5], res.neurons.units[:5], strict=True))]
        decoded = [{"layer": lay, "unit": u, "sign": sign,
                    "tokens": decode_neuron(adapter, lay, u, sign=sign)} for lay, u, sign in best]
        name = f"neuron_{cand.image_id}_L{layer}_U{unit}.png"
        _, scores = sample_panel(adapter, selector, res, fig_dir / name, tokens=decoded[0]["tokens"], store=store)
        rows.append({"image_id": cand.image_id, "top_neuron": [layer, unit], "sign": decoded[0]["sign"], "figure": name,
                     **scores, "set_panel": set_panel(adapter, selector, res, fig_dir / f"set_{cand.image_id}.png"),
                     "decoded": decoded})
    atomic_write_text(Path(out) / "neurons.json", json.dumps(rows, indent=1))
    return [{k: r[k] for k in ("image_id", "top_neuron", "sign", "iou_q95", "pointing", "area_iou")} for r in rows]


def layer_figure(per_layer: list[int], method: str, knowledge: str, out: str | Path) -> Path:
    """Fig. 2 of one job: its neurons per layer."""
    return layer_histogram_png({method: per_layer}, Path(out) / "figures" / "layers.png", f"{knowledge} / {method}")
