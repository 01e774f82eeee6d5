"""The generic adapter for Hugging Face image-text models whose image tokens sit in the language model's sequence.

One ``VLMAdapter`` serves every family of the family table (``knexp.models.adapters.families``): Qwen2-VL, Qwen2.5-VL
and Qwen3-VL, Gemma 3, LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision, Idefics3 and SmolVLM, and InternVL (the table
refuses PaliGemma and Mistral 3 for now, and says why). What differs between them is in the family's row: the
classes, the canonical input size, the layout of the image tokens, where the language model sits, and what knexp's fast
paths may assume.

* **Prompts** come from the processor's chat template (a user turn holding the image and the question, then the
  assistant's turn opened with the caption prefix), so each model gets its own markers.
* **Images** are resized to the family's canonical size (``model.image_size`` changes it), so every row of a batch
  holds the same image tokens and P is fixed: the layout is computed once, from a canonical image.
* **Image positions** are the slots of the image token's id that cover a patch (a newline slot does not).
* **The prompt's embeddings** (for the fast paths) are what the model itself gives its language model: a hook on the
  language model's input catches them, and the model's forward stops there.
* **A family without fast paths** (multimodal RoPE, bidirectional image attention, a prefix LM) runs the model's own
  forward for identification and its own ``generate`` for captions, under the same hooks.
* **What a neuron writes** (``w_out``): ``down_proj``'s column, scaled by the gain of a norm that follows the FFN
  (Gemma's ``post_feedforward_layernorm``), since that norm's gain multiplies every write into the residual stream.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import nn

from knexp.models.adapters.adapter import GREEDY, LLAMA_SITES, Adapter
from knexp.models.adapters.families import FAMILIES, Family, Layout, family
from knexp.models.adapters.processors import load_processor
from knexp.models.errors import ModelError, ModelWeightsMissing
from knexp.models.prepared import Prepared, image_positions_from_ids, last_positions
from knexp.settings import DTYPES, Choice, Device, Fields, Flag, Integer, Many, SettingError, Text, takes


class _Caught(Exception):
    """Raised by the hook that catches the language model's input embeddings: the rest of the forward is not needed."""


