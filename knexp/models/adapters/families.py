"""The family table: what the generic adapter (``knexp.models.adapters.vlm``) needs to know of each Hugging Face
image-text model family, one row each (README, "Models and adapters").

A row names the transformers model and processor classes, the canonical input size (every image is resized to it, so
each row of a batch has the same image tokens), the layout of its image tokens (``layout``: which image-token slot
covers which pixel box, and which slots cover none), where its language model sits, and what knexp's fast paths may
assume of its decoder (``fast_paths``: a causal mask and 1-D positions), with the quirks the adapter must honour: a
norm after the FFN whose gain scales what a neuron writes (Gemma), bidirectional attention over the image (Gemma 3,
PaliGemma), vision features added after the first layers (Qwen3-VL's deepstack).

A new family is one row here, one yaml in ``conf/model/``, and a layout function where its layout is new. Mllama, which
puts no image token into the language model's sequence, is refused, and so, for now, are PaliGemma and Mistral 3
(``REFUSED`` says why).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from knexp.models.errors import ModelError
from knexp.models.geometry import PatchGeometry


@dataclass(frozen=True)
class Layout:
    """Where a family's image tokens sit: ``geometry`` over the slots that cover a patch, and ``keep`` (bool [S]) over
    every image-token slot of the prompt (False: a slot that covers no patch, such as LLaVA-NeXT's row newlines)."""

    geometry: PatchGeometry
    keep: np.ndarray


@dataclass(frozen=True)
class Family:
    """One row of the family table (module docstring)."""

    name: str
    model_class: str  # the transformers class, a ...ForConditionalGeneration
    processor_class: str  # the transformers processor class; knexp builds it without its video part
    image_size: tuple[int, int]  # canonical input (height, width) of the real models
    layout: Callable[..., Layout]  # (inputs of one canonical image, the model's config, the processor) -> Layout
    # a causal mask and 1-D positions: knexp's shared prefix, split prefill and decoding step are exact
    fast_paths: bool
    image_token: str = "image_token_id"  # the config attribute holding the image placeholder's id
    # the norm after the FFN in a decoder layer: its gain scales a neuron's write direction
    post_ffn_norm: str | None = None
    norm_offset: float = 0.0  # what the family's norms add to their weight to get their gain (Gemma: 1)
    # image tokens attend to each other both ways (token type ids at the prompt's pass)
    bidirectional_image: bool = False
    deepstack: bool = False  # vision features are added to the image positions after the first layers, between layers
    # processor outputs the model needs besides ids and pixels
    extra_inputs: tuple[str, ...] = field(default_factory=tuple)
    note: str = ""


def _grid_boxes(rows: int, cols: int, box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)) -> np.ndarray:
    """float [rows * cols, 4]: the row-major cells of a rows x cols grid over ``box`` (x0, y0, x1, y1 in [0, 1])."""
    x0, y0, x1, y1 = box
    t = np.arange(rows * cols)
    r, c = t // cols, t % cols
    w, h = (x1 - x0) / cols, (y1 - y0) / rows
    return np.stack([x0 + c * w, y0 + r * h, x0 + (c + 1) * w, y0 + (r + 1) * h], 1).astype(np.float32)


def square_grid(tokens: int) -> Layout:
    """``tokens`` image tokens on a square grid, row-major (Gemma 3's 16 x 16, PaliGemma's, one InternVL tile)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ModelError(f"{tokens} image tokens do not tile a square grid")
    return Layout(PatchGeometry.row_major(side, side), np.ones(tokens, bool))


def qwen_layout(inputs: dict, config, processor) -> Layout:
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``<|image_pad|>`` x (h * w / merge^2) for an image of t x h x w patches
    (``image_grid_thw``); token k is cell k of the merge x merge-merged grid, row-major."""
    t, h, w = (int(v) for v in inputs["image_grid_thw"][0])
    merge = int(getattr(processor.image_processor, "merge_size", 2))
    rows, cols = h // merge, w // merge
    return Layout(PatchGeometry.row_major(rows, cols), np.ones(rows * cols, bool))


