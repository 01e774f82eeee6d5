import numpy as np
import pytest
import torch

from knexp.models.adapters.base import PatchGeometry
from knexp.models.adapters.spliced import SplicedAdapter
from knexp.models.tiny import tiny_minigpt4
from knexp.reporting.analysis import decode_neuron, layer_histogram_png, mask_iou, overlay, token_heatmap


def test_decoded_tokens_are_the_top_of_wu_times_wout():
    adapter = SplicedAdapter(tiny_minigpt4())
    words = decode_neuron(adapter, 1, 5, k=10)
    logits = adapter.unembedding().float() @ adapter.w_out(1)[:, 5].float()
    assert words == [adapter.tokenizer.decode([i]) for i in torch.topk(logits, 10).indices.tolist()]
    assert len(decode_neuron(adapter, 1, 5, k=3, final_norm=True)) == 3


def test_heatmap_follows_the_geometry_including_strips():
    g = PatchGeometry.row_major(16, 4)  # MiniGPT-4: 1 x 4 strips of a 16 x 16 patch grid
    values = np.zeros(64)
    values[5] = 1.0  # token 5: patch row 1, patch columns 4..7
    heat = token_heatmap(values, g, 224, 224)
    ys, xs = np.nonzero(heat)
    assert (ys.min(), ys.max() + 1) == (14, 28) and (xs.min(), xs.max() + 1) == (56, 112)
    with pytest.raises(ValueError):
        token_heatmap(np.zeros(3), g, 10, 10)


def test_mask_iou_by_hand():
    heat = np.zeros((10, 10))
    heat[0:2, 0:5] = 1.0  # 10 of 100 pixels -> the 0.9-quantile mask
    inst = np.zeros((10, 10), bool)
    inst[0:2, 0:10] = True  # 20 pixels, 10 shared
    assert mask_iou(heat, inst, q=0.9) == pytest.approx(10 / 20)


def test_overlay_and_histogram_files(tmp_path):
    img = np.full((32, 32, 3), 100, np.uint8)
    out = overlay(img, np.arange(32 * 32, dtype=float).reshape(32, 32))
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    path = layer_histogram_png({"ours": [0, 2, 5], "pan": [1, 0, 3]}, tmp_path / "fig2.png", "banana")
    assert path.exists() and path.stat().st_size > 1000