class VLMAdapter(Adapter):
    sites = LLAMA_SITES  # every family's language-model MLP is down_proj(act_fn(gate_proj(x)) * up_proj(x))

    def __init__(self, model: nn.Module, processor, family: Family, question: str = "What does this image show?",
                 caption_prefix: str = "The image shows", image_size: tuple[int, int] | None = None):
        self._model, self.processor, self.family = model.eval(), processor, family
        self.question, self.caption_prefix = question, caption_prefix
        self.image_size = tuple(image_size or family.image_size)
        self.fast_paths = family.fast_paths
        self.processor.tokenizer.padding_side = "left"
        self.image_token_id = int(getattr(model.config, family.image_token))
        canonical = self._processed([self._blank()], [self.prompt_text(caption_prefix)])
        self.layout: Layout = family.layout(canonical, model.config, processor)
        self.geometry = self.layout.geometry
        self._slots = len(self.layout.keep)
        self._keep = torch.as_tensor(self.layout.keep)
        self._canonical = (int(canonical["input_ids"].shape[1]), tuple(canonical["pixel_values"].shape))
        slots = int((canonical["input_ids"][0] == self.image_token_id).sum())
        if slots != self._slots or int(self.layout.keep.sum()) != len(self.geometry):
            raise ModelError(f"{family.name}: at model.image_size={list(self.image_size)} the prompt holds {slots} "
                             f"image tokens but the family's layout expects {self._slots}; choose another "
                             f"model.image_size (the family's canonical size is {list(family.image_size)})")

    # ---- structure ---------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def _lm(self) -> nn.Module:
        """The decoder stack (layers, norm, rotary embedding): ``get_decoder()``, wherever the family keeps it."""
        return self._model.get_decoder()

    def decoder_layers(self) -> list[nn.Module]:
        return list(self._lm().layers)

    def unembedding(self) -> torch.Tensor:
        return self._model.lm_head.weight

    def final_norm(self) -> nn.Module:
        return self._lm().norm

    def language_model(self) -> tuple[nn.Module, nn.Module]:
        return self._lm(), self._model.lm_head

    def w_out(self, layer: int) -> torch.Tensor:
        """W_out^l [d_model, d_f], each column scaled by the gain of the norm after the FFN where the family has one."""
        weight, gain = self.down_proj(layer).weight, self.write_gain(layer)
        return weight if gain is None else weight * gain[:, None].to(weight.dtype)

    def write_gain(self, layer: int) -> torch.Tensor | None:
        block = self.decoder_layers()[layer]
        if self.family.post_ffn_norm is None or not hasattr(block, self.family.post_ffn_norm):
            return None
        norm = block.get_submodule(self.family.post_ffn_norm)
        return norm.weight.float() + self.family.norm_offset  # Gemma's norms scale by (1 + weight)

    @property
    def stop_token_ids(self) -> list[int]:
        eos = self._model.generation_config.eos_token_id
        ids = [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None]
        return ids or [int(self.tokenizer.eos_token_id)]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.stop_token_ids[0])

    def prompt_length(self) -> int:
        return self._canonical[0]

    def vision_shape(self) -> tuple[int, int, int]:
        """(positions per image, width, FFN width) of the vision tower: positions from the processor's pixels (patches
        of every crop, or the rows of a patch list such as Qwen's), widths from ``config.vision_config``."""
        vision = getattr(self._model.config, "vision_config", None)
        if vision is None:
            return 0, 0, 0
        pixels = self._canonical[1]
        patch = getattr(vision, "patch_size", 14)
        patch = patch[0] if isinstance(patch, list | tuple) else patch
        crops = int(np.prod(pixels[1:-3])) if len(pixels) > 4 else 1
        positions = pixels[0] if len(pixels) == 2 else crops * (pixels[-2] // patch) * (pixels[-1] // patch)
        width = int(getattr(vision, "embed_dim", None) or getattr(vision, "hidden_size", 0))  # Qwen2-VL: embed_dim
        ffn = getattr(vision, "intermediate_size", None) or width * getattr(vision, "mlp_ratio", 4)
        return int(positions), width, int(ffn)

    # ---- inputs ------------------------------------------------------------------------------------
    def _blank(self) -> np.ndarray:
        return np.full((*self.image_size, 3), 127, np.uint8)

    def prompt_text(self, prefix: str, question: str | None = None) -> str:
        """The chat template's user turn with the image and the question (``question``, default the model's), then the
        assistant's turn opened by ``prefix``."""
        text = self.question if question is None else question
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(turn, add_generation_prompt=True, tokenize=False) + prefix

    def _sized(self, image: np.ndarray) -> np.ndarray:
        h, w = self.image_size
        return image if image.shape[:2] == (h, w) else cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)

    def _processed(self, images: list[np.ndarray], texts: list[str]) -> dict:
        images = [[self._sized(im)] for im in images]  # one image per prompt, nested as every processor reads it
        return dict(self.processor(images=images, text=texts, return_tensors="pt", padding=True))

    def prepare(self, images: list[np.ndarray], continuations: list[str] | None = None, prefix: str | None = None,
                question: str | None = None) -> Prepared:
        prefix = self.caption_prefix if prefix is None else prefix
        base = self.prompt_text(prefix, question)
        texts = [base + c for c in continuations] if continuations else [base] * len(images)
        if len(texts) != len(images):
            raise ValueError(f"{len(images)} images but {len(texts)} continuations")
        processed = self._processed(images, texts)
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in processed.items()}
        inputs = {k: v.to(self._model.dtype) if k == "pixel_values" else v for k, v in inputs.items()}
        ids = inputs["input_ids"]
        positions = image_positions_from_ids(ids, self.image_token_id, self._slots, self._keep)
        last = last_positions(inputs.get("attention_mask"), ids.shape[0], ids.shape[1])
        return Prepared(inputs, ids, positions, ids.shape[1], last)

    @torch.no_grad()
    def prompt_embeddings(self, prepared: Prepared) -> torch.Tensor:
        """The language model's input embeddings [B, T, d_model], image features in place, as the model builds them: a
        hook on the language model's input catches them and stops the forward there."""
        caught = {}

        def catch(module, args, kwargs):
            caught["embeds"] = kwargs.get("inputs_embeds")
            raise _Caught

        handle = self._lm().register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self._model(**prepared.inputs, use_cache=False)
        except _Caught:
            pass
        finally:
            handle.remove()
        return caught["embeds"]

    def forward(self, prepared: Prepared, positions: torch.Tensor | None = None) -> torch.Tensor:
        return self._model(**prepared.inputs, use_cache=False,
                           logits_to_keep=0 if positions is None else positions).logits

    def generate_ids(self, prepared: Prepared, max_new_tokens: int) -> torch.Tensor:
        gen = self._model.generate(**prepared.inputs, max_new_tokens=max_new_tokens, pad_token_id=self.pad_token_id,
                                   eos_token_id=self.stop_token_ids, **GREEDY)
        return gen[:, prepared.prompt_len:]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA device that supports it (float16 on one that does not), float32 elsewhere."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# the processor settings a model's yaml may give besides its folder's (``model.processor``)
