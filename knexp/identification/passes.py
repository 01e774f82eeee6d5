"""The passes identification needs, reduced on the fly to per-neuron statistics (docs/method.md, "Stage 1: activation
differences by inpainting" and "Stage 2: GradCAM filtering").

For one sample (original image o, inpainted image i, the caption of o with target token c):

1. forward on i (no gradient): O'_i per layer, kept in the model's dtype;
2. forward on o with the caption before c as context, then one backward of y_c, the logit of c at the
   position t* that predicts it. Hooks reduce everything as it streams by; O'_o and O'_i of a layer are
   kept (in the model's dtype) until that layer's gradient arrives and then freed, so the peak extra
   memory is about two [L, P, d_f] tensors in half precision (BENCHMARKS.md). Where what autograd keeps for that
   backward (every layer's activations) would exceed ``knexp.models.memory.RECOMPUTE_ABOVE``, as at a real model's
   size, each layer is recomputed in the backward instead (``prefix_cache.recomputed``): the hooks below see that
   second forward and ignore it.

Both passes take the tokens before the image (system turn, user header) from the prefix cache that captioning shares
(``knexp.models.decoding.prefix_cache.logits_after_prefix``): they cannot depend on the image, so each pass runs over
the positions from the image on, and the hooks see those. The statistics equal the full passes' to float32 rounding: the
attention's products over a cached prefix have other shapes, so on some CPUs the last bits differ (within 3e-6 of each
statistic's scale on the embedded model), and the neurons ranked first are the same (tested).

Every method (ours, its ablations, Schwettmann, Pan, random) is a ranking of these statistics
(``knexp.identification.methods``), so running all methods on a sample costs these two passes once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from knexp.data.catalog import Knowledge
from knexp.models.adapters.adapter import Adapter
from knexp.models.decoding.prefix_cache import logits_after_prefix
from knexp.models.hooks.attach import attached, gradient_anchor
from knexp.models.memory import recomputes


class SampleSkipped(Exception):
    """One sample cannot be used, for a cause of the sample itself: its caption gives no target, its statistics are not
    finite, its image cannot be read, or the rule leaves it no layer. Identification skips it and lists the reason.
    Nothing else is caught as a skip: a setting that cannot work (``ConfigError``) stops the job."""


class TargetNotFound(SampleSkipped):
    """The caption does not name the knowledge, or its word gives no token: the sample is unusable."""


@dataclass
class Target:
    """Where y_c comes from: the caption text before the target word, and c itself."""

    context: str  # caption text after the prefix and before the first mention, e.g. " a"
    token_id: int  # c: the first LM token of the first occurrence of the target word
    word: str  # the matched word form as written in the caption


def locate_target(adapter: Adapter, caption: str, prefix: str, knowledge: Knowledge) -> Target:
    """c = first token of the first mention of ``knowledge`` in ``caption`` (docs/method.md, "Stage 2: GradCAM
    filtering").

    The context is tokenised as the adapter tokenises continuations; c is the first token that
    tokenising context + word adds beyond the context's own tokens.
    """
    if not caption.startswith(prefix):
        raise TargetNotFound(f"caption {caption!r} does not start with the caption prefix {prefix!r}")
    body = caption[len(prefix) :]
    span = knowledge.first_mention(body)
    if span is None:
        raise TargetNotFound(f"caption {caption!r} does not name {knowledge.name!r}")
    # the space before the word belongs to the word's token (BPE and SentencePiece both attach it)
    context, word = body[: span[0]].rstrip(), body[span[0] : span[1]]
    ctx_ids = adapter.tokenize(context) if context else []
    full = adapter.tokenize(body[: span[1]])
    if len(full) <= len(ctx_ids) or full[: len(ctx_ids)] != ctx_ids:
        raise TargetNotFound(f"the tokenizer does not split {context + word!r} after the context {context!r}")
    return Target(context=context, token_id=int(full[len(ctx_ids)]), word=word)


@dataclass
class SampleStats:
    """Per-neuron statistics of one sample; tensors are float32 [L, d_f] unless noted.

    diff_max      max_p (O'_o - O'_i)                    (stage 1)
    diff_absmax   max_p |O'_o - O'_i|                    (stage 1 by the size of the change, either sign)
    gradcam_max   max_p O'_o * dy_c/dO'_o                (stage 2)
    gradcam_argmax  argmax_p of the same, long           (the patch of each neuron's best (unit, patch) pair)
    gradcam_mean  mean_p O'_o * dy_c/dO'_o               (Schwettmann, paper comparison)
    act_mean      mean_p O'_o                            (Pan, paper comparison)
    act_std       std_p O'_o                             (the neuron's spread: unit of relative noise)
    shift_mean    mean_p (O'_i - O'_o)                   (delta_u of the inpainted intervention on other images)
    attribution   sum_p (O'_i - O'_o) * dy_c/dO'_o       (first-order change of y_c when the neuron takes its
                                                          inpainted values; docs/method.md, "Attribution")
    act_last      O_o at t*                              (the full neuron activation at the predicting position)
    actfn_last    act_fn(gate(x)) at t*                  (Pan, authors' hook point)
    wout_dot_wu   W_out^l[:, u] . W_U[c]                 (Pan's projection onto the target token)
    """

    diff_max: torch.Tensor
    diff_absmax: torch.Tensor
    gradcam_max: torch.Tensor
    gradcam_argmax: torch.Tensor
    gradcam_mean: torch.Tensor
    act_mean: torch.Tensor
    act_std: torch.Tensor
    shift_mean: torch.Tensor
    attribution: torch.Tensor
    act_last: torch.Tensor
    actfn_last: torch.Tensor
    wout_dot_wu: torch.Tensor
    target_id: int
    target_position: int
    forward_passes: int = 2

    TENSORS = ("diff_max", "diff_absmax", "gradcam_max", "gradcam_argmax", "gradcam_mean", "act_mean", "act_std",
               "shift_mean", "attribution", "act_last", "actfn_last", "wout_dot_wu")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.diff_max.shape)

    def check_finite(self) -> None:
        """Raise ``SampleSkipped`` naming the statistic that holds NaN or inf (a sample to skip, not to rank)."""
        for name in self.TENSORS:
            t = getattr(self, name)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise SampleSkipped(f"non-finite values in {name}: the sample's activations or gradients overflowed")


def wout_dot_unembedding(adapter: Adapter, token_id: int) -> torch.Tensor:
    """[L, d_f]: W_out^l[:, u] . W_U[token_id] for every neuron; only W_U's row for the token is used."""
    w_u = adapter.unembedding()[token_id].float()  # [d_model]
    return torch.stack([adapter.w_out(layer).float().T @ w_u for layer in range(adapter.num_layers)])


def compute_stats(adapter: Adapter, original: np.ndarray, inpainted: np.ndarray, target: Target,
                  prefix: str | None = None, recompute: bool | None = None) -> SampleStats:
    """Run the two passes of docs/method.md's stages 1 and 2 for one sample and reduce them per neuron. ``recompute``:
    recompute each decoder layer in the backward instead of keeping its activations (None: where keeping them all
    would exceed ``knexp.models.memory.RECOMPUTE_ABOVE``); the statistics are the same either way (bit for bit on a
    model without fast paths; to float rounding on one with them, whose recomputed pass runs over the prefix too)."""
    layers = list(range(adapter.num_layers))
    prep_i = adapter.prepare([inpainted], continuations=[target.context], prefix=prefix)
    prep_o = adapter.prepare([original], continuations=[target.context], prefix=prefix)
    if recompute is None:
        down = adapter.down_proj(0)
        recompute = recomputes(len(layers), prep_o.prompt_len, down.out_features, adapter.d_ff,
                               down.weight.element_size())
    pos_i, pos_o = prep_i.image_positions[0], prep_o.image_positions[0]
    t_star = int(prep_o.last_position[0])  # t*: the position whose logits predict c

    inpainted_acts: dict[int, torch.Tensor] = {}

    def keep_inpainted(layer):
        def hook(x, start):  # [1, T - start, d_f]: the pass after the prefix
            inpainted_acts[layer] = x[0, pos_i - start].detach()  # [P, d_f], model dtype: kept until layer's backward
        return hook

    with torch.no_grad(), attached(adapter, {("ffn", layer): keep_inpainted(layer) for layer in layers},
                                   prefill=prep_i):
        logits_after_prefix(adapter, prep_i, prep_i.last_position[:1])

    out: dict[str, dict[int, torch.Tensor]] = {k: {} for k in SampleStats.TENSORS}

    def on_original(layer):
        def hook(x, start):  # [1, T - start, d_f]
            if layer in out["diff_max"]:  # the layer's forward again, in the backward (``recompute``): seen already
                return None
            here, last = pos_o - start, t_star - start  # the image positions and t* within the pass
            o_det = x.detach()[0, here]  # [P, d_f], model dtype: kept with O'_i until this layer's gradient arrives
            shift = inpainted_acts[layer].float() - o_det.float()  # O'_i - O'_o
            out["diff_max"][layer] = (-shift).amax(0)
            out["diff_absmax"][layer] = shift.abs().amax(0)
            out["shift_mean"][layer] = shift.mean(0)
            out["act_mean"][layer] = o_det.float().mean(0)
            out["act_std"][layer] = o_det.float().std(0, correction=0)
            out["act_last"][layer] = x.detach()[0, last].to(torch.float32, copy=True)
            del shift

            def catch(grad: torch.Tensor) -> None:
                g = grad[0, here].float()  # dy_c/dO'_o [P, d_f]
                o, i = o_det.float(), inpainted_acts.pop(layer).float()
                gc = o * g  # O'_o * dy_c/dO'_o
                best, arg = gc.max(0)
                out["gradcam_max"][layer], out["gradcam_argmax"][layer] = best, arg
                out["gradcam_mean"][layer] = gc.mean(0)
                out["attribution"][layer] = ((i - o) * g).sum(0)

            x.register_hook(catch)
            return None

        return hook

    def on_act(layer):
        def hook(x, start):  # act(gate(x)) [1, T - start, d_f]
            if layer not in out["actfn_last"]:
                out["actfn_last"][layer] = x.detach()[0, t_star - start].to(torch.float32, copy=True)
        return hook

    hooks = {("ffn", k): on_original(k) for k in layers} | {("ffn_act", k): on_act(k) for k in layers}
    with torch.enable_grad(), gradient_anchor(adapter, prep_o), attached(adapter, hooks, prefill=prep_o):
        logits = logits_after_prefix(adapter, prep_o, prep_o.last_position[:1], recompute)  # [1, 1, V]: at t* only
        logits[0, 0, target.token_id].backward()
        del logits
    missing = [layer for layer in layers if layer not in out["gradcam_max"]]
    if missing:
        raise RuntimeError(f"no gradient reached layers {missing}; is the target logit connected to the image tokens?")
    stacked = {k: torch.stack([v[layer] for layer in layers]).cpu() for k, v in out.items() if k != "wout_dot_wu"}
    with torch.no_grad():
        stacked["wout_dot_wu"] = wout_dot_unembedding(adapter, target.token_id).cpu()
    return SampleStats(**stacked, target_id=target.token_id, target_position=t_star)

