"""Causal trace of the image tokens (docs/method.md, "Causal trace of the image tokens"): in which layers does the
object still matter?

For one sample (original image o, inpainted image i, target token c after its caption context), a state of
o's run at the image positions is replaced by i's, in the prompt forward only:
  ``resid``     the residual stream entering layer l                       (a)
  ``ffn``       O^l, every unit of layer l's FFN                            (b)
  ``ffn_upto``  O of layers 0..l                                            (c)
  ``ffn_from``  O of layers l..L-1                                          (c)
For each kind and layer the trace records Δy_c = y_c(patched) - y_c(o), at the position t* that predicts c
with the caption before c as context, and (with ``captions``) whether the greedy caption of the patched prompt
still names k. Each (kind, layer) is one row of a batch: L teacher-forced forwards (and L captions) per kind.
The live window needs only the ``resid`` kind's Δy_c; ``task=trace`` draws all four with captions.

The **live window** (``live_window``) is the set of layers where (a) still moves y_c: the residual layers l
whose patch reaches at least ``frac`` of the whole counterfactual, mean_s Δy_c^resid(l) / mean_s (y_c(i) -
y_c(o)) >= frac (patching the residual entering layer 0 is feeding i itself). An FFN layer l writes into
the residual entering l + 1, so its neurons can act only when l + 1 is live: those are the window's
``neuron_layers``. The last layer's image positions feed nothing, so it is never among them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from knexp.data.catalog import Knowledge
from knexp.identification.passes import Target, TargetNotFound, locate_target
from knexp.identification.selection import Selector
from knexp.models.adapters.adapter import Adapter
from knexp.models.hooks.intervene import ActivationPatch, intervene
from knexp.models.hooks.record import record
from knexp.settings import Integer, Many, Number, Text, check_fields
from knexp.store import Store, stable_key
from knexp.user_errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("resid", "ffn", "ffn_upto", "ffn_from")
SITE = {"resid": "resid_pre", "ffn": "ffn", "ffn_upto": "ffn", "ffn_from": "ffn"}  # each kind's hook site


@dataclass(frozen=True)
class TraceSettings:
    """``trace``: the objects traced (catalog names), selected samples per object, and the share of the whole
    counterfactual a residual layer must reach to be live. Checked when the session is built."""

    objects: tuple[str, ...] = ()
    per_object: int = 1
    frac: float = 0.5

    def __post_init__(self):
        check_fields(self, "trace", objects=Many(Text()), per_object=Integer(low=1),
                     frac=Number(0.0, 1.0, low_open=True))
        object.__setattr__(self, "objects", tuple(self.objects))


def patched_layers(kind: str, layer: int, num_layers: int) -> range:
    """The layers whose state a (kind, layer) row replaces."""
    if kind in ("resid", "ffn"):
        return range(layer, layer + 1)
    if kind == "ffn_upto":
        return range(0, layer + 1)
    if kind == "ffn_from":
        return range(layer, num_layers)
    raise ConfigError(f"unknown trace kind {kind!r}; use one of {KINDS}")


@dataclass
class SampleTrace:
    """One sample's trace: ``delta[kind][l]`` = Δy_c, ``named[kind][l]`` = the patched caption still names k (for the
    kinds traced; ``named`` is empty for a kind traced without captions)."""

    knowledge: str
    image_id: int
    annotation_id: int
    y_original: float
    y_inpainted: float
    delta: dict[str, list[float]]
    named: dict[str, list[bool]]

    @property
    def full_effect(self) -> float:
        """y_c(i) - y_c(o): the whole counterfactual's effect."""
        return self.y_inpainted - self.y_original

    def to_dict(self) -> dict:
        return asdict(self)


def _edits(rows: list[tuple[str, int]], sources: dict[str, torch.Tensor],
           num_layers: int) -> dict[str, dict[int, ActivationPatch]]:
    """Per site, per layer: set the rows that patch that layer to the inpainted run's state [B, P, D]."""
    edits: dict[str, dict[int, ActivationPatch]] = {"resid_pre": {}, "ffn": {}}
    for layer in range(num_layers):
        for site in edits:
            mask = torch.tensor([SITE[kind] == site and layer in patched_layers(kind, lay, num_layers)
                                 for kind, lay in rows])
            if mask.any():
                values = sources[site][layer][None].expand(len(rows), -1, -1)  # [B, P, D], no copy
                edits[site][layer] = ActivationPatch(None, set_to=values, row_mask=mask)
    return edits