PROCESSOR_SETTINGS = Fields({"num_additional_image_tokens": Integer(low=0, optional=True),
                             "patch_size": Integer(low=1, optional=True),
                             "vision_feature_select_strategy": Choice(("default", "full"), optional=True),
                             "image_seq_len": Integer(low=1, optional=True),
                             "image_seq_length": Integer(low=1, optional=True)})


class _ProcessorSettings:
    """``model.processor``: null or a mapping of ``PROCESSOR_SETTINGS``; only the keys given are passed on."""

    expected = PROCESSOR_SETTINGS.expected

    def __call__(self, key: str, value) -> dict:
        if value is None:
            return {}
        return {k: v for k, v in PROCESSOR_SETTINGS(key, value).items() if k in value}


@takes(family=Choice(tuple(FAMILIES)), path=Text(), dtype=Choice(("auto", *DTYPES)), device=Device(), question=Text(),
       trust_remote_code=Flag(), image_size=Many(Integer(low=14), min_len=2, optional=True),
       processor=_ProcessorSettings())
def load_adapter(model_cfg: dict, device: torch.device, cache_dir):
    """``model=<family>``: a Hugging Face model of one family of the table from ``model.path`` (a local folder, or a hub
    id already in the local cache: jobs run offline), in ``model.dtype`` on ``model.device``; code shipped with the
    weights never runs (``trust_remote_code`` stays off)."""
    import transformers

    fam = family(model_cfg["family"])
    path = model_cfg["path"]
    if model_cfg.get("trust_remote_code"):
        raise SettingError("model.trust_remote_code", True,
                           "knexp runs the families of its table with transformers' own code " "only; set it to false")
    try:
        processor = load_processor(path, fam, model_cfg.get("processor"))
        model_class = getattr(transformers, fam.model_class)
        model = model_class.from_pretrained(path, dtype=resolve_dtype(model_cfg["dtype"], device))
    except OSError as exc:
        raise _not_found(fam, path, "weights", exc) from exc
    return _adapter(model.to(device), processor, fam, model_cfg)


def _not_found(fam: Family, path: str, what: str, exc: OSError) -> ModelWeightsMissing:
    return ModelWeightsMissing(f"{fam.name} {what} not found at model.path={path!r} ({str(exc).splitlines()[0]}); "
                               "point model.path at a local folder (knexp runs with HF_HUB_OFFLINE=1) or download it "
                               "first")


def _adapter(model, processor, fam: Family, model_cfg: dict) -> VLMAdapter:
    size = model_cfg.get("image_size")
    return VLMAdapter(model, processor, fam, question=model_cfg["question"],
                      caption_prefix=model_cfg["prompt"]["caption_prefix"], image_size=tuple(size) if size else None)


def meta_adapter(model_cfg: dict, device: torch.device, cache_dir=None) -> VLMAdapter:
    """``load_adapter``'s adapter with its weights on the meta device: the config and processor from ``model.path``,
    no weight read (what the memory check before loading measures, ``knexp.models.memory``)."""
    import transformers

    fam = family(model_cfg["family"])
    path = model_cfg["path"]
    try:
        processor = load_processor(path, fam, model_cfg.get("processor"))
        config = transformers.AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise _not_found(fam, path, "config", exc) from exc
    with torch.device("meta"):
        model = getattr(transformers, fam.model_class)._from_config(
            config, dtype=resolve_dtype(model_cfg["dtype"], device))
    return _adapter(model, processor, fam, model_cfg)


load_adapter.without_weights = meta_adapter

