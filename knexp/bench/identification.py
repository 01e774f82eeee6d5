"""Identification benchmarks: cost against the bare passes, and peak extra memory at 7B activation shape.

cost: one sample on the embedded model. "Bare passes" are what any gradient method must run: a forward on
the inpainted image, and a forward plus a backward of y_c on the original (gradient w.r.t. the input
embeddings, no hooks). "Identification" is ``compute_stats`` followed by every method's ranking.

memory: LLaVA-1.5-7B's activation shape (32 layers x 576 image tokens x 11008 units) without the real
model: a random ``LlavaForConditionalGeneration`` with that FFN width and depth but a narrow residual
stream (64), in bfloat16. Each mode runs in a fresh subprocess and reports its peak RSS; the extra memory
of identification is peak(stats) - peak(bare). glibc's malloc raises its mmap threshold after large frees
and then keeps freed tensors resident, so RSS overstates live memory; the children therefore run with a
fixed ``MALLOC_MMAP_THRESHOLD_`` (freed tensors go back to the OS), and the default-allocator figure is
reported beside it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from knexp.bench.timing import alternating
from knexp.identification import methods as M
from knexp.identification.passes import Target, compute_stats
from knexp.models.decoding.prefix_cache import logits_after_prefix
from knexp.models.hooks.attach import gradient_anchor


def _bare_passes(adapter, original, inpainted, target: Target) -> None:
    prep_i = adapter.prepare([inpainted], continuations=[target.context])
    prep_o = adapter.prepare([original], continuations=[target.context])
    # what compute_stats computes, without its hooks: the tokens before the image cached, the head at t*
    with torch.no_grad():
        logits_after_prefix(adapter, prep_i, prep_i.last_position[:1])
    # differentiate w.r.t. the input embeddings (the embedded model is a spliced model: it has them)
    prep_o.inputs["inputs_embeds"] = prep_o.inputs["inputs_embeds"].detach().requires_grad_(True)
    with torch.enable_grad():
        logits_after_prefix(adapter, prep_o, prep_o.last_position[:1])[0, 0, target.token_id].backward()


def _all_methods(stats) -> None:
    a = float(torch.quantile(stats.diff_max.flatten().double(), 0.999))
    ref = M.ours(stats, a, 0.0)
    n = len(ref)
    for fn in (M.stage1_only, M.stage2_only):
        fn(stats, n)
    for variant in ("paper", "authors"):
        M.schwettmann(stats, n, variant)
        M.pan(stats, n, variant)
    M.random_matched(ref, stats.shape[1], 0)


def toy_sample(adapter, catalog):
    """One toy-world sample: (image, the image with its first object inpainted away, the object's knowledge, a caption
    naming it)."""
    from knexp.counterfactual.inpaint import inpaint, region_mask
    from knexp.data.toyworld.scenes import SceneOptions, make_scene

    scene = make_scene(catalog, np.random.default_rng([31, 5, 0]), SceneOptions(gap_px=8))
    obj = scene.objects[0]
    edited = inpaint(scene.image, region_mask(scene.image.shape[:2], bbox=obj.bbox, dilation=2), 3, "telea")
    return scene.image, edited, obj.knowledge, f"{adapter.caption_prefix} {obj.knowledge.indefinite}."


def identification_cost(repeats: int = 6) -> dict:
    from knexp.identification.passes import locate_target
    from knexp.job.session import session

    s = session("model=embedded", "logger=none")
    adapter = s.adapter
    image, edited, knowledge, caption = toy_sample(adapter, s.catalog)
    target = locate_target(adapter, caption, adapter.caption_prefix, knowledge)
    _bare_passes(adapter, image, edited, target)  # warm-up
    _all_methods(compute_stats(adapter, image, edited, target))
    def identification():
        return _all_methods(compute_stats(adapter, image, edited, target))

    median, _ = alternating({"bare": lambda: _bare_passes(adapter, image, edited, target),
                             "identification": identification}, repeats)
    b, i = median["bare"], median["identification"]
    return {"bare_s": round(b, 4), "identification_s": round(i, 4), "ratio": round(i / b, 4), "repeats": repeats,
            "target": "<= 1.3"}


# ---- memory at 7B activation shape -----------------------------------------------------------------------
def _seven_b_shaped():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from knexp.models.adapters.families import FAMILIES
    from knexp.models.adapters.vlm import VLMAdapter
    from knexp.models.tiny.tiny_builders import LLAVA15_TEMPLATE
    from knexp.models.tiny.tiny_models import word_tokenizer

    tok = word_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=2,
                       num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         image_seq_length=576, vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16).eval().requires_grad_(False)
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA15_TEMPLATE)
    return VLMAdapter(model, processor, FAMILIES["llava"], caption_prefix="the image shows")


def _memory_child(mode: str) -> None:
    """Run one mode and print its peak RSS (MiB) as JSON; called in a fresh subprocess."""
    torch.set_num_threads(2)
    adapter = _seven_b_shaped()
    rng = np.random.default_rng(0)
    original, inpainted = ((rng.random((336, 336, 3)) * 255).astype(np.uint8) for _ in range(2))
    target = Target(context=" a", token_id=adapter.tokenize(" bus")[0], word="bus")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    if mode == "bare":
        prep_i = adapter.prepare([inpainted], continuations=[target.context])
        prep_o = adapter.prepare([original], continuations=[target.context])
        with torch.no_grad():  # the passes compute_stats runs (the tokens before the image cached), without its hooks
            logits_after_prefix(adapter, prep_i, prep_i.last_position[:1])
        # the backward runs through every layer from a zero that requires grad at layer 0's input, compute_stats' own
        # anchor (the LLaVA adapter builds the prompt's embeddings without autograd)
        with torch.enable_grad(), gradient_anchor(adapter, prep_o):
            logits_after_prefix(adapter, prep_o, prep_o.last_position[:1])[0, 0, target.token_id].backward()
    else:
        stats = compute_stats(adapter, original, inpainted, target)
        assert stats.shape == (32, 11008)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "peak_mib": peak, "baseline_mib": before, "seconds": time.perf_counter() - t}))


def _peaks(env: dict) -> dict:
    runs = {}
    for mode in ("bare", "stats"):
        code = f"from knexp.bench.identification import _memory_child; _memory_child({mode!r})"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    return runs


def peak_memory_7b_shape() -> dict:
    fixed = _peaks({**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    default = _peaks({k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"})
    return {"shape": "32 layers x 576 image tokens x 11008 units (bfloat16)", "bare_peak_mib": round(fixed["bare"]),
            "identification_peak_mib": round(fixed["stats"]), "extra_mib": round(fixed["stats"] - fixed["bare"]),
            "extra_mib_default_malloc": round(default["stats"] - default["bare"]), "target": "<= 1024 MiB extra"}
