"""The GPU check (``make gpu-check``, ``python -m knexp.bench --only gpu``): knexp at real sizes, in bfloat16.

On a machine with CUDA it
1. runs the family tests (``tests/test_families.py``) on the GPU in bfloat16;
2. builds random-weight models at real shapes (LLaVA-1.5-7B, Qwen2.5-VL-7B, Gemma-3-4B: their vision towers and
   decoders at full size, the word-level test tokenizer) in bfloat16 on the GPU and measures for each the hook
   overhead (captions with zero-noise hooks on 64 units of every layer, against none), one sample's identification
   (seconds, and the peak GPU memory above the model's), and batched captions per second;
3. writes its section of BENCHMARKS.md.
Without CUDA it says so, measures nothing and leaves BENCHMARKS.md alone. The tests build the same three models at small
``Shape``s on the CPU and measure them, so the check's code runs in CI although no GPU does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from knexp.bench.timing import alternating
from knexp.paths import project_root

HEADING = "## GPU check: real shapes in bfloat16 (issue: any Hugging Face VLM)"
NO_GPU = ("no CUDA device on this machine: the GPU check measures nothing here (run it where "
          "`torch.cuda.is_available()`)")


@dataclass(frozen=True)
class Shape:
    """One real model's shape: its family, decoder (width, FFN width, layers, heads, key/value heads) and vision tower
    (width, FFN width, layers, heads), and the image size it sees."""

    name: str
    family: str
    width: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vision: tuple[int, int, int, int]
    image: int


SHAPES = [
    Shape("llava15_7b", "llava", 4096, 11008, 32, 32, 32, (1024, 4096, 24, 16), 336),
    Shape("qwen2_5_vl_7b", "qwen2_5_vl", 3584, 18944, 28, 28, 4, (1280, 3420, 32, 16), 448),
    Shape("gemma3_4b", "gemma3", 2560, 10240, 34, 8, 4, (1152, 4304, 27, 16), 896),
]


def build(shape: Shape, device: torch.device, dtype: torch.dtype):
    """A ``VLMAdapter`` on a random model of ``shape``, its weights made on ``device`` in ``dtype``."""
    from knexp.models.adapters.families import FAMILIES
    from knexp.models.adapters.vlm import VLMAdapter

    parts = {"llava": _llava_parts, "qwen2_5_vl": _qwen2_5_vl_parts}.get(shape.family, _gemma3_parts)
    tok, config, processor, model_class = parts(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(config).to(dtype)
    if shape.family == "gemma3":
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    return VLMAdapter(model.eval().requires_grad_(False), processor, FAMILIES[shape.family],
                      caption_prefix="the image shows", image_size=(shape.image, shape.image))


def _llava_parts(shape: Shape):
    """LLaVA-1.5's classes at ``shape``: (its tokenizer, config, processor, model class)."""
    import transformers
    from transformers import CLIPImageProcessorPil

    from knexp.models.tiny.tiny_builders import LLAVA15_TEMPLATE
    from knexp.models.tiny.tiny_models import word_tokenizer

    vw, vf, vl, vh = shape.vision
    tok = word_tokenizer()
    patch = 14
    vision = transformers.CLIPVisionConfig(hidden_size=vw, intermediate_size=vf, num_hidden_layers=vl,
                                           num_attention_heads=vh,
                                           image_size=shape.image, patch_size=patch, projection_dim=vw)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=shape.width, intermediate_size=shape.ffn,
                                    num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                    num_key_value_heads=shape.kv_heads, pad_token_id=tok.pad_token_id)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                                      image_seq_length=(shape.image // patch) ** 2,
                                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    images = CLIPImageProcessorPil(size={"shortest_edge": shape.image},
                                   crop_size={"height": shape.image, "width": shape.image})
    processor = transformers.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=patch,
                                            num_additional_image_tokens=1,
                                            vision_feature_select_strategy="default",
                                            chat_template=LLAVA15_TEMPLATE)
    model_class = transformers.LlavaForConditionalGeneration
    return tok, config, processor, model_class


