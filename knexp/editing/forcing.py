"""Teacher forcing for edits and their measures: the position that predicts k in an unedited caption, a caption forced
after its image, and the log-probabilities at the positions a loss or a measure reads."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from knexp.identification.passes import SampleSkipped, locate_target
from knexp.models.prepared import Prepared


def target_context(adapter, caption: str, knowledge) -> str | None:
    """The caption's text before its first mention of ``knowledge`` (``locate_target``'s context: teacher-forced, its
    last position predicts k; docs/method.md, "Stage 2: GradCAM filtering"), or None where the caption gives no
    target."""
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


def log_probs(adapter, prompt) -> torch.Tensor:
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
