"""Tiny randomly initialised models of every family of the generic adapter (``knexp.models.adapters.vlm``), built
offline (``knexp.models.tiny.tiny_builders``), and the tiny adapters the tests use.

Their captions are random words: they check mechanics (formulas, hooks, decoding, geometry), not knowledge.
``model=tiny_<family>`` loads one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from knexp.models.adapters.families import FAMILIES
from knexp.models.adapters.spliced import SplicedAdapter
from knexp.models.adapters.vlm import VLMAdapter
from knexp.models.tiny.tiny_builders import TINY_SIZE, Size, gemma3, idefics3, internvl, llava, llava_next, qwen
from knexp.models.tiny.tiny_models import tiny_embedded, tiny_minigpt4
from knexp.settings import Device, Integer, Text, takes


@dataclass(frozen=True)
class Tiny:
    """How to build one family's tiny model: (layers, size) -> (model, processor, canonical image size)."""

    family: str
    build: callable = field(repr=False)


TINY: dict[str, Tiny] = {t.family: t for t in [
    Tiny("qwen2_5_vl", lambda layers, size: qwen("2.5", layers, size)),
    Tiny("qwen2_vl", lambda layers, size: qwen("2", layers, size)),
    Tiny("qwen3_vl", lambda layers, size: qwen("3", layers, size)),
    Tiny("gemma3", gemma3),
    Tiny("llava", llava),
    Tiny("llava_next", lambda layers, size: llava_next("next", layers, size)),
    Tiny("llava_onevision", lambda layers, size: llava_next("onevision", layers, size)),
    Tiny("idefics3", lambda layers, size: idefics3("idefics3", layers, size)),
    Tiny("smolvlm", lambda layers, size: idefics3("smolvlm", layers, size)),
    Tiny("internvl", internvl),
]}


def tiny_vlm(family: str, layers: int = 2, seed: int = 0, question: str = "what does this image show?",
             caption_prefix: str = "the image shows", size: Size = TINY_SIZE) -> VLMAdapter:
    """A float32 ``VLMAdapter`` on the random model of ``family`` (``TINY``) at ``size``, seeded."""
    torch.manual_seed(seed)
    model, processor, image_size = TINY[family].build(layers, size)
    return VLMAdapter(model.float(), processor, FAMILIES[family], question=question, caption_prefix=caption_prefix,
                      image_size=image_size)


@takes(family=Text(), layers=Integer(low=1), seed=Integer(low=0), device=Device())
def load_tiny_vlm(model_cfg: dict, device: torch.device, cache_dir):
    """``model=tiny_<family>``: the tiny random model of ``model.family``."""
    adapter = tiny_vlm(model_cfg["family"], layers=model_cfg["layers"], seed=model_cfg["seed"],
                       caption_prefix=model_cfg["prompt"]["caption_prefix"])
    adapter.model.to(device)
    return adapter


load_tiny_vlm.without_weights = load_tiny_vlm  # a tiny model costs nothing to build: the check reads it


def tiny_adapter(kind: str, layers: int = 3):
    """A float32 adapter of one tiny model for tests: ``embedded`` or ``minigpt4`` (the spliced adapter), or a family of
    the generic adapter (``TINY``; ``llava`` is LLaVA-1.5's classes)."""
    if kind == "embedded":
        adapter = SplicedAdapter(tiny_embedded(layers=layers))
    elif kind == "minigpt4":
        adapter = SplicedAdapter(tiny_minigpt4(layers=layers))
    elif kind in TINY:
        adapter = tiny_vlm(kind, layers=layers)
    else:
        raise ValueError(f"unknown tiny model {kind!r}; use embedded, minigpt4 or one of {', '.join(TINY)}")
    adapter.model.float()
    return adapter

