"""What an edit is for (docs/method.md, "Editing with the found neurons"): erase k, or swap it for k'.

The target owns everything that differs between the two, so that rules, baselines and measures never compare the
operation's name:
  goal          the object whose words decide success: k for an erase, k' for a swap; its *goal ids* are the first
                token of each of its word forms as it follows a space (how a caption names it);
  loss          at positions with log-probabilities log p [B, V], summed over the rows: erase -log(1 - p(goal)),
                swap -log p(goal), p(goal) the probability of the goal ids together;
  met           erase: p(goal) < ``target_prob`` at every row; swap: every row's top token is a goal id;
  caption       erase: the caption no longer names k; swap: it names k' and not k;
  top token     erase: the top-1 token at the target position is no goal id; swap: it is one;
  yes / no      the objects asked about ("is there <a_k> in this image?") and what the answers must be: erase, No
                passes Yes for k; swap, also Yes passes No for k'.
A swap with no ``edit.replacement`` takes k's *partner*: the next catalog object of k's supercategory, by name, round
the list (a fixed partner per object).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from knexp.data.catalog import Catalog, Knowledge
from knexp.settings import SettingError


def word_ids(adapter, knowledge: Knowledge) -> torch.Tensor:
    """long [W]: the first token of each of the object's word forms as it follows a space (how a caption names it)."""
    return torch.as_tensor(sorted({adapter.tokenize(" " + form)[0] for form in knowledge.forms}), device=adapter.device)


def word_direction(adapter, knowledge: Knowledge) -> torch.Tensor:
    """float [d_model]: e_k / ||e_k||, e_k the unembedding row W_U[c] of the first token c of the object's word (its
    singular, as it follows a space): the direction of the ``kn`` rule, the one that raises the word's logit."""
    c = adapter.tokenize(" " + knowledge.singular)[0]
    row = adapter.unembedding()[c].float()
    return row / row.norm().clamp_min(1e-12)


@dataclass(frozen=True)
class EditTarget(ABC):
    """An edit's target (module docstring): ``knowledge`` is k; ``replacement`` is a swap's k' (None for an erase)."""

    knowledge: Knowledge
    replacement: Knowledge | None = None
    op: ClassVar[str] = ""

    @property
    @abstractmethod
    def goal(self) -> Knowledge:
        """The object whose words decide success."""

    @property
    @abstractmethod
    def asked(self) -> list[Knowledge]:
        """The objects the yes/no question asks about, in the order ``answered`` reads their margins."""

    @classmethod
    @abstractmethod
    def made(cls, catalog: Catalog, k: Knowledge, replacement: str | None) -> EditTarget:
        """The target for ``k`` from the ``edit`` group's settings (``replacement``: ``edit.replacement``)."""

    def goal_ids(self, adapter) -> torch.Tensor:
        """long [W]: the goal's word ids (``word_ids``)."""
        return word_ids(adapter, self.goal)

    @abstractmethod
    def loss(self, logp: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """The loss over rows of log-probabilities ``logp`` [B, V] (a 0-d sum), ``goal`` the goal ids."""

    @abstractmethod
    def met(self, logp: torch.Tensor, goal: torch.Tensor, target_prob: float) -> bool:
        """Whether every row of ``logp`` [B, V] meets the target."""

    @abstractmethod
    def caption_success(self, caption: str) -> bool:
        """Whether a caption shows the edit's effect."""

    @abstractmethod
    def top_success(self, token: int, goal: list[int]) -> bool:
        """Whether the top-1 token at a target position shows the edit's effect."""

    @abstractmethod
    def answered(self, margins: list[float]) -> bool:
        """Whether the yes/no answers show the edit's effect; ``margins`` are Yes's logit minus No's, one per object of
        ``asked``."""


@dataclass(frozen=True)
class Erase(EditTarget):
    """k no longer named."""

    op: ClassVar[str] = "erase"

    @classmethod
    def made(cls, catalog, k, replacement):
        return cls(k)

    @property
    def goal(self) -> Knowledge:
        return self.knowledge

    @property
    def asked(self) -> list[Knowledge]:
        return [self.knowledge]

    def loss(self, logp, goal):
        p_goal = logp[:, goal].exp().sum(-1)  # [B]
        return -torch.log1p(-p_goal.clamp(max=1 - 1e-6)).sum()

    def met(self, logp, goal, target_prob):
        return bool((logp[:, goal].exp().sum(-1) < target_prob).all())

    def caption_success(self, caption):
        return not self.knowledge.mentioned_in(caption)

    def top_success(self, token, goal):
        return token not in goal

    def answered(self, margins):
        return margins[0] < 0


@dataclass(frozen=True)
class Swap(EditTarget):
    """k' named in k's place."""

    op: ClassVar[str] = "swap"

    def __post_init__(self):
        if self.replacement is None:
            raise ValueError("a swap needs the object that takes k's place (replacement)")

    @classmethod
    def made(cls, catalog, k, replacement):
        if replacement is None:
            return cls(k, partner(catalog, k))
        new = catalog.named([replacement], "edit.replacement")[0]
        if new.name == k.name:
            raise SettingError("edit.replacement", replacement, f"must differ from the edited object {k.name!r}")
        return cls(k, new)

    @property
    def goal(self) -> Knowledge:
        return self.replacement

    @property
    def asked(self) -> list[Knowledge]:
        return [self.knowledge, self.replacement]

    def loss(self, logp, goal):
        return -torch.logsumexp(logp[:, goal], -1).sum()

    def met(self, logp, goal, target_prob):
        return bool(torch.isin(logp.argmax(-1), goal).all())

    def caption_success(self, caption):
        return self.replacement.mentioned_in(caption) and not self.knowledge.mentioned_in(caption)

    def top_success(self, token, goal):
        return token in goal

    def answered(self, margins):
        return margins[0] < 0 and margins[1] > 0


TARGETS: dict[str, type[EditTarget]] = {t.op: t for t in (Erase, Swap)}  # ``edit.op``'s values


def partner(catalog: Catalog, k: Knowledge) -> Knowledge:
    """The next object of ``k``'s supercategory by name, round the list (any other object where k is alone in it)."""
    same = sorted((x for x in catalog if x.supercategory == k.supercategory), key=lambda x: x.name)
    if len(same) < 2:
        same = sorted(catalog, key=lambda x: x.name)
    names = [x.name for x in same]
    return same[(names.index(k.name) + 1) % len(same)]
