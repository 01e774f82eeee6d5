"""How much memory a job's largest step needs, estimated before the model loads, and the check that stops a job that
cannot fit (docs/method.md, "Memory before loading").

The estimate reads only shapes: a loader's ``meta`` function builds the adapter on PyTorch's meta device (the model's
classes and config, its processor or tokenizer, no weights), and ``ModelShape.of`` takes from it what the steps'
memory depends on. Each step's figure counts the tensors that step holds at its peak, in bytes:

``weights``         every parameter once, in the model's dtype (knexp never keeps a second copy).
``captions``        R rows of greedy captions (R = ``model.generation.decode_width`` or ``batch_size``): the key/value
                    cache, 2 L R (T0 + N) d_kv values for a prompt of T0 positions and N new tokens; one layer's
                    activations over the prompt pass, R T0 (3 d_ff + 6 d_model) (the gate, up and product tensors, the
                    residual, its norm and the attention's in and out); the vision tower's layer over R images,
                    R V (d_vff + 6 d_v); and float32 logits at the last position only, 2 R |vocab| (the logits and
                    the scores decoding reads).
``identification``  one sample's ``compute_stats`` at batch 1: what autograd keeps for the backward of y_c through
                    every decoder layer, L T1 (3 d_ff + 8 d_model) (the MLP's gate output, and the activation and up
                    outputs that their product keeps; the norms' inputs, attention's queries, keys, values and
                    output; a frozen linear map keeps nothing), with T1 = T0 + 8 context tokens, or where that
                    exceeds ``RECOMPUTE_ABOVE`` (identification then recomputes each layer in the backward) the
                    layers' inputs and one layer's activations, L T1 d_model + T1 (3 d_ff + 8 d_model); O' of both
                    images at the image tokens, kept until a layer's gradient arrives, 2 L P d_ff; and the per-neuron
                    statistics, 12 L d_ff float32 values.

On the CPU the process's own resident memory (Python, torch, the data) is added, since free memory is what the
machine has beside it. The constants count tensors of the formulas' shapes, not measured bytes: BENCHMARKS.md
("Real sizes on the CPU") gives each estimate beside the peak measured at Gemma 3 4B's and Qwen2.5-VL 3B's size.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from knexp.models.adapters.adapter import Adapter
from knexp.models.errors import ModelError

GIB = 2**30
RECOMPUTE_ABOVE = GIB  # identification recomputes each layer in its backward where keeping them all would exceed this
CONTEXT_TOKENS = 8  # caption tokens before the target word that identification's pass adds to the prompt
FREE_ENV = "KNEXP_FREE_MEMORY"  # what the check takes as free memory, e.g. 12GiB (default: what the device reports)


class NotEnoughMemory(ModelError, MemoryError):
    """A job's largest step would need more memory than the device has free; the message names the estimate, the free
    memory and the settings to lower."""


@dataclass(frozen=True)
class ModelShape:
    """What the steps' memory depends on (module docstring's symbols in brackets)."""

    parameters: int  # every weight: vision tower, projector, decoder, head
    value_bytes: int  # bytes per value of the model's dtype
    layers: int  # decoder layers [L]
    d_model: int
    d_ff: int
    vocab: int  # rows of the unembedding [|vocab|]
    kv_width: int  # keys (as many values) per position and layer: key/value heads x head width [d_kv]
    image_tokens: int  # decoder positions of one image [P]
    prompt_positions: int  # a caption prompt's positions, image included [T0]
    vision_positions: int  # positions the vision tower sees per image [V]; 0 for a convolutional encoder
    vision_width: int  # [d_v]
    vision_ffn: int  # [d_vff]

    @classmethod
    def of(cls, adapter: Adapter) -> ModelShape:
        """The shape of ``adapter``'s model (weights on any device, the meta device included)."""
        params = list(adapter.model.parameters())
        attention = getattr(adapter.decoder_layers()[0], "self_attn", None)
        d_model = int(adapter.down_proj(0).out_features)
        kv = getattr(getattr(attention, "k_proj", None), "out_features", d_model)
        positions, width, ffn = adapter.vision_shape()
        return cls(parameters=sum(p.numel() for p in params), value_bytes=params[0].element_size(),
                   layers=adapter.num_layers, d_model=d_model, d_ff=adapter.d_ff,
                   vocab=int(adapter.unembedding().shape[0]), kv_width=int(kv), image_tokens=adapter.num_image_tokens,
                   prompt_positions=adapter.prompt_length(), vision_positions=positions, vision_width=width,
                   vision_ffn=ffn)


def components(shape: ModelShape, rows: int, new_tokens: int) -> dict[str, int]:
    """The bytes of each term of the module docstring's steps, for ``rows`` caption rows of ``new_tokens`` tokens."""
    s, b = shape, shape.value_bytes
    t0, t1 = s.prompt_positions, s.prompt_positions + CONTEXT_TOKENS
    return {"kv_cache": 2 * s.layers * rows * (t0 + new_tokens) * s.kv_width * b,
            "layer": rows * t0 * (3 * s.d_ff + 6 * s.d_model) * b,
            "vision_layer": rows * s.vision_positions * (s.vision_ffn + 6 * s.vision_width) * b,
            "logits": 2 * rows * s.vocab * 4,
            "saved_for_backward": saved_for_backward(s.layers, t1, s.d_model, s.d_ff, b),
            "records": 2 * s.layers * s.image_tokens * s.d_ff * b,
            "statistics": 12 * s.layers * s.d_ff * 4}


