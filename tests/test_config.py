import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from knexp.config import register_resolvers
from knexp.data.catalog import knowledge_from_dict
from knexp.paths import conf_dir, project_root

register_resolvers()
GROUPS = ["model", "data", "knowledge", "thresholds", "method", "intervention", "noise_level", "logger", "task"]


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_has_every_group():
    cfg = _compose()
    for group in GROUPS:
        assert group in cfg and cfg[group].name, group
    assert cfg.task.name == "evaluate" and cfg.model.name == "embedded"
    assert cfg.logger.name == "wandb" and cfg.thresholds.name == "budget" and cfg.intervention.name == "inpainted"
    assert (cfg.thresholds.layers, cfg.thresholds.stage1, cfg.thresholds.n) == ("live", "abs", 1000)  # chosen on the tuning split


@pytest.mark.parametrize("level", [40, 80, 120])
def test_single_noise_levels_are_the_paper_setting_at_one_level(level):
    paper, single = _compose().noise_level, _compose(f"noise_level=n{level}").noise_level
    assert list(single.levels) == [level] and single.name == f"n{level}"
    rest = lambda c: {k: v for k, v in c.items() if k not in ("levels", "name")}  # noqa: E731
    assert rest(single) == rest(paper)


def test_every_knowledge_composes_and_has_paper_thresholds(catalog):
    paper = _compose("thresholds=paper").thresholds.per_knowledge
    assert set(paper) == set(catalog.names)
    for k in catalog:
        cfg = _compose(f"knowledge={k.name.replace(' ', '_')}")
        assert knowledge_from_dict(OmegaConf.to_container(cfg.knowledge)) == k
    assert paper["banana"] == {"a": 2.5, "g": 0.0003} and paper["umbrella"] == {"a": 0.8, "g": 0.0015}


def test_paths_resolve_under_the_project():
    cfg = _compose()
    assert Path(cfg.paths.root_dir) == project_root()
    assert cfg.paths.log_dir.endswith("/runs")


def _run(*args, timeout=240):
    env = dict(os.environ, HYDRA_FULL_ERROR="0", WANDB_MODE="offline")
    return subprocess.run([sys.executable, "run.py", *args], cwd=project_root(), capture_output=True, text=True, timeout=timeout, env=env)


def test_unknown_knowledge_lists_valid_names():
    r = _run("knowledge=zebra")
    assert r.returncode != 0
    assert "knowledge/zebra" in r.stderr and "banana" in r.stderr and "umbrella" in r.stderr


def test_caption_eval_on_tiny_llava_writes_results_and_offline_wandb(tmp_path):
    r = _run("task=caption_eval", "model=tiny_llava", "data.num_images=6", "task.inpaint_scenes=2", f"data.root={tmp_path}/tw",
             f"hydra.run.dir={tmp_path}/job", "logger=wandb")
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


