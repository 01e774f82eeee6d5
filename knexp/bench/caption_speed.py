"""Captioning at the machine's limit: what knexp's decoding (``knexp.models.decoding.prefill``,
``knexp.models.decoding.streaming``) saves, and how close it comes to the arithmetic peak.

reuse_and_decode: perturbed captions per second, the model's own ``generate`` against ``greedy_ids`` at l_min = 20 and
0, and at l_min = 0 each saving turned off in turn (the shared prefix; dropping finished rows), captions compared in the
run. utilisation: FLOPs (``knexp.bench.flops``) per second over the float32 GEMM peak measured in the same run, for
batched captioning (prompt pass and decoding apart) and identification's passes, with a profile by operator.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from knexp.bench.timing import alternating
from knexp.data.toyworld.scenes import SceneOptions, make_scene
from knexp.job.session import session
from knexp.models.hooks.intervene import ActivationPatch, intervene

REUSE_HEADING = "## Reusing what an intervention cannot change (issue: captioning at the machine's limit)"
MFU_HEADING = "## Utilisation of the arithmetic peak (issue: captioning at the machine's limit)"


def _scenes(catalog, seed: int, count: int) -> list:
    return [make_scene(catalog, np.random.default_rng([seed, 5, i]), SceneOptions(gap_px=8)) for i in range(count)]


def _settings(s) -> tuple[int, int]:
    """(prompt batch, decoding width): the embedded model's ``model.generation`` settings, which the evaluation uses."""
    gen = s.spec.generation
    return gen.batch_size, gen.decode_width or gen.batch_size


