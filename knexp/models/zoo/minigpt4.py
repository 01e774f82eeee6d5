"""MiniGPT-4 with LLaMA-2 and no Q-Former (the seed paper's model), from its official checkpoints.

Architecture (docs/method.md, "Patch geometry per model"): EVA ViT-g/14 as in BLIP-2 (39 blocks, width 1408,
16 heads, MLP 6144, q/v biases, LayerNorm eps 1e-6, no final norm) at 224 px gives 1 + 16 x 16 tokens;
``ln_vision`` (LayerNorm 1408) follows, the CLS token is dropped, and every 4 consecutive row-major
patches are concatenated, ``view(B, 64, 4 * 1408)``, then ``llama_proj = Linear(5632 -> 4096)``. So image
token t covers patch row t // 4 and patch columns 4 * (t % 4) .. 4 * (t % 4) + 3: a 16 x 4 grid of 1 x 4
strips. Images are resized to 224 x 224 without keeping the aspect ratio and normalised with CLIP's
mean and std. The LM is LLaMA-2-chat; the prompt is ``[INST] <Img><ImageHere></Img> {question} [/INST]``.

Parameter names follow the official code (``visual_encoder.*``, ``ln_vision.*``, ``llama_proj.*``), so
``eva_vit_g.pth`` and the MiniGPT-4 checkpoint's ``model`` dict load as they are. ``python -m
knexp.models.zoo.minigpt4 convert ...`` turns them into one safetensors folder; every ``.pth`` is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from knexp.io import atomic_path
from knexp.models.adapters.spliced import SplicedAdapter, SplicedMLLM
from knexp.models.errors import ModelWeightsMissing
from knexp.models.geometry import PatchGeometry
from knexp.settings import DTYPES, Choice, Device, Text, takes

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
TEMPLATE = "<s>[INST] <Img><ImageHere></Img> {question} [/INST] {prefix}"
CONVERTED_CONFIG, CONVERTED_WEIGHTS = "minigpt4_config.json", "minigpt4_vision.safetensors"


@dataclass
class EvaConfig:
    img_size: int = 224
    patch_size: int = 14
    dim: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_hidden: int = 6144  # int(1408 * 4.3637)
    eps: float = 1e-6
    merge: int = 4  # consecutive patches concatenated into one LM token

    @property
    def side(self) -> int:
        return self.img_size // self.patch_size


class EvaAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # k has no bias
        q, k, v = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, d_head]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class EvaMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, c: EvaConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(c.dim, eps=c.eps), EvaAttention(c.dim, c.heads)
        self.norm2, self.mlp = nn.LayerNorm(c.dim, eps=c.eps), EvaMlp(c.dim, c.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, c: EvaConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.dim, kernel_size=c.patch_size, stride=c.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, side*side, dim], row-major


class EvaViT(nn.Module):
    """EVA ViT-g/14 as BLIP-2 uses it: all blocks, no final norm; returns [B, 1 + side^2, dim]."""

    def __init__(self, c: EvaConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.side * c.side + 1, c.dim))
        self.blocks = nn.ModuleList(EvaBlock(c) for _ in range(c.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


class MiniGPT4(SplicedMLLM):
    def __init__(self, eva: EvaConfig, lm: nn.Module, tokenizer, question: str = "What does this image show?",
                 caption_prefix: str = "The image shows", template: str = TEMPLATE, image_token: str | None = None):
        image_token = image_token or tokenizer.unk_token
        super().__init__(lm, tokenizer, image_token=image_token, end_token=tokenizer.eos_token,
                         caption_prefix=caption_prefix)
        self.eva, self.question, self.template = eva, question, template
        self.image_marker = "<ImageHere>"
        self.visual_encoder = EvaViT(eva)
        self.ln_vision = nn.LayerNorm(eva.dim)
        self.llama_proj = nn.Linear(eva.dim * eva.merge, lm.config.hidden_size)
        side = eva.side
        if side % eva.merge:
            raise ValueError(f"{side} patches per row do not split into groups of {eva.merge}")
        self._geometry = PatchGeometry.row_major(side, side // eva.merge)  # 1 x merge strips

    @property
    def geometry(self) -> PatchGeometry:
        return self._geometry

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """Resize to img_size x img_size (aspect not kept, bicubic), CLIP-normalise: [B, 3, S, S]."""
        s = self.eva.img_size
        batch = [(cv2.resize(im, (s, s),
                             interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
                 for im in images]
        return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def image_embeddings(self, images: list[np.ndarray]) -> torch.Tensor:
        vit_dtype = self.ln_vision.weight.dtype
        feats = self.ln_vision(self.visual_encoder(self.preprocess(images).to(self.device, vit_dtype)))  # [B, 1+N, dim]
        feats = feats[:, 1:]  # drop CLS
        b, n, d = feats.shape
        merged = feats.reshape(b, n // self.eva.merge, d * self.eva.merge)  # 4 consecutive patches per token
        return self.llama_proj(merged.to(self.llama_proj.weight.dtype)).to(self.lm.dtype)

    def prompt_text(self, prefix: str, question: str | None = None) -> str:
        return self.template.format(question=self.question if question is None else question, prefix=prefix)


# ---- loading ------------------------------------------------------------------------------------------
def _eva_config(folder: Path) -> EvaConfig:
    """The vision tower's config in a converted folder, or ``ModelWeightsMissing`` naming the fix."""
    if not (folder / CONVERTED_CONFIG).exists():
        raise ModelWeightsMissing(
            f"no converted MiniGPT-4 in {folder}: set model.converted_dir, or convert the official checkpoints with "
            "`python -m knexp.models.zoo.minigpt4 convert --minigpt4 <ckpt.pth> --eva <eva_vit_g.pth> --out <dir>`"
        )
    return EvaConfig(**json.loads((folder / CONVERTED_CONFIG).read_text())["eva"])