def _qwen2_5_vl_parts(shape: Shape):
    """Qwen2.5-VL's classes at ``shape``: (its tokenizer, config, processor, model class)."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from knexp.models.adapters.vlm import without_video
    from knexp.models.tiny.tiny_builders import chat_template, mrope_sections
    from knexp.models.tiny.tiny_models import word_tokenizer

    vw, vf, vl, vh = shape.vision
    head_dim = shape.width // shape.heads
    tok = word_tokenizer(special={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                         markers=["<|vision_start|>", "<|vision_end|>"])
    patch = 14
    text = dict(vocab_size=len(tok), hidden_size=shape.width, intermediate_size=shape.ffn,
                num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, pad_token_id=tok.pad_token_id,
                rope_scaling={"rope_type": "default", "mrope_section": mrope_sections(head_dim)})
    vision = dict(depth=vl, hidden_size=vw, intermediate_size=vf, num_heads=vh, out_hidden_size=shape.width,
                  patch_size=patch,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=list(range(vl - 1, -1, -8))[::-1])
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    images = Qwen2VLImageProcessorPil(min_pixels=shape.image ** 2, max_pixels=shape.image ** 2, patch_size=patch,
                                      merge_size=2, temporal_patch_size=2)
    processor = without_video(transformers.Qwen2_5_VLProcessor)(
        image_processor=images, tokenizer=tok,
        chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    model_class = transformers.Qwen2_5_VLForConditionalGeneration
    return tok, config, processor, model_class


def _gemma3_parts(shape: Shape):
    """Gemma 3's classes at ``shape``: (its tokenizer, config, processor, model class)."""
    import transformers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from knexp.models.tiny.tiny_builders import chat_template
    from knexp.models.tiny.tiny_models import word_tokenizer

    vw, vf, vl, vh = shape.vision
    head_dim = shape.width // shape.heads
    tok = word_tokenizer(special={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                  "eoi_token": "<end_of_image>"})
    patch = 14
    tokens = 256 if shape.image == 896 else 4
    kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(shape.layers)]
    text = dict(vocab_size=len(tok), hidden_size=shape.width, intermediate_size=shape.ffn,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=1024,
                pad_token_id=tok.pad_token_id, layer_types=kinds)
    vision = dict(hidden_size=vw, intermediate_size=vf, num_hidden_layers=vl, num_attention_heads=vh,
                  image_size=shape.image, patch_size=patch)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                                       boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                                       eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                                       image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    images = Gemma3ImageProcessorPil(size={"height": shape.image, "width": shape.image})
    template = chat_template("<start_of_image>")
    processor = transformers.Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=template,
                                             image_seq_length=tokens)
    model_class = transformers.Gemma3ForConditionalGeneration
    return tok, config, processor, model_class


def measure(adapter, captions: int = 16, batch_size: int = 8, max_new_tokens: int = 32, units: int = 64,
            rounds: int = 2) -> dict:
    """Hook overhead, one sample's identification (seconds, peak extra GPU memory) and batched captions per second."""
    from knexp.bench.family_costs import _images, hooked_captions
    from knexp.identification.passes import compute_stats, locate_target
    from knexp.job.spec import default_catalog

    cuda = adapter.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    hooks = hooked_captions(adapter, _images(adapter, captions, 0), batch_size, units, rounds, max_new_tokens)
    h, w = adapter.image_size
    rng = np.random.default_rng(1)
    original, inpainted = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(2)]
    target = locate_target(adapter, "the image shows a bus.", adapter.caption_prefix, default_catalog()["bus"])
    compute_stats(adapter, original, inpainted, target)  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    sync()
    began = time.perf_counter()
    compute_stats(adapter, original, inpainted, target)
    sync()
    identify_s = time.perf_counter() - began
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
    pics = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(2 * captions)]
    def captions():
        return adapter.caption(pics, batch_size=2 * batch_size, max_new_tokens=max_new_tokens)

    median, _ = alternating({"captions": captions}, rounds)
    return {"hook_overhead": hooks["ratio"], "identification_s": round(identify_s, 3),
            "identification_extra_gib": None if peak is None else round(peak, 2),
            "captions_per_s": round(len(pics) / median["captions"], 2), "fast_paths": adapter.fast_paths}


def family_tests_on_gpu(timeout: int = 240) -> dict:
    """``tests/test_families.py`` on the GPU in bfloat16 (``KNEXP_TEST_DEVICE``, ``KNEXP_TEST_DTYPE``)."""
    env = {**os.environ, "KNEXP_TEST_DEVICE": "cuda", "KNEXP_TEST_DTYPE": "bfloat16", "HF_HUB_OFFLINE": "1"}
    began = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_families.py"],
                       cwd=project_root(), capture_output=True, text=True, timeout=timeout, env=env)
    tail = [line for line in r.stdout.splitlines() if line.strip()][-1:] or [r.stderr[-300:]]
    return {"returncode": r.returncode, "summary": tail[0], "seconds": round(time.perf_counter() - began, 1)}


def gpu_check() -> dict | None:
    """The check of the module docstring, or None (and a line saying so) without CUDA."""
    if not torch.cuda.is_available():
        print(NO_GPU)
        return None
    out = {"device": torch.cuda.get_device_name(0), "tests": family_tests_on_gpu(), "models": {}}
    for shape in SHAPES:
        began = time.perf_counter()
        adapter = build(shape, torch.device("cuda"), torch.bfloat16)
        built_s = time.perf_counter() - began
        out["models"][shape.name] = {**measure(adapter), "build_s": round(built_s, 1),
                                     "params_b": round(sum(p.numel() for p in adapter.model.parameters()) / 1e9, 2)}
        del adapter
        torch.cuda.empty_cache()
    return out


def gpu_markdown(r: dict) -> str:
    rows = [f"| `{name}` | {m['params_b']} | {'yes' if m['fast_paths'] else 'no'} | {m['hook_overhead']} | "
            f"{m['identification_s']} | "
            f"{m['identification_extra_gib']} | {m['captions_per_s']} |" for name, m in r["models"].items()]
    header = ("| model | parameters (billions) | fast paths | hook overhead | one sample's identification (s) "
              "| its peak extra GPU memory (GiB) | captions per second (batch 16, 32 tokens) |")
    return f"""{HEADING}

On {r['device']}: the family tests in bfloat16 on the GPU: {r['tests']['summary']} ({r['tests']['seconds']} s).
Random-weight models at real shapes (the test tokenizer, so the vocabulary is small), bfloat16 (`knexp.bench.gpu`):

{header}
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
