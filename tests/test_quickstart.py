"""The README's Python quickstart (examples/quickstart.py) runs on the embedded model and its outputs hold up."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from knexp.job.compose import compose
from knexp.paths import project_root


@pytest.mark.slow
def test_quickstart_identifies_captions_and_draws(tmp_path):
    r = subprocess.run([sys.executable, "examples/quickstart.py", str(tmp_path / "qs")], cwd=project_root(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    q = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
    assert q["knowledge"] == "banana" and q["size"] == compose().thresholds.n  # the default budget rule's set
    assert q["layers"] and set(q["layers"]) <= set(q["live_window"])  # the rule keeps its neurons in the live window
    assert q["captions"]["clean"] == q["selected_caption"]  # greedy captions do not depend on how they are asked for
    assert q["mentions"]["clean"] and not q["mentions"]["inpainted image"]  # the sample meets selection's constraints
    assert all(text.startswith("The image shows") for text in q["captions"].values())
    assert q["top_neuron"][0] in q["layers"] and 0.0 <= q["iou_q95"] <= 1.0 and 0.0 <= q["auc"] <= 1.0
    assert Path(q["figure"]).stat().st_size > 20_000 and "neurons per layer" in r.stdout
