"""The adapter protocol: everything methods and evaluation may know about a model.

A neuron ``(l, u)`` is unit ``u`` of layer ``l``'s FFN; its activation ``O^l[t, u]`` is the input of the
FFN's output projection (``down_proj`` in LLaMA-style gated MLPs, docs/method.md, "Notation"), so
``down_proj(O^l) == mlp(x)``. An adapter names its hook sites in one table (``sites``), gives ``W_out``, the
unembedding and the tokenizer, builds prompts with the model's own template, finds the image-token span and the
predicting position in a prepared input (never a hard-coded offset), tells which image region each image token
covers, and generates captions. Methods, evaluation and hooks use only this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from knexp.models.decoding.prefill import Prefilled, prefill
from knexp.models.decoding.streaming import greedy_ids, stream_ids
from knexp.models.geometry import PatchGeometry
from knexp.models.prepared import Prepared

# docs/method.md, "Evaluation: captions under noise": do_sample=False, temperature=1.0, num_beams=1, max_new_tokens=32,
# min_length=1, top_p=0.9, repetition_penalty=1, length_penalty=1 (greedy: temperature and top_p have no effect).
GREEDY = dict(do_sample=False, num_beams=1, min_length=1, repetition_penalty=1.0, length_penalty=1.0)


@dataclass(frozen=True)
class HookSite:
    """One hook site of a decoder layer: the submodule at ``path`` inside the layer ("" is the layer itself), read at
    its input (``when="pre"``, the first positional or ``hidden_states`` argument) or at its output (``"post"``)."""

    path: str
    when: str


# A LLaMA-family decoder layer (``LlamaDecoderLayer``), as pyvene maps model types to sites. Each is a tensor
# [B, T, d] per layer l:
LLAMA_SITES: dict[str, HookSite] = {
    "resid_pre": HookSite("", "pre"),  # the residual stream entering layer l [B, T, d_model]
    "ffn_in": HookSite("mlp", "pre"),  # the FFN's input (after the post-attention norm) [B, T, d_model]
    "ffn_act": HookSite("mlp.act_fn", "post"),  # act(gate(x)), without the up factor (Pan et al.'s hook) [B, T, d_f]
    "ffn": HookSite("mlp.down_proj", "pre"),  # O^l, the neuron activations (docs/method.md, "Notation") [B, T, d_f]
    "ffn_out": HookSite("mlp", "post"),  # what the FFN writes into the residual stream, down_proj(O^l) [B, T, d_model]
}


class Adapter(ABC):
    """One model family. Subclasses fill in structure, prompting and the forward pass. ``fast_paths``: knexp may run the
    decoder layer by layer (``knexp.models.prepared.Decodable``)."""

    caption_prefix: str
    geometry: PatchGeometry
    sites: ClassVar[dict[str, HookSite]] = LLAMA_SITES
    fast_paths: bool = True

    # ---- structure ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def model(self) -> nn.Module: ...

    @property
    @abstractmethod
    def tokenizer(self):
        """The model's tokenizer (``decode`` of single ids names what a neuron writes)."""

    @abstractmethod
    def decoder_layers(self) -> list[nn.Module]: ...

    @abstractmethod
    def unembedding(self) -> torch.Tensor:
        """W_U [V, d_model]."""

    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    def site(self, name: str, layer: int) -> tuple[nn.Module, str]:
        """(module, "pre" | "post") of hook site ``name`` in decoder layer ``layer`` (``sites``)."""
        if name not in self.sites:
            raise ValueError(f"unknown hook site {name!r}; {type(self).__name__} has {', '.join(self.sites)}")
        site = self.sites[name]
        layer_module = self.decoder_layers()[layer]
        return (layer_module.get_submodule(site.path) if site.path else layer_module), site.when

    def ffn(self, layer: int) -> nn.Module:
        """The whole FFN (MLP) module of ``layer``: its output, the hook site ``ffn_out``, is
        ``down_proj(layer)(O^l)``."""
        return self.site("ffn_in", layer)[0]

    def down_proj(self, layer: int) -> nn.Linear:
        """The FFN's output projection of ``layer`` (``down_proj``); its input is the neuron activation O^l [B, T, d_f],
        the hook site ``ffn``."""
        return self.site("ffn", layer)[0]

    def ffn_linear(self, layer: int, name: str) -> nn.Linear:
        """One of the gated FFN's linear maps of ``layer``: ``down_proj`` (W_out, [d_model, d_f]), ``gate_proj`` or
        ``up_proj`` ([d_f, d_model]; their inputs are the FFN's input, the hook site ``ffn_in``)."""
        if name == "down_proj":
            return self.down_proj(layer)
        if name not in ("gate_proj", "up_proj"):
            raise ValueError(f"unknown FFN map {name!r}; use down_proj, gate_proj or up_proj")
        return self.ffn(layer).get_submodule(name)

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def d_ff(self) -> int:
        return self.down_proj(0).in_features

    @property
    def num_image_tokens(self) -> int:
        return len(self.geometry)

    @abstractmethod
    def prompt_length(self) -> int:
        """Positions of a caption prompt of one image, its image tokens included (T0 of docs/method.md, "Memory
        before loading")."""

    def vision_shape(self) -> tuple[int, int, int]:
        """(positions per image, width, FFN width) of a transformer vision tower; zeros for none (a convolutional
        encoder, whose activations are small beside the decoder's)."""
        return 0, 0, 0

    def w_out(self, layer: int) -> torch.Tensor:
        """W_out^l [d_model, d_f]: column u is what neuron u writes into the residual stream."""
        return self.down_proj(layer).weight

    def write_gain(self, layer: int) -> torch.Tensor | None:
        """float [d_model]: what multiplies every write of layer ``layer``'s FFN into the residual stream (a norm after
        the FFN), or None where nothing does: ``w_out(layer) == down_proj(layer).weight * write_gain(layer)[:,
        None]``."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @abstractmethod
    def language_model(self) -> tuple[nn.Module, nn.Module]:
        """(the decoder stack: a transformers LLaMA-family model with ``layers``, ``norm``, ``rotary_emb``,
        ``embed_tokens`` and ``config``; the LM head): what ``knexp.models.decoding.prefill`` and
        ``knexp.models.decoding.decode_step`` run layer by layer."""

    @property
    @abstractmethod
    def stop_token_ids(self) -> list[int]:
        """The token ids that end a caption (greedy generation stops a row there)."""

    @property
    @abstractmethod
    def pad_token_id(self) -> int: ...

    # ---- inputs ------------------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, images: list[np.ndarray], continuations: list[str] | None = None, prefix: str | None = None,
                question: str | None = None) -> Prepared:
        """Prompt + images (+ optional text after the prefix, e.g. a caption for teacher forcing). ``question`` replaces
        the model's caption question in the user turn (another prompt on the same images, e.g. an edit's
        T-generality)."""

    @abstractmethod
    def prompt_embeddings(self, prepared: Prepared) -> torch.Tensor:
        """The LM's input embeddings [B, T, d_model] of a prepared batch, image features in place."""

    @abstractmethod
    def forward(self, prepared: Prepared, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, K, V] of one forward pass (no cache) at the sequence positions ``positions`` (long [K], the same
        for every row; default every position, K = T): the LM head runs at those positions only."""

    def text_logits(self, texts: list[str]) -> torch.Tensor:
        """float32 [B, V]: the LM's logits after each of ``texts`` alone, no image (the tokenizer's special tokens
        added, as a text-only prompt is given to the model), at each text's last token: what an edit's T-locality
        compares. Rows are right-padded, which causal attention never sees from earlier positions."""
        decoder, head = self.language_model()
        rows = [self.tokenizer(t)["input_ids"] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        # [B, T, d_model], normed
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = torch.tensor([len(r) - 1 for r in rows], device=self.device)
        return head(hidden[torch.arange(len(rows), device=self.device), last]).float()

    def run_hooks(self, prepared: Prepared) -> None:
        """A forward pass for what the hooks armed on ``prepared`` record or change; the LM head runs at one
        position."""
        self.forward(prepared, positions=torch.tensor([prepared.prompt_len - 1], device=self.device))

    @abstractmethod
    def generate_ids(self, prepared: Prepared, max_new_tokens: int) -> torch.Tensor:
        """New token ids [B, N] after the prompt, greedy (``GREEDY``) with the KV cache."""

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as it appears after other text (no special tokens)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ---- captioning --------------------------------------------------------------------------------
    @torch.no_grad()
    def caption(self, images: list[np.ndarray], batch_size: int = 16, max_new_tokens: int = 32,
                prefix: str | None = None, width: int | None = None, question: str | None = None) -> list[str]:
        """Greedy captions, caption prefix included, decoded with continuous batching (``stream``); ``question`` in
        place of the model's caption question."""
        def prefill_rows(rows: list[int]) -> Prefilled:
            prepared = self.prepare([images[i] for i in rows], prefix=prefix, question=question)
            return self.prefill(prepared, max_new_tokens=max_new_tokens)

        return self.stream(len(images), prefill_rows, batch_size, max_new_tokens, width, prefix, "captioning")

    def prefill(self, prepared: Prepared, start_layer: int = 0, groups: list | None = None,
                max_new_tokens: int | None = None
                ) -> Prefilled:
        """The prompt's pass of an unpadded prepared batch, under whatever hooks are armed on it
        (``knexp.models.decoding.prefill.prefill``: layers below ``start_layer`` once per group of ``groups``; without
        ``fast_paths``, the model's own ``generate`` of ``max_new_tokens``)."""
        return prefill(self, prepared, start_layer, groups, max_new_tokens=max_new_tokens)

    def stream(self, count: int, prefill_rows, batch_size: int, max_new_tokens: int = 32, width: int | None = None,
               prefix: str | None = None, what: str = "captions") -> list[str]:
        """Greedy captions of rows 0..count-1, caption prefix included: ``prefill_rows(rows)`` gives the ``prefill`` of
        at most ``batch_size`` rows, and up to ``width`` rows decode together, refilled as rows end
        (``knexp.models.decoding.streaming.stream_ids``)."""
        if count == 0:
            return []
        ids = stream_ids(self, count, prefill_rows, max_new_tokens, batch_size, width, what=what)
        prefix = self.caption_prefix if prefix is None else prefix
        return [join_prefix(prefix, t) for t in self.decode(ids)]

    @torch.no_grad()
    def generate(self, prepared: Prepared, max_new_tokens: int = 32, prefix: str | None = None, start_layer: int = 0,
                 groups: list | None = None) -> list[str]:
        """Captions of an already prepared batch (so hooks can be armed on exactly this batch).

        An unpadded batch decodes with ``knexp.models.decoding.streaming.greedy_ids`` (finished rows leave the batch;
        with ``start_layer`` > 0, layers below it run once per group of ``groups``: only for hooks on layers >=
        ``start_layer``); a padded one with the model's own ``generate``. Both give the same tokens (tested)."""
        prefix = self.caption_prefix if prefix is None else prefix
        mask = prepared.inputs.get("attention_mask")
        if mask is None or bool(mask.all()):
            ids = greedy_ids(self, prepared, max_new_tokens, start_layer, groups)
        elif start_layer:
            raise ValueError("reusing the layers below start_layer needs unpadded prompts")
        else:
            ids = self.generate_ids(prepared, max_new_tokens)
        return [join_prefix(prefix, t) for t in self.decode(ids)]


def join_prefix(prefix: str, continuation: str) -> str:
    """``prefix`` + generated text, with one space between words unless the text starts with one."""
    if not continuation:
        return prefix.strip()
    if continuation[0].isspace() or continuation[0] in ".,;:!?" or not prefix:
        return (prefix + continuation).strip()
    return (prefix + " " + continuation).strip()
