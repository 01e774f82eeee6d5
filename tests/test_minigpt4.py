import pickle

import numpy as np
import pytest
import torch

from knexp.models.errors import ModelWeightsMissing
from knexp.models.tiny.tiny_models import tiny_minigpt4
from knexp.models.zoo.minigpt4 import EvaConfig, convert, load_minigpt4


def test_real_geometry_is_16_by_4_strips():
    """Token t covers patch row t // 4 and patch columns 4 * (t % 4) .. 4 * (t % 4) + 3 (docs/method.md, "Patch geometry
    per model")."""
    from knexp.models.geometry import PatchGeometry

    eva = EvaConfig()
    assert eva.side == 16 and eva.mlp_hidden == int(1408 * 4.3637)
    g = PatchGeometry.row_major(eva.side, eva.side // eva.merge)
    assert len(g) == 64 and g.grid == (16, 4)
    for t in range(64):
        x0, y0, x1, y1 = g.boxes[t] * 16  # in patch units
        assert (y0, y1) == (t // 4, t // 4 + 1)
        assert (x0, x1) == (4 * (t % 4), 4 * (t % 4) + 4)


def test_four_consecutive_patches_make_one_token():
    model = tiny_minigpt4()
    images = [(np.random.default_rng(0).random((70, 50, 3)) * 255).astype(np.uint8)]
    with torch.no_grad():
        feats = model.ln_vision(model.visual_encoder(model.preprocess(images)))[:, 1:]  # [1, 64, 16]
        got = model.image_embeddings(images)  # [1, 16, d]
        t = 5
        manual = model.llama_proj(torch.cat([feats[0, 4 * t + i] for i in range(4)]))
    assert got.shape == (1, 16, model.lm.config.hidden_size)
    torch.testing.assert_close(got[0, t], manual)
    assert model.preprocess(images).shape == (1, 3, 56, 56)  # resized, aspect not kept


def test_conversion_round_trip(tmp_path):
    model = tiny_minigpt4()
    eva = model.eva
    vit = {k.removeprefix("visual_encoder."): v.clone() for k, v in model.state_dict().items()
           if k.startswith("visual_encoder.")}
    vit["head.weight"] = torch.zeros(3, 3)  # classifier head in the BLIP-2 file: dropped
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    torch.save({"model": {"llama_proj.weight": torch.randn(32, 64), "llama_proj.bias": torch.randn(32)}},
               tmp_path / "minigpt4.pth")
    out = convert(tmp_path / "minigpt4.pth", tmp_path / "eva_vit_g.pth", tmp_path / "converted", eva=eva)
    model.lm.save_pretrained(tmp_path / "llama")
    model.tokenizer.save_pretrained(tmp_path / "llama")
    loaded = load_minigpt4(out, str(tmp_path / "llama"), dtype="float32", caption_prefix="the image shows")
    torch.testing.assert_close(loaded.visual_encoder.blocks[1].attn.q_bias, model.visual_encoder.blocks[1].attn.q_bias)
    assert torch.equal(loaded.ln_vision.weight, torch.ones(eva.dim))  # absent from the checkpoint: identity init
    assert loaded.llama_proj.weight.shape == (32, 64)
    # the memory check's view of the same folders (no weight read) has the loaded model's shape
    from knexp.models.adapters.spliced import SplicedAdapter
    from knexp.models.zoo.minigpt4 import load_adapter

    cfg = {"converted_dir": str(out), "llama": str(tmp_path / "llama"), "dtype": "float32",
           "question": loaded.question, "prompt": {"caption_prefix": "the image shows"}}
    shaped = load_adapter.without_weights(cfg, torch.device("cpu"), tmp_path)
    assert next(shaped.model.parameters()).device.type == "meta"
    real = SplicedAdapter(loaded)
    assert sum(p.numel() for p in shaped.model.parameters()) == sum(p.numel() for p in real.model.parameters())
    assert (shaped.num_layers, shaped.d_ff, shaped.num_image_tokens) == (real.num_layers, real.d_ff,
                                                                          real.num_image_tokens)
    # (the word-level test tokenizer has no "<unk>" image token of LLaMA-2's, so no prompt is built here)


def test_conversion_refuses_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    torch.save({"x": torch.zeros(1)}, tmp_path / "eva.pth")
    with pytest.raises(pickle.UnpicklingError):
        convert(tmp_path / "evil.pth", tmp_path / "eva.pth", tmp_path / "out")


def test_missing_weights_say_which_key_to_set(tmp_path):
    with pytest.raises(ModelWeightsMissing, match="model.converted_dir"):
        load_minigpt4(tmp_path / "nothing", "meta-llama/Llama-2-7b-chat-hf")