def load_minigpt4(converted: str | Path, llama: str, dtype: str = "float16", device: str = "cpu",
                  vision_dtype: str = "float32",
                  caption_prefix: str = "The image shows", question: str = "What does this image show?") -> MiniGPT4:
    """Assemble MiniGPT-4 from a converted folder (vision + projection) and LLaMA-2-chat (hub id or path)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(converted)
    eva = _eva_config(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(llama)
        lm = AutoModelForCausalLM.from_pretrained(llama, dtype=getattr(torch, dtype))
    except OSError as exc:
        raise ModelWeightsMissing(f"LLaMA-2 weights not found at {llama!r} ({exc}); set model.llama to a local folder "
                                  "or hub id") from exc
    model = MiniGPT4(eva, lm.eval().requires_grad_(False), tokenizer, question=question, caption_prefix=caption_prefix)
    state = load_file(str(folder / CONVERTED_WEIGHTS))
    missing = model.load_state_dict(state, strict=False).missing_keys
    vision_missing = [k for k in missing if not k.startswith("lm.")]
    if vision_missing:
        raise ModelWeightsMissing(f"{folder / CONVERTED_WEIGHTS} lacks {vision_missing[:5]}...; re-run the conversion")
    model.visual_encoder.to(getattr(torch, vision_dtype))
    model.ln_vision.to(getattr(torch, vision_dtype))
    return model.eval().requires_grad_(False).to(device)


@takes(converted_dir=Text(), llama=Text(), dtype=Choice(DTYPES), vision_dtype=Choice(DTYPES), device=Device(),
       question=Text())
def load_adapter(model_cfg: dict, device: torch.device, cache_dir: Path):
    """``model=minigpt4_llama2``: MiniGPT-4 from its converted folder, in the spliced-model adapter."""
    model = load_minigpt4(model_cfg["converted_dir"], model_cfg["llama"], dtype=model_cfg["dtype"], device=str(device),
                          vision_dtype=model_cfg["vision_dtype"], caption_prefix=model_cfg["prompt"]["caption_prefix"],
                          question=model_cfg["question"])
    return SplicedAdapter(model)


def minigpt4_without_weights(model_cfg: dict, device: torch.device, cache_dir: Path) -> SplicedAdapter:
    """``load_adapter``'s adapter with every weight on the meta device: the vision tower from the converted folder's
    config, LLaMA-2 from its config and tokenizer, no weight read (the memory check's view of it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    llama = model_cfg["llama"]
    eva = _eva_config(Path(model_cfg["converted_dir"]))
    try:
        tokenizer, config = AutoTokenizer.from_pretrained(llama), AutoConfig.from_pretrained(llama)
    except OSError as exc:
        raise ModelWeightsMissing(f"LLaMA-2 config not found at {llama!r} ({exc}); set model.llama to a local folder "
                                  "or hub id") from exc
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, model_cfg["dtype"]))
        model = MiniGPT4(eva, lm, tokenizer, question=model_cfg["question"],
                         caption_prefix=model_cfg["prompt"]["caption_prefix"])
    return SplicedAdapter(model)


