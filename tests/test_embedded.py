"""End-to-end checks of the embedded model with its real weights (marked slow: about a minute)."""

import json

import numpy as np
import pytest
import torch

from knexp.data.toyworld.dataset import DATASET_STREAM
from knexp.data.toyworld.scenes import SceneOptions, make_scene
from knexp.evaluation.mentions import mention_scores
from knexp.models.adapters.spliced import SplicedAdapter
from knexp.models.zoo.embedded import load_embedded
from knexp.paths import default_cache_dir, project_root
from knexp.tasks.train_projector import caption_batch, caption_loss
from knexp.user_errors import ConfigError

pytestmark = pytest.mark.slow
SHIPPED = project_root() / "knexp/models/weights/embedded_projector.safetensors"


@pytest.fixture(scope="module")
def embedded():
    return load_embedded(default_cache_dir(), SHIPPED)


@pytest.fixture(scope="module")
def adapter(embedded):
    return SplicedAdapter(embedded)


def test_converted_lm_is_plain_safetensors():
    folder = default_cache_dir() / "smollm2-135m-instruct"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["intermediate_size"] == 1536


def test_prompt_has_one_contiguous_image_span_in_the_user_turn(embedded):
    ids = torch.tensor(embedded.prompt_ids())
    pos = (ids == embedded.image_token_id).nonzero().flatten()
    assert len(pos) == 49 and (pos.diff() == 1).all()
    text = embedded.tokenizer.decode(ids[: pos[0]])
    assert text.rstrip().endswith("<|im_start|>user")
    assert embedded.tokenizer.decode(ids[-3:]) == "The image shows"


def test_captions_name_the_objects_of_held_out_scenes(adapter, catalog):
    scenes = [make_scene(catalog, np.random.default_rng([4321, DATASET_STREAM, i]),
                         SceneOptions(gap_px=8)) for i in range(24)]
    captions = adapter.caption([s.image for s in scenes], batch_size=12)
    scores = mention_scores([{o.knowledge.name for o in s.objects} for s in scenes],
                            [catalog.mentioned(c) for c in captions])
    assert all(c.startswith("The image shows") for c in captions)
    assert scores["recall"] >= 0.85, (scores, captions)
    assert scores["precision"] >= 0.9, (scores, captions)


def test_batched_captions_equal_single_captions(adapter, catalog):
    images = [make_scene(catalog, np.random.default_rng([99, DATASET_STREAM, i])).image for i in range(3)]
    assert adapter.caption(images, batch_size=3) == [adapter.caption([im], batch_size=1)[0] for im in images]


def test_caption_batch_puts_labels_on_the_caption_only(embedded):
    ids, labels = caption_batch(embedded, ["The image shows a bus.", "The image shows a banana and an umbrella."])
    n_prompt = len(embedded.prompt_ids())
    assert (labels[:, :n_prompt] == -100).all()
    row = labels[1][labels[1] != -100]
    assert embedded.tokenizer.decode(row) == " a banana and an umbrella.<|im_end|>"
    assert (ids[:, :n_prompt] == torch.tensor(embedded.prompt_ids())).all()
    with pytest.raises(ConfigError, match="caption prefix"):
        caption_batch(embedded, ["A bus."])


def test_projector_training_steps_reduce_the_loss(catalog):
    model = load_embedded(default_cache_dir(), None, seed=3)
    model.projector.requires_grad_(True)
    opt = torch.optim.AdamW(model.projector.parameters(), lr=1e-3)
    scenes = [make_scene(catalog, np.random.default_rng([5, 1, i])) for i in range(4)]
    from knexp.models.zoo.embedded import preprocess

    feats = model.encode_images(preprocess([s.image for s in scenes]))
    ids, labels = caption_batch(model, [s.caption for s in scenes])
    losses = []
    for _ in range(6):
        loss = caption_loss(model, feats, ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.grad is None for p in model.lm.parameters()), "the LM stays frozen"


