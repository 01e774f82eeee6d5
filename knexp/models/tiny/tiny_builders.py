"""The builders of the tiny random models of every family of the generic adapter (``knexp.models.adapters.vlm``):
each family's real transformers classes at toy size (a vision tower of one or two blocks, a decoder of a few layers 32
wide) with the word-level tokenizer of ``knexp.models.tiny.tiny_models``, the family's image and chat markers added, and
its real processor (the PIL image processor, no video part) at a small canonical image size. ``knexp.models.tiny.
tiny_vlm`` puts them in a table and an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knexp.models.adapters.processors import without_video
from knexp.models.tiny.tiny_models import word_tokenizer


@dataclass(frozen=True)
class Size:
    """The decoder's width and heads (its FFN is twice as wide): 32 and 2 for the tests, 512 and 8 for the bench's
    mid-size models (``knexp.bench.family_costs``)."""

    width: int = 32
    heads: int = 2

    @property
    def ffn(self) -> int:
        return 2 * self.width


TINY_SIZE = Size()


def chat_template(image: str) -> str:
    """A ChatML chat template whose user turn shows ``image`` where the image goes (the family's own marker)."""
    return ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image + "{% else %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _text(tok, layers: int, size: Size, **extra) -> dict:
    """A decoder config of ``size`` for ``tok``'s vocabulary; ``<|im_end|>`` ends a caption."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return dict(vocab_size=len(tok), hidden_size=size.width, intermediate_size=size.ffn, num_hidden_layers=layers,
                num_attention_heads=size.heads, num_key_value_heads=size.heads, max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id, eos_token_id=end,
                bos_token_id=tok.bos_token_id, **extra)


def _finish(model, tok):
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval().requires_grad_(False)


def mrope_sections(head_dim: int) -> list[int]:
    """Qwen's multimodal RoPE sections (time, height, width) for ``head_dim``: they sum to head_dim / 2."""
    half = head_dim // 2
    side = half // 4 + half // 8
    return [half - 2 * side, side, side]


def qwen(version: str, layers: int, size: Size):
    """Qwen2-VL, Qwen2.5-VL or Qwen3-VL: 112 px images, 14 px patches (16 for Qwen3-VL) merged 2 x 2."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = word_tokenizer(special={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                         markers=["<|vision_start|>", "<|vision_end|>"])
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    patch = 16 if version == "3" else 14
    pixels = 8 * patch
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=size.width,
                  patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    head_dim = size.width // size.heads
    rope = {"rope_type": "default", "mrope_section": mrope_sections(head_dim)}
    if version == "2.5":
        vision |= dict(fullatt_block_indexes=[1], window_size=4 * patch)
        config_class, processor_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLProcessor
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
        text = _text(tok, layers, size, rope_scaling=rope)
    elif version == "2":
        vision = dict(depth=2, embed_dim=16, hidden_size=size.width, mlp_ratio=2, num_heads=2, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config_class, processor_class = transformers.Qwen2VLConfig, transformers.Qwen2VLProcessor
        model_class = transformers.Qwen2VLForConditionalGeneration
        text = _text(tok, layers, size, rope_scaling=rope)
    else:
        vision |= dict(num_position_embeddings=64, deepstack_visual_indexes=[0])
        config_class, processor_class = transformers.Qwen3VLConfig, transformers.Qwen3VLProcessor
        model_class = transformers.Qwen3VLForConditionalGeneration
        text = _text(tok, layers, size, head_dim=head_dim, rope_scaling={**rope, "mrope_interleaved": True})
    config = config_class(text_config=text, vision_config=vision, **ids)
    images = Qwen2VLImageProcessorPil(min_pixels=pixels * pixels, max_pixels=pixels * pixels, patch_size=patch,
                                      merge_size=2, temporal_patch_size=2)
    processor = without_video(processor_class)(image_processor=images, tokenizer=tok,
                                               chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    return _finish(model_class(config), tok), processor, (pixels, pixels)


def gemma3(layers: int, size: Size):
    """Gemma 3: 56 px images, SigLIP's 14 px patches pooled to 2 x 2 soft tokens; sliding-window layers (window 8)
    beside global ones, bidirectional attention over the image."""
    import transformers
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = word_tokenizer(special={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                  "eoi_token": "<end_of_image>"})
    text = _text(tok, layers, size, head_dim=size.width // size.heads, query_pre_attn_scalar=size.width // size.heads,
                 sliding_window=8,
                 layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                                       eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                                       image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    processor = transformers.Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 56, "width": 56}),
                                             tokenizer=tok,
                                             chat_template=chat_template("<start_of_image>"), image_seq_length=4)
    model = transformers.Gemma3ForConditionalGeneration(config)
    # its init is all zeros
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    return _finish(model, tok), processor, (56, 56)


LLAVA15_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: "
                    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                    "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endif %}{% endfor %}"
                    # LLaVA-1.5's USER: <image>\n{question} ASSISTANT:
                    "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def llava(layers: int, size: Size):
    """LLaVA-1.5: the tiny LLaVA of ``knexp.models.tiny.tiny_models`` (CLIP on 32 px, 4 x 4 patches; a LLaMA decoder),
    with LLaVA-1.5's prompt as its chat template."""
    from knexp.models.tiny.tiny_models import tiny_llava

    model, processor = tiny_llava(grid=4, hidden=size.width, intermediate=size.ffn, layers=layers,
                                  seed=int(torch.initial_seed()))
    processor.chat_template = LLAVA15_TEMPLATE
    return model, processor, (32, 32)


def llava_next(kind: str, layers: int, size: Size):
    """LLaVA-NeXT (a LLaMA decoder) or LLaVA-OneVision (a Qwen2 decoder): CLIP or SigLIP on 32 px tiles of 4 x 4
    patches, a 64 px image as 2 x 2 tiles beside the base image, each row of tiles' features ended by a newline."""
    import transformers

    tok = word_tokenizer(special={"image_token": "<image>", "video_token": "<video>"})
    text = _text(tok, layers, size)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    image_id = tok.convert_tokens_to_ids("<image>")
    if kind == "next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
        config = transformers.LlavaNextConfig(vision_config=vision, text_config=transformers.LlamaConfig(**text),
                                              image_token_index=image_id, image_grid_pinpoints=pinpoints,
                                              vision_feature_select_strategy="default", vision_feature_layer=-2)
        images = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                            image_grid_pinpoints=pinpoints)
        template = chat_template("<image>")
        processor = transformers.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=8,
                                                    vision_feature_select_strategy="default",
                                                    num_additional_image_tokens=1, chat_template=template)
        return _finish(transformers.LlavaNextForConditionalGeneration(config), tok), processor, (64, 64)
    from transformers.models.llava_onevision import image_processing_pil_llava_onevision as pil

    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=transformers.Qwen2Config(**text),
                                               image_token_index=image_id,
                                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                                               image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
                                               vision_feature_layer=-1)
    images = pil.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = without_video(transformers.LlavaOnevisionProcessor)(
        image_processor=images, tokenizer=tok, chat_template=chat_template("<image>"), num_image_tokens=16,
        vision_feature_select_strategy="full")
    return _finish(transformers.LlavaOnevisionForConditionalGeneration(config), tok), processor, (64, 64)


