"""Sequential edits (knexp.tasks.edit_sequence) through run.py on a tiny model: each step's edit made on the model the
earlier files give (its file lists their hashes, and model.edit composes them), every object erased so far measured
again after each step, the final guard, and a rerun that resumes every step."""

import hashlib
import json

import pandas as pd
from conftest import run_py


def test_a_sequence_edits_each_object_on_the_model_the_earlier_edits_give(tmp_path):
    args = ["task=edit_sequence", "task.objects=[cell_phone,horse]", "model=tiny_llava", "model.seed=0",
            "data.num_images=150", "thresholds.n=20", "thresholds.layers=nonzero", "task.job.k_images=1",
            "task.job.other_images=2", "task.job.general_images=6", "edit.size=8", "edit.source=ours",
            "edit.fit_other=1", "edit.fit_k=1", "edit/rule=local", "edit.rule.steps=4", "edit.rule.check_every=2",
            "edit.rule.per_unit=0.5", "logger=none", "num_threads=1", f"data.root={tmp_path}/tw",
            f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/job"]
    r = run_py(*args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    job = tmp_path / "job"
    summary = json.loads((job / "sequence.json").read_text())
    first, second = job / "00_cell_phone" / "edit.safetensors", job / "01_horse" / "edit.safetensors"
    assert summary["edits"] == [str(first), str(second)]
    from safetensors import safe_open

    with safe_open(str(second), "pt") as f:
        after = json.loads(f.metadata()["knexp_edit"])["after"]
    assert after == [hashlib.sha1(first.read_bytes()).hexdigest()]  # made on the model the first edit gives
    table = pd.read_csv(job / "sequence.csv")
    assert table[["step", "object"]].values.tolist() == [[0, "cell phone"], [1, "cell phone"], [1, "horse"]]
    assert (table.reliability_n > 0).all() and table.reliability.between(0, 1).all()
    final = summary["final"]
    assert final["images"] == 6 and final["texts"]["prompts"] >= 100 and 0 <= final["bertscore_f1"] <= 1.0 + 1e-6
    done = {step: (job / step / "done.json").stat().st_mtime_ns for step in ("00_cell_phone", "01_horse")}
    again = run_py(*args, timeout=600)  # every step finished: the rerun resumes them and measures the same
    assert again.returncode == 0, again.stderr[-3000:]
    assert {step: (job / step / "done.json").stat().st_mtime_ns for step in done} == done
    assert json.loads((job / "sequence.json").read_text())["steps"] == summary["steps"]


def test_a_sequence_that_does_not_erase_or_save_or_whose_rule_does_not_fit_is_refused_in_one_line(tmp_path):
    """Refused before any step: alpha_edit's default layers (1-8) do not fit the tiny model's two."""
    for extra, named in (("edit.op=swap", "edit.op"), ("task.job.save=false", "task.job.save"),
                         ("task.objects=[horse,horse]", "task.objects"), ("edit/rule=alpha_edit", "edit.rule.layers")):
        r = run_py("task=edit_sequence", "model=tiny_llava", extra, "logger=none", f"data.root={tmp_path}/tw",
                   f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/job", timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1 and named in lines[0], r.stderr[-2000:]
        assert not list((tmp_path / "job").glob("00_*"))


def test_the_final_measures_are_those_after_the_last_step_that_made_an_edit():
    """A last step that made no edit leaves the model as the step before left it: its measures are the final ones."""
    from knexp.tasks.edit_sequence import final_measures

    measured = [{"object": "cell phone", "reliability": 1.0}, {"object": "horse", "reliability": 0.5}]
    steps = [{"step": 0, "edited": True, "earlier": measured[:1]}, {"step": 1, "edited": True, "earlier": measured},
             {"step": 2, "edited": False, "earlier": []}]
    assert final_measures(steps) == measured
    assert final_measures([{"step": 0, "edited": False, "earlier": []}]) == []


def test_the_kept_images_join_the_fits_locality_images_unless_they_show_k_or_are_measured(tmp_path):
    """``task.job.keep`` (a sequence's earlier objects' images) adds to the images the KL term keeps, less those that
    show k (the edit must change them) and those the probe measures."""
    from knexp.job.session import session
    from knexp.tasks.edit import EditTask

    s = session("model=tiny_llava", "model.seed=0", "knowledge=cell_phone", "data.num_images=60", "thresholds.n=20",
                "thresholds.layers=nonzero", "edit.source=ours", "logger=none", f"data.root={tmp_path}/tw",
                f"paths.cache_dir={tmp_path}/cache", output_dir=tmp_path / "api")
    found = s.identify(method="ours")
    target = s.spec.edit.target(s.catalog, s.knowledge)
    task = EditTask(k_images=1, other_images=2, general_images=4)
    plain = task._images(s, found, target)
    k = s.knowledge.coco_id
    with_k = [i for i in s.data.image_ids if k in s.data.category_ids(i) and i not in plain.measured][:1]
    without = [i for i in s.data.image_ids if k not in s.data.category_ids(i) and i not in plain.measured][:2]
    measured = sorted(plain.measured)[:1]
    task.keep = with_k + without + measured
    kept = task._images(s, found, target)
    assert len(with_k) == 1 and len(without) == 2 and len(kept.locality) == len(plain.locality) + 2
    assert kept.measured == plain.measured
