"""Learning an edit of some ``down_proj`` columns by gradient (the ``optimized`` rule, and the fine-tuning baseline).

The edit Delta [d_model, U] of each layer is trained while the model stays frozen: a hook adds O'[..., units] @ Delta^T
to the FFN's output (``ffn_out``, with O' read at ``ffn``), which is what W_out[:, units] += Delta computes. The loss,
per step, over the fitting data (``FitData``):

  erase   sum_s -log(1 - p_s(k))             p_s(k): the probability of k's word forms (their first tokens) at
                                              sample s's target position (the caption's context before k)
  swap    sum_s -log p_s(k')                 the same for the replacement's word forms
  + kl_weight * mean KL(p_edit || p_base)    against the unedited model, at every position of the unedited caption of
                                              each image without k (teacher-forced), and after each text-only prompt
  + norm_weight * ||Delta||_F^2

Adam on Delta, from zero; it stops as soon as every fitting sample meets the target (erase: p(k) < ``target_prob``; swap: k' is the
top token), or after ``steps``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from knexp.editing.rules import by_layer, word_ids
from knexp.editing.weights import ColumnDelta, WeightEdit
from knexp.identification.passes import SampleSkipped, locate_target
from knexp.models.hooks import everywhere
from knexp.models.prepared import Prepared


@dataclass
class FitData:
    """What an edit is fitted on: teacher-forced prompts whose last position predicts the object (``samples``), and
    locality prompts (``locality``: images without k with their unedited captions, and the positions that predict the
    caption's tokens; ``texts``: text-only) with the unedited model's log-probabilities there (``base``, float [n, V]
    each), filled by ``baseline``."""

    samples: list[Prepared]
    locality: list[tuple[Prepared, torch.Tensor]] = field(default_factory=list)  # (one image + its caption, positions [n])
    texts: list[list[str]] = field(default_factory=list)  # batches of text-only prompts
    base: list[torch.Tensor] = field(default_factory=list)


def target_context(adapter, caption: str, knowledge) -> str | None:
    """The caption's text before its first mention of ``knowledge`` (``locate_target``'s context: teacher-forced, its last
    position predicts k), or None where the caption gives no target."""
    try:
        return locate_target(adapter, caption, adapter.caption_prefix, knowledge).context
    except SampleSkipped:
        return None


def forced_caption(adapter, image, caption: str) -> tuple[Prepared, int]:
    """(the image's prompt with the caption after its prefix teacher-forced, the position of the caption's first token):
    positions start - 1 .. T - 2 predict the caption's tokens. A caption without the prefix forces nothing."""
    prefix = adapter.caption_prefix
    body = caption[len(prefix):] if caption.startswith(prefix) else ""
    return adapter.prepare([image], continuations=[body]), adapter.prepare([image]).prompt_len


def last_logits(adapter, prepared: Prepared) -> torch.Tensor:
    """float32 [B, V]: the logits at each row's last real position (rows may end at different positions)."""
    last = prepared.last_position
    positions = torch.unique(last)  # [K], ascending
    logits = adapter.forward(prepared, positions=positions)  # [B, K, V]
    return logits[torch.arange(len(last), device=last.device), torch.searchsorted(positions, last)].float()


def _last_logprobs(adapter, prompt) -> torch.Tensor:
    """float32 [n, V]: log-probabilities after each row of a prepared batch, after each of text-only prompts (a list of
    str), or at the given positions of a one-row batch (a (Prepared, positions) pair)."""
    if isinstance(prompt, list):
        logits = adapter.text_logits(prompt)
    elif isinstance(prompt, tuple):
        prepared, positions = prompt
        logits = adapter.forward(prepared, positions=positions)[0].float()  # [n, V]
    else:
        logits = last_logits(adapter, prompt)
    return F.log_softmax(logits, -1)


def baseline(adapter, data: FitData) -> FitData:
    """``data`` with the unedited model's log-probabilities at the locality prompts (``base``)."""
    with torch.no_grad():
        data.base = [_last_logprobs(adapter, p) for p in data.locality + data.texts]
    return data


@contextmanager
def with_columns(adapter, deltas: dict[int, torch.Tensor], units: dict[int, torch.Tensor]) -> Iterator[None]:
    """Hooks that add O'[..., units] @ Delta^T to each edited layer's FFN output, on every pass: what
    W_out[:, units] += Delta computes, with Delta [d_model, U] differentiable."""
    seen: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(o):  # O' [B, n, d_f]
            seen[layer] = o[..., units[layer].to(o.device)]
        return hook

    def add(layer):
        def hook(out):  # the FFN's output [B, n, d_model]
            return out + seen.pop(layer) @ deltas[layer].T.to(out.dtype)
        return hook

    hooks = {("ffn", layer): keep(layer) for layer in deltas} | {("ffn_out", layer): add(layer) for layer in deltas}
    with everywhere(adapter, hooks):
        yield


def fit_columns(adapter, neurons, target, data: FitData, settings) -> WeightEdit:
    """The edit of ``neurons``' columns that the module docstring's loss gives (``settings``: an ``Optimized`` rule)."""
    units = by_layer(neurons)
    d_model = adapter.down_proj(0).out_features
    deltas = {layer: torch.zeros(d_model, len(u), device=adapter.device, requires_grad=True) for layer, u in units.items()}
    goal = word_ids(adapter, target.replacement if target.op == "swap" else target.knowledge)
    optimizer = torch.optim.Adam(list(deltas.values()), lr=settings.lr)
    steps_run, met = 0, False
    locality = data.locality + data.texts
    with torch.enable_grad(), with_columns(adapter, deltas, units):
        for step in range(settings.steps):
            optimizer.zero_grad(set_to_none=True)
            losses, met = [], True
            for prepared in data.samples:
                logp = _last_logprobs(adapter, prepared)  # [B, V]
                p_goal = logp[:, goal].exp().sum(-1)  # [B]
                if target.op == "erase":
                    losses.append(-torch.log1p(-p_goal.clamp(max=1 - 1e-6)).sum())
                    met &= bool((p_goal < settings.target_prob).all())
                else:
                    losses.append(-torch.logsumexp(logp[:, goal], -1).sum())
                    met &= bool(torch.isin(logp.argmax(-1), goal).all())
            if met:
                break
            for prompt, base in zip(locality, data.base, strict=True):
                logp = _last_logprobs(adapter, prompt)
                kl = F.kl_div(base, logp, log_target=True, reduction="batchmean")  # KL(edited || unedited), as METHOD.md has it
                losses.append(settings.kl_weight * kl / len(locality))
            losses.append(settings.norm_weight * sum(d.pow(2).sum() for d in deltas.values()))
            torch.stack([v.reshape(()) for v in losses]).sum().backward()
            optimizer.step()
            steps_run = step + 1
    layers = {layer: ColumnDelta(units[layer], deltas[layer].detach().cpu()) for layer in units}
    return WeightEdit(layers, {"steps_run": steps_run, "target_met": met})
