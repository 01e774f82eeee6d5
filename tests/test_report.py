import json

import pytest

from knexp.reporting.report import collect, tables, write_report


def _job(folder, knowledge, method, s_se, s_re, per_layer, variant="", bleu=0.5, noise_level=None):
    folder.mkdir(parents=True)
    lv = {"40.0": {"S_se": s_se, "S_re": s_re, "S_mean": (s_se + s_re) / 2}}
    m = {"model": "embedded", "knowledge": knowledge, "method": method, "variant": variant, "thresholds": "quantile",
         **({"noise_level": noise_level} if noise_level else {}),
         "table2": {"S_se": s_se, "S_re": s_re, "S_mean": (s_se + s_re) / 2, "per_level": lv},
         "table3": {"bleu": bleu, "rouge1": 0.6, "rougeL": 0.5, "bertscore_f1": 0.9}, "per_layer": per_layer}
    (folder / "metrics.json").write_text(json.dumps(m))


def test_report_tables_by_hand(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep / "0", "bed", "ours", 0.8, 0.6, [1, 2, 0])
    _job(sweep / "1", "bear", "ours", 0.6, 0.8, [0, 1, 1])
    _job(sweep / "2", "bed", "pan", 0.2, 1.0, [0, 0, 3], bleu=0.7)
    _job(sweep / "3", "bed", "pan", 0.1, 0.9, [0, 0, 3], variant="authors")
    (sweep / "4").mkdir()
    (sweep / "4" / "metrics.json").write_text(json.dumps({"captions": {}}))  # not an evaluation job: ignored
    results = collect(sweep)
    assert len(results) == 4
    t = tables(results)
    assert t["table2"].loc["ours", "S_se"] == pytest.approx(0.7) and t["table2"].loc["ours", "S_mean"] == pytest.approx(0.7)
    assert t["table2"].loc["pan", "S_re"] == pytest.approx(1.0) and "pan:authors" in t["table2"].index
    assert t["table3"].loc["pan", "bleu"] == pytest.approx(0.7)
    path = write_report(sweep, tmp_path / "out")
    text = path.read_text()
    assert "0.7335" in text and "0.7714" in text  # the paper's averages beside ours
    assert (tmp_path / "out" / "fig2_layers.png").exists() and (tmp_path / "out" / "table2.csv").exists()


def test_a_rerun_counts_once(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep / "0", "bed", "ours", 0.2, 0.6, [1, 0])
    _job(sweep / "rerun" / "0", "bed", "ours", 0.8, 0.6, [1, 0])  # written later: wins
    results = collect(sweep)
    assert len(results) == 1 and results[0]["table2"]["S_se"] == 0.8


def test_empty_sweep_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="sweep_dir"):
        write_report(tmp_path, tmp_path / "out")


def test_a_varied_setting_gets_its_own_rows_and_jobs_without_the_key_are_kept(tmp_path):
    sweep = tmp_path / "sweep"
    _job(sweep / "0", "bed", "ours", 0.8, 0.6, [1, 0], noise_level="n40")
    _job(sweep / "1", "bed", "ours", 0.2, 1.0, [1, 0], noise_level="n120")
    _job(sweep / "2", "bear", "ours", 0.4, 0.4, [1, 0])  # an older job: no noise_level in its metrics
    t = tables(collect(sweep))["table2"]
    assert t.index.names == ["noise_level", "method"] and len(t) == 3
    assert t.loc[("n40", "ours"), "S_se"] == pytest.approx(0.8) and t.loc[("n120", "ours"), "S_se"] == pytest.approx(0.2)
    assert sorted(t["S_se"].round(4)) == [0.2, 0.4, 0.8]