def _layer_bytes(positions: int, d_model: int, d_ff: int, value_bytes: int) -> int:
    """What autograd keeps of one decoder layer over ``positions`` positions: T (3 d_ff + 8 d_model) b."""
    return positions * (3 * d_ff + 8 * d_model) * value_bytes


def recomputes(layers: int, positions: int, d_model: int, d_ff: int, value_bytes: int) -> bool:
    """Whether identification recomputes each layer in its backward: where keeping every layer's activations,
    L T (3 d_ff + 8 d_model) b, would exceed ``RECOMPUTE_ABOVE``."""
    return layers * _layer_bytes(positions, d_model, d_ff, value_bytes) > RECOMPUTE_ABOVE


def saved_for_backward(layers: int, positions: int, d_model: int, d_ff: int, value_bytes: int,
                       recompute: bool | None = None) -> int:
    """What autograd keeps for a backward through ``layers`` decoder layers over ``positions`` positions: every layer's
    activations, L T (3 d_ff + 8 d_model) b; or, recomputing each layer in the backward (``recompute``; None: as
    ``recomputes`` decides), every layer's input and one layer's activations,
    L T d_model b + T (3 d_ff + 8 d_model) b."""
    layer = _layer_bytes(positions, d_model, d_ff, value_bytes)
    if recompute is None:
        recompute = recomputes(layers, positions, d_model, d_ff, value_bytes)
    return layers * positions * d_model * value_bytes + layer if recompute else layers * layer


def step_bytes(shape: ModelShape, rows: int, new_tokens: int) -> dict[str, int]:
    """{step: bytes above the weights} of the module docstring, and ``weights``."""
    c, one = components(shape, rows, new_tokens), components(shape, 1, 0)
    captions = c["kv_cache"] + c["layer"] + c["vision_layer"] + c["logits"]
    identification = one["saved_for_backward"] + one["records"] + one["statistics"] + one["vision_layer"]
    return {"weights": shape.parameters * shape.value_bytes, "captions": captions, "identification": identification}


def resident_bytes() -> int:
    """This process's resident memory (Linux's /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def parse_bytes(text: str) -> int:
    """``"12GiB"``, ``"512MiB"``, ``"1.5GB"`` or a plain number of bytes, as bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is no amount of memory; write e.g. 12GiB or 512MiB")
    unit = (m.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def free_bytes(device: torch.device) -> int:
    """What the device has free: ``KNEXP_FREE_MEMORY`` where set, else CUDA's free memory, else Linux's MemAvailable
    (or, off Linux, physical memory)."""
    given = os.environ.get(FREE_ENV)
    if given:
        try:
            return parse_bytes(given)
        except ValueError as exc:
            raise ModelError(f"{FREE_ENV}={given!r}: {exc}") from exc
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class Estimate:
    """A job's peak: the weights, its largest step's extra bytes and (on the CPU) the process's own memory."""

    weights: int
    steps: dict[str, int]
    process: int

    @property
    def largest(self) -> str:
        return max(self.steps, key=self.steps.get)

    def peak(self, step: str | None = None) -> int:
        return self.process + self.weights + self.steps[step or self.largest]


def estimate(shape: ModelShape, rows: int, new_tokens: int, device: torch.device) -> Estimate:
    """The peak of each step of ``step_bytes`` for ``rows`` caption rows of ``new_tokens`` tokens on ``device``."""
    steps = step_bytes(shape, rows, new_tokens)
    weights = steps.pop("weights")
    return Estimate(weights, steps, resident_bytes() if device.type == "cpu" else 0)


def check(model_name: str, shape: ModelShape, rows: int, new_tokens: int, device: torch.device, rows_setting: str,
          dtype_setting: str | None) -> Estimate:
    """The job's ``Estimate``; ``NotEnoughMemory`` in one line where its peak exceeds what ``device`` has free, naming
    the settings that lower it: ``rows_setting`` (the caption rows' setting) where captions are the largest step, and
    ``dtype_setting`` (None where the model has none) while the weights are in float32."""
    est, free = estimate(shape, rows, new_tokens, device), free_bytes(device)
    if est.peak() <= free:
        return est
    lower = [f"{rows_setting} ({rows} rows)"] if est.largest == "captions" else []
    if dtype_setting and shape.value_bytes == 4:
        lower.append(f"{dtype_setting}=bfloat16 (float32 now)")
    lower = lower or ["the model's size"]
    raise NotEnoughMemory(
        f"model={model_name} needs about {est.peak() / GIB:.1f} GiB at its largest step ({est.largest}: weights "
        f"{est.weights / GIB:.1f} GiB + {est.steps[est.largest] / GIB:.1f} GiB"
        + (f" + this process's {est.process / GIB:.1f} GiB" if est.process else "")
        + f"), but {device.type} has {free / GIB:.1f} GiB free: lower {', '.join(lower)}, or run where more "
        f"memory is free ({FREE_ENV} overrides what knexp takes as free)")
