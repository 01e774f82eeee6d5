"""Every cache checks an entry when it reads it: an entry cut short, edited, or another entry's file is rebuilt with a
warning naming it (``knexp.checked``, ``knexp.manifest``), and the rerun gives the results of a clean run. Two identical
jobs on one new cache give identical results."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _job_files, run_py

from knexp.counterfactual.cache import InpaintCache, InpaintOptions
from knexp.editing.preserved import PreservedCache, PreservedKeys
from knexp.identification.passes import SampleStats
from knexp.identification.reference import ReferenceCache, ReferenceStats
from knexp.identification.stats_cache import StatsCache
from knexp.manifest import FolderInUse, built
from knexp.paths import project_root

# a tiny-model job that fills every cache a job reads: the toy-world split, captions, inpainted images, per-sample
# statistics, reference statistics (the mean intervention) and heatmaps (the Fig. 3 panels). The random tiny LLaVA names
# a cell phone in one of these 60 scenes and not once it is inpainted, so the job has one sample.
JOB = ("task=evaluate", "model=tiny_llava", "knowledge=cell_phone", "data.num_images=60", "thresholds.n=20",
       "thresholds.layers=nonzero", "intervention=mean", "reference.images=4", "reference.removals=4",
       "task.k_images=1", "task.other_images=2", "logger=none")


def _results(job: Path) -> dict[str, bytes]:
    """A job's result files, less what may differ between two runs of one config (``conftest._job_files``) and what the
    caches held."""
    return _job_files(job, also=("cache",))


def _cut_every_file(root: Path) -> int:
    """Truncate every file under ``root`` to half its size, as a full disk or an interrupted copy leaves it."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return len(files)


def test_a_run_over_a_cache_with_every_entry_cut_short_gives_the_clean_results(tmp_path):
    cache = tmp_path / "cache"
    common = (*JOB, f"data.root={cache}/toyworld", f"paths.cache_dir={cache}")
    clean = run_py(*common, f"hydra.run.dir={tmp_path}/clean", timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    metrics = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert metrics["status"]["state"] == "ok" and metrics["table2"] is not None
    kinds = {p.relative_to(cache).parts[0] for p in cache.rglob("*") if p.is_file()}
    assert {"captions", "heatmaps", "inpainted", "reference", "stats", "toyworld"} <= kinds
    assert _cut_every_file(cache) > 50

    again = run_py(*common, f"hydra.run.dir={tmp_path}/again", timeout=300)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert _results(tmp_path / "again") == _results(tmp_path / "clean")
    log = again.stdout + again.stderr
    for name in ("toy-world split", "captions cache", "inpainted images cache", "statistics cache",
                 "reference statistics cache", "heatmaps cache"):
        assert name in log and "damaged" in log, name
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["cache"]["damaged_entries_rebuilt"] > 0


def _stats(seed: int) -> SampleStats:
    g = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(2, 5, generator=g) for name in SampleStats.TENSORS}
    tensors["gradcam_argmax"] = torch.randint(0, 4, (2, 5), generator=g)
    return SampleStats(**tensors, target_id=seed, target_position=3)


def _same_stats(a: SampleStats, b: SampleStats) -> bool:
    return all(torch.equal(getattr(a, n), getattr(b, n)) for n in SampleStats.TENSORS) and a.target_id == b.target_id


