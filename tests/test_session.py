"""The job's session (``knexp.job``): built once from the composed config, it hands the stages plain objects."""

import numpy as np
import pandas as pd
import pytest

from knexp.identification import methods as M
from knexp.identification.thresholds import BudgetRule, PaperRule
from knexp.job.compose import compose
from knexp.job.session import Session


def _session(tmp_path, *overrides) -> Session:
    return Session.from_config(compose(f"paths.cache_dir={tmp_path}/cache", "logger=none", *overrides,
                                       output_dir=tmp_path / "job"))


def test_the_knowledge_comes_from_the_composed_config(tmp_path):
    default = _session(tmp_path, "knowledge=bear")
    assert default.knowledge.mentioned_in("a teddy bear") and not default.knowledge.mentioned_in("a cot")
    s = _session(tmp_path, "knowledge=bear", "knowledge.synonyms=[cot]")
    assert s.knowledge.synonyms == ("cot",) and s.knowledge.mentioned_in("a cot on the floor")
    assert not s.knowledge.mentioned_in("a teddy bear on the floor") or s.knowledge.mentioned_in("bears")  # plural kept
    assert s.catalog["bear"] == s.knowledge  # evaluation scores every image through the same catalog entry
    assert s.catalog.mentioned("a cot and a clock") == {"bear", "clock"}
    other = _session(tmp_path, "catalog.clock.synonyms=[timepiece]")  # any entry of the catalog, not only the job's
    assert other.catalog["clock"].mentioned_in("an old timepiece") and len(other.catalog) == 30


def test_rule_method_and_logger_are_built_by_target(tmp_path):
    s = _session(tmp_path, "method=pan", "method.variant=authors", "thresholds=budget", "thresholds.n=30")
    assert isinstance(s.spec.method, M.Pan) and s.spec.method.variant == "authors"
    assert isinstance(s.spec.rule, BudgetRule) and s.spec.rule.n == 30 and s.spec.rule.label == "budget(abs, live)"
    paper = _session(tmp_path, "thresholds=paper")
    assert isinstance(paper.spec.rule, PaperRule)
    assert paper.spec.rule.per_knowledge["tennis racket"] == {"a": 1.5, "g": 0.0001}
    logger = s.spec.logger()
    logger.log_metrics({"x": 1})
    assert (tmp_path / "job" / "metrics.json").exists() and type(logger).__name__ == "RunLogger"


def test_sessions_for_other_objects_share_the_model_and_say_so_in_their_config(tmp_path):
    from knexp.job.spec import job_key

    s = _session(tmp_path, "model=tiny_minigpt4", "knowledge=bus")
    other = s.for_knowledge("tennis racket", tmp_path / "racket")
    assert other.adapter is s.adapter and other.resources.captioner is s.resources.captioner
    assert other.knowledge.name == "tennis racket" and other.spec.cfg.knowledge.name == "tennis racket"
    assert other.spec.output_dir == tmp_path / "racket" and other.spec.cfg.paths.output_dir == str(tmp_path / "racket")
    assert job_key(other.spec.cfg) != job_key(s.spec.cfg) and s.spec.cfg.knowledge.name == "bus"  # the parent untouched
    assert other.spec.job_key == job_key(other.spec.cfg)


def test_the_api_identifies_captions_and_draws_on_a_tiny_model(tmp_path):
    """identify -> a perturbed caption -> a heatmap through the session (a scripted captioner names the bus)."""
    from test_selection import _coco, script_captions

    _coco(tmp_path / "data", {i: [(6, (8 * i, 10, 40, 40))] for i in range(1, 4)})
    s = _session(tmp_path, "model=tiny_minigpt4", "knowledge=bus", "data=coco2017", f"data.root={tmp_path}/data",
                 "data.split=val",
                 "data.image_dir=val", "data.per_knowledge=2", "thresholds=budget", "thresholds.n=5",
                 "thresholds.layers=nonzero")
    script_captions(s)
    found = s.identify()
    assert len(found.results) == 2 and all(len(r.neurons) == 5 for r in found.results)
    assert found.per_layer(s.adapter.num_layers)[-1] == 0 and sum(found.per_layer(s.adapter.num_layers)) == 10
    pan = s.identify(method="pan")  # another configured method by name, on the same cached statistics
    assert isinstance(pan.method, M.Pan) and [len(r.neurons) for r in pan.results] == [5, 5]
    assert s.resources.stats_cache.computed == 2
    image = s.data.load_image(found.results[0].candidate.image_id)
    clean = s.caption([image])
    zeroed = s.caption([image], neurons=found.results[0].neurons, intervention="zero")
    noised = s.caption([image, image], neurons=found.results[0].neurons, intervention="noise", level=500.0)
    assert len(clean) == 1 and len(zeroed) == 1 and noised[0] == noised[1]  # one seed: the same draw for the same image
    assert all(c.startswith(s.adapter.caption_prefix) for c in clean + zeroed + noised)
    heat = s.heatmap(found.results[0])
    assert heat.values.shape == image.shape[:2] and 0 <= heat.iou_q95 <= 1
    assert set(heat.scores) == {"iou_q95", "pointing", "area_iou", "auc"}
    assert (heat.layer, heat.unit) == (int(found.results[0].neurons.layers[0]), int(found.results[0].neurons.units[0]))
    assert s.figure(found.results[0], tmp_path / "panel.png").stat().st_size > 20_000  # Fig. 3's four panels
    trace = s.trace(objects=["bus"], kinds=("resid",), captions=False)
    frame = trace.frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) == len(trace.samples) * s.adapter.num_layers
    assert set(trace.window) >= {"neuron_layers", "resid_share"}