@pytest.mark.parametrize("logger", ["none"])
def test_logger_none_writes_files_only(tmp_path, logger):
    r = _run("task=caption_eval", "model=tiny_llava", "data.num_images=3", "task.inpaint_scenes=1", f"data.root={tmp_path}/tw",
             f"hydra.run.dir={tmp_path}/job", f"logger={logger}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "job" / "metrics.json").exists()
    assert not (tmp_path / "job" / "wandb").exists()


def test_experiment_files_are_global_packages():
    paper = _compose("experiment=paper_minigpt4")
    assert (paper.model.name, paper.thresholds.name, paper.data.name) == ("minigpt4_llama2", "paper", "coco2017")
    cfg = _compose("experiment=quick_caption")
    assert cfg.data.num_images == 60 and cfg.task.inpaint_scenes == 20 and cfg.logger.name == "none"
    for f in (conf_dir() / "experiment").glob("*.yaml"):
        assert f.read_text().startswith("# @package _global_"), f


def test_real_size_models_fail_with_the_key_to_set(tmp_path):
    from omegaconf.errors import MissingMandatoryValue

    from knexp.models import ModelWeightsMissing, load_model

    cfg = _compose("model=llava15_7b", f"model.path={tmp_path}/no-llava")
    with pytest.raises(ModelWeightsMissing, match="model.path"):
        load_model(cfg.model, cfg.paths.cache_dir)
    cfg = _compose("model=minigpt4_llama2")
    with pytest.raises(MissingMandatoryValue, match="converted_dir"):
        load_model(cfg.model, cfg.paths.cache_dir)
    cfg = _compose("model=minigpt4_llama2", f"model.converted_dir={tmp_path}")
    with pytest.raises(ModelWeightsMissing, match="convert"):
        load_model(cfg.model, cfg.paths.cache_dir)


@pytest.mark.parametrize("name, tokens", [("tiny_llava", 16), ("tiny_minigpt4", 16)])
def test_tiny_model_configs_build_adapters(name, tokens):
    import numpy as np

    from knexp.models import load_model

    cfg = _compose(f"model={name}")
    adapter = load_model(cfg.model, cfg.paths.cache_dir)
    assert adapter.num_image_tokens == tokens
    caps = adapter.caption([np.zeros((50, 50, 3), np.uint8)] * 2, max_new_tokens=3)
    assert len(caps) == 2 and all(c.startswith(cfg.model.prompt.caption_prefix) for c in caps)


def test_a_sweeps_jobs_share_the_loaded_model_until_the_model_changes():
    from knexp.models import _LAST, load_model

    cfg = _compose("model=tiny_minigpt4")
    first = load_model(cfg.model, cfg.paths.cache_dir)
    assert load_model(_compose("model=tiny_minigpt4", "knowledge=bus").model, cfg.paths.cache_dir) is first
    other = load_model(_compose("model=tiny_minigpt4", "model.layers=2").model, cfg.paths.cache_dir)
    assert other is not first and other.num_layers == 2 and list(_LAST.values()) == [other]  # one model held at a time


def test_identify_task_reports_too_few_samples_and_writes_outputs(tmp_path):
    r = _run("task=identify", "model=tiny_llava", "knowledge=bus", "method=pan", "thresholds=quantile", "data.num_images=20",
             f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job", "logger=none", f"paths.cache_dir={tmp_path}/cache")
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
             f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job", "logger=none", f"paths.cache_dir={tmp_path}/cache")
    assert r.returncode == 0, r.stderr[-3000:]
    sel = json.loads((tmp_path / "job" / "selection.json").read_text())
    assert sel["knowledge"] == "clock" and sel["rejected"] and all(c["reason"] for c in sel["rejected"])
    assert list((tmp_path / "cache" / "inpainted").glob("*.png")), "inpainted images are cached"


def test_evaluate_task_runs_and_logs_files_offline(tmp_path):
    r = _run("task=evaluate", "model=tiny_llava", "knowledge=bus", "data.num_images=40", "task.k_images=2", "task.other_images=3",
             "noise_level.draws=1", f"data.root={tmp_path}/tw", f"hydra.run.dir={tmp_path}/job", "logger=wandb",
             f"paths.cache_dir={tmp_path}/cache")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    captions = (tmp_path / "job" / "captions.csv").read_text().splitlines()
    assert metrics["knowledge"] == "bus" and metrics["images"]["other"] == 3
    assert len(captions) - 1 == metrics["images"]["k"] + 3 + 3 * metrics["sets"] * (metrics["images"]["k"] + 3)  # clean + 3 levels
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


def test_report_without_sweep_dir_says_what_to_pass(tmp_path):
    r = _run("task=report", f"hydra.run.dir={tmp_path}/job", "logger=none")
    assert r.returncode != 0 and "sweep_dir" in r.stderr


def test_joblib_launcher_runs_a_two_job_multirun_in_parallel(tmp_path):
    r = _run("-m", "task=select", "model=tiny_llava", "knowledge=clock,bus", "data.num_images=20", f"data.root={tmp_path}/tw",
             f"paths.cache_dir={tmp_path}/cache", "hydra/launcher=parallel", "logger=none", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in r.stdout + r.stderr
    names = {json.loads((tmp_path / "sweep" / str(i) / "selection.json").read_text())["knowledge"] for i in (0, 1)}
    assert names == {"clock", "bus"}


def test_tuning_configs_compose_with_their_sweepers():
    optuna = _compose("hparams_search=thresholds_optuna")
    assert optuna.task.name == "tune" and optuna.optimized_metric == "S_mean" and optuna.thresholds.name == "quantile"
    assert set(optuna.splits.tuning).isdisjoint(optuna.splits.heldout)
    assert len(optuna.splits.tuning) + len(optuna.splits.heldout) == 30
    grid = _compose("hparams_search=thresholds_grid")
    assert grid.task.name == "tune"


def test_demo_and_paper_experiments_are_whole_sweeps():
    demo = _compose("experiment=demo")
    assert demo.task.name == "evaluate" and demo.model.name == "embedded"
    defaults = _compose()
    assert (demo.thresholds, demo.intervention) == (defaults.thresholds, defaults.intervention)  # the demo shows the defaults
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        h = compose("config", overrides=["experiment=demo"], return_hydra_config=True).hydra
        paper = compose("config", overrides=["experiment=paper_table2"], return_hydra_config=True)
    assert h.mode.name == "MULTIRUN" and h.sweep.dir.endswith("demo/multirun")  # fixed: a rerun resumes
    assert dict(h.sweeper.params) == {"knowledge": "bed,bear,banana", "method": "ours,pan,schwettmann,attribution,random"}
    assert paper.model.name == "minigpt4_llama2" and paper.thresholds.name == "paper" and list(paper.noise_level.levels) == [40, 80, 120]
    assert paper.intervention.name == "noise" and paper.noise_level.scale == "absolute"  # the paper's protocol, whatever the defaults
    assert paper.noise_level.draws == 10 and paper.hydra.sweeper.params.knowledge == "glob(*)"


def test_the_study_experiments_keep_the_splits_apart():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        tuning = compose("config", overrides=["experiment=embedded_tuning"], return_hydra_config=True)
        parts = [compose("config", overrides=[f"experiment={e}"], return_hydra_config=True)
                 for e in ("embedded_table2", "embedded_table2_curves", "embedded_table2_noise")]
    assert tuning.hydra.sweeper.params.knowledge.split(",") == list(tuning.splits.tuning)  # the rule is chosen there only
    assert all(p.hydra.sweeper.params.knowledge == "glob(*)" for p in parts[:2]) and all(p.model.name == "embedded" for p in parts)
    noise_objects = parts[2].hydra.sweeper.params.knowledge.split(",")  # the cut noise part: held-out objects only
    assert len(noise_objects) == 12 and {o.replace("_", " ") for o in noise_objects} <= set(parts[2].splits.heldout)
    assert [p.intervention.name for p in parts] == ["inpainted", "inpainted", "noise"] and parts[2].noise_level.scale == "calibrated"
    assert parts[1].task.sizes and len({p.hydra.sweep.dir for p in parts}) == 3


def test_same_config_and_seed_give_byte_identical_results(tmp_path, job_files):
    common = ["task=evaluate", "model=tiny_llava", "knowledge=bus", "data.num_images=40", "task.k_images=2", "task.other_images=3",
              "noise_level.draws=1", f"data.root={tmp_path}/tw", "logger=none", "task.cache=false", f"paths.cache_dir={tmp_path}/cache"]
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
    r = subprocess.run([sys.executable, "run.py", "task=identify", "model=tiny_llava", "knowledge=bus", "data.num_images=20",
                        f"data.root={tmp_path}/tw", f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/job",
                        "logger=wandb", "logger.mode=online"], cwd=project_root(), capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "logging offline instead" in r.stdout + r.stderr
    assert list((tmp_path / "job" / "wandb").glob("offline-run-*"))
    assert time.time() - t0 < 60  # the whole job, model and all: nothing waited on a network


def test_submitit_local_launcher_runs_a_job(tmp_path):
    """The submitit launcher's local executor (the Slurm one's interface, without a cluster)."""
    r = _run("-m", "task=select", "model=tiny_llava", "knowledge=clock", "data.num_images=20", f"data.root={tmp_path}/tw",
             f"paths.cache_dir={tmp_path}/cache", "hydra/launcher=submitit_local", "logger=none", f"hydra.sweep.dir={tmp_path}/sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "sweep" / "0" / "selection.json").read_text())["knowledge"] == "clock"
    assert (tmp_path / "sweep" / ".submitit").is_dir()


def test_job_key_covers_what_results_depend_on_and_nothing_else(tmp_path):
    from knexp.tasks.resume import job_key

    def key(*overrides):  # outside a Hydra job the output folder must be given
        return job_key(_compose(f"paths.output_dir={tmp_path}/job", *overrides))

    base = key()
    assert key("model.generation.batch_size=3", "logger=none", "num_threads=1", "tags=[x]") == base
    assert key("model.generation.max_new_tokens=5") != base
    assert key("thresholds.n=300") != base and key("thresholds.stage1=raw") != base
    projector = tmp_path / "p.safetensors"  # the shipped projector's bytes at another path: the same model
    projector.write_bytes(Path(_compose().model.projector_path).read_bytes())
    assert key(f"model.projector_path={projector}") == base
    projector.write_bytes(b"another projector")  # other bytes at that path: another model
    assert key(f"model.projector_path={projector}") != base
