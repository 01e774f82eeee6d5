"""What an edit rule may build its context from (``EditRule.context``): the model, the object's identification, the
data, and what fitting may see besides (images without k, text prompts, the reference statistics).

A rule reads what it needs and nothing else; a new rule that needs new data builds it here from these, with no change
elsewhere. ``task=edit`` builds one context per way of building it (``type(rule).context``), so the edit, its random
control and the fine-tuning baseline share one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from knexp.data.coco import CocoScenes
from knexp.editing.preserved import PreservedKeys
from knexp.editing.target import EditTarget
from knexp.identification.pipeline import Identification
from knexp.identification.reference import ReferenceStats
from knexp.models.adapters.adapter import Adapter


@dataclass
class EditInputs:
    """``found``: the object's identification (its samples: images, unedited captions, annotations, statistics);
    ``locality``: images without k that fitting may see (never among the measured ones); ``texts``: text-only prompts
    that fitting may see; ``reference()``: the model's reference statistics, computed on the first call;
    ``preserved(layers, positions, site)``: the preserved keys of ``layers`` (``knexp.editing.preserved``) at hook site
    ``site`` (``ffn_in`` or ``ffn``) over at least ``positions`` positions of images without k that are never measured,
    with their captions, and of ``texts``; ``more_k``: the ids of more images of k that fitting may see (never
    measured); ``without_k(image_id)``: that image with every instance of k inpainted away (the counterfactual of
    stage 1, from the job's inpainting cache)."""

    adapter: Adapter
    target: EditTarget
    found: Identification
    data: CocoScenes
    locality: list[np.ndarray]
    texts: list[str]
    batch_size: int
    max_new_tokens: int
    reference: Callable[[], ReferenceStats]
    preserved: Callable[..., PreservedKeys]
    more_k: list[int] = field(default_factory=list)
    without_k: Callable[[int], np.ndarray] | None = None

    def samples(self) -> list[tuple[np.ndarray, str]]:
        """(image, unedited caption naming k) of each identification sample."""
        return [(self.data.load_image(r.candidate.image_id), r.candidate.original_caption) for r in self.found.results]

    def fitting_k(self) -> list[tuple[np.ndarray, str]]:
        """(image, unedited caption) of every image of k that fitting may see: the identification samples' and
        ``more_k``'s (their captions made here)."""
        more = [self.data.load_image(i) for i in self.more_k]
        return self.samples() + list(zip(more, self.captions(more), strict=True))

    def k_views(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(image [H, W, 3], the image with every instance of k inpainted away, the union of k's instance masks bool
        [H, W]) of every image of k that fitting may see: the identification images' and ``more_k``'s."""
        if self.without_k is None:
            raise ValueError("these edit inputs have no counterfactual images (without_k)")
        k = self.target.knowledge.coco_id
        views = []
        for image_id in [r.candidate.image_id for r in self.found.results] + list(self.more_k):
            views.append((self.data.load_image(image_id), self.without_k(image_id), self.data.object_mask(image_id, k)))
        return views

    def captions(self, images: list[np.ndarray]) -> list[str]:
        """The unedited model's greedy captions of ``images``."""
        return self.adapter.caption(images, self.batch_size, self.max_new_tokens) if images else []


@dataclass
class PreservedSite:
    """The preserved keys at hook site ``site`` (``ffn_in`` or ``ffn``) of every layer asked for so far, over at least
    ``per_unit`` x d_ff positions: a rule's context is asked once per set, and a set's new layers are computed together
    with those already held (each layer is cached on disk apart)."""

    inputs: EditInputs
    per_unit: float
    site: str = "ffn_in"
    _keys: PreservedKeys | None = field(default=None, repr=False)

    def __call__(self, layers: list[int]) -> PreservedKeys:
        have = self._keys.second if self._keys is not None else {}
        if any(layer not in have for layer in layers):
            minimum = int(np.ceil(self.per_unit * self.inputs.adapter.d_ff))
            self._keys = self.inputs.preserved(sorted(set(layers) | set(have)), minimum, self.site)
        return self._keys