def idefics3(kind: str, layers: int, size: Size):
    """Idefics3 or SmolVLM: 32 px tiles of 4 x 4 patches, pixel-shuffled 2 x 2 to 4 tokens each; a 64 px image as
    2 x 2 tiles (``<row_i_col_j>`` markers) and the global image."""
    import transformers

    markers = ["<fake_token_around_image>", "<end_of_utterance>", "<global-img>"] + [
        f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = word_tokenizer(special={"image_token": "<image>", "video_token": "<video>",
                                  "fake_image_token": "<fake_token_around_image>",
                                  "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
                         markers=markers)
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    if kind == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        config = transformers.Idefics3Config(vision_config=vision, text_config=_text(tok, layers, size), scale_factor=2,
                                             image_token_id=image_id)
        processor = transformers.Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**sizes), tokenizer=tok,
                                                   image_seq_len=4, chat_template=chat_template("<image>"))
        return _finish(transformers.Idefics3ForConditionalGeneration(config), tok), processor, (64, 64)
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    config = transformers.SmolVLMConfig(vision_config=vision, text_config=_text(tok, layers, size), scale_factor=2,
                                        image_token_id=image_id)
    processor = without_video(transformers.SmolVLMProcessor)(
        image_processor=SmolVLMImageProcessorPil(**sizes), tokenizer=tok, image_seq_len=4,
        chat_template=chat_template("<image>"))
    return _finish(transformers.SmolVLMForConditionalGeneration(config), tok), processor, (64, 64)


def internvl(layers: int, size: Size):
    """InternVL: one 32 px tile of 4 x 4 patches, pixel-shuffled to 2 x 2 tokens between ``<img>`` and ``</img>``; a
    Qwen2 decoder."""
    import transformers
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = word_tokenizer(special={"image_token": "<IMG_CONTEXT>", "context_image_token": "<IMG_CONTEXT>",
                                  "start_image_token": "<img>", "end_image_token": "</img>", "video_token": "<video>"})
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=[32, 32],
                  patch_size=[8, 8])
    # untied head: with random tied embeddings the argmax repeats the prompt's last word for ever
    text = transformers.Qwen2Config(**_text(tok, layers, size), tie_word_embeddings=False)
    image_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    config = transformers.InternVLConfig(vision_config=vision, image_token_id=image_token_id, text_config=text,
                                         image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=False)
    processor = without_video(transformers.InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False),
        tokenizer=tok, image_seq_length=4, chat_template=chat_template("<IMG_CONTEXT>"))
    return _finish(transformers.InternVLForConditionalGeneration(config), tok), processor, (32, 32)