def reuse_and_decode(images: int = 16, per_image: int = 8, units: int = 40, max_new_tokens: int = 32,
                     repeats: int = 2) -> dict:
    """Perturbed captions per second: the full recompute (the model's own ``generate`` per batch of ``batch_size`` rows:
    every layer of every row, and decoding until the batch's last row ends) against knexp's decoding as the
    evaluation runs it (``stream_ids``: the shared prefix once; layers below the set's lowest layer l_min once per
    image; finished rows leave; up to ``decode_width`` rows decode together, refilled by the next prompt batch as rows
    end), at l_min = 20 and l_min = 0 of 30. At l_min = 0, also knexp with each saving turned off in turn: each one's
    own ratio. Noise on ``units`` units in every layer from l_min, one seeded draw per row; ``per_image`` rows per
    image; median of ``repeats`` runs each, in the reverse order every other round (``knexp.bench.timing``). There are
    twice as many rows as the embedded model's ``decode_width`` (64), as in an evaluation: with no more rows than the
    width, every row starts at once, and neither continuous batching nor finished rows leaving can let later rows in
    earlier (measured at 64 rows: rows leaving 0.92x, i.e. a cost)."""
    from knexp.models.adapters.adapter import join_prefix
    from knexp.models.decoding.prefill import prefill
    from knexp.models.decoding.prefix_cache import PREFIXES
    from knexp.models.decoding.streaming import stream_ids

    s = session("model=embedded", "logger=none")
    adapter = s.adapter
    batch_size, width = _settings(s)
    pics = [sc.image for sc in _scenes(s.catalog, 78, images)]
    groups = [i // per_image for i in range(images * per_image)]  # each row's image
    chosen = torch.as_tensor(np.random.default_rng(0).choice(adapter.d_ff, units, replace=False))
    out = {"captions": len(groups), "images": images, "batch_size": batch_size, "width": width,
           "units_per_layer": units, "repeats": repeats, "max_new_tokens": max_new_tokens}
    modes = {"full": {}, "knexp": {}, "prefix_off": {"share_prefix": False}, "keep_finished": {"drop_finished": False},
             "one_batch_at_a_time": {"continuous": False}}

    def armed(rows: list[int], l_min: int, prepared):
        draws = [np.random.default_rng([l_min, r]).standard_normal(adapter.num_image_tokens) * 3 for r in rows]
        noise = torch.tensor(np.stack(draws), dtype=torch.float32)  # [B, P]: one seeded draw per row
        return intervene(adapter, prepared,
                         {layer: ActivationPatch(chosen, add=noise) for layer in range(l_min, adapter.num_layers)})

    def run(mode: str, l_min: int) -> list[str]:
        PREFIXES.clear()  # the prefix's one pass is part of what each run pays
        if mode == "full":
            ids = []
            for start in range(0, len(groups), batch_size):
                rows = list(range(start, min(start + batch_size, len(groups))))
                prepared = adapter.prepare([pics[groups[r]] for r in rows])
                with armed(rows, l_min, prepared):
                    ids += adapter.decode(adapter.generate_ids(prepared, max_new_tokens))
            return [join_prefix(adapter.caption_prefix, t) for t in ids]
        share = modes[mode].get("share_prefix", True)

        def prompt_pass(rows: list[int]):
            prepared = adapter.prepare([pics[groups[r]] for r in rows])
            with armed(rows, l_min, prepared):
                return prefill(adapter, prepared, l_min, [groups[r] for r in rows], share)

        ids = stream_ids(adapter, len(groups), prompt_pass, max_new_tokens, batch_size, width,
                         drop_finished=modes[mode].get("drop_finished", True),
                         continuous=modes[mode].get("continuous", True))
        return [join_prefix(adapter.caption_prefix, t) for t in adapter.decode(ids)]

    for l_min, compared in ((20, ("full", "knexp")), (0, tuple(modes))):
        median, captions = alternating({m: (lambda m=m, l_min=l_min: run(m, l_min)) for m in compared}, repeats)
        row = {f"{m}_per_s": round(len(groups) / median[m], 2) for m in compared}
        row["ratio"] = round(median["full"] / median["knexp"], 2)
        for mode in compared[2:]:
            row[f"{mode}_ratio"] = round(median[mode] / median["knexp"], 3)  # that saving alone
        row["identical"] = all(captions[m] == captions["full"] for m in compared)
        row["generated_tokens"] = sum(len(adapter.tokenize(c[len(adapter.caption_prefix):])) for c in captions["full"])
        out[f"l{l_min}"] = row
    out["targets"] = {"l20": ">= 2", "l0": ">= 0.97"}
    return out


def reuse_markdown(r: dict) -> str:
    """The BENCHMARKS.md section of ``reuse_and_decode``'s result."""
    r20, r0 = r["l20"], r["l0"]
    width = r.get("width", r["batch_size"])
    more = (f"There are more rows than decode together ({width}), as in an evaluation, so rows that end let later "
            "rows in." if r["captions"] > width else
            f"All {r['captions']} rows decode together from the start (the width is {width}).")
    rows = "\n".join(f"| {n} | {x['full_per_s']} | {x['knexp_per_s']} | **{x['ratio']}x** (target {r['targets'][key]}) "
                     f"| {x['identical']} |" for n, x, key in ((20, r20, "l20"), (0, r0, "l0")))
    savings = "\n".join(f"| {what} | {r0[key + '_per_s']} | **{r0[key + '_ratio']}x** |" for what, key in (
        ("the shared prefix (16 tokens before the image, once per model)", "prefix_off"),
        ("finished rows leave the batch", "keep_finished"),
        ("continuous batching (else one batch at a time)", "one_batch_at_a_time")))
    return f"""{REUSE_HEADING}

{r['captions']} perturbed captions ({r['images']} images x {r['captions'] // r['images']} rows, prompt batch
{r['batch_size']}, {r['max_new_tokens']} new tokens at most, noise on {r['units_per_layer']} units of every layer from
l_min) on the embedded model: the model's own `generate` per batch (every layer of every row; decoding goes on until
the batch's last row ends) against knexp's decoding (`knexp.models.decoding.prefill`,
`knexp.models.decoding.streaming`) as the evaluation runs it (the tokens before the image once per model; layers below
l_min once per image; finished rows leave; up to {width} rows decode together, the next prompt batch joining as rows
end). Median of {r['repeats']} runs each, in the reverse order every other round; the captions of every variant are
compared in the run.
{more}

| l_min | full recompute, captions / s | knexp, captions / s | ratio | identical captions |
|---|---|---|---|---|
{rows}

Each saving alone, at l_min = 0 (knexp with that one saving turned off, over knexp; captions identical:
{r0['identical']}):

| saving | knexp without it, captions / s | its ratio |
|---|---|---|
{savings}
"""


def utilisation(images: int = 64, max_new_tokens: int = 32, repeats: int = 3, top: int = 10) -> dict:
    """Model FLOP utilisation: the FLOPs batched greedy captioning and identification's passes execute
    (``knexp.bench.flops``, from the model's config and the actual token counts) per second, over the float32 GEMM
    peak torch reaches at the model's shapes on the same threads, measured in the same run: each timing is divided by
    the better of the peaks sampled just before and just after it (this machine's speed drifts by tens of percent within
    minutes; one sample of the whole run gave ratios above 1). Captioning runs as the
    evaluation does (``stream_ids`` at the embedded model's ``model.generation`` settings: prompt batches of
    ``batch_size``, up to ``decode_width`` rows decoding together), preparing the images included (its FLOPs counted by
    torch's FLOP counter: the image encoder and projector) and timed apart; it is
    timed ``repeats`` times plainly (the run of the median ratio is reported), then once under ``torch.profiler`` for
    its prompt pass and decoding apart and its ``top`` operators."""
    from knexp.bench.flops import DecoderShape, decode_flops, gemm_peak, prefill_flops
    from knexp.models.decoding.prefill import prefill
    from knexp.models.decoding.streaming import stream_ids

    s = session("model=embedded", "logger=none")
    adapter = s.adapter
    batch_size, width = _settings(s)
    lm, _ = adapter.language_model()
    shape = DecoderShape.of(lm.config)
    peaks = [gemm_peak(shape)]  # sampled between the timings
    scenes = _scenes(s.catalog, 79, images)
    pics = [sc.image for sc in scenes]
    stop = set(adapter.stop_token_ids)
    sample = adapter.prepare(pics[:1])
    prompt_len, past = sample.prompt_len, int(sample.image_positions[0, 0])
    with FlopCounterMode(display=False) as counter:  # the image encoder and projector, counted by torch (2 images)
        adapter.mllm.image_embeddings(pics[:2])
    encoder_flops = counter.get_total_flops() // 2  # per image

    preparing = []  # seconds spent preparing each prompt batch's images (the image encoder), inside the captioning

    def prepared(rows: list[int]):
        began = time.perf_counter()
        batch = adapter.prepare([pics[r] for r in rows])
        preparing.append(time.perf_counter() - began)
        return batch

    def caption_all() -> tuple[int, int]:
        ids = stream_ids(adapter, images, lambda rows: prefill(adapter, prepared(rows)), max_new_tokens, batch_size,
                         width).tolist()
        generated = [next((i + 1 for i, t in enumerate(row) if t in stop), max_new_tokens) for row in ids]
        return prefill_flops(shape, prompt_len, images, past), decode_flops(shape, prompt_len, generated)

    def rate(n: float, seconds: float, peak: float) -> dict:
        return {"gflop": round(n / 1e9, 1), "s": round(seconds, 3), "gflops_per_s": round(n / seconds / 1e9, 1),
                "mfu": round(n / seconds / peak, 3), "peak_gflops": round(peak / 1e9, 1)}

    runs = []  # each timed captioning, over the better of the peaks sampled just before and just after it
    for _ in range(repeats):
        preparing.clear()
        began = time.perf_counter()
        prefill_fl, decode_fl = caption_all()
        seconds = time.perf_counter() - began
        peaks.append(gemm_peak(shape))
        runs.append((seconds, sum(preparing), max(peaks[-2:])))
    flops = prefill_fl + decode_fl  # the language model's
    whole = flops + images * encoder_flops  # with preparing the images
    # the median ratio's run
    caption_s, encoder_s, peak = sorted(runs, key=lambda r: whole / r[0] / r[2])[len(runs) // 2]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        caption_all()
    peaks.append(gemm_peak(shape))
    profiled_peak = max(peaks[-2:])
    phases, total_self, profile_rows = _operator_profile(prof.key_averages(), top)
    ident_flops, ident_s = _identification_timing(adapter, scenes[0], shape, past, peaks)
    return {"gemm_peak_gflops": round(max(peaks) / 1e9, 1), "gemm_peak_samples": [round(p / 1e9, 1) for p in peaks],
            "captions": images, "batch_size": batch_size, "width": width, "repeats": repeats,
            "captioning_runs": [rate(whole, r[0], r[2]) for r in runs],
            "captioning": rate(whole, caption_s, peak), "language_model": rate(flops, caption_s - encoder_s, peak),
            "preparing_images_s": round(encoder_s, 3), "encoder_gflop_per_image": round(encoder_flops / 1e9, 3),
            "identification": rate(ident_flops, ident_s, max(peaks[-2:])),
            "profiled": {"prefill": rate(prefill_fl, phases["knexp.prefill"], profiled_peak),
                         "decode": rate(decode_fl, phases["knexp.decode"], profiled_peak)},
            "profile_total_s": round(total_self / 1e6, 2), "operators": profile_rows, "target": ">= 0.60 (captioning)"}


def _operator_profile(events, top: int) -> tuple[dict, float, list[dict]]:
    """(seconds of the prompt passes and of decoding, the profile's total self time, its ``top`` operators by self
    time) from ``torch.profiler`` events."""
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in ("knexp.prefill", "knexp.decode")}
    operators = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: e.self_cpu_time_total,
                       reverse=True)
    total_self = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "calls": e.count, "self_s": round(e.self_cpu_time_total / 1e6, 3),
             "share": round(e.self_cpu_time_total / total_self, 3)} for e in operators[:top]]
    return phases, total_self, rows


