"""The embedded MLLM: EfficientNet-Lite0 (frozen) -> projector (trained) -> SmolLM2-135M-Instruct (frozen).

Captioning and neuron access go through ``knexp.models.adapters.spliced.SplicedAdapter``.
This is MiniGPT-4's first-stage recipe in miniature: a frozen image encoder whose 7 x 7 x 1280 feature
map becomes 49 image tokens (row-major, token ``t`` covers grid cell ``(t // 7, t % 7)``), a projector
into the LM's embedding space, and a frozen chat LM. Image tokens sit in the user turn of the LM's own
chat template as a run of placeholder ids that are replaced by the projected features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from knexp.models.adapters.spliced import SplicedAdapter, SplicedMLLM
from knexp.models.errors import ProjectorWeightsError
from knexp.models.geometry import PatchGeometry
from knexp.models.zoo.offline import efficientnet_lite0_weights, smollm2_folder
from knexp.settings import DTYPES, Choice, Device, Fields, Integer, SettingError, Text, takes
from knexp.user_errors import ConfigError

log = logging.getLogger(__name__)

IMAGE_SIZE = 224
GRID = 7  # EfficientNet-Lite0 at 224 px: stride 32
VISION_DIM = 1280


@dataclass
class PromptConfig:
    system: str = "You are a helpful assistant that describes images."
    user: str = "<image>\nWhat does this image show?"
    caption_prefix: str = "The image shows"
    image_marker: str = "<image>"  # where the image tokens go in ``user``
    image_token: str = "<|endoftext|>"  # placeholder id, replaced by projected features


def preprocess(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """RGB uint8 images -> float tensor [B, 3, 224, 224] in [-1, 1] (EfficientNet-Lite's input range)."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    batch = []
    for im in images:
        if im.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
            im = cv2.resize(im, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
        batch.append(im)
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


PROJECTORS = ("linear", "mlp")


class PromptSettings(Fields):
    """``model.prompt``: the chat turns, the caption prefix, and where the image tokens go (``user`` holds the marker
    once)."""

    def __init__(self):
        super().__init__({name: Text() for name in ("system", "user", "caption_prefix", "image_marker", "image_token")})

    def __call__(self, key: str, value) -> dict:
        prompt = super().__call__(key, value)
        if prompt["user"].count(prompt["image_marker"]) != 1:
            raise SettingError(f"{key}.user", prompt["user"],
                               f"must hold {key}.image_marker={prompt['image_marker']!r} exactly once")
        return prompt


def build_projector(kind: str, hidden: int, out_dim: int) -> nn.Module:
    """``linear``: MiniGPT-4's single Linear; ``mlp``: LayerNorm -> Linear -> GELU -> Linear (LLaVA-1.5 style)."""
    if kind == "linear":
        return nn.Linear(VISION_DIM, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.LayerNorm(VISION_DIM), nn.Linear(VISION_DIM, hidden), nn.GELU(),
                             nn.Linear(hidden, out_dim))
    raise ConfigError(f"unknown projector kind {kind!r}; use 'linear' or 'mlp'")


class EmbeddedMLLM(SplicedMLLM):
    """Vision encoder + projector spliced into SmolLM2's chat template (image tokens in the user turn)."""

    def __init__(self, vision: nn.Module, projector: nn.Module, lm: nn.Module, tokenizer, prompt: PromptConfig):
        super().__init__(lm, tokenizer, image_token=prompt.image_token, end_token="<|im_end|>",
                         caption_prefix=prompt.caption_prefix)
        self.vision, self.projector = vision, projector
        self.prompt = prompt
        self.image_marker = prompt.image_marker
        self._geometry = PatchGeometry.row_major(GRID, GRID)

    @property
    def geometry(self) -> PatchGeometry:
        return self._geometry

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen features [B, 49, 1280] (row-major 7 x 7 grid) from pixels [B, 3, 224, 224]."""
        feats = self.vision.extract_features(pixel_values.to(self.device, torch.float32))  # [B, 1280, 7, 7]
        return feats.flatten(2).transpose(1, 2)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Projected image tokens [B, 49, d_model] in the LM's dtype."""
        return self.projector(features.float()).to(self.lm.dtype)

    def image_embeddings(self, images: list[np.ndarray]) -> torch.Tensor:
        return self.project(self.encode_images(preprocess(images)))

    def prompt_text(self, prefix: str, question: str | None = None) -> str:
        user = self.prompt.user if question is None else f"{self.image_marker}\n{question}"
        messages = [{"role": "system", "content": self.prompt.system}, {"role": "user", "content": user}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix


def load_embedded(
    cache_dir: str | Path,
    projector_path: str | Path | None,
    projector_kind: str = "mlp",
    projector_hidden: int = 1536,
    dtype: str = "float32",
    attn_implementation: str = "eager",
    prompt: PromptConfig | None = None,
    seed: int = 0,
) -> EmbeddedMLLM:
    """Assemble the embedded model from the offline packages and the projector file.

    ``projector_path=None`` leaves the projector randomly initialised (seeded), as training starts.
    """
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vision = EfficientNet.from_name("efficientnet-lite0")
    vision.load_state_dict(torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True))
    vision.eval().requires_grad_(False)
    folder = smollm2_folder(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                              attn_implementation=attn_implementation)
    lm.eval().requires_grad_(False)
    torch.manual_seed(seed)
    projector = build_projector(projector_kind, projector_hidden, lm.config.hidden_size)
    if projector_path is not None:
        load_projector(projector, projector_path)
    return EmbeddedMLLM(vision, projector, lm, tokenizer, prompt or PromptConfig())


def embedded_without_weights(model_cfg: dict, device: torch.device, cache_dir: Path) -> SplicedAdapter:
    """``load_adapter``'s adapter with every weight on the meta device: the LM from its config, the encoder and the
    projector from their classes, nothing read but the config and the tokenizer (the memory check's view of it)."""
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.device("meta"):
        config = AutoConfig.from_pretrained(folder)
        lm = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, model_cfg["dtype"]))
        vision = EfficientNet.from_name("efficientnet-lite0")
        projector = build_projector(model_cfg["projector_kind"], model_cfg["projector_hidden"], lm.config.hidden_size)
    return SplicedAdapter(EmbeddedMLLM(vision, projector, lm, tokenizer, PromptConfig(**model_cfg["prompt"])))


