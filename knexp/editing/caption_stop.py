"""Fitting on what the user sees: the greedy captions of the fitting images of k (docs/method.md, "Stopping on the
captions").

A fit that stops when p(k) falls below a bar at one teacher-forced position can stop while the free caption still
names k a few words later. ``CaptionWatch`` holds the images of k that a fit may see (the identification images and
``edit.fit_k`` more, never measured) with their unedited greedy captions, and

  ``check``  regenerates their greedy captions under the edit as it stands and says whether every caption whose
             unedited version named k now shows the edit's effect (``EditTarget.caption_success``: erase, k not named;
             swap, k' named and k not);
  ``loss``   the unlikelihood of k at every position of the current captions and of the unedited ones:
             sum over captions c and positions t of -log(1 - p_t(k)), p_t(k) the probability of k's word ids
             (``knexp.editing.target.word_ids``) at the position that predicts c's t-th token (and the one after its
             last), teacher-forced after the image.
A current caption that equals the unedited one is forced once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from knexp.editing.target import EditTarget, word_ids
from knexp.models.hooks.attach import hooks_changed
from knexp.models.prepared import Prepared


def forced_captions(adapter, images: list[np.ndarray], captions: list[str]) -> tuple[Prepared, torch.Tensor]:
    """(one batch of ``images``, each with its caption teacher-forced after the caption prefix, bool [B, T]: the
    positions that predict each caption's tokens and the one after its last)."""
    prefix = adapter.caption_prefix
    bodies = [c[len(prefix):] if c.startswith(prefix) else "" for c in captions]
    bare = adapter.prepare(images[:1]).prompt_len
    lengths = [adapter.prepare(images[:1], continuations=[b]).prompt_len - bare for b in bodies]  # caption tokens
    prepared = adapter.prepare(images, continuations=bodies)
    index = torch.arange(prepared.prompt_len, device=prepared.last_position.device)[None]  # [1, T]
    last = prepared.last_position[:, None]  # [B, 1]
    lengths_t = torch.as_tensor(lengths, device=last.device)[:, None]
    return prepared, (index <= last) & (index >= last - lengths_t)


@dataclass
class CaptionWatch:
    """The images of k a fit may see, with their unedited captions (``unedited``) and their captions under the edit as
    it stands (``current``, updated by ``check``); module docstring."""

    images: list[np.ndarray]
    unedited: list[str]
    batch_size: int
    max_new_tokens: int
    current: list[str] = field(default_factory=list)
    checks: int = 0
    _forced: tuple[Prepared, torch.Tensor] | None = None

    def __post_init__(self):
        self.current = list(self.current or self.unedited)

    def reset(self) -> None:
        """Back to the unedited captions, no check made: before a fit starts."""
        self.current, self.checks, self._forced = list(self.unedited), 0, None

    def named(self, target: EditTarget) -> list[bool]:
        """Whether each unedited caption names k (only those decide ``check``)."""
        return [target.knowledge.mentioned_in(c) for c in self.unedited]

    def showing(self, target: EditTarget) -> int:
        """How many current captions whose unedited version named k show the edit's effect."""
        return sum(target.caption_success(c) for c, named in zip(self.current, self.named(target), strict=True)
                   if named)

    def shows(self, target: EditTarget) -> bool:
        """Whether every current caption whose unedited version named k shows the edit's effect."""
        return self.showing(target) == sum(self.named(target))

    def check(self, adapter, target: EditTarget) -> bool:
        """Regenerate the captions under the hooks in place, then ``shows``."""
        hooks_changed(adapter)  # the edit moved since the last captions: no shared prefix cache from before
        with torch.no_grad():
            self.current = adapter.caption(self.images, self.batch_size, self.max_new_tokens)
        self.checks += 1
        self._forced = None
        return self.shows(target)

    def loss(self, adapter, target: EditTarget) -> torch.Tensor:
        """The unlikelihood of k at every position of the current and unedited captions (module docstring), 0-d."""
        if self._forced is None:
            pairs = list(enumerate(self.unedited)) + [(i, c) for i, c in enumerate(self.current)
                                                      if c != self.unedited[i]]
            self._forced = forced_captions(adapter, [self.images[i] for i, _ in pairs], [c for _, c in pairs])
        prepared, mask = self._forced
        used = mask.any(0).nonzero()[:, 0]  # [K]: the positions any row needs
        logp = F.log_softmax(adapter.forward(prepared, positions=used).float(), -1)  # [B, K, V]
        p_k = logp[..., word_ids(adapter, target.knowledge)].exp().sum(-1)  # [B, K]
        return -(torch.log1p(-p_k.clamp(max=1 - 1e-6)) * mask[:, used]).sum()
