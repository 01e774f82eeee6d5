import numpy as np
import pytest
import torch

from knexp.evaluation.localization import localization
from knexp.models.adapters.spliced import SplicedAdapter
from knexp.models.geometry import PatchGeometry
from knexp.models.tiny.tiny_models import tiny_minigpt4
from knexp.reporting.analysis import decode_neuron, layer_histogram_png, mask_iou, token_heatmap
from knexp.store import Store


def test_decoded_tokens_are_the_top_of_wu_times_wout():
    adapter = SplicedAdapter(tiny_minigpt4())
    words = decode_neuron(adapter, 1, 5, k=10)
    logits = adapter.unembedding().float() @ adapter.w_out(1)[:, 5].float()
    assert words == [adapter.tokenizer.decode([i]) for i in torch.topk(logits, 10).indices.tolist()]
    with torch.no_grad():  # through the final norm first: W_U . norm(W_out[:, u])
        normed = adapter.final_norm()(adapter.w_out(1)[:, 5][None, None])[0, 0].float()
    top = torch.topk(adapter.unembedding().float() @ normed, 3).indices.tolist()
    expected = [adapter.tokenizer.decode([i]) for i in top]
    assert decode_neuron(adapter, 1, 5, k=3, final_norm=True) == expected


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


def _adapter_image_mask(seed: int, box: tuple[slice, slice]):
    """The tiny MiniGPT-4 in float32, a random 224 x 224 image and an instance mask over ``box``."""
    adapter = SplicedAdapter(tiny_minigpt4())
    adapter.model.float()
    image = (np.random.default_rng(seed).random((224, 224, 3)) * 255).astype(np.uint8)
    mask = np.zeros((224, 224), bool)
    mask[box] = True
    return adapter, image, mask


def test_neuron_heatmap_and_its_panel(tmp_path):
    """Fig. 3 for one neuron: the heatmap is the recorded O'[:, u] painted by the geometry, and the panel is drawn."""
    from knexp.models.hooks.record import record
    from knexp.reporting.figures import neuron_heatmap, neuron_panel

    adapter, image, mask = _adapter_image_mask(0, (slice(20, 120), slice(30, 90)))
    heat, scores = neuron_heatmap(adapter, image, 1, 5, mask)
    prepared = adapter.prepare([image])
    with torch.no_grad(), record(adapter, prepared, layers=[1]) as rec:
        adapter.forward(prepared)
    values = rec.activations[1][0, :, 5].numpy()
    np.testing.assert_allclose(heat, token_heatmap(values, adapter.geometry, 224, 224))
    iou = scores["iou_q95"]
    assert iou == mask_iou(heat, mask) and 0 <= iou <= 1
    inside = np.isin(np.arange(len(values)), adapter.geometry.object_tokens(mask))  # the tokens the measures use
    assert {k: scores[k] for k in ("pointing", "area_iou", "auc")} == pytest.approx(localization(values, inside))
    path = neuron_panel(image, image[::-1], heat, mask, decode_neuron(adapter, 1, 5), "L1 U5 · ours · q95 IoU 0.10",
                        tmp_path / "p.png")
    assert path.stat().st_size > 20_000  # four panels at 13 x 3.6 inches

    # through a store: the same heatmap, computed once (a rerun draws it without a pass), keyed by image and neuron
    store, passes = Store(tmp_path / "cache", "heatmaps"), []
    run_hooks = type(adapter).run_hooks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(adapter), "run_hooks", lambda self, *a, **kw: passes.append(1) or run_hooks(self, *a, **kw))
        for _ in range(2):
            stored, stored_scores = neuron_heatmap(adapter, image, 1, 5, mask, store, ["tiny", "toy", 42])
            assert np.array_equal(stored, heat) and stored_scores == scores
        assert (len(passes), store.misses, store.hits) == (1, 1, 1)
        other, _ = neuron_heatmap(adapter, image, 1, 6, mask, store, ["tiny", "toy", 42])
        assert len(passes) == 2 and not np.array_equal(other, heat)
    with pytest.raises(ValueError, match="image_key"):
        neuron_heatmap(adapter, image, 1, 5, mask, store)


def test_histogram_file(tmp_path):
    path = layer_histogram_png({"ours": [0, 2, 5], "pan": [1, 0, 3]}, tmp_path / "fig2.png", "banana")
    assert path.exists() and path.stat().st_size > 1000


def test_a_negated_neuron_gets_the_same_signed_heatmap_iou_and_tokens():
    """Signed Fig. 3: negate neuron u's activation (its up_proj row) and its output column (so the model computes the
    same): with the sign of its change (-1) the negated neuron's heatmap, IoU and decoded tokens are the original's."""
    from knexp.identification.methods import NeuronSet
    from knexp.reporting.figures import change_sign, neuron_heatmap

    adapter, image, mask = _adapter_image_mask(1, (slice(40, 140), slice(60, 160)))
    heat, scores = neuron_heatmap(adapter, image, 1, 5, mask)
    words = decode_neuron(adapter, 1, 5)
    ffn = adapter.ffn(1)
    with torch.no_grad():
        ffn.up_proj.weight[5] *= -1
        ffn.down_proj.weight[:, 5] *= -1
    flipped, _ = neuron_heatmap(adapter, image, 1, 5, mask)
    assert np.allclose(flipped, -heat, atol=1e-6)  # the activation is negated
    signed, signed_scores = neuron_heatmap(adapter, image, 1, 5, mask, sign=-1)
    np.testing.assert_allclose(signed, heat, atol=1e-6)
    assert signed_scores == pytest.approx(scores) and decode_neuron(adapter, 1, 5, sign=-1) == words
    assert decode_neuron(adapter, 1, 5) != words  # unsigned, the negated neuron reads as another one
    # the sign is that of mean_p V = -shift: a neuron whose activation is lower with the object there is -1
    found = NeuronSet("ours", "", np.array([1, 1]), np.array([5, 6]), np.array([2.0, 1.0]), shift=np.array([0.3, -0.2]))
    assert (change_sign(found, 0), change_sign(found, 1)) == (-1, 1)
