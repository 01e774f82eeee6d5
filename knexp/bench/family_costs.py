"""Every family of the generic adapter at mid size: the hook overhead and identification's cost against the bare passes.

Each family's real classes (``knexp.models.tiny.tiny_vlm``) with a 512-wide, 8-layer decoder and random weights, on the
family's small test images. Hook overhead: batched greedy captions with intervention hooks armed on ``units`` units of
every layer and zero noise, against no hooks (zero noise reproduces the plain captions, checked). Identification:
``compute_stats`` and every method's ranking on one sample, against the bare passes any gradient method runs (the
inpainted forward; the original's forward and the backward of y_c, anchored so that a gradient exists). Medians of
``repeats`` runs, in the reverse order every other round (``knexp.bench.timing``).
"""

from __future__ import annotations

import numpy as np
import torch

from knexp.bench.timing import alternating, paired_ratio

HEADING = "## Every family at mid size: hook overhead and identification (issue: any Hugging Face VLM)"


def _images(adapter, count: int, seed: int) -> list[np.ndarray]:
    h, w = adapter.image_size
    rng = np.random.default_rng(seed)
    return [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(count)]


def hooked_captions(adapter, pics: list[np.ndarray], batch_size: int, units: int, repeats: int,
                    max_new_tokens: int) -> dict:
    """{plain_s, hooked_s, ratio}: greedy captions of ``pics`` with zero-noise hooks on ``units`` units of every layer,
    against none (the hook overhead; zero noise must give the same captions)."""
    from knexp.models.hooks.intervene import ActivationPatch, intervene

    prepared = [adapter.prepare(pics[i:i + batch_size]) for i in range(0, len(pics), batch_size)]
    rng = np.random.default_rng(0)

    def plain() -> list[str]:
        return [c for p in prepared for c in adapter.generate(p, max_new_tokens)]

    def hooked() -> list[str]:
        out = []
        for p in prepared:
            edits = {layer: ActivationPatch(torch.as_tensor(rng.choice(adapter.d_ff, units, replace=False)),
                                      add=torch.zeros(p.batch_size,
                                                      adapter.num_image_tokens)) for layer in range(adapter.num_layers)}
            with intervene(adapter, p, edits):
                out += adapter.generate(p, max_new_tokens)
        return out

    assert plain() == hooked(), "zero noise must reproduce the plain captions"  # also warms up
    plain_s, hooked_s, ratio = paired_ratio(plain, hooked, repeats)
    return {"plain_s": round(plain_s, 3), "hooked_s": round(hooked_s, 3), "ratio": round(ratio, 4)}


def identification_cost(adapter, catalog, repeats: int) -> dict:
    from knexp.bench.identification import _all_methods
    from knexp.identification.passes import compute_stats, locate_target
    from knexp.models.decoding.prefix_cache import logits_after_prefix
    from knexp.models.hooks.attach import gradient_anchor

    original, inpainted = _images(adapter, 2, 1)
    target = locate_target(adapter, f"{adapter.caption_prefix} a bus.", adapter.caption_prefix, catalog["bus"])

    def bare() -> None:
        prep_i = adapter.prepare([inpainted], continuations=[target.context])
        prep_o = adapter.prepare([original], continuations=[target.context])
        with torch.no_grad():
            logits_after_prefix(adapter, prep_i, prep_i.last_position[:1])
        with torch.enable_grad(), gradient_anchor(adapter, prep_o):
            logits_after_prefix(adapter, prep_o, prep_o.last_position[:1])[0, 0, target.token_id].backward()

    def identification() -> None:
        _all_methods(compute_stats(adapter, original, inpainted, target))

    bare(), identification()  # warm-up
    median, _ = alternating({"bare": bare, "identification": identification}, repeats)
    return {"bare_s": round(median["bare"], 4), "identification_s": round(median["identification"], 4),
            "ratio": round(median["identification"] / median["bare"], 4)}


def family_costs(images: int = 32, batch_size: int = 8, units: int = 64, repeats: int = 8, max_new_tokens: int = 16,
                 width: int = 512, layers: int = 8) -> dict:
    """The hook overhead and identification's cost of every family at ``width`` x ``layers`` (module docstring)."""
    from knexp.job.spec import default_catalog
    from knexp.models.tiny.tiny_builders import Size
    from knexp.models.tiny.tiny_vlm import TINY, tiny_vlm

    catalog = default_catalog()
    rows = {}
    for family in sorted(TINY):
        adapter = tiny_vlm(family, layers=layers, size=Size(width, 8))
        rows[family] = {"fast_paths": adapter.fast_paths, "image_tokens": adapter.num_image_tokens,
                        "hooks": hooked_captions(adapter, _images(adapter, images, 0), batch_size, units, repeats,
                                                 max_new_tokens),
                        "identification": identification_cost(adapter, catalog, repeats)}
    return {"width": width, "layers": layers, "images": images, "batch_size": batch_size, "units_per_layer": units,
            "max_new_tokens": max_new_tokens, "repeats": repeats, "families": rows,
            "targets": {"hooks": "<= 1.05", "identification": "<= 1.3"}}


def family_markdown(r: dict) -> str:
    lines = [f"| `{name}` | {'yes' if row['fast_paths'] else 'no (its own forward and generate)'} | "
             f"{row['image_tokens']} | "
             f"{row['hooks']['plain_s']} / {row['hooks']['hooked_s']} | **{row['hooks']['ratio']}** | "
             f"{row['identification']['bare_s']} / {row['identification']['identification_s']} | "
             f"**{row['identification']['ratio']}** |"
             for name, row in r["families"].items()]
    met_h = all(row["hooks"]["ratio"] <= 1.05 for row in r["families"].values())
    met_i = all(row["identification"]["ratio"] <= 1.3 for row in r["families"].values())
    header = ("| family | fast paths | image tokens | captions plain / hooked (s) | hook overhead (target "
              f"{r['targets']['hooks']}) "
              f"| bare / identification (s) | identification (target {r['targets']['identification']}) |")
    return f"""{HEADING}

Each family's real classes with a {r['width']}-wide, {r['layers']}-layer decoder and random weights
(`knexp.bench.family_costs`), on its small test images. Hooks: {r['images']} captions in batches of {r['batch_size']},
{r['max_new_tokens']} new tokens, hooks on {r['units_per_layer']} units of every layer with zero noise, against none.
Identification: one sample's `compute_stats` and every method's ranking against the bare passes. Hooks: the median over
{r['repeats']} rounds of each round's ratio; identification: the ratio of the medians of {r['repeats']} runs; the order
reversed every other round.

{header}
|---|---|---|---|---|---|---|
{chr(10).join(lines)}

Hook overhead target met for every family: {met_h}. Identification target met for every family: {met_i}.
"""
