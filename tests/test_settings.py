"""Every setting is checked once, when the job is built, before any model is loaded (``knexp.settings``,
``knexp.job.session.build_job``): a value that cannot work stops the job with one line naming its key, never an empty
success."""

import functools
import re

import pytest
import yaml
from conftest import run_py
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from knexp.config import register_resolvers
from knexp.job.session import build_job
from knexp.paths import conf_dir
from knexp.settings import Choice, Integer, Many, Number, SettingError
from knexp.user_errors import ConfigError

register_resolvers()

# what an option needs before it builds at all (a value the user must give)
FILL = {"model=minigpt4_llama2": ["model.converted_dir=/nowhere"],
        "thresholds=fixed": ["thresholds.a=1.0", "thresholds.g=0.001"],
        "data=coco2017": ["data.root=/nowhere"], "task=report": ["sweep_dir=."],
        "experiment=paper_minigpt4": ["model.converted_dir=/nowhere", "data.root=/nowhere"],
        "experiment=paper_table2": ["model.converted_dir=/nowhere", "data.root=/nowhere"]}
WRONG = ("bogus-value", 12345)  # a word where a number or a choice belongs, a number where a word or a list belongs


def _options():
    """Every option of every config group, nested groups (``edit/rule``) included (two of the 30 knowledge files: they
    share one layout)."""
    out = []
    root = conf_dir()
    groups = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                    if p.is_dir() and not p.is_relative_to(root / "hydra"))
    for group in groups:
        files = sorted((conf_dir() / group).glob("*.yaml"))
        out += [f"{group}={f.stem}" for f in (files[:2] if group == "knowledge" else files)]
    return out


def _leaves(node, prefix=""):
    """Dotted keys of the scalar and list values under ``node`` (lists as one setting)."""
    for key in node:
        full = f"{prefix}.{key}" if prefix else str(key)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from _leaves(child, full)
        else:
            yield full


def _general(key: str) -> str:
    """The key with the catalog's and Table IV's object names taken out: one check stands for all 30."""
    return re.sub(r"^(catalog|thresholds\.per_knowledge)\.[^.]+", r"\1.*", key)


