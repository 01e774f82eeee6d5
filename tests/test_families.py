"""Every family of the generic adapter (``knexp.models.adapters.vlm``, ``knexp.models.adapters.families``) on its tiny
random model: the statistics against their formulas, captions under every intervention against the model's own
``generate`` with the same hooks, the geometry by effect, what a neuron writes, and a real folder written by
``save_pretrained``."""

import os

import numpy as np
import pytest
import torch
from test_identification import _reference

from knexp.identification.passes import compute_stats, locate_target
from knexp.models.hooks.intervene import ActivationPatch, intervene
from knexp.models.tiny.tiny_vlm import TINY, tiny_vlm

FAMILIES = sorted(TINY)
CAPTION = "the image shows a bus and a clock."
# where and in what precision (the GPU check runs this file on CUDA in bfloat16: knexp.bench.gpu)
DEVICE = torch.device(os.environ.get("KNEXP_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("KNEXP_TEST_DTYPE", "float32"))
CLOSE = {} if DTYPE == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    adapter = tiny_vlm(request.param, layers=3)
    adapter.model.to(DEVICE, DTYPE)
    return adapter


def _images(adapter, n: int, seed: int) -> list[np.ndarray]:
    """Random RGB images at the family's canonical size, and one of another size (the adapter resizes it)."""
    h, w = adapter.image_size
    rng = np.random.default_rng(seed)
    sizes = [(h, w)] * (n - 1) + [(h + 7, w + 3)]
    return [(rng.random((*s, 3)) * 255).astype(np.uint8) for s in sizes]


def test_every_family_of_the_table_but_the_refused_has_a_tiny_model():
    from knexp.models.adapters.families import FAMILIES as TABLE
    from knexp.models.adapters.families import REFUSED

    assert set(TINY) == set(TABLE) and not set(TABLE) & set(REFUSED)
    assert {"qwen2_5_vl", "qwen3_vl", "gemma3", "llava_onevision", "llava_next", "smolvlm", "idefics3",
            "internvl"} <= set(TINY)


def test_statistics_equal_their_formulas_on_full_tensors(vlm, catalog):
    """``compute_stats`` (the two passes reduced as they stream, after the shared prefix where the family allows it)
    against the full [L, P, d_f] tensors of a plain recorded forward and backward."""
    original, inpainted = _images(vlm, 2, 11)
    target = locate_target(vlm, CAPTION, vlm.caption_prefix, catalog["bus"])
    stats = compute_stats(vlm, original, inpainted, target)
    o, i, g, _ = _reference(vlm, original, inpainted, target)  # plain recorded passes (tests/test_identification.py)
    assert stats.shape == (vlm.num_layers, vlm.d_ff) and o.shape[1] == vlm.num_image_tokens
    for got, want in ((stats.diff_max, (o - i).amax(1)), (stats.gradcam_max, (o * g).amax(1)),
                      (stats.gradcam_mean, (o * g).mean(1)),
                      (stats.attribution, ((i - o) * g).sum(1)), (stats.act_mean, o.mean(1))):
        torch.testing.assert_close(got.cpu(), want.cpu(),
                                   **({**CLOSE, "atol": CLOSE["atol"] * float(want.abs().max())} if CLOSE else {}))
    assert float(g.abs().sum()) > 0, "the gradient of y_c reaches the image positions"


def _edits(adapter, batch: int, kind: str, layers: list[int]) -> dict[int, ActivationPatch]:
    """One intervention of each kind the evaluation uses, on units 1, 5, 9 of ``layers``, per row of a batch."""
    g = torch.Generator().manual_seed(7)
    units, p = torch.tensor([1, 5, 9]), adapter.num_image_tokens
    if kind == "noise":
        return {lay: ActivationPatch(units, add=torch.randn(batch, p, generator=g) * 8) for lay in layers}
    if kind == "zero":
        return {lay: ActivationPatch(units, set_to=torch.zeros(batch, p, 3)) for lay in layers}
    if kind == "counterfactual":  # per row, position and unit: the inpainted intervention on images of k
        return {lay: ActivationPatch(units, set_to=torch.randn(batch, p, 3, generator=g) * 4) for lay in layers}
    # the shift on other images
    return {lay: ActivationPatch(units, add=torch.full((batch, p, 3), 3.0)) for lay in layers}


@pytest.mark.parametrize("kind", ["noise", "zero", "counterfactual", "shift"])
def test_captions_under_every_intervention_equal_the_models_own_generate(vlm, kind):
    """knexp's captions (its prefill, reuse below the lowest edited layer and its own decoding where the family has fast
    paths; the model's generate in the prompt's pass where it has none) equal the model's own ``generate`` of the same
    batch under the same hooks."""
    images = _images(vlm, 3, 5)
    layers = [1, 2] if kind != "zero" else [2]
    from knexp.models.decoding.streaming import stream_ids

    prepared, theirs = vlm.prepare(images), _edits(vlm, 3, kind, layers)
    with intervene(vlm, prepared, theirs):
        expected = vlm.generate_ids(prepared, 8)
    mine, ours = vlm.prepare(images), _edits(vlm, 3, kind, layers)
    with intervene(vlm, mine, ours):
        got = vlm.prefill(mine, start_layer=layers[0], groups=[0, 1, 2], max_new_tokens=8)
    ids = stream_ids(vlm, 3, lambda rows: got, 8, batch_size=3)
    stop = set(vlm.stop_token_ids)
    for row_expected, row_got in zip(expected.tolist(), ids.tolist(), strict=True):
        end = next((j for j, t in enumerate(row_expected) if t in stop), len(row_expected) - 1)
        assert row_got[: end + 1] == row_expected[: end + 1]
    # each edit acted once, in the prompt's pass, on both paths (never at a decoding step)
    assert [e.applied for e in theirs.values()] == [e.applied for e in ours.values()] == [1] * len(layers)


def test_geometry_holds_by_effect(vlm):
    """Change the pixels under one token of the finest view: with the vision tower's attention silenced (so tokens do
    not mix), exactly that token changes among the finest view's, and a coarser view's changed tokens all touch it
    (its resampling may spread a few pixels)."""
    model = vlm.model
    decoder = {id(m) for m in vlm.language_model()[0].modules()} | {id(m) for m in model.lm_head.modules()}
    handles = [m.register_forward_hook(lambda mod, args,
                                       out: (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple)
                                       else torch.zeros_like(out))
               for m in model.modules() if id(m) not in decoder and "attention" in type(m).__name__.lower()
               and "rotary" not in type(m).__name__.lower()]
    assert handles, "the vision tower has attention to silence"
    try:
        h, w = vlm.image_size
        image = (np.random.default_rng(3).random((h, w, 3)) * 255).astype(np.uint8)
        g = vlm.geometry
        fine = np.flatnonzero(g.finest)
        token = int(fine[len(fine) // 2 + 1])
        x0, y0, x1, y1 = g.boxes[token]
        r0, r1, c0, c1 = round(y0 * h), round(y1 * h), round(x0 * w), round(x1 * w)
        changed_image = image.copy()
        changed_image[r0:r1, c0:c1] = 255 - changed_image[r0:r1, c0:c1]

        def features(im):
            p = vlm.prepare([im])
            return vlm.prompt_embeddings(p)[0, p.image_positions[0]].float()

        delta = (features(image) - features(changed_image)).abs().amax(-1)
    finally:
        for handle in handles:
            handle.remove()
    changed = set(np.flatnonzero(delta.numpy() > 1e-5 * float(delta.max())).tolist())
    assert changed & set(fine.tolist()) == {token}
    b, pad = g.boxes, 1.0 / 8  # a coarser view's resampling may reach into its neighbouring cells
    overlaps = (b[:, 0] < x1 + pad) & (b[:, 2] > x0 - pad) & (b[:, 1] < y1 + pad) & (b[:, 3] > y0 - pad)
    near = set(np.flatnonzero(overlaps).tolist())
    assert changed <= near


def test_a_neurons_write_direction_includes_the_norm_after_the_ffn():
    """Gemma 3's post-FFN norm multiplies every write into the residual stream by its gain (1 + weight): ``w_out`` is
    down_proj's column so scaled, the direction the norm gives one neuron's write."""
    gemma = tiny_vlm("gemma3", layers=2)
    block = gemma.decoder_layers()[1]
    with torch.no_grad():
        block.post_feedforward_layernorm.weight.normal_(0, 0.5)
        one = torch.zeros(1, 1, gemma.d_ff)
        one[..., 7] = 3.0
        written = block.post_feedforward_layernorm(gemma.down_proj(1)(one))[0, 0]
    direction = gemma.w_out(1)[:, 7]
    assert torch.nn.functional.cosine_similarity(written, direction, dim=0) > 0.9999
    assert not torch.allclose(direction, gemma.down_proj(1).weight[:, 7])
    llava = tiny_vlm("llava", layers=2)
    assert torch.equal(llava.w_out(1), llava.down_proj(1).weight)


def test_a_family_is_loaded_from_a_folder_written_by_save_pretrained(tmp_path):
    """``model=<family> model.path=<folder>`` on Qwen2.5-VL (whose stock AutoProcessor needs torchvision for its video
    part): the tokenizer, the image processor and the chat template come back, and so do the captions."""
    from knexp.models.adapters.vlm import load_adapter

    tiny = tiny_vlm("qwen2_5_vl", layers=2)
    tiny.model.save_pretrained(tmp_path / "qwen")
    tiny.processor.save_pretrained(tmp_path / "qwen")
    cfg = {"family": "qwen2_5_vl", "path": str(tmp_path / "qwen"), "dtype": "float32", "question": tiny.question,
           "image_size": list(tiny.image_size), "prompt": {"caption_prefix": tiny.caption_prefix}}
    loaded = load_adapter(cfg, torch.device("cpu"), None)
    images = _images(tiny, 2, 9)
    assert loaded.num_image_tokens == tiny.num_image_tokens and loaded.prompt_text("x") == tiny.prompt_text("x")
    assert loaded.caption(images, max_new_tokens=6) == tiny.caption(images, max_new_tokens=6)


def test_a_family_without_image_tokens_in_its_sequence_is_refused_with_the_reason():
    from knexp.models.adapters.families import family
    from knexp.models.errors import ModelError

    with pytest.raises(ModelError, match="cross-attends"):
        family("mllama")
    with pytest.raises(ModelError, match="knexp knows"):
        family("gpt5_vision")


def test_bfloat16_runs_on_the_cpu_and_reduces_in_float32(catalog):
    """A bf16 model (Qwen2.5-VL's tiny one): identification runs, and its statistics are float32, near the float32
    model's."""
    bf16 = tiny_vlm("qwen2_5_vl", layers=2)
    f32 = tiny_vlm("qwen2_5_vl", layers=2)
    bf16.model.to(torch.bfloat16)
    original, inpainted = _images(f32, 2, 4)
    target = locate_target(f32, CAPTION, f32.caption_prefix, catalog["bus"])
    low, full = compute_stats(bf16, original, inpainted, target), compute_stats(f32, original, inpainted, target)
    assert low.diff_max.dtype == torch.float32 and low.gradcam_max.dtype == torch.float32
    assert torch.isfinite(low.gradcam_max).all() and float(low.gradcam_max.abs().sum()) > 0
    torch.testing.assert_close(low.act_mean, full.act_mean, atol=0.05 * float(full.act_mean.abs().max()), rtol=0.1)
    assert bf16.caption(_images(f32, 2, 8), max_new_tokens=4)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="builds the GPU check's models small, on the CPU")
def test_the_gpu_checks_models_build_and_measure_at_small_shapes():
    """The GPU check's three real-shape models (``knexp.bench.shapes``), shrunk, on the CPU: each builds through its
    family and the check measures it (hook overhead, identification, captions per second)."""
    from knexp.bench.gpu import measure
    from knexp.bench.shapes import SHAPES, Shape, build

    small = {"llava": (64, 128, 2, 4, 4, (32, 64, 1, 2), 56), "qwen2_5_vl": (64, 128, 2, 4, 2, (32, 64, 2, 2), 56),
             "gemma3": (64, 128, 2, 4, 2, (32, 64, 1, 2), 56)}
    for shape in SHAPES:
        adapter = build(Shape(shape.name, shape.family, *small[shape.family]), torch.device("cpu"), torch.float32)
        result = measure(adapter, captions=2, batch_size=2, max_new_tokens=4, units=4, rounds=1)
        assert result["hook_overhead"] > 0 and result["identification_s"] > 0, shape.name
        assert result["captions_per_s"] > 0, shape.name
    assert [s.name for s in SHAPES] == ["llava15_7b", "qwen2_5_vl_7b", "gemma3_4b"] and SHAPES[1].width == 3584


def test_the_gpu_check_without_cuda_says_so_and_exits_0(tmp_path):
    import subprocess
    import sys

    from knexp.paths import project_root

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n")
    r = subprocess.run([sys.executable, "-m", "knexp.bench", "--only", "gpu", "--out", str(out)], cwd=project_root(),
                       capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0 and "no CUDA device" in r.stdout
    assert out.read_text() == "# Benchmarks\n"  # nothing measured, nothing written