def _logit_at(adapter: Adapter, prepared, position: int, token_id: int) -> torch.Tensor:
    """[B]: every row's logit of ``token_id`` at sequence position ``position``, the LM head run there only (never
    the [B, T, V] logits of every position)."""
    return adapter.forward(prepared, positions=torch.tensor([position], device=adapter.device))[:, 0, token_id]


@torch.no_grad()
def trace_sample(adapter: Adapter, original: np.ndarray, inpainted: np.ndarray, target: Target, knowledge: Knowledge,
                 image_id: int = -1, annotation_id: int = -1, batch_size: int = 16, max_new_tokens: int = 32,
                 kinds: tuple[str, ...] = KINDS, captions: bool = True) -> SampleTrace:
    """The patch ``kinds`` at every layer for one sample (see the module docstring)."""
    n = adapter.num_layers
    prep_i = adapter.prepare([inpainted], continuations=[target.context])
    with record(adapter, prep_i, site="resid_pre") as r_resid, record(adapter, prep_i) as r_ffn:
        y_i = float(_logit_at(adapter, prep_i, int(prep_i.last_position[0]), target.token_id)[0])
    sources = {"resid_pre": r_resid.stacked()[:, 0], "ffn": r_ffn.stacked()[:, 0]}  # [L, P, d_model], [L, P, d_f]
    del r_resid, r_ffn
    prep_o = adapter.prepare([original], continuations=[target.context])
    t_star = int(prep_o.last_position[0])
    y_o = float(_logit_at(adapter, prep_o, t_star, target.token_id)[0])
    rows = [(kind, layer) for kind in kinds for layer in range(n)]
    ys: list[float] = []
    texts: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        edits = _edits(chunk, sources, n)
        forced = adapter.prepare([original] * len(chunk), continuations=[target.context] * len(chunk))
        with intervene(adapter, forced, edits["resid_pre"], site="resid_pre"), intervene(adapter, forced, edits["ffn"]):
            ys += _logit_at(adapter, forced, t_star, target.token_id).float().tolist()
        if captions:
            prompt = adapter.prepare([original] * len(chunk))
            with intervene(adapter, prompt, edits["resid_pre"], site="resid_pre"), intervene(adapter, prompt,
                                                                                             edits["ffn"]):
                texts += adapter.generate(prompt, max_new_tokens)
    delta = {kind: [ys[i] - y_o for i, (k, _) in enumerate(rows) if k == kind] for kind in kinds}
    named = {kind: [knowledge.mentioned_in(texts[i]) for i, (k, _) in enumerate(rows) if k == kind]
             for kind in kinds} if captions else {}
    return SampleTrace(knowledge.name, int(image_id), int(annotation_id), y_o, y_i, delta, named)


def normalised(traces: list[SampleTrace], kind: str = "resid") -> np.ndarray:
    """[L]: mean_s Δy_c^kind(l) / mean_s (y_c(i) - y_c(o)), the share of the whole counterfactual a patch reaches."""
    full = float(np.mean([t.full_effect for t in traces]))
    if full == 0:
        raise ValueError("the traced samples' inpainting does not change y_c on average; the live window is undefined")
    return np.mean([t.delta[kind] for t in traces], axis=0) / full


def live_window(traces: list[SampleTrace], frac: float = 0.1) -> dict:
    """The layers where residual patching still reaches ``frac`` of the counterfactual, and the FFN layers
    whose neurons feed them (see the module docstring)."""
    if not traces:
        raise ValueError("no traced samples: the live window needs at least one")
    share = normalised(traces, "resid")
    n = len(share)
    resid = [layer for layer in range(n) if share[layer] >= frac]
    neuron_layers = [layer for layer in range(n - 1) if share[layer + 1] >= frac]
    return {"frac": frac, "samples": len(traces), "resid_share": [round(float(s), 4) for s in share],
            "resid_layers": resid,
            "neuron_layers": neuron_layers, "full_effect": float(np.mean([t.full_effect for t in traces]))}


