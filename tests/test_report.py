import json
from pathlib import Path

import pytest

from knexp.reporting.sweep import collect, tables, write_report


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
    assert t["table2"].loc["ours", "S_se"] == pytest.approx(0.7)
    assert t["table2"].loc["ours", "S_mean"] == pytest.approx(0.7)
    assert t["table2"].loc["pan", "S_re"] == pytest.approx(1.0) and "pan:authors" in t["table2"].index
    assert t["table3"].loc["pan", "bleu"] == pytest.approx(0.7)
    report = write_report(sweep, tmp_path / "out")
    text = report.markdown.read_text()
    assert "0.7335" in text and "0.7714" in text  # the paper's averages beside ours
    assert (tmp_path / "out" / "fig2_layers.png").exists() and (tmp_path / "out" / "table2.csv").exists()
    # the same report as one self-contained page: the tables as HTML, every figure inline, no link to a file beside it
    page = report.html.read_text()
    assert page.count("<table") == 3 and "0.7335" in page and "pan:authors" in page  # Table II, III, per knowledge
    assert page.count('src="data:image/png;base64,') == len(report.figures) == 1 and ".png" not in page
    assert report.figures == [tmp_path / "out" / "fig2_layers.png"]


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
    assert t.loc[("n40", "ours"), "S_se"] == pytest.approx(0.8)
    assert t.loc[("n120", "ours"), "S_se"] == pytest.approx(0.2)
    assert sorted(t["S_se"].round(4)) == [0.2, 0.4, 0.8]


def _curve_job(folder, knowledge, method, points, thresholds="budget(abs, live)"):
    folder.mkdir(parents=True)
    curve = [{"size": n, "S_se": se, "S_re": re, "S_mean": (se + re) / 2} for n, se, re in points]
    m = {"model": "embedded", "knowledge": knowledge, "method": method, "variant": "", "thresholds": thresholds,
         "intervention": "inpainted", "noise_level": "-", "curve": curve, "per_layer": [1, 0]}
    (folder / "metrics.json").write_text(json.dumps(m))


def test_size_curves_and_their_areas_by_hand_per_split(tmp_path):
    from knexp.evaluation.scores import curve_area

    sweep = tmp_path / "sweep"
    _curve_job(sweep / "0", "pizza", "ours", [(10, 0.0, 1.0), (100, 0.4, 1.0), (1000, 0.8, 0.8)])
    _curve_job(sweep / "1", "giraffe", "ours", [(10, 0.2, 1.0), (100, 0.6, 1.0), (1000, 1.0, 0.6)])
    _curve_job(sweep / "2", "bear", "ours", [(10, 0.0, 1.0), (100, 0.0, 1.0), (1000, 0.0, 1.0)])
    splits = {"tuning": ["pizza", "giraffe"], "heldout": ["bear"]}
    t = tables(collect(sweep), splits)
    curves = t["curves"]
    assert curves.index.names == ["split", "size", "method"]
    # tuning: the mean of the two objects at each size; held-out: bear alone
    assert curves.loc[("tuning", 100, "ours"), "S_se"] == pytest.approx(0.5)
    assert curves.loc[("tuning", 1000, "ours"), "S_mean"] == pytest.approx((0.9 + 0.7) / 2)
    assert curves.loc[("heldout", 1000, "ours"), "S_se"] == pytest.approx(0.0)
    # area under S_mean over log n, over the log range: trapezoids of equal width here
    s_mean = [0.55, 0.75, 0.8]  # tuning at 10, 100, 1000: means of pizza's and giraffe's (S_se + S_re) / 2
    area = ((s_mean[0] + s_mean[1]) / 2 + (s_mean[1] + s_mean[2]) / 2) / 2
    assert t["curve_areas"].loc[("tuning", "ours"), "area_S_mean"] == pytest.approx(area)
    assert t["curve_areas"].loc[("heldout", "ours"), "area_S_mean"] == pytest.approx(0.5)
    assert curve_area([{"size": 30, "S_mean": 0.7}]) == 0.7 and curve_area([]) is None
    report = write_report(sweep, tmp_path / "out", splits)
    assert (tmp_path / "out" / "size_curves.png").exists() and "Size curves" in report.markdown.read_text()


