"""Every task end to end through run.py in a subprocess, on tiny models: outputs, logging, resume, launchers, errors."""

import json
import os
import re
import subprocess
import sys
from functools import partial

import pytest
from conftest import run_py

from knexp.paths import project_root

_run = partial(run_py, timeout=240)


def test_unknown_knowledge_lists_valid_names():
    r = _run("knowledge=zebra")
    assert r.returncode != 0
    assert "knowledge/zebra" in r.stderr and "banana" in r.stderr and "umbrella" in r.stderr


def test_caption_eval_on_tiny_llava_writes_results_and_offline_wandb(tmp_path):
    r = _run("task=caption_eval", "model=tiny_llava", "data.num_images=6", "task.inpaint_scenes=2",
             f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job", "logger=wandb")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert metrics["captions"]["scenes"] == 6
    assert set(metrics) >= {"captions", "inpainting_telea", "inpainting_ns", "data"}
    assert 0.0 <= metrics["inpainting_ns"]["phantom"] <= 1.0
    assert (tmp_path / "job" / "captions.csv").read_text().count("\n") == 7
    runs = list((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert runs, "W&B should have written an offline run in the job directory"
    printed = json.loads(r.stdout[r.stdout.index("{") :])
    assert printed["output_dir"] == str(tmp_path / "job")


def test_logger_none_writes_files_only(tmp_path):
    r = _run("task=caption_eval", "model=tiny_llava", "data.num_images=3", "task.inpaint_scenes=1",
             f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job", "logger=none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "job" / "metrics.json").exists()
    assert not (tmp_path / "job" / "wandb").exists()


def test_identify_task_reports_too_few_samples_and_writes_outputs(tmp_path):
    r = _run("task=identify", "model=tiny_llava", "knowledge=bus", "method=pan", "thresholds=quantile",
             "data.num_images=20",
             f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job", "logger=none",
             f"paths.cache_dir={tmp_path}/cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "identification results:" in r.stdout and str(tmp_path / "job") in r.stdout
    summary = json.loads((tmp_path / "job" / "identify.json").read_text())
    selection = json.loads((tmp_path / "job" / "selection.json").read_text())
    assert summary["method"] == "pan" and summary["requested"] == 3
    assert summary["samples"] == len(selection["accepted"]) < 3  # a random tiny model rarely names the bus
    assert "only" in summary["selection"] and selection["rejected"]
    assert all(c["reason"] for c in selection["rejected"])


def test_select_task_writes_reasons(tmp_path):
    r = _run("task=select", "model=tiny_llava", "knowledge=clock", "inpaint=segm_dilated", "data.num_images=60",
             f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job", "logger=none",
             f"paths.cache_dir={tmp_path}/cache")
    assert r.returncode == 0, r.stderr[-3000:]
    sel = json.loads((tmp_path / "job" / "selection.json").read_text())
    assert sel["knowledge"] == "clock" and sel["rejected"] and all(c["reason"] for c in sel["rejected"])
    assert list((tmp_path / "cache" / "inpainted").glob("*.png")), "inpainted images are cached"


def test_evaluate_task_runs_and_logs_files_offline(tmp_path):
    r = _run("task=evaluate", "model=tiny_llava", "knowledge=bus", "data.num_images=40", "task.k_images=2",
             "task.other_images=3",
             "noise_level.draws=1", f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job", "logger=wandb",
             f"paths.cache_dir={tmp_path}/cache")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    captions = (tmp_path / "job" / "captions.csv").read_text().splitlines()
    assert metrics["knowledge"] == "bus" and metrics["images"]["other"] == 3 and isinstance(metrics["skipped"], list)
    # clean + 3 levels
    assert len(captions) - 1 == metrics["images"]["k"] + 3 + 3 * metrics["sets"] * (metrics["images"]["k"] + 3)
    assert (tmp_path / "job" / "layers_histogram.csv").exists()
    assert list((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert metrics["cache"]["captions_computed"] > 0

    # the same job again in the same folder is a finished job: skipped, nothing rewritten
    before = (tmp_path / "job" / "captions.csv").stat().st_mtime_ns
    again = _run(*r.args[2:])
    assert again.returncode == 0 and "finished before" in again.stdout + again.stderr
    assert (tmp_path / "job" / "captions.csv").stat().st_mtime_ns == before
    # the same job in a new folder: every caption comes from the cache, and they are the same captions
    args = [a.replace(f"{tmp_path}/job", f"{tmp_path}/job2") for a in r.args[2:]]
    second = _run(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    m2 = json.loads((tmp_path / "job2" / "metrics.json").read_text())
    assert m2["cache"]["captions_computed"] == 0 and m2["cache"]["captions_from_cache"] > 0
    assert (tmp_path / "job2" / "captions.csv").read_text() == (tmp_path / "job" / "captions.csv").read_text()
    assert m2["table2"] == metrics["table2"]


def test_a_job_with_no_usable_sample_says_so_and_the_report_marks_it(tmp_path):
    """A random tiny model never names the bus: the job ends (status 0, the sweep goes on), says so in its last line and
    in metrics.json with the first reasons, and a report over the sweep lists it apart from the scored jobs."""
    from test_report import _job

    from knexp.reporting.sweep import write_report

    sweep = tmp_path / "sweep"
    r = _run("task=evaluate", "model=tiny_llava", "knowledge=bus", "data.num_images=20", "task.k_images=1",
             "task.other_images=1",
             f"data.root={tmp_path}/tw", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={sweep}/0", "logger=none")
    assert r.returncode == 0, r.stderr[-3000:]
    status = json.loads((sweep / "0" / "metrics.json").read_text())["status"]
    assert status["state"] == "no_samples" and status["usable"] == 0
    assert status["reasons"][0].startswith("bus: only 0 of 3")
    assert any("does not name it" in why for why in status["reasons"])
    last = [line for line in r.stdout.splitlines() if line.strip()][-1]  # the job's log goes to stdout
    assert "bus: no usable sample" in last and "metrics.json" in last
    _job(sweep / "1", "bed", "ours", 0.8, 0.6, [1, 2, 0])  # a scored job beside it
    report = write_report(sweep, tmp_path / "report")
    text = report.markdown.read_text()
    assert "1 more had no usable sample" in text and "## Jobs with no usable sample" in text
    assert re.search(r"\|\s+0\s+\| bus\s+\| ours\s+\| bus: only 0 of 3", text)  # the job's folder, its labels and why
    assert (tmp_path / "report" / "unusable_jobs.csv").read_text().count("\n") == 2
    only_empty = write_report(sweep / "0", tmp_path / "report_empty")  # a sweep of nothing but such jobs still reports
    assert "Jobs with no usable sample" in only_empty.markdown.read_text()


def test_report_without_sweep_dir_says_what_to_pass(tmp_path):
    r = _run("task=report", f"hydra.run.dir={tmp_path}/job", "logger=none")
    assert r.returncode != 0 and "sweep_dir" in r.stderr


def test_joblib_launcher_runs_a_two_job_multirun_in_parallel(tmp_path):
    r = _run("-m", "task=select", "model=tiny_llava", "knowledge=clock,bus", "data.num_images=20",
             f"data.root={tmp_path}/tw",
             f"paths.cache_dir={tmp_path}/cache", "hydra/launcher=parallel", "logger=none",
             f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr
    cores = os.cpu_count()
    logs = [(tmp_path / "sweep" / str(i) / "run.log").read_text() for i in (0, 1)]  # each job's share of the cores
    assert all(f"torch threads: {max(1, cores // 2)}" in log for log in logs)
    names = {json.loads((tmp_path / "sweep" / str(i) / "selection.json").read_text())["knowledge"] for i in (0, 1)}
    assert names == {"clock", "bus"}


def test_same_config_and_seed_give_byte_identical_results(tmp_path, job_files):
    common = ["task=evaluate", "model=tiny_llava", "knowledge=bus", "data.num_images=40", "task.k_images=2",
              "task.other_images=3",
              "noise_level.draws=1", f"data.root={tmp_path}/tw", "logger=none", "task.cache=false",
              f"paths.cache_dir={tmp_path}/cache"]
    for name in ("a", "b"):
        r = _run(*common, f"hydra.run.dir={tmp_path}/{name}")
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = job_files(tmp_path / "a"), job_files(tmp_path / "b")
    assert {"captions.csv", "metrics.json", "selection.json"} <= set(a)
    assert a == b
    assert not (tmp_path / "cache" / "captions").exists()  # task.cache=false: both runs computed everything


@pytest.mark.parametrize("override, listed", [("model=gpt5", "embedded"), ("method=magic", "schwettmann"),
                                              ("noise_level=loud", "relative"), ("intervention=blur", "inpainted"),
                                              ("thresholds=magic", "layer_quantile")])
def test_unknown_option_of_any_group_lists_valid_names(override, listed):
    r = _run(override)
    group, name = override.split("=")
    assert r.returncode != 0 and f"{group}/{name}" in r.stderr and listed in r.stderr


def test_wandb_online_without_a_key_falls_back_offline_quickly(tmp_path):
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), HYDRA_FULL_ERROR="0", WANDB_SILENT="true")
    t0 = time.time()
    r = subprocess.run([sys.executable, "run.py", "task=identify", "model=tiny_llava", "knowledge=bus",
                        "data.num_images=20",
                        f"data.root={tmp_path}/tw", f"paths.cache_dir={tmp_path}/cache",
                        f"hydra.run.dir={tmp_path}/job",
                        "logger=wandb", "logger.mode=online"], cwd=project_root(), capture_output=True, text=True,
                        timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "logging offline instead" in r.stdout + r.stderr
    assert list((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert time.time() - t0 < 60  # the whole job, model and all: nothing waited on a network


def test_submitit_local_launcher_runs_a_job(tmp_path):
    """The submitit launcher's local executor (the Slurm one's interface, without a cluster)."""
    r = _run("-m", "task=select", "model=tiny_llava", "knowledge=clock", "data.num_images=20",
             f"data.root={tmp_path}/tw",
             f"paths.cache_dir={tmp_path}/cache", "hydra/launcher=submitit_local", "logger=none",
             f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "sweep" / "0" / "selection.json").read_text())["knowledge"] == "clock"
    assert (tmp_path / "sweep" / ".submitit").is_dir()
