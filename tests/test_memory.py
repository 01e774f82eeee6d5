"""The memory check before any model loads (``knexp.models.memory``, ``registry.check_memory``) and the real-shape
phases (``knexp.bench.real_shapes``) at small shapes."""

import pytest
import torch

from tests.conftest import run_py


def test_the_estimate_counts_the_formulas_tensors():
    """Each step's bytes are the module docstring's sums: the key/value cache and the logits scale with the rows, the
    identification records with the layers, the weights with the parameters and the dtype."""
    from knexp.models.memory import CONTEXT_TOKENS, ModelShape, step_bytes

    s = ModelShape(parameters=1000, value_bytes=4, layers=3, d_model=8, d_ff=32, vocab=100, kv_width=4,
                   image_tokens=5, prompt_positions=12, vision_positions=0, vision_width=0, vision_ffn=0)
    one, two = step_bytes(s, 1, 10), step_bytes(s, 2, 10)
    assert one["weights"] == 4000 == two["weights"]
    kv = 2 * 3 * (12 + 10) * 4 * 4
    layer = 12 * (3 * 32 + 6 * 8) * 4
    assert one["captions"] == kv + layer + 2 * 100 * 4 and two["captions"] == 2 * one["captions"]
    t1 = 12 + CONTEXT_TOKENS
    assert one["identification"] == 3 * t1 * (3 * 32 + 8 * 8) * 4 + 2 * 3 * 5 * 32 * 4 + 12 * 3 * 32 * 4
    half = step_bytes(ModelShape(**{**s.__dict__, "value_bytes": 2}), 1, 10)
    assert half["weights"] == 2000 and half["identification"] < one["identification"]


def test_a_loaders_shape_without_weights_is_the_loaded_models(tmp_path):
    """``load_adapter.without_weights`` on a folder written by ``save_pretrained`` reads its config and processor, not
    its weights, and gives the shape of the model ``load_adapter`` loads from it (tied weights counted once)."""
    from knexp.models.adapters.vlm import load_adapter
    from knexp.models.memory import ModelShape
    from knexp.models.tiny.tiny_vlm import tiny_vlm

    for fam in ("qwen2_5_vl", "gemma3"):
        tiny = tiny_vlm(fam, layers=2)
        tiny.model.save_pretrained(tmp_path / fam)
        tiny.processor.save_pretrained(tmp_path / fam)
        cfg = {"family": fam, "path": str(tmp_path / fam), "dtype": "float32", "question": tiny.question,
               "image_size": list(tiny.image_size), "prompt": {"caption_prefix": tiny.caption_prefix}}
        shaped = load_adapter.without_weights(cfg, torch.device("cpu"), None)
        assert next(shaped.model.parameters()).device.type == "meta"
        assert ModelShape.of(shaped) == ModelShape.of(load_adapter(cfg, torch.device("cpu"), None)), fam


