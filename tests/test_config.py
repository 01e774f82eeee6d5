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


def _model(cfg) -> dict:
    """The model config as ``knexp.job.spec.JobSpec.model`` hands it to ``load_model``."""
    return OmegaConf.to_container(cfg.model, resolve=True, throw_on_missing=True)


def test_default_config_has_every_group():
    cfg = _compose()
    for group in GROUPS:
        assert group in cfg and cfg[group].name, group
    assert cfg.task.name == "evaluate" and cfg.model.name == "embedded"
    assert cfg.logger.name == "wandb" and cfg.thresholds.name == "budget" and cfg.intervention.name == "inpainted"
    # chosen on the tuning split
    assert (cfg.thresholds.layers, cfg.thresholds.stage1, cfg.thresholds.n) == ("live", "abs", 1000)


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


def test_experiment_files_are_global_packages():
    paper = _compose("experiment=paper_minigpt4")
    assert (paper.model.name, paper.thresholds.name, paper.data.name) == ("minigpt4_llama2", "paper", "coco2017")
    cfg = _compose("experiment=quick_caption")
    assert cfg.data.num_images == 60 and cfg.task.inpaint_scenes == 20 and cfg.logger.name == "none"
    for f in (conf_dir() / "experiment").glob("*.yaml"):
        assert f.read_text().startswith("# @package _global_"), f


def test_real_size_models_fail_with_the_key_to_set(tmp_path):
    from omegaconf.errors import MissingMandatoryValue

    from knexp.models.errors import ModelWeightsMissing
    from knexp.models.registry import load_model

    cfg = _compose("model=llava15_7b", f"model.path={tmp_path}/no-llava")
    with pytest.raises(ModelWeightsMissing, match="model.path"):
        load_model(_model(cfg), cfg.paths.cache_dir)
    cfg = _compose("model=minigpt4_llama2")
    with pytest.raises(MissingMandatoryValue, match="converted_dir"):
        load_model(_model(cfg), cfg.paths.cache_dir)
    cfg = _compose("model=minigpt4_llama2", f"model.converted_dir={tmp_path}")
    with pytest.raises(ModelWeightsMissing, match="convert"):
        load_model(_model(cfg), cfg.paths.cache_dir)


@pytest.mark.parametrize("name, tokens", [("tiny_llava", 16), ("tiny_minigpt4", 16)])
def test_tiny_model_configs_build_adapters(name, tokens):
    import numpy as np

    from knexp.models.registry import load_model

    cfg = _compose(f"model={name}")
    adapter = load_model(_model(cfg), cfg.paths.cache_dir)
    assert adapter.num_image_tokens == tokens
    caps = adapter.caption([np.zeros((50, 50, 3), np.uint8)] * 2, max_new_tokens=3)
    assert len(caps) == 2 and all(c.startswith(cfg.model.prompt.caption_prefix) for c in caps)


def test_a_sweeps_jobs_share_the_loaded_model_until_the_model_changes():
    from knexp.models.registry import _LAST, load_model

    cfg = _compose("model=tiny_minigpt4")
    first = load_model(_model(cfg), cfg.paths.cache_dir)
    assert load_model(_model(_compose("model=tiny_minigpt4", "knowledge=bus")), cfg.paths.cache_dir) is first
    other = load_model(_model(_compose("model=tiny_minigpt4", "model.layers=2")), cfg.paths.cache_dir)
    assert other is not first and other.num_layers == 2 and list(_LAST.values()) == [other]  # one model held at a time


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
    # the demo shows the defaults
    assert (demo.thresholds, demo.intervention) == (defaults.thresholds, defaults.intervention)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        h = compose("config", overrides=["experiment=demo"], return_hydra_config=True).hydra
        paper = compose("config", overrides=["experiment=paper_table2"], return_hydra_config=True)
    assert h.mode.name == "MULTIRUN" and h.sweep.dir.endswith("demo/multirun")  # fixed: a rerun resumes
    assert dict(h.sweeper.params) == {"knowledge": "bed,bear,banana",
                                      "method": "ours,pan,schwettmann,attribution,random"}
    assert paper.model.name == "minigpt4_llama2" and paper.thresholds.name == "paper"
    assert list(paper.noise_level.levels) == [40, 80, 120]
    # the paper's protocol, whatever the defaults
    assert paper.intervention.name == "noise" and paper.noise_level.scale == "absolute"
    assert paper.noise_level.draws == 10 and paper.hydra.sweeper.params.knowledge == "glob(*)"