def load_projector(projector: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``projector``; a clear error names the file when it is bad."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ProjectorWeightsError(
            f"projector weights {path} not found: restore the shipped file (`git checkout -- {path}`), "
            "point model.projector_path at a trained one, or train one with `python run.py task=train_projector`"
        )
    try:
        state = load_file(str(path))
        projector.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as exc:  # safetensors raises several types for torn or foreign files
        raise ProjectorWeightsError(
            f"projector weights {path} are unreadable or do not fit model.projector_kind ({exc}); restore the "
            f"file (`git checkout -- {path}`) or retrain it with `python run.py task=train_projector`; "
            "run `make install` if the offline packages are missing"
        ) from exc


@takes(projector_path=Text(), projector_kind=Choice(PROJECTORS), projector_hidden=Integer(low=1), dtype=Choice(DTYPES),
       attn_implementation=Choice(("eager", "sdpa")), device=Device(), prompt=PromptSettings())
def load_adapter(model_cfg: dict, device: torch.device, cache_dir: Path):
    """``model=embedded``: the embedded MLLM in its adapter (the loader named in conf/model/embedded.yaml)."""
    mllm = load_embedded(
        cache_dir=cache_dir,
        projector_path=model_cfg["projector_path"],
        projector_kind=model_cfg["projector_kind"],
        projector_hidden=model_cfg["projector_hidden"],
        dtype=model_cfg["dtype"],
        attn_implementation=model_cfg["attn_implementation"],
        prompt=PromptConfig(**model_cfg["prompt"]),
    )
    return SplicedAdapter(mllm.to(device))


load_adapter.without_weights = embedded_without_weights