def test_statistics_cut_short_edited_or_of_another_sample_are_recomputed(tmp_path, caplog):
    StatsCache(tmp_path).get("a" * 20, lambda: _stats(1))
    StatsCache(tmp_path).get("b" * 20, lambda: _stats(2))
    path, other = tmp_path / "stats" / f"{'a' * 20}.safetensors", tmp_path / "stats" / f"{'b' * 20}.safetensors"
    whole = path.read_bytes()
    edited = bytearray(whole)
    edited[-3] ^= 0xFF  # one byte of a tensor
    for damage in (whole[: len(whole) // 2], bytes(edited), other.read_bytes(), b"not a safetensors file"):
        path.write_bytes(damage)
        cache = StatsCache(tmp_path)
        with caplog.at_level("WARNING"):
            got = cache.get("a" * 20, lambda: _stats(1))
        assert cache.computed == 1 and cache.damaged == 1 and _same_stats(got, _stats(1))
        assert _same_stats(StatsCache(tmp_path).get("a" * 20, lambda: _stats(99)), _stats(1))  # rewritten whole
    assert str(path) in caplog.text and "statistics cache" in caplog.text


def _reference(seed: int) -> ReferenceStats:
    g = torch.Generator().manual_seed(seed)
    return ReferenceStats(torch.randn(2, 5, generator=g), torch.rand(2, 5, generator=g), torch.rand(2, generator=g),
                          torch.randn(3, 2, 5, generator=g), ["bus", "clock", "bed"], [4, 5])


def test_reference_statistics_cut_short_or_of_another_model_are_recomputed(tmp_path, caplog):
    ReferenceCache(tmp_path).get(["model a"], lambda: _reference(1))
    ReferenceCache(tmp_path).get(["model b"], lambda: _reference(2))
    a, b = sorted((tmp_path / "reference").glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    whole = a.read_bytes()
    for damage in (whole[: len(whole) // 2], b.read_bytes()):
        a.write_bytes(damage)
        cache = ReferenceCache(tmp_path)
        with caplog.at_level("WARNING"):
            got = cache.get(["model a"], lambda: _reference(1))
        assert cache.computed == 1 and cache.damaged == 1 and torch.equal(got.removal_diff, _reference(1).removal_diff)
        assert got.removal_objects == ["bus", "clock", "bed"]
    assert str(a) in caplog.text


def _preserved(layers: list[int]) -> PreservedKeys:
    """C_l = l I_4 + 1 for each layer l of ``layers``, over 7 positions."""
    return PreservedKeys({layer: layer * torch.eye(4, dtype=torch.float64) + 1 for layer in layers}, 7)


def test_preserved_keys_are_read_per_layer_and_a_damaged_layer_is_computed_again(tmp_path, caplog):
    asked = []

    def compute(layers):
        asked.append(list(layers))
        return _preserved(layers)

    PreservedCache(tmp_path).get(["model a"], [1, 2], compute)
    warm = PreservedCache(tmp_path)
    got = warm.get(["model a"], [1, 2, 3], compute)  # layers 1, 2 from their files, 3 computed alone
    assert asked == [[1, 2], [3]] and warm.computed == 1 and got.positions == 7
    assert all(torch.equal(got.second[layer], _preserved([layer]).second[layer]) for layer in (1, 2, 3))
    files = sorted((tmp_path / "preserved").glob("*_L2.safetensors"))
    assert len(files) == 1
    whole = files[0].read_bytes()
    for damage in (whole[: len(whole) // 2], next((tmp_path / "preserved").glob("*_L1.safetensors")).read_bytes()):
        files[0].write_bytes(damage)
        with caplog.at_level("WARNING"):
            got = PreservedCache(tmp_path).get(["model a"], [1, 2, 3], compute)
        assert asked[-1] == [2] and torch.equal(got.second[2], _preserved([2]).second[2])
    assert len(asked) == 4 and str(files[0]) in caplog.text and "preserved keys cache" in caplog.text


def test_inpainted_images_cut_short_or_of_another_instance_are_inpainted_again(tmp_path, caplog):
    import cv2

    rng = np.random.default_rng(0)
    image = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    opts = InpaintOptions()
    first = InpaintCache(tmp_path).get("data", 1, 10, image, (5, 5, 10, 10), None, opts)
    InpaintCache(tmp_path).get("data", 1, 11, image, (20, 20, 10, 10), None, opts)
    a, b = sorted((tmp_path / "inpainted").glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
    whole = a.read_bytes()
    older = cv2.imencode(".png", cv2.cvtColor(first, cv2.COLOR_RGB2BGR))[1].tobytes()  # an older knexp's file: no key
    for damage in (whole[: len(whole) // 2], b.read_bytes(), older, b"\x89PNG\r\n\x1a\n junk"):
        a.write_bytes(damage)
        cache = InpaintCache(tmp_path)
        with caplog.at_level("WARNING"):
            got = cache.get("data", 1, 10, image, (5, 5, 10, 10), None, opts)
        assert (cache.misses, cache.damaged) == (1, 1) and np.array_equal(got, first)
        again = InpaintCache(tmp_path)
        assert np.array_equal(again.get("data", 1, 10, image, (5, 5, 10, 10), None, opts), first) and again.hits == 1
    assert str(a) in caplog.text


@pytest.fixture
def split(tmp_path, catalog):
    from knexp.data.toyworld.dataset import generate_split
    from knexp.data.toyworld.scenes import SceneOptions

    def make(root=tmp_path / "tw", seed=5):
        return generate_split(root, "val", 8, seed=seed, catalog=catalog, opts=SceneOptions(gap_px=8))

    return make


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".lock" not in p.name}


@pytest.mark.parametrize("damage",
                         ["image cut short", "annotations cut short", "manifest cut short", "another split's image",
                                    "image deleted"])
def test_a_damaged_toy_world_split_is_made_again_the_same(split, tmp_path, caplog, damage):
    root = split()
    clean = _files(root)
    other = split(tmp_path / "other", seed=6)
    image, manifest = root / "val" / "val_000003.png", root / "val" / "manifest.json"
    annotations = root / "instances_val.json"
    if damage == "image cut short":
        image.write_bytes(image.read_bytes()[:100])
    elif damage == "annotations cut short":
        annotations.write_text(annotations.read_text()[:500])
    elif damage == "manifest cut short":
        manifest.write_text(manifest.read_text()[:50])
    elif damage == "another split's image":
        image.write_bytes((other / "val" / "val_000003.png").read_bytes())
    else:
        image.unlink()
    with caplog.at_level("WARNING"):
        assert split() == root
    assert "damaged" in caplog.text and str(root) in caplog.text
    assert _files(root) == clean  # the same bytes as the split made at first


def test_a_split_made_with_other_settings_is_never_overwritten_and_the_message_names_the_folder(split, tmp_path):
    root = split()
    before = _files(root)
    with pytest.raises(FolderInUse, match=f"delete {root / 'val'}"):
        split(seed=7)
    assert _files(root) == before


def test_a_built_folder_is_built_once_for_many_callers_and_rebuilt_when_damaged(tmp_path, caplog):
    """``built`` under four processes at once builds once; a file cut short is rebuilt, with a warning naming it."""
    script = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(project_root())!r})
from knexp.manifest import built

def build(folder):
    with open({str(tmp_path / "builds.txt")!r}, "a") as f:
        f.write("1")
    time.sleep(0.5)
    (folder / "sub").mkdir()
    (folder / "sub" / "data.bin").write_bytes(bytes(range(256)) * 100)

built(Path({str(tmp_path / "folder")!r}), "manifest.json", {{"v": 1}}, build, "a test folder")
"""
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    assert (tmp_path / "builds.txt").read_text() == "1"
    data = tmp_path / "folder" / "sub" / "data.bin"
    data.write_bytes(data.read_bytes()[:10])
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "sub").mkdir()
        (folder / "sub" / "data.bin").write_bytes(bytes(range(256)) * 100)

    with caplog.at_level("WARNING"):
        built(tmp_path / "folder", "manifest.json", {"v": 1}, build, "a test folder")
    assert len(calls) == 1 and data.read_bytes() == bytes(range(256)) * 100
    assert "sub/data.bin (changed or cut short)" in caplog.text
    built(tmp_path / "folder", "manifest.json", {"v": 1}, build, "a test folder")
    assert len(calls) == 1  # whole: nothing to do


def test_two_identical_jobs_at_once_on_one_new_cache_give_identical_results(tmp_path):
    cache = tmp_path / "cache"
    common = (*JOB, f"data.root={cache}/toyworld", f"paths.cache_dir={cache}", "num_threads=1")
    env = {"HYDRA_FULL_ERROR": "0", "WANDB_MODE": "offline"}
    procs = [subprocess.Popen([sys.executable, "run.py", *common, f"hydra.run.dir={tmp_path}/{name}"],
                              cwd=project_root(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, **env})
             for name in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    a, b = _results(tmp_path / "a"), _results(tmp_path / "b")
    assert "captions.csv" in a and a == b
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["status"]["state"] == "ok"