def test_the_study_experiments_keep_the_splits_apart():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        tuning = compose("config", overrides=["experiment=embedded_tuning"], return_hydra_config=True)
        parts = [compose("config", overrides=[f"experiment={e}"], return_hydra_config=True)
                 for e in ("embedded_table2", "embedded_table2_curves", "embedded_table2_noise")]
    # the rule is chosen there only
    assert tuning.hydra.sweeper.params.knowledge.split(",") == list(tuning.splits.tuning)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        edit_tuning = compose("config", overrides=["experiment=embedded_edit_tuning"], return_hydra_config=True)
    # the edit's defaults too
    assert edit_tuning.hydra.sweeper.params.knowledge.split(",") == list(edit_tuning.splits.tuning)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        edit_held = compose("config", overrides=["experiment=embedded_edit"], return_hydra_config=True)
    held = [o.replace("_", " ") for o in edit_held.hydra.sweeper.params.knowledge.split(",")]
    assert held == list(edit_held.splits.heldout)  # measured there, beside random neurons and the whole-matrix rule
    assert {"random", "alpha_edit"} <= set(edit_held.task.baselines)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        fig3 = compose("config", overrides=["experiment=embedded_fig3"], return_hydra_config=True)
    assert [o.replace("_", " ") for o in fig3.hydra.sweeper.params.knowledge.split(",")] == list(fig3.splits.heldout)
    assert fig3.task.name == "localize" and {"ours", "pan", "schwettmann", "attribution"} <= set(fig3.task.methods)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        sequence = compose("config", overrides=["experiment=embedded_edit_sequence"], return_hydra_config=True)
    objects = [o.replace("_", " ") for o in sequence.task.objects]
    assert len(objects) == 10 and set(objects) <= set(sequence.splits.heldout)  # never a tuning object
    assert all(p.hydra.sweeper.params.knowledge == "glob(*)" for p in parts[:2])
    assert all(p.model.name == "embedded" for p in parts)
    noise_objects = parts[2].hydra.sweeper.params.knowledge.split(",")  # the cut noise part: held-out objects only
    assert len(noise_objects) == 12 and {o.replace("_", " ") for o in noise_objects} <= set(parts[2].splits.heldout)
    assert [p.intervention.name for p in parts] == ["inpainted", "inpainted",
                                                    "noise"] and parts[2].noise_level.scale == "calibrated"
    assert parts[1].task.sizes and len({p.hydra.sweep.dir for p in parts}) == 3


def test_job_key_covers_what_results_depend_on_and_nothing_else(tmp_path):
    from knexp.job.spec import job_key

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


def test_every_edit_rule_can_be_built_by_name_as_a_baseline_or_a_bench_builds_it(tmp_path):
    """``JobSpec.named("edit/rule", name)`` (task=edit's baselines, the bench) builds every rule of conf/edit/rule: a
    rule file with a defaults list could only be chosen on the command line."""
    from knexp.job.compose import run_sources
    from knexp.job.spec import JobSpec

    spec = JobSpec.from_config(_compose(f"paths.output_dir={tmp_path}/job"), run_sources())
    names = sorted(f.stem for f in (conf_dir() / "edit" / "rule").glob("*.yaml"))
    assert {"alpha_edit", "memit", "optimized"} <= set(names)
    assert [spec.named("edit/rule", name).name for name in names] == names
