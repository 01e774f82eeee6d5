"""A ROME-style rank-one edit of one ``down_proj`` (Meng et al., 2022), the baseline that edits a layer, not neurons.

ROME's subject token has an image analogue: the image tokens over the object. For layer l:

  key      k* = mean of O'^l [d_f] over the object's image tokens (``PatchGeometry.object_tokens``: those of the finest
           view whose box centre lies in the object's instance mask) of the identification images;
  C        = mean of O'^l O'^l^T over every image token of ``covariance_images`` images without k, plus a ridge of
           ``ridge`` x its mean diagonal (fewer tokens than d_f leave it singular);
  value    v* = W k* + delta*, delta* [d_model] learned (Adam, ``steps``, ``lr``) as the vector added to the FFN's
           output at the object's image tokens that gives the target's loss (``knexp.editing.target``) at the caption's
           target position, plus ``norm_weight`` ||delta||^2, until the target is met;
  update   W += delta* u^T, u = C^-1 k* / (k*^T C^-1 k*): the least change of W, measured by C, with W k* = v*.

Every column of the layer changes: the edit's cost says so (``parameters_changed`` = d_model x d_f).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from knexp.editing.forcing import target_context
from knexp.models.hooks.attach import attached
from knexp.models.hooks.record import recorded
from knexp.models.prepared import Prepared
from knexp.models.weight_edit import LayerDelta, WeightEdit
from knexp.settings import Integer, Number, check_fields


@dataclass
class RankOneData:
    """What the rank-one edit needs: each identification sample teacher-forced up to k (``samples``, one row each) with
    its object's patch tokens (``patches``), and the images without k for the covariance (``others``)."""

    samples: list[Prepared]
    patches: list[np.ndarray]
    others: list[np.ndarray]


def rank_one_data(adapter, data, results, knowledge, covariance: list[np.ndarray]) -> RankOneData:
    """The rank-one edit's data from identification results (``SampleResult``: the image, its unedited caption and the
    object's annotation): each sample teacher-forced up to k with its object's patch tokens, and the ``covariance``
    images without k."""
    samples, patches = [], []
    for r in results:
        context = target_context(adapter, r.candidate.original_caption, knowledge)
        if context is None:
            continue
        samples.append(adapter.prepare([data.load_image(r.candidate.image_id)], continuations=[context]))
        patches.append(adapter.geometry.object_tokens(data.instance_mask(r.candidate.annotation_id)))
    return RankOneData(samples, patches, covariance)


@dataclass
class RankOne:
    """The baseline's settings (``task.rank_one``; module docstring)."""

    layer: int | None = None  # null: the layer that holds most of the edited set's neurons
    steps: int = 40
    lr: float = 0.05
    norm_weight: float = 1e-3
    ridge: float = 1e-2
    covariance_images: int = 16
    target_prob: float = 0.05

    def __post_init__(self):
        check_fields(self, "task.rank_one", layer=Integer(low=0, optional=True), steps=Integer(low=1),
                     lr=Number(low=0.0, low_open=True),
                     norm_weight=Number(low=0.0), ridge=Number(low=0.0, low_open=True),
                     covariance_images=Integer(low=1), target_prob=Number(0.0, 1.0, low_open=True))

    @torch.no_grad()
    def _key_and_covariance(self, adapter, layer: int, data: RankOneData,
                            batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = []
        for prepared, patches in zip(data.samples, data.patches, strict=True):
            keys.append(recorded(adapter, prepared, [layer])[layer][0, torch.as_tensor(patches)])  # [n_p, d_f]
        key = torch.cat(keys).mean(0)  # [d_f]
        second, count = None, 0
        for i in range(0, len(data.others), batch):
            prepared = adapter.prepare(data.others[i:i + batch])
            o = recorded(adapter, prepared, [layer])[layer].reshape(-1, key.shape[0]).double()  # [B * P, d_f]
            second = o.T @ o if second is None else second + o.T @ o
            count += o.shape[0]
        c = second / max(count, 1)
        c += self.ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
        return key, c

    def make(self, adapter, layer: int, target, data: RankOneData, batch: int) -> WeightEdit:
        key, c = self._key_and_covariance(adapter, layer, data, batch)
        d_model = adapter.down_proj(layer).out_features
        delta = torch.zeros(d_model, device=adapter.device, requires_grad=True)
        goal = target.goal_ids(adapter)
        optimizer = torch.optim.Adam([delta], lr=self.lr)
        steps_run, met = 0, False
        for step in range(self.steps):
            optimizer.zero_grad(set_to_none=True)
            losses, met = [], True
            for prepared, patches in zip(data.samples, data.patches, strict=True):
                # [n_p]
                at = prepared.image_positions[0, torch.as_tensor(patches, device=prepared.image_positions.device)]

                def add(out, start, at=at):  # the FFN's output [1, n, d_model] of the prompt's pass from ``start``
                    out = out.clone()
                    out[0, at - start] += delta.to(out.dtype)
                    return out

                with torch.enable_grad(), attached(adapter, {("ffn_out", layer): add}, prepared):
                    last = prepared.last_position[:1]
                    logp = F.log_softmax(adapter.forward(prepared, positions=last)[0, -1].float(), -1)[None]  # [1, V]
                losses.append(target.loss(logp, goal))
                met &= target.met(logp, goal, self.target_prob)
            if met:
                break
            (torch.stack(losses).sum() + self.norm_weight * delta.pow(2).sum()).backward()
            optimizer.step()
            steps_run = step + 1
        u = torch.linalg.solve(c, key.double())  # C^-1 k*
        u = (u / (key.double() @ u)).float()  # [d_f], u . k* = 1
        update = delta.detach().cpu()[:, None] * u.cpu()[None, :]  # [d_model, d_f]
        return WeightEdit([LayerDelta(layer, "down_proj", "whole", update)],
                          {"rule": "rank_one", "layer": layer, "steps_run": steps_run, "target_met": met,
                           "delta_norm": float(delta.detach().norm())})
