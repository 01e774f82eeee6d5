"""Tiny randomly initialised models of the real classes, so tests run in seconds on a CPU.

``tiny_llava``: a transformers ``LlavaForConditionalGeneration`` (CLIP vision tower, 2-layer MLP
projector, LLaMA decoder) with a word-level tokenizer and a real ``LlavaProcessor``. CLIP adds a CLS
token, so the processor needs ``num_additional_image_tokens=1``; with ``vision_feature_select_strategy
="default"`` the CLS is dropped and the image span is the (grid x grid) patches, row-major, as in
LLaVA-1.5 (24 x 24 at full size).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from knexp.models.adapters.spliced import SplicedAdapter
from knexp.settings import Device, Integer, takes

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>",
            "<|im_start|>", "<|im_end|>", "<|endoftext|>", "[INST]", "[/INST]", "<Img>", "</Img>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "user assistant system : the image show shows a an and of pair what does this describe is there in on with "
    "empty scene . , ? USER ASSISTANT"
).split()
# The word forms of the 30 catalog objects (conf/knowledge), written out: a tiny model's vocabulary, and so its random
# weights, stay the same whatever a user's catalog says.
OBJECT_WORDS = (
    "bicycles bicycle bikes bike a aeroplanes airplanes aeroplane airplane aircraft planes plane jets jet an busses "
    "buses "
    "coach bus traffic signals lights signal light stoplights stoplight fire hydrants hydrant stop signs sign horses "
    "ponies "
    "horse pony teddy bear grizzly bears giraffes giraffe backpacks rucksacks backpack rucksack umbrellas umbrella "
    "suitcases "
    "suitcase luggage snow boards snowboards board snowboard surf surfboards surfboard tennis rackets racket racquets "
    "racquet bananas banana pizzas pizza birthday cake cakes beds bed toilets toilet notebook computer laptops laptop "
    "keyboards "
    "keyboard mobile phone cell phones smartphones cellphones smartphone cellphone microwave oven microwaves toasters "
    "toaster refrigerators refrigerator fridges fridge books book clocks clock vases vase pair of scissors"
).split()


def word_tokenizer(extra_words: list[str] | None = None, special: dict[str, str] | None = None,
                   markers: list[str] | None = None):
    """A PreTrainedTokenizerFast over whitespace/punctuation-split words (``WORDS``, ``OBJECT_WORDS`` and
    ``extra_words``). ``special``: the named special tokens a family's processor reads (default ``image_token``:
    ``<image>``); ``markers``: more tokens split out before word splitting (a family's image and chat markers)."""
    from transformers import PreTrainedTokenizerFast

    special = {"image_token": "<image>", **(special or {})}
    markers = list(dict.fromkeys([*SPECIALS[5:], *special.values(), *(markers or [])]))
    words = WORDS + OBJECT_WORDS + list(extra_words or [])
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIALS + markers + words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens=special,
    )
    fast.add_tokens(markers, special_tokens=True)  # chat and image markers, split out before word splitting
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_llava(grid: int = 4, patch_size: int = 8, hidden: int = 32, intermediate: int = 64, layers: int = 2,
               seed: int = 0):
    """(model, processor) of a random LLaVA whose image span is ``grid * grid`` tokens."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_tokenizer()
    image_size = grid * patch_size
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                              num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=grid * grid, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def tiny_embedded(hidden: int = 32, intermediate: int = 64, layers: int = 3, seed: int = 0):
    """The embedded MLLM's classes at toy size: random EfficientNet-Lite0, linear projector, tiny LLaMA."""
    from efficientnet_lite_pytorch import EfficientNet

    from knexp.models.zoo.embedded import EmbeddedMLLM, PromptConfig, build_projector

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    vision = EfficientNet.from_name("efficientnet-lite0").eval().requires_grad_(False)
    for conv in vision.modules():  # torch's default init shrinks the signal ~50 layers down to ~1e-8: two images then
        if isinstance(conv, torch.nn.Conv2d):  # differ only in rounding noise, which depends on the CPU's kernels
            torch.nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    lm = tiny_lm(tokenizer, hidden, intermediate, layers, eos="<|im_end|>")
    prompt = PromptConfig(system="describe", user="<image>\nwhat does this image show?",
                          caption_prefix="the image shows")
    return EmbeddedMLLM(vision, build_projector("linear", 0, hidden), lm, tokenizer, prompt)


def tiny_lm(tokenizer, hidden: int = 32, intermediate: int = 64, layers: int = 3, eos: str = "</s>"):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.convert_tokens_to_ids(eos))
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def tiny_minigpt4(layers: int = 3, seed: int = 0):
    """MiniGPT-4's classes at toy size: a 2-block EVA ViT on 56 px (8 x 8 patches -> 16 tokens of 1 x 4 strips)."""
    from knexp.models.zoo.minigpt4 import EvaConfig, MiniGPT4

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    eva = EvaConfig(img_size=56, patch_size=7, dim=16, depth=2, heads=2, mlp_hidden=32)
    model = MiniGPT4(eva, tiny_lm(tokenizer, layers=layers), tokenizer, caption_prefix="the image shows",
                     image_token="<image>")
    for p in model.visual_encoder.parameters():  # a random but not degenerate encoder
        torch.nn.init.normal_(p, std=0.2)
    return model.eval().requires_grad_(False)


@takes(layers=Integer(low=1), seed=Integer(low=0), device=Device())
def load_tiny_minigpt4(model_cfg: dict, device: torch.device, cache_dir: Path):
    """``model=tiny_minigpt4``."""
    return SplicedAdapter(tiny_minigpt4(layers=model_cfg["layers"], seed=model_cfg["seed"]).to(device))


load_tiny_minigpt4.without_weights = load_tiny_minigpt4  # a tiny model costs nothing to build: the check reads it
