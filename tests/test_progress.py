import logging
import os
from pathlib import Path
from types import SimpleNamespace

from omegaconf import OmegaConf

from knexp.console import heartbeat, quiet_third_party
from knexp.reporting.progress import SweepProgress, eta_line, sweep_size


def _cfg(params=None, task=(), n_trials=None, sweep_dir="."):
    sweeper = {"params": params or {}} | ({"n_trials": n_trials} if n_trials else {})
    return OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": list(task)},
                                       "sweep": {"dir": str(sweep_dir)}, "job": {"num": 0},
                                       "runtime": {"output_dir": str(Path(sweep_dir) / "0")}}})


def test_the_sweep_size_is_the_product_of_the_swept_values():
    assert sweep_size(_cfg({"knowledge": "bed,bear,banana"}, ["method=ours,pan", "seed=1"])) == 6
    assert sweep_size(_cfg({}, ["knowledge=bed"])) == 1
    assert sweep_size(_cfg({"x": "1,2"}, n_trials=40)) == 40  # an optimising sweeper says how many trials it runs
    assert sweep_size(_cfg({}, ["seed=range(0,3)"])) == 3
    assert sweep_size(_cfg({}, ["x=interval(0,1)"])) is None  # a sweep the basic sweeper cannot count


def test_the_eta_is_the_mean_job_time_times_the_jobs_left():
    assert eta_line(0, 6, 5.0) == "job 1/6 · 0:05 elapsed"  # no ETA before a job has ended
    assert eta_line(2, 6, 120.0) == "job 3/6 · 2:00 elapsed · ETA 4:00"
    assert eta_line(3, None, 4000.0) == "job 4/? · 1:06:40 elapsed"
    # the first job's one-off costs (caches, the live window) do not count once a later job has ended
    assert eta_line(3, 6, 200.0, [140.0, 20.0, 40.0]) == "job 4/6 · 3:20 elapsed · ETA 1:30"
    # jobs skipped as finished before (a resumed sweep) count neither as time nor as jobs done
    assert eta_line(4, 6, 3.0, [], skipped=4) == "job 5/6 · 0:03 elapsed"
    assert eta_line(5, 6, 63.0, [60.0], skipped=4) == "job 6/6 · 1:03 elapsed · ETA 1:03"


def _run_sweep(tmp_path, caplog, monkeypatch, jobs: int, times: list[float], finished=()) -> tuple[SweepProgress, list]:
    """A sweep of ``jobs`` jobs that began at t = 1000 s, run through the callback with the clock reading ``times``:
    every job but the last ends; the jobs numbered in ``finished`` hold a done.json from an earlier run. Returns the
    callback and its job-start lines."""
    from hydra.types import RunMode

    import knexp.reporting.progress as progress_module
    from knexp.resume import mark_finished

    cfg = _cfg({"knowledge": ",".join("abcdefgh"[:jobs])}, sweep_dir=tmp_path)
    cfg.hydra.mode = RunMode.MULTIRUN
    (tmp_path / "multirun.yaml").write_text("{}")
    os.utime(tmp_path / "multirun.yaml", (1000, 1000))
    for num in finished:
        (tmp_path / str(num)).mkdir()
        mark_finished("key", tmp_path / str(num), {})
    clock = iter(times)
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(time=lambda: next(clock)))
    progress = SweepProgress()
    progress.on_multirun_start(cfg)
    with caplog.at_level(logging.INFO, logger="knexp.progress"):
        for num in range(jobs):
            cfg.hydra.job.num = num
            cfg.hydra.runtime.output_dir = str(tmp_path / str(num))
            progress.on_job_start(cfg)
            if num < jobs - 1:
                progress.on_job_end(cfg)
    return progress, [r.getMessage() for r in caplog.records if "elapsed" in r.getMessage()]


def test_the_callback_leaves_the_first_job_out_of_the_eta(tmp_path, caplog, monkeypatch):
    # a sweep of 3 jobs: job 1 takes 100 s, job 2 takes 10 s
    progress, starts = _run_sweep(tmp_path, caplog, monkeypatch, 3, [1000.0, 1100.0, 1100.0, 1110.0, 1110.0])
    assert progress.ran_s == [100.0, 10.0]
    assert "job 3/3 · 1:50 elapsed · ETA 0:10" in starts[-1]  # 1 left x 10 s, not x 55 s


def test_a_resumed_sweep_leaves_the_skipped_jobs_out_of_the_eta(tmp_path, caplog, monkeypatch):
    # jobs 1 and 2 finished in an earlier run and are skipped in 1 s each; job 3 runs for 100 s, job 4 for 10 s
    times = [1000.0, 1001.0, 1001.0, 1002.0, 1002.0, 1102.0, 1102.0, 1112.0, 1112.0]
    progress, starts = _run_sweep(tmp_path, caplog, monkeypatch, 5, times, finished=(0, 1))
    assert progress.skipped == 2 and progress.ran_s == [100.0, 10.0]
    assert "ETA" not in starts[2]  # only skipped jobs so far: no ETA of 0:01
    assert "job 4/5 · 1:42 elapsed · ETA 3:24" in starts[3]  # 102 s over the one job that ran, 2 jobs left
    assert "job 5/5 · 1:52 elapsed · ETA 0:10" in starts[4]  # the later job's 10 s, 1 job left


def test_the_callback_logs_the_job_and_its_eta(tmp_path, caplog):
    from hydra.types import RunMode

    cfg = _cfg({"knowledge": "bed,bear"}, ["method=ours,pan"], sweep_dir=tmp_path)
    cfg.hydra.mode = RunMode.MULTIRUN
    (tmp_path / "multirun.yaml").write_text("{}")
    progress = SweepProgress()
    progress.on_multirun_start(cfg)
    cfg.hydra.job.num = 1
    with caplog.at_level(logging.INFO, logger="knexp.progress"):
        progress.on_job_start(cfg)
        progress.on_job_end(cfg)
    assert "job 2/4 · 0:00 elapsed · ETA 0:00 · method=ours,pan" in caplog.text and "job 2/4 done in" in caplog.text


def test_third_party_loggers_are_quieted():
    logging.getLogger("absl").setLevel(logging.INFO)
    quiet_third_party()
    assert logging.getLogger("absl").level == logging.WARNING
    assert logging.getLogger("matplotlib.font_manager").getEffectiveLevel() >= logging.WARNING
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()


def test_the_heartbeat_fills_a_silence_with_the_phase_still_running_and_stops_after(caplog):
    import threading
    import time

    work = logging.getLogger("knexp.some_stage")
    with caplog.at_level(logging.INFO, logger="knexp"):
        with heartbeat(every_s=0.2):
            work.info("tracing pizza")
            time.sleep(0.75)  # silent for about 3 beats
            work.info("tracing giraffe")
        beats = [r.getMessage() for r in caplog.records if r.name == "knexp.progress"]
        time.sleep(0.5)
        after = [r for r in caplog.records if r.name == "knexp.progress"]
    assert 2 <= len(beats) <= 4 and all(b.startswith("still at work on: tracing pizza (0:0") for b in beats)
    assert len(after) == len(beats)  # nothing after the block
    assert not any(t.name == "knexp-heartbeat" for t in threading.enumerate())
    assert not any(type(h).__name__ == "_LastLine" for h in logging.getLogger("knexp").handlers)
