"""The whole pipeline on the tiny model of every family of the generic adapter: ``run.py task=evaluate`` (Table II and
a Fig. 3 panel), and through the Python API every method, every intervention, the trace and the report.

A tiny random model captions random words, so each family runs on an object its random captions happen to name in one
of these toy-world scenes and not once the object is inpainted away (found with ``task=select
task.all_knowledge=true``).
"""

import json

import pytest
from conftest import run_py

# family -> (knowledge, scenes, model seed): a sample the tiny model's captions select
SETUPS = {
    "qwen2_5_vl": ("cell_phone", 60, 0), "qwen2_vl": ("pizza", 60, 0), "qwen3_vl": ("bear", 60, 0),
    "gemma3": ("pizza", 60, 0),
    "llava": ("cell_phone", 60, 0), "llava_next": ("suitcase", 60, 2), "llava_onevision": ("horse", 60, 0),
    "idefics3": ("horse", 60, 0), "smolvlm": ("horse", 60, 0), "internvl": ("bear", 150, 1),
}


def _common(family: str, tmp_path) -> list[str]:
    knowledge, scenes, seed = SETUPS[family]
    return [f"model=tiny_{family}", f"model.seed={seed}", f"knowledge={knowledge}", f"data.num_images={scenes}",
            "thresholds.n=20", "thresholds.layers=nonzero", "task.k_images=1", "task.other_images=2", "logger=none",
            f"data.root={tmp_path}/tw", f"paths.cache_dir={tmp_path}/cache"]


@pytest.mark.parametrize("family", sorted(SETUPS))
def test_run_py_evaluates_a_family_and_writes_table2_and_a_panel(family, tmp_path):
    r = run_py("task=evaluate", *_common(family, tmp_path), f"hydra.run.dir={tmp_path}/job", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert metrics["status"]["state"] == "ok" and metrics["model"] == f"tiny_{family}"
    assert {"S_se", "S_re", "S_mean"} <= set(metrics["table2"]) and metrics["table3"]["pairs"] > 0
    panels = list((tmp_path / "job" / "figures").glob("neuron_*.png"))
    assert panels and all(p.stat().st_size > 10_000 for p in panels)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "llava_onevision", "idefics3"])
def test_every_method_intervention_the_trace_and_the_report_run_on_a_family(family, tmp_path):
    """Through the Python API: every method identifies on the cached statistics, every intervention captions, the trace
    draws its four kinds with captions, and the report summarises a sweep of the family's jobs."""
    import knexp
    from knexp.evaluation.interventions import Noise
    from knexp.reporting.sweep import write_report

    overrides = [o for o in _common(family, tmp_path) if not o.startswith("task.")]
    s = knexp.session(*overrides, f"trace.objects=[{SETUPS[family][0]}]", output_dir=tmp_path / "api")
    found = s.identify()
    assert found.results, found.selection.message
    for method in ("ours", "stage1_only", "stage2_only", "schwettmann", "pan", "random"):
        assert s.identify(method=method).results, method
    # in the live window, traced on the family's own object: a tiny model's may be empty
    live = s.identify(method="attribution")
    assert live.results or all("leaves no layer" in why["reason"] for why in live.skipped)
    assert s.resources.stats_cache.computed == len(found.results)  # every method ranked the same cached statistics
    image = s.data.load_image(found.results[0].candidate.image_id)
    neurons = found.results[0].neurons
    for how in ("zero", "mean", "inpainted", "noise"):
        caption = s.caption([image], neurons=neurons, intervention=how, level=40.0)
        assert caption[0].startswith(s.adapter.caption_prefix), how
    s.intervention = Noise(name="noise", levels=(40.0,), draws=1)
    evaluation = s.evaluate(found, k_images=1, other_images=1)
    assert evaluation.scores["table2"] is not None
    trace = s.trace(objects=[found.knowledge])
    assert set(trace.samples[0].delta) == {"resid", "ffn", "ffn_upto", "ffn_from"} and trace.samples[0].named["resid"]
    heat = s.heatmap(found.results[0])
    assert heat.values.shape == image.shape[:2]
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    metrics = {**s.spec.labels(), "status": found.status(), **evaluation.scores,
               "per_layer": evaluation.per_layer(s.adapter.num_layers)}
    (tmp_path / "sweep" / "0" / "metrics.json").write_text(json.dumps(metrics))
    report = write_report(tmp_path / "sweep", tmp_path / "report")
    assert "Table II" in report.markdown.read_text()