def test_an_unusable_sample_is_skipped_with_its_reason_and_written(tmp_path, catalog):
    """A selected sample whose caption gives no target token is skipped, not fatal; selection.json lists it."""
    import json

    from test_selection import _coco, script_captions

    from knexp.identification.pipeline import identify_knowledge
    from knexp.identification.selection import Candidate, Selection
    from knexp.reporting.outputs import write_identification

    _coco(tmp_path / "data", {1: [(6, (10, 10, 40, 40))]})
    s = _session(tmp_path, "model=tiny_minigpt4", "knowledge=bus", "data=coco2017", f"data.root={tmp_path}/data",
                 "data.split=val", "data.image_dir=val", "thresholds.layers=nonzero")
    script_captions(s)
    bad = Candidate(1, 1, "bus", True, "", "the image shows a clock.", "the image shows nothing.")
    found = identify_knowledge(s.resources.selector, s.knowledge, s.spec.rule, s.spec.method, s.resources.stats_cache,
                               s.rule_context(), Selection("bus", 1, [bad], []))
    assert found.results == [] and len(found.skipped) == 1 and "does not name 'bus'" in found.skipped[0]["reason"]
    write_identification(tmp_path / "job", found, s.adapter.num_layers)
    assert json.loads((tmp_path / "job" / "selection.json").read_text())["skipped"] == found.skipped


@pytest.mark.parametrize("raised, skipped", [("setting", False), ("sample", True)])
def test_only_a_sample_level_cause_skips_a_sample_and_a_setting_error_stops_the_job(tmp_path, monkeypatch, raised,
                                                                                    skipped):
    """A ``ConfigError`` raised inside a sample's work (here from its passes) is never taken for a skip: it stops the
    job. A ``SampleSkipped`` skips the sample, and the identification's status says no sample was usable."""
    from test_selection import _coco, script_captions

    from knexp.identification import pipeline
    from knexp.identification.passes import SampleSkipped
    from knexp.user_errors import ConfigError

    _coco(tmp_path / "data", {1: [(6, (10, 10, 40, 40))]})
    s = _session(tmp_path, "model=tiny_minigpt4", "knowledge=bus", "data=coco2017", f"data.root={tmp_path}/data",
                 "data.split=val",
                 "data.image_dir=val", "data.per_knowledge=1", "thresholds.layers=nonzero", "task.cache=false")
    script_captions(s)
    error = SampleSkipped("no usable patch") if raised == "sample" else ConfigError("thresholds.x=1: use another")

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "compute_stats", failing)
    if not skipped:
        with pytest.raises(ConfigError, match="thresholds.x"):
            s.identify()
        return
    found = s.identify()
    assert found.results == [] and found.skipped[0]["reason"] == "no usable patch"
    status = found.status()
    assert status["state"] == "no_samples" and status["usable"] == 0 and "no usable patch" in status["reasons"]


def test_an_empty_identification_has_zero_counts_per_layer(tmp_path):
    from knexp.identification.pipeline import Identification
    from knexp.identification.selection import Selection

    found = Identification("bus", M.Ours(name="ours"), Selection("bus", 3, [], []), [])
    assert found.per_layer(4) == [0, 0, 0, 0]


@pytest.mark.parametrize("fails", [False, True])
def test_compute_stats_leaves_no_hook_behind(fails, catalog, monkeypatch):
    """Every hook compute_stats attaches (FFN inputs and outputs, act_fn, the gradient anchor) is gone after it returns,
    and after it raises halfway through its backward pass."""
    from knexp.identification import passes
    from knexp.identification.passes import compute_stats, locate_target
    from knexp.models.tiny.tiny_vlm import tiny_adapter

    adapter = tiny_adapter("llava")

    def hooks() -> int:
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in adapter.model.modules())

    images = [(np.random.default_rng(i).random((60, 60, 3)) * 255).astype(np.uint8) for i in range(2)]
    # transformers installs its own output-capturing hooks on a first forward
    adapter.forward(adapter.prepare(images[:1]))
    before = hooks()
    target = locate_target(adapter, "the image shows a bus.", adapter.caption_prefix, catalog["bus"])
    if fails:
        real = passes.logits_after_prefix  # compute_stats' pass (after the cached prefix)

        def forward_then_fail(*args):
            logits = real(*args)
            if logits.requires_grad:  # the original's pass: hooks are armed now
                assert hooks() > before
                raise RuntimeError("failed mid-pass")
            return logits

        monkeypatch.setattr(passes, "logits_after_prefix", forward_then_fail)
        with pytest.raises(RuntimeError, match="mid-pass"):
            compute_stats(adapter, *images, target)
    else:
        compute_stats(adapter, *images, target)
    assert hooks() == before


def test_decode_width_reaches_the_captioner_and_stays_out_of_the_cache_key(tmp_path):
    """``model.generation.decode_width`` (rows decoding together) goes to every caption path through the captioner; like
    ``batch_size`` it changes no caption, so the model's identity (every cache key) ignores it."""
    from knexp.models.registry import model_identity

    tiny = ("model=tiny_llava",)
    wide, narrow = (_session(tmp_path, *tiny, f"model.generation.decode_width={w}") for w in (48, "null"))
    assert wide.resources.captioner.decode_width == 48 and narrow.resources.captioner.decode_width is None
    assert wide.resources.captioner.batch_size == narrow.resources.captioner.batch_size == 8
    assert model_identity(wide.spec.model) == model_identity(narrow.spec.model)
    other = _session(tmp_path, *tiny, "model.generation.max_new_tokens=20")
    assert model_identity(other.spec.model) != model_identity(narrow.spec.model)  # what captions depend on still counts