def gemma3_layout(inputs: dict, config, processor) -> Layout:
    """Gemma 3: ``mm_tokens_per_image`` soft tokens (256 at full size) on a square grid."""
    return square_grid(int(config.mm_tokens_per_image))


def llava_layout(inputs: dict, config, processor) -> Layout:
    """LLaVA-1.5: the vision tower's (image_size / patch_size)^2 patches, row-major (CLIP's CLS dropped by the default
    feature strategy; with ``full`` it comes first and covers the whole image)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    grid = PatchGeometry.row_major(side, side)
    if config.vision_feature_select_strategy == "default":
        return Layout(grid, np.ones(side * side, bool))
    boxes = np.vstack([[0.0, 0.0, 1.0, 1.0], grid.boxes]).astype(np.float32)
    return Layout(PatchGeometry(boxes, None, np.array([1] + [0] * len(grid), np.int8)), np.ones(len(boxes), bool))


def _unpadded(rows: int, cols: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(first row, rows, first column, columns) of a rows x cols feature grid that LLaVA-NeXT keeps after removing the
    padding the processor added to fit an image of ``height`` x ``width`` into it (``unpad_image``'s arithmetic)."""
    if width / height > cols / rows:  # wider: padding above and below
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return pad, rows - 2 * pad, 0, cols
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return 0, rows, pad, cols - 2 * pad


