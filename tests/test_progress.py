import logging

from omegaconf import OmegaConf

from knexp.reporting.progress import SweepProgress, eta_line, quiet_third_party, sweep_size


def _cfg(params=None, task=(), n_trials=None, sweep_dir="."):
    sweeper = {"params": params or {}} | ({"n_trials": n_trials} if n_trials else {})
    return OmegaConf.create({"hydra": {"sweeper": sweeper, "overrides": {"task": list(task)}, "sweep": {"dir": str(sweep_dir)},
                                       "job": {"num": 0}}})


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