load_adapter.without_weights = minigpt4_without_weights


def convert(minigpt4_ckpt: str | Path, eva_ckpt: str | Path, out: str | Path, eva: EvaConfig | None = None) -> Path:
    """Official ``.pth`` files -> ``out/minigpt4_vision.safetensors`` + ``out/minigpt4_config.json``.

    ``eva_ckpt``: BLIP-2's ``eva_vit_g.pth`` (the ``visual_encoder``); ``minigpt4_ckpt``: MiniGPT-4's
    checkpoint, whose ``model`` dict holds ``llama_proj`` (and ``ln_vision`` where it was saved; the
    LLaMA-2 variant never loads BLIP-2's Q-Former checkpoint, so an absent ``ln_vision`` is its identity
    initialisation, as in the official code).
    """
    from safetensors.torch import save_file

    eva = eva or EvaConfig()
    vit = _load_pth(eva_ckpt)
    vit = vit.get("model", vit)
    mini = _load_pth(minigpt4_ckpt)
    mini = mini.get("model", mini)
    state = {f"visual_encoder.{k}": v for k, v in vit.items() if not k.startswith(("head.", "norm.", "fc_norm."))}
    for key in ("llama_proj.weight", "llama_proj.bias"):
        if key not in mini:
            raise KeyError(f"{minigpt4_ckpt} has no {key}: is it a MiniGPT-4 (LLaMA-2) checkpoint?")
        state[key] = mini[key]
    state["ln_vision.weight"] = mini.get("ln_vision.weight", torch.ones(eva.dim))
    state["ln_vision.bias"] = mini.get("ln_vision.bias", torch.zeros(eva.dim))
    if state["llama_proj.weight"].shape[1] != eva.dim * eva.merge:
        got = state["llama_proj.weight"].shape[1]
        raise ValueError(f"llama_proj takes {got} inputs, expected {eva.dim * eva.merge} (the no-Q-Former variant)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / CONVERTED_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    (out / CONVERTED_CONFIG).write_text(json.dumps({"eva": asdict(eva), "sources": [str(minigpt4_ckpt), str(eva_ckpt)]},
                                                   indent=1))
    return out


def _load_pth(path: str | Path) -> dict:
    """A checkpoint of plain tensors, loaded safely: pickled code is refused (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m knexp.models.zoo.minigpt4", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="official checkpoints -> a folder model.converted_dir can point at")
    c.add_argument("--minigpt4", required=True, help="MiniGPT-4 LLaMA-2 checkpoint (.pth)")
    c.add_argument("--eva", required=True, help="BLIP-2 eva_vit_g.pth")
    c.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(convert(args.minigpt4, args.eva, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