def test_a_model_that_cannot_fit_stops_before_it_loads(monkeypatch, tmp_path):
    """With less free memory than the estimate (``KNEXP_FREE_MEMORY``), ``load_model`` raises ``NotEnoughMemory``
    naming the estimate, the free memory and the settings to lower, and the loader never runs."""
    from knexp.models import registry
    from knexp.models.memory import NotEnoughMemory
    from knexp.models.tiny import tiny_vlm as module

    cfg = {"name": "tiny_llava", "loader": "knexp.models.tiny.tiny_vlm.load_tiny_vlm", "family": "llava", "layers": 2,
           "seed": 0, "device": "cpu", "prompt": {"caption_prefix": "the image shows"},
           "generation": {"batch_size": 8, "max_new_tokens": 8, "decode_width": None}, "edit": None}
    calls = []
    real = module.load_tiny_vlm

    def spy(*args):
        calls.append(args)
        return real(*args)

    spy.without_weights = real.without_weights
    monkeypatch.setattr(module, "load_tiny_vlm", spy)
    monkeypatch.setenv("KNEXP_FREE_MEMORY", "1MiB")
    with pytest.raises(NotEnoughMemory) as caught:
        registry.load_model(cfg, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "model=tiny_llava needs about" in message and "0.0 GiB free" in message
    assert "model.generation.batch_size (8 rows)" in message and "model.dtype" not in message  # tiny: no dtype setting
    assert "KNEXP_FREE_MEMORY" in message and calls == []
    monkeypatch.setenv("KNEXP_FREE_MEMORY", "1TiB")
    registry.load_model(cfg, tmp_path)
    assert len(calls) == 1


def test_run_py_stops_in_one_line_when_the_estimate_exceeds_free_memory():
    r = run_py("task=identify", "model=tiny_llava", "knowledge=bed", "logger=none", "hydra.run.dir=/tmp/knexp_mem",
               env={"KNEXP_FREE_MEMORY": "2MiB"}, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1, r.stderr[-2000:]
    assert len(lines) == 1 and "needs about" in lines[0] and "GiB free" in lines[0], lines
    assert "model.generation" in lines[0] or "model.dtype" in lines[0]


def test_free_memory_is_read_and_a_bad_override_is_named(monkeypatch):
    from knexp.models.errors import ModelError
    from knexp.models.memory import free_bytes, parse_bytes

    assert parse_bytes("12GiB") == 12 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1000") == 1000
    monkeypatch.delenv("KNEXP_FREE_MEMORY", raising=False)
    assert free_bytes(torch.device("cpu")) > 2**20
    monkeypatch.setenv("KNEXP_FREE_MEMORY", "lots")
    with pytest.raises(ModelError, match="KNEXP_FREE_MEMORY='lots'"):
        free_bytes(torch.device("cpu"))


def test_the_real_shape_phases_run_at_small_shapes():
    """``make real-shapes``' phases on the CPU shapes shrunk (but with Gemma 3's real vocabulary): every phase runs,
    gives its seconds, its peak and an estimate, and the edit read back equals the one made."""
    from knexp.bench.gpu import gpu_markdown, measure
    from knexp.bench.real_shapes import phases_table, real_shapes_markdown, run_shape
    from knexp.bench.shapes import CPU_SHAPES, Shape

    small = {"gemma3": (64, 128, 2, 4, 2, (32, 64, 1, 2), 56), "qwen2_5_vl": (64, 128, 2, 4, 2, (32, 64, 2, 2), 56)}
    runs = []
    for shape in CPU_SHAPES:
        vocab = shape.vocab if shape.family == "gemma3" else None
        r = run_shape(Shape(shape.name, shape.family, *small[shape.family], vocab=vocab, tie=shape.tie),
                      torch.device("cpu"), torch.float32,
                      extra=lambda a: measure(a, captions=2, batch_size=2, max_new_tokens=4, units=4, rounds=1))
        assert not r["skipped"]
        assert [p["phase"] for p in r["phases"]] == ["build", "forward", "gradient", "identification", "captions",
                                                    "edit"]
        assert all(p["seconds"] >= 0 and p["peak"] > 0 and p["estimate"] > 0 for p in r["phases"])
        assert phases_table(r["phases"]).count("\n") == 7 and r["extra"]["captions_per_s"] > 0
        runs.append(r)
    assert [s.name for s in CPU_SHAPES] == ["gemma3_4b", "qwen2_5_vl_3b"] and CPU_SHAPES[0].vocab == 262208
    skipped = {**runs[1], "skipped": True, "estimate": 2**40}
    page = real_shapes_markdown({"models": [runs[0], skipped], "threads": 1})
    assert "| identification |" in page and "Not run: it needs about 1024.00 GiB" in page
    gpu = gpu_markdown({"device": "test", "tests": {"summary": "ok", "seconds": 0},
                        "models": {r["name"]: {**r["extra"], "params_b": 0.0, "run": r} for r in (runs[0], skipped)}})
    assert gpu.count("| identification |") == 1 and "was not run: it needs about 1024.0 GiB" in gpu


def _packed_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for a backward while ``fn`` runs (outside checkpointed regions)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


@pytest.mark.parametrize("kind", ["embedded", "gemma3"])
def test_identification_recomputes_layers_where_keeping_them_would_not_fit(kind, monkeypatch):
    """At real size, keeping every layer's activations for the backward of y_c was knexp's largest cost (BENCHMARKS.md,
    "Real sizes on the CPU"). ``compute_stats`` recomputes each layer in the backward where they would exceed
    ``RECOMPUTE_ABOVE`` (forced here at tiny size): autograd then keeps a fraction of what it kept, and the statistics
    are the same (bit for bit without a prefix cache; to float rounding for a fast-path model, whose recomputed pass
    runs over the prefix too)."""
    import numpy as np

    from knexp.identification.passes import SampleStats, Target, compute_stats
    from knexp.models import memory
    from knexp.models.tiny.tiny_vlm import tiny_adapter

    adapter = tiny_adapter(kind, layers=4)
    h, w = getattr(adapter, "image_size", (224, 224))
    rng = np.random.default_rng(0)
    original, inpainted = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(2)]
    target = Target(context=" a", token_id=adapter.tokenize(" bus")[0], word="bus")
    kept = _packed_bytes(lambda: compute_stats(adapter, original, inpainted, target, recompute=False))
    monkeypatch.setattr(memory, "RECOMPUTE_ABOVE", 0)  # the automatic choice, as at real size
    recomputed = _packed_bytes(lambda: compute_stats(adapter, original, inpainted, target))
    assert recomputed < kept / 3, (recomputed, kept)
    full = compute_stats(adapter, original, inpainted, target, recompute=False)
    again = compute_stats(adapter, original, inpainted, target, recompute=True)
    for name in SampleStats.TENSORS:
        a, b = getattr(full, name), getattr(again, name)
        if adapter.fast_paths:
            scale = float(a.float().abs().max()) or 1.0
            torch.testing.assert_close(b.float(), a.float(), atol=1e-5 * scale, rtol=0, msg=name)
        else:
            assert torch.equal(a, b), name
    assert all(type(layer).__dict__.get("forward") is not None and "forward" not in layer.__dict__
               for layer in adapter.decoder_layers())  # every layer's own forward is back


def test_a_real_shape_that_cannot_fit_is_named_and_not_built(monkeypatch):
    """``make real-shapes`` on a machine with too little free memory: the model is not built, its need and the free
    memory are given, and the run goes on (the command exits 0)."""
    from knexp.bench import real_shapes
    from knexp.bench.shapes import CPU_SHAPES

    built = []
    monkeypatch.setattr(real_shapes, "build", lambda *a: built.append(a) or pytest.fail("built"))
    monkeypatch.setattr(real_shapes, "_planned", lambda shape, dtype: _shape_of(shape))
    monkeypatch.setenv("KNEXP_FREE_MEMORY", "4GiB")
    r = real_shapes.real_shapes([CPU_SHAPES[0]])
    (model,) = r["models"]
    assert model["skipped"] and model["estimate"] > 16 * 2**30 and model["free"] == 4 * 2**30 and not built
    assert "Not run: it needs about" in real_shapes.real_shapes_markdown(r)


def _shape_of(shape):
    """The ``ModelShape`` of a ``Shape`` from its numbers alone (parameters counted as Gemma 3 4B's)."""
    from knexp.models.memory import ModelShape

    return ModelShape(parameters=4_315_317_824, value_bytes=4, layers=shape.layers, d_model=shape.width,
                      d_ff=shape.ffn, vocab=shape.vocab, kv_width=shape.kv_heads * shape.head_width, image_tokens=256,
                      prompt_positions=272, vision_positions=4096, vision_width=shape.vision[0],
                      vision_ffn=shape.vision[1])


def test_the_embedded_models_shape_without_weights_is_the_loaded_models():
    """The embedded default's ``without_weights`` (its LM from the config on the meta device, the encoder and projector
    from their classes) gives the shape of the model ``load_adapter`` loads."""
    from knexp.job.session import session
    from knexp.models.memory import ModelShape
    from knexp.models.zoo.embedded import load_adapter

    s = session("model=embedded", "logger=none")
    shaped = load_adapter.without_weights(s.spec.model, torch.device("cpu"), s.spec.cache_dir)
    assert next(shaped.model.parameters()).device.type == "meta"
    assert ModelShape.of(shaped) == ModelShape.of(s.adapter)
