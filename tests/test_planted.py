"""A planted, known-causal neuron is recovered by ours (its automatic rule) and by attribution.

The plant, built in memory on a copy of the model's weights for one (original, inpainted, target) sample:
- the neuron's gate and up rows make its input z = w . x equal +4 on the original image at the ``spots`` image
  positions where the two runs' MLP inputs differ most (the object) and -6 at every other position of both runs
  (least squares), so its activation O = z^2 sigmoid(z) is 15.7 there and about 0.09 anywhere else;
- its output column points along the sum of the gradients of y_c with respect to that layer's MLP output at those
  positions, with ``scale`` times the median norm of the layer's output columns.
"Known-causal" is then measured, not assumed: setting the neuron to its inpainted values lowers y_c by over ten
times as much as doing the same to any of eight unplanted neurons of the layer.
"""

import numpy as np
import pytest
import torch

from knexp.identification import methods as M
from knexp.identification.passes import compute_stats, locate_target
from knexp.identification.thresholds import BudgetRule, RuleContext
from knexp.models.hooks.intervene import ActivationPatch, intervene
from knexp.models.hooks.record import record


def _mlp_input_and_grad(adapter, prepared, layer, target):
    """MLP input x [T, d] of ``layer`` and dy_c / d(MLP output) [T, d] on one prepared row."""
    seen = {}
    mlp = adapter.ffn(layer)
    h1 = mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][0].detach().clone()))

    def keep_grad(m, a, out):
        out.register_hook(lambda g: seen.__setitem__("g", g[0].detach().clone()))

    h2 = mlp.register_forward_hook(keep_grad)
    try:
        emb = prepared.inputs.get("inputs_embeds")
        if emb is not None:
            prepared.inputs["inputs_embeds"] = emb.detach().requires_grad_(True)
        with torch.enable_grad():
            adapter.forward(prepared)[0, prepared.prompt_len - 1, target.token_id].backward()
    finally:
        h1.remove()
        h2.remove()
    return seen["x"], seen["g"]


@torch.no_grad()
def plant(adapter, original, inpainted, target, layer: int, unit: int, scale: float = 1.0, spots: int = 1):
    prep_o = adapter.prepare([original], continuations=[target.context])
    prep_i = adapter.prepare([inpainted], continuations=[target.context])
    x_o, grad = _mlp_input_and_grad(adapter, prep_o, layer, target)
    x_i, _ = _mlp_input_and_grad(adapter, prep_i, layer, target)
    pos_o, pos_i = prep_o.image_positions[0], prep_i.image_positions[0]
    spot = pos_o[(x_o[pos_o] - x_i[pos_i]).norm(dim=1).topk(spots).indices]  # sequence positions of the object
    inputs = torch.cat([x_o, x_i]).double()  # every position of both runs [2T, d]
    z = torch.full((len(inputs),), -6.0, dtype=torch.float64)
    z[spot] = 4.0
    w = torch.linalg.lstsq(inputs, z[:, None], driver="gelsd").solution[:, 0].float()  # min-norm when underdetermined
    mlp = adapter.ffn(layer)
    mlp.gate_proj.weight[unit] = w.to(mlp.gate_proj.weight.dtype)
    mlp.up_proj.weight[unit] = w.to(mlp.up_proj.weight.dtype)
    g = grad[spot].sum(0).float()
    w_out = adapter.down_proj(layer).weight
    w_out[:, unit] = (g / g.norm() * scale * w_out.float().norm(dim=0).median()).to(w_out.dtype)


def _y(adapter, prepared, target, edits=None):
    with torch.no_grad(), intervene(adapter, prepared, edits or {}):
        return float(adapter.forward(prepared)[0, prepared.prompt_len - 1, target.token_id])


def _patch_effect(adapter, original, inpainted, target, layer, unit):
    """y_c change when (layer, unit) takes its inpainted values at the image positions."""
    prep_o = adapter.prepare([original], continuations=[target.context])
    prep_i = adapter.prepare([inpainted], continuations=[target.context])
    with torch.no_grad(), record(adapter, prep_i, layers=[layer]) as rec:
        adapter.forward(prep_i)
    edit = ActivationPatch(torch.tensor([unit]), set_to=rec.activations[layer][:, :, unit:unit + 1])
    return _y(adapter, prep_o, target, {layer: edit}) - _y(adapter, prep_o, target)


