"""Greedy captions through the shared store: an image's caption is computed once per model and options.

A caption's key is (model identity, image identity, caption prefix, max_new_tokens), where the image identity
says where the pixels come from (dataset id and image id, plus annotation and inpainting options for an
inpainted image). Greedy captions do not depend on the batch (tested), so cached and fresh ones agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from knexp.models.adapters.adapter import Adapter
from knexp.settings import Integer, check_fields
from knexp.store import Store, stable_key


@dataclass(frozen=True)
class Generation:
    """``model.generation``: prompt rows per batch, new tokens per caption, and rows decoding together (null: the batch
    size; ``knexp.models.decoding.streaming.stream_ids``). Checked when the session is built."""

    batch_size: int = 16
    max_new_tokens: int = 32
    decode_width: int | None = None

    def __post_init__(self):
        check_fields(self, "model.generation", batch_size=Integer(low=1), max_new_tokens=Integer(low=1),
                     decode_width=Integer(low=1, optional=True))


class Captioner:
    def __init__(self, adapter: Adapter, model_key: str, store: Store, batch_size: int = 16, max_new_tokens: int = 32,
                 decode_width: int | None = None):
        self.adapter, self.model_key, self.store = adapter, model_key, store
        self.batch_size, self.max_new_tokens, self.decode_width = batch_size, max_new_tokens, decode_width

    def __call__(self, images: list[np.ndarray], image_keys: list, question: str | None = None,
                 prefix: str | None = None) -> list[str]:
        """Captions of ``images``, whose identities are ``image_keys`` (JSON-serialisable, one per image); ``question``
        and ``prefix`` in place of the model's caption question and prefix (both in the key when given)."""
        prefix_key = self.adapter.caption_prefix if prefix is None else prefix
        asked = [] if question is None else [question]
        keys = [stable_key("caption", self.model_key, k, prefix_key, self.max_new_tokens, *asked) for k in image_keys]
        return self.store.get_many(keys, lambda idx: self.adapter.caption(
            [images[i] for i in idx], batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
            width=self.decode_width,
            prefix=prefix, question=question), chunk=4 * max(self.batch_size, self.decode_width or 0))

    def renamed(self, model_key: str) -> Captioner:
        """The same captioner for a model whose identity is ``model_key`` (an edited model: its captions are its
        own)."""
        return Captioner(self.adapter, model_key, self.store, self.batch_size, self.max_new_tokens, self.decode_width)