@functools.cache
def _compose(option: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("config", overrides=[option, *FILL.get(option, []), "paths.output_dir=/tmp/knexp-settings"])


def _walk():
    """(option, key) once per option's own group and general key (experiments: every key they set)."""
    seen, cases = set(), []
    for option in _options():
        group = option.split("=")[0]
        cfg = _compose(option)
        node = OmegaConf.select(cfg, group.replace("/", "."))
        root = cfg if group in ("experiment", "hparams_search") or node is None else node
        prefix = "" if root is cfg else group.replace("/", ".")
        for key in _leaves(root, prefix):
            if key.startswith("catalog.") and not key.startswith("catalog.banana."):
                continue  # the catalog's entries share one layout: banana's stands for all
            tag = (option if group not in ("experiment", "hparams_search") else "", _general(key))
            if tag not in seen:
                seen.add(tag)
                cases.append((option, key))
    return cases


@pytest.fixture(scope="module")
def cases():
    return _walk()


@pytest.fixture(scope="module")
def composed():
    return lambda option: _compose(option).copy()


def test_the_walk_covers_every_group_and_its_settings(cases):
    keys = {_general(k) for _, k in cases}
    groups = {k.split(".")[0] for k in keys}
    assert {"model", "data", "knowledge", "catalog", "thresholds", "method", "intervention", "noise_level", "inpaint",
            "splits", "trace", "reference", "logger", "task", "paths", "seed", "num_threads", "tags", "edit"} <= groups
    assert {"thresholds.n", "thresholds.q_a", "method.form", "model.generation.decode_width", "task.k_images",
            "task.job.k_images",
            "data.scene.object_px", "noise_level.levels", "catalog.*.coco_id", "thresholds.per_knowledge.*.a",
            "edit.op", "edit.rule.lam_erase", "edit.rule.steps", "edit.prompts.yes_no", "model.edit"} <= keys
    assert len(cases) > 250


def test_every_setting_of_every_group_has_a_check(cases, composed):
    """Each value in conf/, set to a word where a number or choice belongs and to a number where a word or list belongs,
    is refused by some check when the job is built, and the message names the key. No setting is left unchecked."""
    unchecked, unnamed = [], []
    for option, key in cases:
        caught = False
        for wrong in WRONG:
            cfg = composed(option)
            with open_dict(cfg):
                OmegaConf.update(cfg, key, wrong, force_add=True)
            try:
                build_job(cfg)
            except ConfigError as exc:
                if key not in str(exc):
                    unnamed.append((option, key, str(exc)))
                caught = True
                break
        if not caught:
            unchecked.append((option, key))
    assert not unchecked, f"settings with no check: {unchecked}"
    assert not unnamed, f"errors that do not name their setting: {unnamed}"


@pytest.mark.parametrize("check, good, bad", [
    (Integer(low=1), [1, 7, 1e3], [0, -1, 1.5, True, "3", None, float("nan")]),
    (Integer(low=1, optional=True), [None, 2], [0]),
    (Number(0.0, 1.0, high_open=True), [0, 0.5, 0.999], [1.0, -0.1, float("inf"), "x", False]),
    (Choice(("a", "b")), ["a"], ["c", 1, None]),
    (Many(Number(low=0.0)), [[0, 40], (1.5,)], [[], "40", [-1], [40, "x"]]),
])
def test_each_check_admits_what_works_and_names_the_rest(check, good, bad):
    for value in good:
        check("group.key", value)
    for value in bad:
        with pytest.raises(SettingError, match=r"^group\.key(\[\d\])?="):
            check("group.key", value)


def test_a_setting_error_is_not_a_value_error():
    """Nothing that handles bad data (``except ValueError``) can swallow a setting that cannot work."""
    assert not issubclass(SettingError, ValueError) and not issubclass(ConfigError, ValueError)


# (override, the key its message must name): values out of range, across every group
OUT_OF_RANGE = [
    ("thresholds.stage1=bogus", "thresholds.stage1"), ("thresholds.n=0", "thresholds.n"),
    ("thresholds.q_g=1.0", "thresholds.q_g"),
    ("thresholds=quantile thresholds.q_a=1.5", "thresholds.q_a"), ("method=attribution method.form=top", "method.form"),
    ("method=attribution method.threshold=-1", "method.threshold"), ("intervention.name=blur", "intervention.name"),
    ("noise_level.draws=0", "noise_level.draws"), ("noise_level.levels=[]", "noise_level.levels"),
    ("noise_level.levels=[40,-1]", "noise_level.levels[1]"),
    ("model.generation.decode_width=0", "model.generation.decode_width"),
    ("model.generation.max_new_tokens=0", "model.generation.max_new_tokens"), ("model.device=gpu", "model.device"),
    ("task.k_images=-1", "task.k_images"), ("task.sizes=[0]", "task.sizes[0]"), ("trace.frac=1.5", "trace.frac"),
    ("trace.objects=[zebra]", "trace.objects"), ("reference.images=0", "reference.images"),
    ("data.per_knowledge=0", "data.per_knowledge"),
    ("data.scene.max_objects=0", "data.scene.max_objects"), ("data.scene.object_px=[130,60]", "data.scene.object_px"),
    ("inpaint.region=circle", "inpaint.region"), ("inpaint.radius=0", "inpaint.radius"),
    ("logger.mode=live", "logger.mode"),
    ("seed=-3", "seed"), ("num_threads=0", "num_threads"), ("knowledge.coco_id=0", "knowledge.coco_id"),
    ("splits.tuning=[pizza,zebra]", "splits.tuning"), ("task=tune task.split=val", "task.split"),
    ("task=tune task.job.other_images=-2", "task.job.other_images"),
    ("thresholds=fixed thresholds.g=???", "thresholds.g"),
    ("model.generation.batchsize=4", "model.generation.batchsize"), ("edit.op=move", "edit.op"),
    ("edit.size=0", "edit.size"),
    ("edit.rule.lam_erase=-1", "edit.rule.lam_erase"), ("edit.op=swap edit.replacement=zebra", "edit.replacement"),
    ("edit.prompts.yes_no=Is_it_there", "edit.prompts.yes_no"), ("model.edit=/nowhere.safetensors", "model.edit"),
    ("task=edit task.baselines=[rome]", "task.baselines[0]"),
]
GROUPS = {p.name for p in conf_dir().iterdir() if p.is_dir()}


@pytest.mark.parametrize("overrides, key", OUT_OF_RANGE)
def test_a_value_out_of_range_is_refused_by_name(composed, overrides, key):
    """As the command line would set them: a group's option, then values (parsed as YAML, as Hydra parses them)."""
    words = overrides.split()
    option = next((w for w in words if w.split("=")[0] in GROUPS and "." not in w.split("=")[0]), "knowledge=banana")
    cfg = composed(option)
    with open_dict(cfg):
        for word in words:
            if word != option:
                name, value = word.split("=", 1)
                OmegaConf.update(cfg, name, yaml.safe_load(value), force_add=True)
    with pytest.raises(ConfigError) as err:
        build_job(cfg)
    assert str(err.value).startswith(f"{key}="), str(err.value)


# a sample of them through run.py: exit 1, one line, nothing computed
@pytest.mark.parametrize("overrides, key", [
    ("thresholds.stage1=bogus", "thresholds.stage1"), ("task.k_images=-1", "task.k_images"),
    ("model.generation.decode_width=0", "model.generation.decode_width"), ("noise_level.draws=0", "noise_level.draws"),
    ("data.per_knowledge=0", "data.per_knowledge"), ("trace.frac=1.5", "trace.frac"),
    ("logger.mode=live", "logger.mode"),
    ("knowledge.coco_id=x", "knowledge.coco_id"), ("task=tune task.job.other_images=-2", "task.job.other_images"),
    ("task=edit edit.size=0", "edit.size"), ("model.edit=/nowhere.safetensors", "model.edit"),
])
def test_a_bad_value_exits_1_before_any_work_with_one_line_naming_it(tmp_path, overrides, key):
    cache = tmp_path / "cache"
    r = run_py(*overrides.split(), f"paths.cache_dir={cache}", f"hydra.run.dir={tmp_path}/job", timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"knexp: error: {key}="), lines[0]
    assert not cache.exists()  # no data generated, no model converted, nothing computed
    assert not (tmp_path / "job" / "metrics.json").exists()
