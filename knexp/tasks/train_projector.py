"""Train the embedded model's projector on toy-world scenes (``python run.py task=train_projector``).

Only the projector learns; the vision encoder and the LM stay frozen (MiniGPT-4's first stage). The loss
is next-token cross-entropy on the caption after the prefix ("The image shows") plus the end-of-turn
token, with the LM head applied only at the caption positions (a flat [N, d] tensor, not [B, T, V]).
Step ``s`` draws its scenes from ``np.random.default_rng([seed, TRAIN_STREAM, s])``, so a run is
reproducible, resumable, and disjoint from every ``data.seed`` split (which uses another stream).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from knexp.data.loading import scene_options
from knexp.data.toyworld.scenes import make_scene
from knexp.io import atomic_path
from knexp.job.session import Session
from knexp.models.registry import load_model
from knexp.models.zoo.embedded import EmbeddedMLLM, preprocess
from knexp.settings import DTYPES, Choice, Flag, Integer, Number, Text, check_fields
from knexp.user_errors import ConfigError

log = logging.getLogger(__name__)
TRAIN_STREAM = 1  # the dataset generator uses stream 2


def caption_batch(model: EmbeddedMLLM, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and labels [B, T_prompt + T_caption], right-padded; labels are -100 off the caption.

    Right padding needs no attention mask under causal attention: real tokens never see the pads.
    """
    prefix = model.prompt.caption_prefix
    prompt = model.prompt_ids(prefix)
    targets = []
    for c in captions:
        if not c.startswith(prefix):
            raise ConfigError(f"training caption {c!r} does not start with the caption prefix {prefix!r}")
        targets.append(model.tokenizer(c[len(prefix) :], add_special_tokens=False)["input_ids"] + [model.end_token_id])
    width = len(prompt) + max(map(len, targets))
    ids = torch.full((len(captions), width), model.end_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    ids[:, : len(prompt)] = torch.tensor(prompt)
    for i, t in enumerate(targets):
        ids[i, len(prompt) : len(prompt) + len(t)] = torch.tensor(t)
        labels[i, len(prompt) : len(prompt) + len(t)] = torch.tensor(t)
    return ids, labels


def caption_loss(model: EmbeddedMLLM, features: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over caption tokens; features [B, 49, 1280]."""
    device = model.device
    ids, labels = ids.to(device), labels.to(device)
    embeds = model.embed(ids, model.project(features))
    hidden = model.lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, T, d]
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm.lm_head(hidden[:, :-1][keep]).float()  # [N, V], caption positions only
    return F.cross_entropy(logits, target[keep])


def lr_at(step: int, settings) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    floor = settings.min_lr_ratio
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_projector(model: EmbeddedMLLM, path: Path, metadata: dict) -> None:
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.projector.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


@dataclass
class TrainProjectorTask:
    """``conf/task/train_projector.yaml``: the training settings (``lr_at`` reads the schedule's)."""

    name: str = "train_projector"
    seed: int = 0
    lm_dtype: str = "bfloat16"
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ghost_prob: float = 0.3
    empty_prob: float = 0.04
    log_every: int = 20
    checkpoint_every: int = 100
    resume_from: str | None = None
    output: str = "projector.safetensors"
    cache: bool = True

    def __post_init__(self):
        check_fields(self, "task", seed=Integer(low=0), lm_dtype=Choice(DTYPES), steps=Integer(low=1),
                     batch_size=Integer(low=1),
                     lr=Number(low=0.0, low_open=True), warmup_steps=Integer(low=0), min_lr_ratio=Number(0.0, 1.0),
                     weight_decay=Number(low=0.0), grad_clip=Number(low=0.0, low_open=True),
                     ghost_prob=Number(0.0, 1.0),
                     empty_prob=Number(0.0, 1.0), log_every=Integer(low=1), checkpoint_every=Integer(low=1),
                     resume_from=Text(optional=True), output=Text(), cache=Flag())

    def __call__(self, session: Session) -> dict:
        return run(session, self)


def run(session: Session, t: TrainProjectorTask) -> dict:
    spec, catalog = session.spec, session.catalog
    out_dir = spec.output_dir
    model_cfg = {**spec.model, "projector_path": None, "dtype": t.lm_dtype}  # start from a seeded random projector
    model = load_model(model_cfg, spec.cache_dir).mllm
    model.projector.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.projector.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    start = 0
    if t.resume_from:
        ckpt = torch.load(t.resume_from, map_location="cpu", weights_only=True)
        model.projector.load_state_dict(ckpt["projector"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        log.info("resumed from %s at step %d", t.resume_from, start)
    opts = scene_options(spec.data)
    opts.ghost_prob, opts.empty_prob = float(t.ghost_prob), float(t.empty_prob)
    history, began, smooth = [], time.time(), None
    for step in range(start, t.steps):
        rng = np.random.default_rng([t.seed, TRAIN_STREAM, step])
        scenes = [make_scene(catalog, rng, opts) for _ in range(t.batch_size)]
        features = model.encode_images(preprocess([s.image for s in scenes]))
        ids, labels = caption_batch(model, [s.caption for s in scenes])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        loss = caption_loss(model, features, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.projector.parameters(), t.grad_clip)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if (step + 1) % t.log_every == 0 or step == start:
            rate = (time.time() - began) / (step + 1 - start)
            log.info("step %d/%d loss %.4f (smoothed %.4f) lr %.2e %.2f s/step, eta %.0f min",
                     step + 1, t.steps, loss.item(), smooth, lr_at(step, t), rate, rate * (t.steps - step - 1) / 60)
            history.append({"step": step + 1, "loss": loss.item(), "smoothed": smooth})
        if (step + 1) % t.checkpoint_every == 0:
            with atomic_path(out_dir / "checkpoint.pt") as tmp:
                torch.save({"projector": model.projector.state_dict(), "optimizer": opt.state_dict(), "step": step + 1},
                           tmp)
    wall = time.time() - began
    meta = {"seed": t.seed, "steps": t.steps, "batch_size": t.batch_size, "lr": t.lr,
            "projector_kind": spec.model["projector_kind"],
            "ghost_prob": t.ghost_prob, "empty_prob": t.empty_prob, "wall_time_s": round(wall, 1),
            "final_smoothed_loss": round(smooth or 0, 4)}
    save_projector(model, Path(t.output), meta)
    (out_dir / "train_log.json").write_text(json.dumps({"meta": meta, "history": history}, indent=1))
    log.info("projector written to %s (%.1f min)", t.output, wall / 60)
    return meta