@pytest.mark.parametrize("method", ["ours", "pan"])
def test_identify_on_the_embedded_model(tmp_path, method):
    """task=identify on real weights: 2 selected samples, a non-empty neuron set, results on disk."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    (cache / "smollm2-135m-instruct").symlink_to(default_cache_dir() / "smollm2-135m-instruct")
    r = subprocess.run([sys.executable, "run.py", "task=identify", "knowledge=clock", f"method={method}",
                        "data.num_images=60",
                        "data.per_knowledge=2", "trace.objects=[clock]", f"data.root={tmp_path}/tw",
                        f"hydra.run.dir={tmp_path}/job", "logger=none",
                        f"paths.cache_dir={cache}"], cwd=project_root(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "job" / "identify.json").read_text())
    assert summary["samples"] == 2, summary
    assert all(size > 0 for size in summary["sizes"]) and sum(summary["per_layer"]) == sum(summary["sizes"])
    samples = sorted((tmp_path / "job" / "samples").glob("*.json"))
    first = json.loads(samples[0].read_text())
    assert "clock" in first["captions"]["original"] and "clock" not in first["captions"]["inpainted"]
    assert first["neuron_set"]["method"] == method and first["neuron_set"]["size"] == first["reference_size"]


def test_noise_on_many_neurons_changes_captions_and_zero_noise_does_not(adapter, catalog):
    from knexp.evaluation.interventions import rows_for
    from knexp.evaluation.perturb import noise_captions
    from knexp.identification.methods import NeuronSet

    images = [make_scene(catalog, np.random.default_rng([55, DATASET_STREAM, i])).image for i in range(2)]
    clean = adapter.caption(images)
    layers = np.repeat(np.arange(4, 12), 200)
    units = np.tile(np.arange(200), 8)
    neurons = NeuronSet("test", "", layers, units, np.zeros(len(units)))
    zero = noise_captions(adapter, images, rows_for([0, 1], [0.0], 1), neurons, seed=0)
    loud = noise_captions(adapter, images, rows_for([0, 1], [40.0], 2), neurons, seed=0)
    assert zero == clean
    assert sum(c not in clean for c in loud) >= 2, (clean, loud)


def test_evaluate_on_the_embedded_model_writes_scores_and_figures(tmp_path):
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(default_cache_dir() / "smollm2-135m-instruct")
    r = subprocess.run([sys.executable, "run.py", "task=evaluate", "knowledge=clock", "method=ours",
                        "data.num_images=60",
                        "data.per_knowledge=2", "task.k_images=2", "task.other_images=3", "intervention=noise",
                        "noise_level=paper",
                        "noise_level.draws=1", "trace.objects=[clock]", f"data.root={tmp_path}/tw",
                        f"hydra.run.dir={tmp_path}/job",
                        "logger=none", f"paths.cache_dir={cache}"], cwd=project_root(), capture_output=True, text=True,
                        timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert m["sets"] == 2 and m["clean"]["S_k"] == 1.0
    t2 = m["table2"]
    assert set(t2["per_level"]) == {"40.0", "80.0", "120.0"} and 0 <= t2["S_mean"] <= 1
    assert t2["S_mean"] == pytest.approx((t2["S_se"] + t2["S_re"]) / 2)
    assert 0 < m["table3"]["bertscore_f1"] <= 1 and m["table3"]["pairs"] == 2 * 3 * 2  # 2 sets x 3 levels x 2 images
    figures = {p.name for p in (tmp_path / "job" / "figures").iterdir()}
    assert "layers.png" in figures and sum(f.startswith("neuron_") for f in figures) == 2
    neurons = json.loads((tmp_path / "job" / "neurons.json").read_text())
    assert all(len(n["decoded"][0]["tokens"]) == 10 for n in neurons)
    assert m["cache"]["heatmaps_computed"] == 2
    # Fig. 3, measured, for the job's method: its 2 identification images and the 2 other images of k
    located = m["localization"]["ours"]
    assert located["identification"]["top"]["n_images"] == 2 and located["held-out"]["set"]["n_images"] == 2
    assert all(0 <= cell[k] <= 1 for kind in located.values() for cell in kind.values()
               for k in ("pointing", "area_iou", "auc", "random_auc"))
    assert {"pointing", "area_iou", "iou_q95"} <= set(neurons[0])
    # the same job into a new folder: its captions and its figures' heatmaps all come from the cache, unchanged
    again = subprocess.run([a.replace(f"{tmp_path}/job", f"{tmp_path}/job2") for a in r.args], cwd=project_root(),
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    m2 = json.loads((tmp_path / "job2" / "metrics.json").read_text())
    assert m2["cache"]["captions_computed"] == 0 and m2["cache"]["heatmaps_computed"] == 0
    assert m2["neurons"] == m["neurons"] and m2["table2"] == m["table2"]
    assert (tmp_path / "job2" / "neurons.json").read_text() == (tmp_path / "job" / "neurons.json").read_text()


def test_evaluate_with_the_inpainted_patch_at_a_size_ladder(tmp_path):
    """intervention=inpainted with task.sizes: one caption per image and set, a curve per size, the counterfactual's
    captions as the ceiling, and the live window (traced on clock alone here) in the results."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(default_cache_dir() / "smollm2-135m-instruct")
    r = subprocess.run([sys.executable, "run.py", "task=evaluate", "knowledge=clock", "method=attribution",
                        "intervention=inpainted",
                        "task.sizes=[10,300]", "data.num_images=60", "data.per_knowledge=2", "task.k_images=2",
                        "task.other_images=3",
                        "trace.objects=[clock]", f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job",
                        "logger=none",
                        f"paths.cache_dir={cache}"], cwd=project_root(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert m["intervention"] == "inpainted" and m["table2"] is None and [c["size"] for c in m["curve"]] == [10, 300]
    assert all(c["mean_set_size"] == c["size"] for c in m["curve"])
    assert all(c["S_mean"] == pytest.approx((c["S_se"] + c["S_re"]) / 2) for c in m["curve"])
    assert m["counterfactual"]["S_k"] <= 0.5 and m["clean"]["S_k"] == 1.0
    assert max(m["live_window"]) < 29 and (tmp_path / "job" / "trace.json").exists()
    rows = (tmp_path / "job" / "captions.csv").read_text().splitlines()
    images = m["images"]["k"] + m["images"]["other"]
    assert len(rows) - 1 == images + 2 * 2 * images  # clean + 2 sets x 2 sizes, one caption per image each
    assert 0.2 < m["curve_area"] <= 1


def test_perturbed_captions_do_not_depend_on_the_batch(adapter, catalog):
    """The default float32 LM is batch-invariant; in bfloat16 4 of these 32 captions changed with the batch."""
    from knexp.evaluation.interventions import rows_for
    from knexp.evaluation.perturb import noise_captions
    from knexp.identification.methods import NeuronSet

    images = [make_scene(catalog, np.random.default_rng([77, 5, i]), SceneOptions(gap_px=8)).image for i in range(8)]
    rng = np.random.default_rng(0)
    neurons = NeuronSet("t", "", np.sort(rng.integers(15, 30, 20)), rng.integers(0, adapter.d_ff, 20), np.zeros(20))
    rows = rows_for(list(range(8)), [40.0, 80.0], 2)
    batched = noise_captions(adapter, images, rows, neurons, seed=0, batch_size=32)
    assert batched == [noise_captions(adapter, images, [r], neurons, seed=0, batch_size=1)[0] for r in rows]


def test_optuna_tunes_thresholds_for_s_mean_on_the_tuning_split(tmp_path):
    """hparams_search=thresholds_optuna end to end: 2 trials on one tuning object; the reported best is the
    best trial's S_mean, with parameters inside the search space."""
    import subprocess
    import sys

    import yaml

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(default_cache_dir() / "smollm2-135m-instruct")
    r = subprocess.run([sys.executable, "run.py", "-m", "hparams_search=thresholds_optuna", "hydra.sweeper.n_trials=2",
                        "splits.tuning=[clock]", "intervention=noise", "noise_level=n120", "noise_level.draws=1",
                        "task.job.k_images=0", "task.job.other_images=1",
                        "data.num_images=60", "data.per_knowledge=2", f"data.root={tmp_path}/tw",
                        f"hydra.sweep.dir={tmp_path}/sweep",
                        "logger=none", f"paths.cache_dir={cache}"], cwd=project_root(), capture_output=True, text=True,
                        timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    trials = [json.loads((tmp_path / "sweep" / str(i) / "tune.json").read_text()) for i in (0, 1)]
    assert best["best_value"] == pytest.approx(max(t["S_mean"] for t in trials))
    assert 0.99 <= best["best_params"]["thresholds.q_a"] <= 0.9999
    assert 0.0 <= best["best_params"]["thresholds.q_g"] <= 0.9
    assert all(t["objects"] == ["clock"] and set(t["per_object"]) == {"clock"} for t in trials)


def test_a_killed_multirun_resumes_to_the_report_of_an_uninterrupted_one(tmp_path):
    """Kill a 4-job evaluate sweep (SIGKILL to its process group) after its first job; rerun it into the same
    folder: the finished job is skipped, and the report equals that of an uninterrupted sweep with its own cache."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def sweep(name: str) -> list[str]:
        cache = tmp_path / f"cache_{name}"
        if not cache.exists():
            cache.mkdir()
            (cache / "smollm2-135m-instruct").symlink_to(default_cache_dir() / "smollm2-135m-instruct")
        return [sys.executable, "run.py", "-m", "task=evaluate", "knowledge=clock,bus", "method=ours,random",
                "data.num_images=60",
                "data.per_knowledge=2", "task.k_images=1", "task.other_images=2", "intervention=noise",
                "noise_level=n120",
                "noise_level.draws=1", "trace.objects=[clock]", f"data.root={tmp_path}/tw",
                f"hydra.sweep.dir={tmp_path}/{name}", "logger=none", f"paths.cache_dir={cache}"]

    def report(name: str) -> str:
        r = subprocess.run([sys.executable, "run.py", "task=report", f"sweep_dir={tmp_path}/{name}",
                            f"hydra.run.dir={tmp_path}/r_{name}",
                            "logger=none"], cwd=project_root(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return (tmp_path / f"r_{name}" / "table2_per_knowledge.csv").read_text()

    full = subprocess.run(sweep("full"), cwd=project_root(), capture_output=True, text=True, timeout=1200)
    assert full.returncode == 0, full.stderr[-3000:]

    job = subprocess.Popen(sweep("killed"), cwd=project_root(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 900
    while not (tmp_path / "killed" / "0" / "done.json").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # into the second job
    assert job.poll() is None, "the sweep ended before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "killed" / "3" / "done.json").exists()

    rerun = subprocess.run(sweep("killed"), cwd=project_root(), capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "finished before" in rerun.stdout + rerun.stderr
    assert report("killed") == report("full")


def test_same_config_and_seed_give_byte_identical_neuron_sets_captions_and_metrics(tmp_path, job_files):
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(default_cache_dir() / "smollm2-135m-instruct")
    for name in ("a", "b"):
        r = subprocess.run([sys.executable, "run.py", "task=evaluate", "knowledge=clock", "method=ours",
                            "data.num_images=60",
                            "data.per_knowledge=2", "task.k_images=1", "task.other_images=1", "intervention=noise",
                            "noise_level=n120",
                            "noise_level.draws=1", "trace.objects=[clock]", "task.cache=false",
                            f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/{name}", "logger=none",
                            f"paths.cache_dir={cache}"], cwd=project_root(), capture_output=True, text=True,
                            timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = job_files(tmp_path / "a"), job_files(tmp_path / "b")
    assert len([f for f in a if f.startswith("samples/")]) == 2 and "neurons.json" in a
    assert a == b


def _log_gaps(log: str) -> list[float]:
    """Seconds between consecutive timestamped lines of a Hydra job log."""
    from datetime import datetime

    stamps = [datetime.strptime(line[1:24],
                                "%Y-%m-%d %H:%M:%S,%f") for line in log.splitlines() if line.startswith("[20")]
    return [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:], strict=False)]


def test_the_demo_console_is_never_silent_for_30_s_and_shows_the_sweeps_progress(tmp_path):
    """The demo's settings on a small sweep (bed x ours, random), cold cache: the first job pays the toy world, the
    selection and the live window's trace. Every job's log has a line at least every 30 s, and says job i/2 with an
    ETA."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "smollm2-135m-instruct").symlink_to(default_cache_dir() / "smollm2-135m-instruct")
    r = subprocess.run([sys.executable, "run.py", "experiment=demo", "knowledge=bed",
                        "method=ours,random", f"hydra.sweep.dir={tmp_path}/sweep", f"paths.cache_dir={cache}",
                        "logger=none"], cwd=project_root(), capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [(tmp_path / "sweep" / str(n) / "run.log").read_text() for n in range(2)]
    assert "job 1/2 · " in logs[0] and "job 2/2 · " in logs[1] and " · ETA " in logs[1] and "job 2/2 done in" in logs[1]
    assert "trace: pizza" in logs[0] and "captions with set 3/3" in logs[0]  # the first job did the slow phases
    gaps = [gap for log in logs for gap in _log_gaps(log)]
    assert len(gaps) > 20 and max(gaps) <= 30, sorted(gaps)[-5:]
