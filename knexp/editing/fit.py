"""Learning an edit of some ``down_proj`` columns by gradient (the ``optimized`` rule, and the fine-tuning baseline;
docs/method.md, "Editing with the found neurons").

The edit Delta [d_model, U] of each layer is trained while the model stays frozen: a hook adds O'[..., units] @ Delta^T
to the FFN's output (``ffn_out``, with O' read at ``ffn``), which is what W_out[:, units] += Delta computes. The loss,
per step, over the fitting data (``FitData``):

  the target's loss (``knexp.editing.target``) at each sample's target position (the caption's context before k)
  + kl_weight * mean KL(p_edit || p_base)    against the unedited model, at every position of the unedited caption of
                                              each image without k (teacher-forced), and after each text-only prompt
  + norm_weight * ||Delta||_F^2
  [+ the unlikelihood of k at every position of the fitting images' captions, when it stops on them (``CaptionWatch``)]
  [+ lam * sum_l tr(Delta_l A_l Delta_l^T) / tr(W_l A_l W_l^T), A_l the preserved second moment of the set's
     activations (``Penalty``; the ``local`` rule)]

Adam on Delta, from zero. With ``stop="target"`` it stops as soon as every fitting sample meets the target
(``EditTarget.met``); with ``stop="captions"``, as soon as the greedy captions of the fitting images, regenerated every
``check_every`` steps, all show the edit's effect (``knexp.editing.caption_stop``); or after ``steps``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from knexp.data.catalog import Knowledge
from knexp.editing.caption_stop import CaptionWatch
from knexp.editing.forcing import forced_caption, log_probs, target_context
from knexp.editing.sets import by_layer
from knexp.models.hooks.attach import everywhere
from knexp.models.prepared import Prepared
from knexp.models.weight_edit import LayerDelta, WeightEdit

log = logging.getLogger("knexp.progress")


@dataclass
class FitData:
    """What an edit is fitted on: teacher-forced prompts whose last position predicts the object (``samples``), and
    locality prompts (``locality``: images without k with their unedited captions, and the positions that predict the
    caption's tokens; ``texts``: text-only) with the unedited model's log-probabilities there (``base``, float [n, V]
    each), filled by ``baseline``."""

    samples: list[Prepared]
    # (one image + its caption, positions [n])
    locality: list[tuple[Prepared, torch.Tensor]] = field(default_factory=list)
    texts: list[list[str]] = field(default_factory=list)  # batches of text-only prompts
    base: list[torch.Tensor] = field(default_factory=list)
    watch: CaptionWatch | None = None  # the fitting images of k and their captions, for stop="captions"


@dataclass
class Penalty:
    """The ``local`` rule's locality term (module docstring): ``moments[l]`` = A_l restricted to the layer's edited
    units, float [U, U], in the order of ``by_layer``; ``weight`` = lam."""

    moments: dict[int, torch.Tensor]
    weight: float

    def __call__(self, deltas: dict[int, torch.Tensor], columns: dict[int, torch.Tensor]) -> torch.Tensor:
        """lam * sum_l tr(Delta_l A_l Delta_l^T) / tr(W_l A_l W_l^T), ``columns[l]`` = W_l [d_model, U], 0-d."""
        total = 0.0
        for layer, delta in deltas.items():
            a = self.moments[layer].to(delta)
            own = torch.einsum("du,uv,dv->", columns[layer], a, columns[layer]).clamp_min(1e-12)
            total = total + torch.einsum("du,uv,dv->", delta, a, delta) / own
        return self.weight * total


def baseline(adapter, data: FitData) -> FitData:
    """``data`` with the unedited model's log-probabilities at the locality prompts (``base``)."""
    with torch.no_grad():
        data.base = [log_probs(adapter, p) for p in data.locality + data.texts]
    return data


def fit_data(adapter, knowledge: Knowledge, samples: list[tuple[np.ndarray, str]],
             locality: list[tuple[np.ndarray, str]], texts: list[str], batch: int, max_new_tokens: int) -> FitData:
    """The optimized rule's data: each sample (image of k, its unedited caption) teacher-forced up to k where the
    caption names it, all of them watched (``CaptionWatch``), each image without k with its unedited caption (every
    caption position is a KL position), and the text prompts; with the unedited model's log-probabilities."""
    contexts = [(image, target_context(adapter, caption, knowledge)) for image, caption in samples]
    forced = [(image, context) for image, context in contexts if context is not None]
    chunks = [forced[i:i + batch] for i in range(0, len(forced), batch)]
    prepared = [adapter.prepare([im for im, _ in c], continuations=[ctx for _, ctx in c]) for c in chunks]
    loc = []
    for image, caption in locality:
        forced_one, start = forced_caption(adapter, image, caption)
        # the caption, and after it
        loc.append((forced_one, torch.arange(start - 1, forced_one.prompt_len, device=adapter.device)))
    watch = CaptionWatch([image for image, _ in samples], [caption for _, caption in samples], batch, max_new_tokens)
    return baseline(adapter, FitData(prepared, loc, [texts[i:i + batch] for i in range(0, len(texts), batch)],
                                     watch=watch))


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


def _locality_loss(adapter, data: FitData, kl_weight: float) -> list[torch.Tensor]:
    """kl_weight * KL(edited || unedited) at each locality prompt, over the prompts' count."""
    locality = data.locality + data.texts
    losses = []
    for prompt, base in zip(locality, data.base, strict=True):
        logp = log_probs(adapter, prompt)
        kl = F.kl_div(base, logp, log_target=True, reduction="batchmean")  # KL(edited || unedited)
        losses.append(kl_weight * kl / len(locality))
    return losses


def fit_columns(adapter, neurons, target, data: FitData, settings, penalty: Penalty | None = None) -> WeightEdit:
    """The edit of ``neurons``' columns that the module docstring's loss gives (``settings``: an ``Optimized`` rule);
    its provenance says how many steps ran, whether the target was met and, stopping on captions, how many checks."""
    units = by_layer(neurons)
    d_model = adapter.down_proj(0).out_features
    deltas = {layer: torch.zeros(d_model, len(u), device=adapter.device,
                                 requires_grad=True) for layer, u in units.items()}
    columns = {layer: adapter.down_proj(layer).weight[:, u.to(adapter.device)].detach().float()
               for layer, u in units.items()}
    goal = target.goal_ids(adapter)
    watch = data.watch if settings.stop == "captions" else None
    if watch is not None:
        watch.reset()  # the context is shared: another fit (a random control) may have watched before
    optimizer = torch.optim.Adam(list(deltas.values()), lr=settings.lr)
    steps_run, met = 0, False
    with torch.enable_grad(), with_columns(adapter, deltas, units):
        for step in range(settings.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            losses, met = [], True
            for prepared in data.samples:
                logp = log_probs(adapter, prepared)  # [B, V]
                losses.append(target.loss(logp, goal))
                met &= target.met(logp, goal, settings.target_prob)
            if watch is not None:  # the captions as they stand at the start, then regenerated every check_every steps
                due = step > 0 and (step % settings.check_every == 0 or step == settings.steps)
                met = watch.check(adapter, target) if due else step == 0 and watch.shows(target)
                if due:
                    log.info("fit: step %d/%d, %d of %d captions show the edit", step, settings.steps,
                             watch.showing(target), sum(watch.named(target)))
            if met or step == settings.steps:
                break
            if watch is not None:
                losses.append(watch.loss(adapter, target))
            losses += _locality_loss(adapter, data, settings.kl_weight)
            losses.append(settings.norm_weight * sum(d.pow(2).sum() for d in deltas.values()))
            if penalty is not None:
                losses.append(penalty(deltas, columns))
            torch.stack([v.reshape(()) for v in losses]).sum().backward()
            optimizer.step()
            steps_run = step + 1
    layers = [LayerDelta.columns(layer, units[layer], deltas[layer].detach().cpu()) for layer in units]
    checks = {"checks": watch.checks} if watch is not None else {}
    return WeightEdit(layers, {"steps_run": steps_run, "target_met": bool(met), **checks})