def _identification_timing(adapter, scene, shape, past: int, peaks: list[float]) -> tuple[int, float]:
    """(FLOPs, seconds) of identification's two passes on ``scene``'s first object, after a warm-up run; the GEMM peak
    is sampled before and after the timed run into ``peaks``."""
    from knexp.bench.flops import gemm_peak, identification_flops
    from knexp.counterfactual.inpaint import inpaint, region_mask
    from knexp.identification.passes import compute_stats, locate_target

    obj = scene.objects[0]
    edited = inpaint(scene.image, region_mask(scene.image.shape[:2], bbox=obj.bbox, dilation=2), 3, "telea")
    target = locate_target(adapter, f"{adapter.caption_prefix} {obj.knowledge.indefinite}.", adapter.caption_prefix,
                           obj.knowledge)
    compute_stats(adapter, scene.image, edited, target)  # warm up
    peaks.append(gemm_peak(shape))
    began = time.perf_counter()
    compute_stats(adapter, scene.image, edited, target)
    seconds = time.perf_counter() - began
    peaks.append(gemm_peak(shape))
    prompt_len = adapter.prepare([scene.image], continuations=[target.context]).prompt_len
    return identification_flops(shape, prompt_len, past), seconds


def mfu_markdown(u: dict) -> str:
    """The BENCHMARKS.md section of ``utilisation``'s result (also of an older run's, which sampled the peak once)."""
    peak_of = (lambda r: f" | {r['peak_gflops']}") if "gemm_peak_samples" in u else (lambda r: "")

    def row(name: str, r: dict) -> str:
        return f"| {name} | {r['gflop']} | {r['s']} | {r['gflops_per_s']}{peak_of(r)} | **{r['mfu']}** |"

    ops = "\n".join(f"| `{o['op']}` | {o['calls']} | {o['self_s']} | {o['share']:.1%} |" for o in u["operators"])
    p = u["profiled"]
    if "gemm_peak_samples" in u:
        peak = (f"sampled before and after each timing ({', '.join(map(str, u['gemm_peak_samples']))} GFLOP/s: this "
                f"machine's speed drifts within minutes), each timing over the better of its two samples")
        header = "| | GFLOP | seconds | GFLOP/s | peak GFLOP/s | utilisation |\n|---|---|---|---|---|---|"
        runs = ", ".join(str(r["mfu"]) for r in u["captioning_runs"])
        encoder = (f"whose FLOPs (the image encoder and projector, {u['encoder_gflop_per_image']} GFLOP per image by "
                   "`torch.utils.flop_counter`) the first row counts" if "encoder_gflop_per_image" in u
                   else "whose FLOPs are not counted")
        timed = (f"The captioning was timed {u['repeats']} times (utilisation {runs}); the table shows the run of the "
                 f"median. Its time includes preparing the images ({u['preparing_images_s']} s), {encoder} (the image "
                 "encoder is `mkldnn_convolution`, `native_batch_norm`, `clamp` below); the second row is the same "
                 "run without that time: the language model's FLOPs over the language model's time.")
        lm = "\n" + row("  the language model alone (the same run, less preparing the images)", u["language_model"])
    else:
        peak = f"measured once in the same run: **{u['gemm_peak_gflops']} GFLOP/s**"
        header = "| | GFLOP | seconds | GFLOP/s | utilisation |\n|---|---|---|---|---|"
        timed = ("The captioning time includes preparing the images (the image encoder: `mkldnn_convolution`, "
                 "`native_batch_norm`, `clamp` below), whose FLOPs are not counted.")
        lm = ""
    return f"""{MFU_HEADING}

FLOPs counted from the model's config and the actual token counts (`knexp/bench/flops.py`, checked against torch's
FLOP counter), over the float32 GEMM peak torch reaches at the embedded model's shapes on the same threads, {peak}.
Target for batched captioning: {u['target']}.

{header}
{row(f"batched greedy captioning ({u['captions']} images, prompt batch {u['batch_size']}, width {u.get('width', '-')})",
     u['captioning'])}{lm}
{row("  its prompt pass (profiled run)", p['prefill'])}
{row("  its decoding steps (profiled run)", p['decode'])}
{row("identification's passes (`compute_stats`, one sample)", u['identification'])}

{timed} The same captioning under `torch.profiler` ({u['profile_total_s']} s profiled), the operators with the most time
of their own:

| operator | calls | seconds | share |
|---|---|---|---|
{ops}
"""