def cached_trace(store, key_parts: list, sample: tuple[str, int, int], compute, kinds: tuple[str, ...] = KINDS,
                 captions: bool = True) -> SampleTrace:
    """The trace of ``sample`` (knowledge, image id, annotation id) for ``kinds``, from the JSON ``store``
    (``knexp.store.Store``) where it can: each kind is stored on its own, so a window (``resid`` without captions)
    reuses a full trace. ``compute(kinds, captions)`` traces the kinds that are missing."""
    found: dict[str, dict] = {}
    for kind in kinds:
        for with_captions in (True,) if captions else (True, False):
            value = store.get(stable_key("trace", *key_parts, kind, with_captions))
            if value is not None:
                found[kind] = value
                break
    missing = tuple(k for k in kinds if k not in found)
    if missing:
        fresh = compute(missing, captions)
        for kind in missing:
            found[kind] = {"y": [fresh.y_original, fresh.y_inpainted], "delta": fresh.delta[kind],
                           "named": fresh.named.get(kind)}
            store.put(stable_key("trace", *key_parts, kind, captions), found[kind])
    y_o, y_i = found[kinds[0]]["y"]
    return SampleTrace(*sample, y_o, y_i, {k: found[k]["delta"] for k in kinds},
                       {k: found[k]["named"] for k in kinds if found[k]["named"] is not None})


def trace_objects(selector: Selector, objects: list[Knowledge], per_object: int, store: Store,
                  kinds: tuple[str, ...] = KINDS, captions: bool = True) -> list[SampleTrace]:
    """The trace (``kinds``, with or without captions) of the first ``per_object`` selected samples of every object
    (``Selector.first``: only as many candidates captioned as that takes), from the trace ``store`` where it holds
    them."""
    captioner = selector.captioner
    adapter = captioner.adapter
    traces = []
    for knowledge in objects:
        for cand in selector.first(knowledge, per_object).accepted:
            try:
                target = locate_target(adapter, cand.original_caption, adapter.caption_prefix, knowledge)
            except TargetNotFound as exc:
                log.warning("trace: skipping image %d: %s", cand.image_id, exc)
                continue

            def compute(todo, with_captions, cand=cand, target=target, knowledge=knowledge) -> SampleTrace:
                log.info("trace: %s, image %d (%s x %d patched rows%s)", knowledge.name, cand.image_id, "/".join(todo),
                         adapter.num_layers, ", with captions" if with_captions else "")
                return trace_sample(adapter, selector.data.load_image(cand.image_id), selector.inpainted(cand), target,
                                    knowledge,
                                    cand.image_id, cand.annotation_id, captioner.batch_size, captioner.max_new_tokens,
                                    todo, with_captions)

            key = [captioner.model_key, selector.dataset_id, cand.image_id, cand.annotation_id, selector.opts,
                   cand.original_caption, captioner.max_new_tokens]
            traces.append(cached_trace(store, key, (knowledge.name, cand.image_id, cand.annotation_id), compute, kinds,
                                       captions))
    if not traces:
        raise ConfigError(f"trace: no usable sample among trace.objects={[k.name for k in objects]}; add objects or "
                          "images")
    return traces


@dataclass
class Trace:
    """The causal trace of some samples' image tokens on ``model``, and the live window it gives."""

    model: str
    window: dict
    samples: list[SampleTrace]

    def to_dict(self) -> dict:
        return {"model": self.model, "window": self.window, "samples": [t.to_dict() for t in self.samples]}

    def frame(self) -> pd.DataFrame:
        """One row per (sample, patch kind, layer): Δy_c and, where traced with captions, whether k is still named."""
        rows = [{"knowledge": t.knowledge, "image_id": t.image_id, "kind": kind, "layer": layer, "delta": d,
                 "named": (t.named.get(kind) or [None] * len(deltas))[layer]}
                for t in self.samples for kind, deltas in t.delta.items() for layer, d in enumerate(deltas)]
        return pd.DataFrame(rows)


def span(layers: list[int]) -> str:
    """``3-9`` for a run of consecutive layers, else the list."""
    return f"{layers[0]}-{layers[-1]}" if layers and layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