def _known_causal(adapter, original, inpainted, target, layer, unit) -> tuple[float, float]:
    """(the planted neuron's patch effect, the largest |effect| of eight other neurons of its layer)."""
    others = np.random.default_rng(0).choice([u for u in range(adapter.d_ff) if u != unit], 8, replace=False)
    return (_patch_effect(adapter, original, inpainted, target, layer, unit),
            max(abs(_patch_effect(adapter, original, inpainted, target, layer, int(u))) for u in others))


def _recovers(adapter, original, inpainted, target, layer, unit, live_layers, n=20):
    stats = compute_stats(adapter, original, inpainted, target)
    rule = BudgetRule(name="budget", n=n, q_g=0.5, layers="live", stage1="raw")
    ours = M.from_two_stage(rule.apply(stats, RuleContext("bus", live_layers=live_layers)))
    attribution = M.attribution(stats, n=n)
    return ours, attribution, stats


@pytest.fixture()
def tiny():
    from knexp.models.adapters.spliced import SplicedAdapter
    from knexp.models.tiny.tiny_models import tiny_minigpt4

    # its random image encoder tells images apart (tiny_embedded's does not)
    adapter = SplicedAdapter(tiny_minigpt4(layers=4))
    adapter.model.float()
    return adapter


def _scene_pair(size=224, seed=3):
    rng = np.random.default_rng(seed)
    original = (rng.random((size, size, 3)) * 60 + 100).astype(np.uint8)
    original[60:130, 70:150] = [230, 200, 20]  # the "object": a yellow block
    inpainted = original.copy()
    inpainted[60:130, 70:150] = (rng.random((70, 80, 3)) * 60 + 100).astype(np.uint8)
    return original, inpainted


def test_a_planted_neuron_is_known_causal_and_recovered_on_a_tiny_model(tiny, catalog):
    original, inpainted = _scene_pair()
    target = locate_target(tiny, "the image shows a bus.", tiny.caption_prefix, catalog["bus"])
    layer, unit = 1, 37 % tiny.d_ff
    plant(tiny, original, inpainted, target, layer, unit)
    planted, others = _known_causal(tiny, original, inpainted, target, layer, unit)
    assert planted < 0 and abs(planted) > 10 * others, (planted, others)
    ours, attribution, stats = _recovers(tiny, original, inpainted, target, layer, unit, live_layers=[0, 1, 2])
    assert (layer, unit) in ours.pairs() and (layer, unit) in attribution.pairs()
    assert (int(attribution.layers[0]), int(attribution.units[0])) == (layer, unit)  # the most negative a
    assert stats.diff_max[layer, unit] > 10


@pytest.mark.slow
def test_a_planted_neuron_is_recovered_on_the_embedded_model(catalog):
    """The same on the embedded model's real weights, with a toy-world scene, in the middle of the live window."""
    from knexp.counterfactual.inpaint import inpaint, region_mask
    from knexp.data.toyworld.scenes import SceneOptions, make_scene
    from knexp.models.adapters.spliced import SplicedAdapter
    from knexp.models.zoo.embedded import load_embedded
    from knexp.paths import default_cache_dir, project_root

    adapter = SplicedAdapter(load_embedded(default_cache_dir(),
                                           project_root() / "knexp/models/weights/embedded_projector.safetensors"))
    scene = make_scene(catalog, np.random.default_rng([31, 5, 0]), SceneOptions(gap_px=8))
    obj = scene.objects[0]
    edited = inpaint(scene.image, region_mask(scene.image.shape[:2], bbox=obj.bbox, dilation=2), 3, "telea")
    target = locate_target(adapter, f"{adapter.caption_prefix} {obj.knowledge.indefinite}.", adapter.caption_prefix,
                           obj.knowledge)
    layer, unit = 12, 777
    # six object positions at 0.3 of a typical column: -2.2 logits, inside attribution's linear regime (at scale 1 the
    # patch moves y_c by -3.4 but the first-order estimate is +0.1: attribution misses a saturated neuron, ours does
    # not)
    plant(adapter, scene.image, edited, target, layer, unit, scale=0.3, spots=6)
    planted, others = _known_causal(adapter, scene.image, edited, target, layer, unit)
    assert planted < -1 and abs(planted) > 10 * others, (planted, others)
    ours, attribution, _ = _recovers(adapter, scene.image, edited, target, layer, unit, live_layers=list(range(23)),
                                     n=100)
    assert (layer, unit) in ours.pairs()
    assert (int(attribution.layers[0]), int(attribution.units[0])) == (layer, unit)
