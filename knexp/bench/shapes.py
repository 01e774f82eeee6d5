"""Random-weight models at the real shapes of published VLMs, for the checks that measure knexp at real size: the real
shapes on the CPU (``knexp.bench.real_shapes``, ``make real-shapes``) and the GPU check (``knexp.bench.gpu``).

Each ``Shape`` gives a model's decoder (width, FFN width, layers, heads, key/value heads, head width), vision tower
(width, FFN width, layers, heads), image size, vocabulary and whether the head shares the embedding's weights. The
tokenizer is the tests' word-level one, padded with filler words (``v0``, ``v1``, ...) to the real vocabulary, so
the embedding, the head and every logit have their real size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """One real model's shape (module docstring)."""

    name: str
    family: str
    width: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vision: tuple[int, int, int, int]
    image: int
    vocab: int | None = None  # None: the word tokenizer's own (a few hundred)
    head_dim: int | None = None  # None: width // heads
    tie: bool = False  # the head shares the embedding's weights

    @property
    def head_width(self) -> int:
        return self.head_dim or self.width // self.heads


# the GPU check's models: their configs on the Hugging Face hub (config.json of each checkpoint)
SHAPES = [
    Shape("llava15_7b", "llava", 4096, 11008, 32, 32, 32, (1024, 4096, 24, 16), 336, vocab=32064),
    Shape("qwen2_5_vl_7b", "qwen2_5_vl", 3584, 18944, 28, 28, 4, (1280, 3420, 32, 16), 448, vocab=152064),
    Shape("gemma3_4b", "gemma3", 2560, 10240, 34, 8, 4, (1152, 4304, 27, 16), 896, vocab=262208, head_dim=256,
          tie=True),
]
# the two that fit a 24 GiB machine in float32 (``make real-shapes``)
CPU_SHAPES = [
    SHAPES[2],
    Shape("qwen2_5_vl_3b", "qwen2_5_vl", 2048, 11008, 36, 16, 2, (1280, 3420, 32, 16), 448, vocab=151936, tie=True),
]


def build(shape: Shape, device: torch.device, dtype: torch.dtype):
    """A ``VLMAdapter`` on a random model of ``shape``, its weights made on ``device`` in ``dtype``."""
    from knexp.models.adapters.families import FAMILIES
    from knexp.models.adapters.vlm import VLMAdapter

    parts = {"llava": _llava_parts, "qwen2_5_vl": _qwen2_5_vl_parts}.get(shape.family, _gemma3_parts)
    tok, config, processor, model_class = parts(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
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

    vw, vf, vl, vh = shape.vision
    tok = _padded(shape.vocab)
    patch = 14
    vision = transformers.CLIPVisionConfig(hidden_size=vw, intermediate_size=vf, num_hidden_layers=vl,
                                           num_attention_heads=vh,
                                           image_size=shape.image, patch_size=patch, projection_dim=vw)
    text = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=shape.width, intermediate_size=shape.ffn,
                                    num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                    num_key_value_heads=shape.kv_heads, pad_token_id=tok.pad_token_id,
                                    tie_word_embeddings=shape.tie)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, tie_word_embeddings=shape.tie,
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

    from knexp.models.adapters.processors import without_video
    from knexp.models.tiny.tiny_builders import chat_template, mrope_sections

    vw, vf, vl, vh = shape.vision
    head_dim = shape.head_width
    tok = _padded(shape.vocab, special={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                  markers=["<|vision_start|>", "<|vision_end|>"])
    patch = 14
    text = dict(vocab_size=len(tok), hidden_size=shape.width, intermediate_size=shape.ffn,
                num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=shape.tie,
                rope_scaling={"rope_type": "default", "mrope_section": mrope_sections(head_dim)})
    vision = dict(depth=vl, hidden_size=vw, intermediate_size=vf, num_heads=vh, out_hidden_size=shape.width,
                  patch_size=patch,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=list(range(vl - 1, -1, -8))[::-1])
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape.tie, **ids)
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

    vw, vf, vl, vh = shape.vision
    head_dim = shape.head_width
    tok = _padded(shape.vocab, special={"image_token": "<image_soft_token>",
                                                        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    patch = 14
    tokens = 256 if shape.image == 896 else 4
    kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(shape.layers)]
    text = dict(vocab_size=len(tok), hidden_size=shape.width, intermediate_size=shape.ffn,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=1024,
                pad_token_id=tok.pad_token_id, layer_types=kinds, tie_word_embeddings=shape.tie)
    vision = dict(hidden_size=vw, intermediate_size=vf, num_hidden_layers=vl, num_attention_heads=vh,
                  image_size=shape.image, patch_size=patch)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens,
                                       boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                                       eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                                       image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
                                       tie_word_embeddings=shape.tie)
    images = Gemma3ImageProcessorPil(size={"height": shape.image, "width": shape.image})
    template = chat_template("<start_of_image>")
    processor = transformers.Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=template,
                                             image_seq_length=tokens)
    model_class = transformers.Gemma3ForConditionalGeneration
    return tok, config, processor, model_class




def _padded(vocab: int | None, **kwargs):
    """``word_tokenizer(**kwargs)`` with filler words added up to ``vocab`` entries (None: as it is)."""
    from knexp.models.tiny.tiny_models import word_tokenizer

    tok = word_tokenizer(**kwargs)
    if vocab is None or vocab == len(tok):
        return tok
    if vocab < len(tok):
        raise ValueError(f"a vocabulary of {vocab} is smaller than the word tokenizer's {len(tok)}")
    return word_tokenizer(extra_words=[f"v{i}" for i in range(vocab - len(tok))], **kwargs)