def test_report_draws_the_trace_a_job_wrote(tmp_path):
    from knexp.identification.causal_trace import KINDS, SampleTrace, live_window
    from knexp.reporting.outputs import write_trace

    sweep = tmp_path / "sweep"
    _job(sweep / "0", "bed", "ours", 0.8, 0.6, [1, 2, 0])
    traces = [SampleTrace("bed", 1, 2, 10.0, 2.0, {k: [-8.0, -6.0, 0.0] for k in KINDS},
                          {k: [False, False, True] for k in KINDS})]
    window_only = [SampleTrace("bed", 1, 2, 10.0, 2.0, {"resid": [-8.0, -8.0, -8.0]}, {})]  # its window: layers 0-1
    def trace(window, samples):
        return {"model": "embedded", "window": window, "samples": [t.to_dict() for t in samples]}

    write_trace(sweep / "0", trace(live_window(window_only, 0.5), window_only))  # an evaluate job's window
    write_trace(sweep / "trace", trace(live_window(traces, 0.5), traces))  # task=trace's, found later in path order
    text = write_report(sweep, tmp_path / "out").markdown.read_text()
    assert "neurons of layers 0-0 of 3" in text and "(`trace/trace.json`)" in text  # the full one
    assert (tmp_path / "out" / "trace.png").exists()


def test_wandb_summary_flattens_nested_results_and_a_curve_is_logged_offline(tmp_path):
    from knexp.reporting.logger import WandbLogger, _flatten

    curve = [{"size": 10, "S_se": 0.1}, {"size": 100, "S_se": 0.5}]
    assert _flatten({"curve": curve, "clean": {"S_k": 1.0}, "sizes": [1, 2]}) == {
        "curve/0/size": 10, "curve/0/S_se": 0.1, "curve/1/size": 100, "curve/1/S_se": 0.5, "clean/S_k": 1.0,
        "sizes": [1, 2]}
    import pandas as pd

    logger = WandbLogger(tmp_path, run_config={"task": {"name": "evaluate"}}, job_type="evaluate", mode="offline",
                         dir=tmp_path)
    logger.log_table("curve", pd.DataFrame(curve))
    logger.log_metrics({"curve": curve})
    assert logger.run.summary["curve/1/S_se"] == 0.5
    logger.finish()
    assert (tmp_path / "curve.csv").read_text().splitlines()[0] == "size,S_se"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_report_task_writes_the_page_and_logs_tables_and_figures_to_wandb(tmp_path):
    from knexp.job.compose import compose
    from knexp.job.session import Session
    from knexp.tasks.report import ReportTask

    sweep = tmp_path / "demo" / "multirun"
    _job(sweep / "0", "bed", "ours", 0.8, 0.6, [1, 2, 0])
    _job(sweep / "1", "bed", "pan", 0.2, 1.0, [0, 0, 3])
    for job, method in (("0", "ours"), ("1", "pan")):  # what Hydra keeps of each job's config
        (sweep / job / ".hydra").mkdir()
        (sweep / job / ".hydra" / "config.yaml").write_text(
            f"knowledge: {{name: bed}}\nmethod: {{name: {method}}}\nmodel: {{name: embedded}}\ntags: [demo]\n")
    session = Session.from_config(compose("task=report", f"sweep_dir={sweep}", "logger=wandb", "logger.mode=offline",
                                          output_dir=tmp_path / "report"))
    result = ReportTask()(session)
    assert result["html"] == str(tmp_path / "report" / "report.html")
    assert "fig2_layers.png" not in Path(result["html"]).read_text()
    run = next((tmp_path / "report" / "wandb").glob("offline-run-*"))
    assert (tmp_path / "report" / "table2.csv").exists() and not (tmp_path / "report" / "report_table2.csv").exists()
    logged = next(run.rglob("*.wandb")).read_bytes()
    assert b"report_table2" in logged  # mirrored to W&B, not copied beside its CSV
    # the report's run joins its sweep's group and carries the sweep's tags, not the default config's
    assert b"demo/multirun" in logged and b"knowledge:bed" in logged and b"method:pan" in logged
    assert b"knowledge:banana" not in logged and b"method:ours" in logged


def _panel(job: Path, knowledge: str, layer: int, unit: int, with_set: bool = False):
    """What an evaluate job writes for Fig. 3: neurons.json and the panel it names (``with_set``: and the set's map,
    which points at the object better than its best single neuron)."""
    import cv2
    import numpy as np

    (job / "figures").mkdir(parents=True, exist_ok=True)
    name = f"neuron_1_L{layer}_U{unit}.png"
    cv2.imwrite(str(job / "figures" / name), np.full((20, 40, 3), 200, np.uint8))
    scores = {"iou_q95": 0.25, "pointing": 0.5, "area_iou": 0.375, "auc": 0.7}
    set_panel = None
    if with_set:
        cv2.imwrite(str(job / "figures" / "set_1.png"), np.full((20, 40, 3), 90, np.uint8))
        set_panel = {"figure": "set_1.png", "scores": {**scores, "pointing": 1.0, "area_iou": 0.625},
                     "best_single": scores}
    rows = [{"image_id": 1, "top_neuron": [layer, unit], "sign": -1, "figure": name, **scores, "set_panel": set_panel,
             "decoded": []}]
    (job / "neurons.json").write_text(json.dumps(rows))