def llava_next_layout(inputs: dict, config, processor) -> Layout:
    """LLaVA-NeXT and LLaVA-OneVision: the base image's grid (the whole image, coarse: view 1), then the unpadded hi-res
    tiles as one grid (view 0), each row ended by a newline slot that covers no patch (OneVision's ``anyres_max`` too,
    without pooling at knexp's canonical sizes)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    height, width = (int(v) for v in inputs["image_sizes"][0])
    tiles_h, tiles_w = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, vision.image_size)
    r0, rows, c0, cols = _unpadded(tiles_h * side, tiles_w * side, height, width)
    full_rows, full_cols = tiles_h * side, tiles_w * side
    base = _grid_boxes(side, side)
    fine = _grid_boxes(full_rows, full_cols).reshape(full_rows, full_cols, 4)[r0:r0 + rows, c0:c0 + cols].reshape(-1, 4)
    # the kept grid's boxes, renormalised from the padded tile grid to the image it holds
    span = np.array([c0 / full_cols, r0 / full_rows, (c0 + cols) / full_cols, (r0 + rows) / full_rows], np.float32)
    fine = (fine - span[[0, 1, 0, 1]]) / np.array([span[2] - span[0], span[3] - span[1]] * 2, np.float32)
    newline = np.zeros((rows, cols + 1), bool)
    newline[:, -1] = True
    keep = np.concatenate([np.ones(side * side, bool), ~newline.reshape(-1)])
    views = np.concatenate([np.ones(side * side, np.int8), np.zeros(rows * cols, np.int8)])
    return Layout(PatchGeometry(np.vstack([base, fine]).astype(np.float32), None, views), keep)


def idefics3_layout(inputs: dict, config, processor) -> Layout:
    """Idefics3 and SmolVLM: the image split into rows x cols tiles (``<row_i_col_j>`` markers in the prompt), each an
    n x n grid of tokens (after the pixel shuffle), row-major, the tiles in reading order (view 0), then the whole
    image resized, n x n (view 1)."""
    ids = inputs["input_ids"][0].tolist()
    tokenizer = processor.tokenizer
    marks = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    tiles = [m for m in marks if isinstance(m, str) and m.startswith("<row_")]
    per = int(processor.image_seq_len)
    n = math.isqrt(per)
    image_id = int(config.image_token_id)
    slots = sum(i == image_id for i in ids)
    if not tiles:  # a single image with no tiles: the global view alone
        return Layout(PatchGeometry(_grid_boxes(n, n), None), np.ones(slots, bool))
    rows = max(int(t.split("_")[1]) for t in tiles)
    cols = max(int(t.split("_")[3].rstrip(">")) for t in tiles)
    boxes = [_grid_boxes(n, n,
                         (c / cols, r / rows, (c + 1) / cols,
                          (r + 1) / rows)) for r in range(rows) for c in range(cols)]
    boxes.append(_grid_boxes(n, n))
    views = np.concatenate([np.zeros(rows * cols * per, np.int8), np.ones(per, np.int8)])
    return Layout(PatchGeometry(np.vstack(boxes).astype(np.float32), None, views), np.ones(slots, bool))


def internvl_layout(inputs: dict, config, processor) -> Layout:
    """InternVL: 16 x 16 tokens per 448 px tile (after the pixel shuffle); knexp's canonical size is one tile (no
    thumbnail: InternVL adds one only when it splits the image)."""
    ids = inputs["input_ids"][0]
    return square_grid(int((ids == int(config.image_token_id)).sum()))


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", (448, 448), qwen_layout,
           fast_paths=False, extra_inputs=("image_grid_thw", "mm_token_type_ids"),
           note="multimodal RoPE (3 x B x T positions, the text after the image offset by rope_deltas): the model's "
                "own forward and generate"),
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", (448, 448), qwen_layout, fast_paths=False,
           extra_inputs=("image_grid_thw", "mm_token_type_ids"), note="as Qwen2.5-VL"),
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", (448, 448), qwen_layout, fast_paths=False,
           deepstack=True, extra_inputs=("image_grid_thw", "mm_token_type_ids"),
           note="multimodal RoPE, and deepstack: vision features are added to the image positions after the first "
                "layers, so the residual entering layer l + 1 is not layer l's output there"),
    Family("gemma3", "Gemma3ForConditionalGeneration", "Gemma3Processor", (896, 896), gemma3_layout, fast_paths=False,
           post_ffn_norm="post_feedforward_layernorm", norm_offset=1.0, bidirectional_image=True,
           extra_inputs=("token_type_ids",),
           note="bidirectional attention over the image at the prompt's pass (token_type_ids), sliding-window layers, "
                "a norm after the FFN"),
    Family("llava", "LlavaForConditionalGeneration", "LlavaProcessor", (336, 336), llava_layout, fast_paths=True,
           note="LLaVA-1.5: CLIP, a projector, a LLaMA decoder"),
    Family("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextProcessor", (672, 672), llava_next_layout,
           fast_paths=True,
           extra_inputs=("image_sizes",), note="anyres tiles beside the base image; a newline slot ends each row"),
    Family("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor", (768, 768),
           llava_next_layout,
           fast_paths=True, extra_inputs=("image_sizes",), note="as LLaVA-NeXT, with a Qwen2 decoder"),
    Family("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Processor", (728, 728), idefics3_layout,
           fast_paths=True, note="tiles with <row_i_col_j> markers, then the global image"),
    Family("smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMProcessor", (768, 768), idefics3_layout,
           fast_paths=True, note="Idefics3's layout, a smaller decoder"),
    Family("internvl", "InternVLForConditionalGeneration", "InternVLProcessor", (448, 448), internvl_layout,
           fast_paths=True, note="one 448 px tile at the canonical size"),
]}

REFUSED = {
    "mllama": "Mllama (Llama 3.2 Vision) cross-attends to the image from separate layers: no image token sits in the "
              "language model's sequence, so there are no image positions for knexp's neurons to act at",
    "paligemma": "not yet: PaliGemma's processor appends a newline after the prompt, so a caption prefix cannot open "
                 "the model's answer, and its prefix-LM attention needs the prefix told apart from the answer (README)",
    "mistral3": "not yet: transformers' PixtralProcessor imports its torchvision image processor, and torchvision does "
                "not load beside knexp's CPU torch, so no tiny Mistral 3 could be tested here (README)",
}


def family(name: str) -> Family:
    """The row for ``name``, or a one-line error: the families knexp knows, or why one is refused."""
    if name in REFUSED:
        raise ModelError(f"model.family={name!r} is not supported: {REFUSED[name]}")
    if name not in FAMILIES:
        raise ModelError(f"model.family={name!r} is unknown; knexp knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def image_slots(inputs: dict, image_token_id: int) -> int:
    """How many image-token slots the first row of processed ``inputs`` holds."""
    return int((torch.as_tensor(inputs["input_ids"][0]) == image_token_id).sum())