class _Page:
    """The report page through the standard library's HTML parser: every image's source, every table's id and rows."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        self.images, self.tables, self.headings = [], {}, []
        page, current = self, {"table": None, "in_body": False, "heading": False}

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                a = dict(attrs)
                if tag == "img":
                    page.images.append(a["src"])
                elif tag == "table":
                    current["table"] = a.get("id")
                    page.tables[current["table"]] = 0
                elif tag == "tbody":
                    current["in_body"] = True
                elif tag == "tr" and current["in_body"]:
                    page.tables[current["table"]] += 1
                elif tag in ("h2", "h3"):
                    current["heading"] = True

            def handle_endtag(self, tag):
                if tag == "tbody":
                    current["in_body"] = False
                elif tag in ("h2", "h3"):
                    current["heading"] = False

            def handle_data(self, data):
                if current["heading"]:
                    page.headings.append(data)

        Parser().feed(text)


def test_the_page_parses_its_images_decode_and_its_tables_have_their_csv_rows(tmp_path):
    import base64

    import cv2
    import numpy as np
    import pandas as pd

    from knexp.identification.causal_trace import SampleTrace, live_window
    from knexp.reporting.outputs import write_trace

    sweep = tmp_path / "sweep"
    jobs = [("bear", "random", 0.1), ("bed", "pan", 0.3), ("bear", "ours", 0.9), ("pizza", "attribution", 0.7),
            ("bed", "ours", 0.7), ("pizza", "ours", 0.6), ("bear", "pan", 0.2), ("bed", "random", 0.0)]
    for i, (knowledge, method, s_se) in enumerate(jobs):
        _job(sweep / str(i), knowledge, method, s_se, 0.8, [1, 0, 2])
        _panel(sweep / str(i), knowledge, 2, 10 + i, with_set=(knowledge, method) == ("bed", "pan"))
    window_only = [SampleTrace("bed", 1, 2, 10.0, 2.0, {"resid": [-8.0, -8.0, -8.0]}, {})]
    write_trace(sweep / "0", {"model": "embedded", "window": live_window(window_only, 0.5),
                              "samples": [t.to_dict() for t in window_only]})
    (sweep / "edit").mkdir()
    (sweep / "edit" / "metrics.json").write_text(json.dumps(
        {"task": "edit", "model": "embedded", "knowledge": "bed", "method": "attribution", "rule": "optimized",
         "op": "erase",
         "size": 30,
         "variants": {"unedited": {"reliability": 0.0}, "edit": {"reliability": 0.8, "m_locality": {"S_re": 0.9}}}}))
    splits = {"tuning": ["pizza", "giraffe"], "heldout": ["bed", "bear", "bus"]}
    out = tmp_path / "out"
    report = write_report(sweep, out, splits)
    text = report.html.read_text()
    page = _Page(text)
    # every image is an inline PNG that decodes to a picture of nonzero size
    assert len(page.images) == len(jobs) + 3  # the gallery (one set's map with it), the trace, Fig. 2
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        picture = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        assert picture is not None and picture.shape[0] > 0 and picture.shape[1] > 0
    # every table has the rows of its CSV
    assert set(page.tables) == {"table2", "table3", "table2_per_knowledge", "edit_summary"}
    for name, rows in page.tables.items():
        assert rows == len(pd.read_csv(out / f"{name}.csv")), name
    # plain labels, no NaN, means with intervals, the paper's empty cells
    assert "NaN" not in text and "nan" not in report.markdown.read_text() and "('" not in text
    assert "<th>split</th>" in text and "0.8000 [" in text  # ours on the held-out pair: mean 0.8 with its interval
    # the paper's order: per object, then ours, schwettmann, pan, attribution, ..., random; tuning before held-out
    per_object = pd.read_csv(out / "table2_per_knowledge.csv")
    assert list(zip(per_object["knowledge"], per_object["method"], strict=True)) == [
        ("pizza", "ours"), ("pizza", "attribution"), ("bear", "ours"), ("bear", "pan"), ("bear", "random"),
        ("bed", "ours"), ("bed", "pan"), ("bed", "random")]
    means = pd.read_csv(out / "table2.csv")
    assert list(zip(means["split"], means["method"], strict=True)) == [
        ("tuning", "ours"), ("tuning", "attribution"), ("heldout", "ours"), ("heldout", "pan"), ("heldout", "random")]
    assert means["S_se_lo"].isna().tolist() == [True, True, False, False, False]  # no interval for one object
    # Fig. 3's gallery grouped by method in that order, each object's panel once
    methods = [h for h in page.headings if h in ("ours", "pan", "attribution", "random")]
    assert methods == ["ours", "pan", "attribution", "random"]
    assert sorted(p.name for p in (out / "fig3").iterdir()) == sorted([f"{m}__{k}.png" for k, m, _ in jobs]
                                                                      + ["pan__bed__set.png"])
    # the captions give the pointing game and the area-matched IoU; the set's panel says what its best neuron reached
    assert "bed: L2 U11, pointing 0.50, area IoU 0.38, q95 IoU 0.25" in text
    assert ("bed: the set&#x27;s map, pointing 1.00, area IoU 0.62, q95 IoU 0.25 (its best single neuron: area IoU "
            "0.38)") in text
    # the header lists this sweep's objects by split, not every object of the splits; the trace names its samples
    assert "tuning: pizza; heldout: bear, bed." in text and "giraffe" not in text and "bus" not in text
    assert "neurons of layers 0-1 of 3" in text and "traced samples of bed (<code>0/trace.json</code>)" in text
    trace = cv2.imread(str(out / "trace.png"))
    assert trace.shape[0] < 0.6 * trace.shape[1]  # a window-only trace: one row of panels, no empty captions row


def _located(folder: Path, knowledge: str, cells: dict):
    """A task=localize job: {method: (auc, random auc)} on the held-out images' set map (other measures alike)."""
    folder.mkdir(parents=True)
    measures = ("pointing", "area_iou", "auc")
    loc = {method: {"held-out": {"set": {
        **{k: v for k in measures}, **{f"random_{k}": r for k in measures},
        "chance_pointing": 0.2, "chance_area_iou": 0.11, "chance_auc": 0.5, "n_images": 6}}}
        for method, (v, r) in cells.items()}
    (folder / "metrics.json").write_text(json.dumps({"task": "localize", "model": "embedded", "knowledge": knowledge,
                                                     "localization": loc}))


def test_fig3_measured_by_hand_with_paired_intervals_and_its_table_on_the_page(tmp_path):
    import os

    import pandas as pd

    sweep = tmp_path / "sweep"
    # ours beats random on every object by 0.2; pan is random's equal on average (+0.2, -0.1, -0.1)
    _located(sweep / "0", "bed", {"ours": (0.8, 0.6), "pan": (0.8, 0.6)})
    _located(sweep / "1", "bear", {"ours": (0.9, 0.7), "pan": (0.5, 0.6)})
    _located(sweep / "2", "bus", {"ours": (0.7, 0.5), "pan": (0.6, 0.7)})
    _located(sweep / "old", "bus", {"ours": (0.1, 0.9)})  # an older file of the same object and method: overridden
    os.utime(sweep / "old" / "metrics.json", (1, 1))
    report = write_report(sweep, tmp_path / "out", {"heldout": ["bed", "bear", "bus"]})
    fig3 = pd.read_csv(tmp_path / "out" / "fig3.csv").set_index("method")
    assert fig3.loc["ours", "auc"] == pytest.approx(0.8) and fig3.loc["ours", "random_auc"] == pytest.approx(0.6)
    assert fig3.loc["ours", "diff_auc"] == pytest.approx(0.2) and fig3.loc["ours", "diff_auc_lo"] == pytest.approx(0.2)
    assert fig3.loc["pan", "diff_auc"] == pytest.approx(0.0) and fig3.loc["pan", "diff_auc_lo"] < 0
    assert fig3.loc["ours", "chance_auc"] == 0.5 and fig3.loc["ours", "objects"] == 3
    page = _Page(report.html.read_text())
    assert page.tables["fig3_auc"] == page.tables["fig3_pointing"] == page.tables["fig3_area_iou"] == 2
    assert "Fig. 3, measured: do the maps point at the object?" in page.headings
    auc = pd.read_csv(tmp_path / "out" / "fig3_auc.csv")
    assert len(auc.columns) == 4 + 3 * 3 + 1 + 1  # the keys, (mean, lo, hi) of method, random and diff, chance, objects
    text = report.html.read_text()
    assert "heldout, held-out images, set map: ours beats layer-matched random neurons on auc" in text
    assert "0.8000 [0.70, 0.90]" in text  # ours' AUC with its interval over the three objects
