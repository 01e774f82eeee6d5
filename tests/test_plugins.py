"""A new identification method, intervention or edit rule is one class and one yaml, outside knexp: a folder on
``hydra.searchpath`` with the yamls and an importable module with the classes, run through ``run.py`` on a tiny model.
A name with no yaml, or a ``_target_`` that does not import, stops the job with an error that names the key and lists
the group's options."""

import json
import textwrap

import pytest
from conftest import run_py

PLUGINS = '''
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from knexp.editing.rules import EditRule, column_edit
from knexp.evaluation.interventions import Intervention, Row, SetValues
from knexp.identification.methods import Method, NeuronSet


@dataclass
class LastUnits(Method):
    """The last ``count`` units of layer 0, whatever the sample."""

    count: int = 3

    def select(self, stats, ts, rule, ctx, d_ff):
        units = np.arange(d_ff - self.count, d_ff)
        return NeuronSet(self.name, "plugin", np.zeros(self.count, np.int64), units, np.ones(self.count))


@dataclass(frozen=True)
class Twice(Intervention):
    """The set's O' set to ``value``, captioned twice per image (two draws)."""

    value: float = 5.0
    kind: ClassVar[str] = "twice"
    deterministic: ClassVar[bool] = False

    def rows(self, image_keys):
        return [Row(i, key, 0, 0.0, draw) for i, key in enumerate(image_keys) for draw in (0, 1)]

    def values(self, neurons, reference=None, counterfactual=None):
        return SetValues(fixed=np.full(len(neurons), self.value))

    def change(self, rows, neurons, values, seed, positions):
        return torch.full((len(rows), positions, len(neurons)), self.value)


@dataclass
class ObjectsOnly(EditRule):
    """Zeroes as many of the set's neurons as the identification images have annotated objects of k: its context, the
    instance masks of the samples, is one no shipped rule reads."""

    name: str = "objects_only"

    def context(self, inputs):
        return [inputs.data.instance_mask(r.candidate.annotation_id) for r in inputs.found.results]

    def make(self, adapter, neurons, target, context):
        kept = sum(1 for mask in context if mask.any())
        first = NeuronSet(neurons.method, neurons.variant, neurons.layers[:kept], neurons.units[:kept],
                          neurons.scores[:kept])
        edit = column_edit(adapter, first, lambda layer, units, w: (-w, None))
        edit.provenance.update(rule=self.name)
        return edit
'''

YAMLS = {
    "method/last_units.yaml": "_target_: knexp_plugin_demo.LastUnits\nname: last_units\ncount: 3\n",
    "intervention/twice.yaml": "_target_: knexp_plugin_demo.Twice\nname: twice\nvalue: 5.0\n",
    "edit/rule/objects_only.yaml": "_target_: knexp_plugin_demo.ObjectsOnly\nname: objects_only\n",
    "method/broken.yaml": "_target_: knexp_plugin_demo.NoSuchClass\nname: broken\n",
}
COMMON = ["model=tiny_llava", "knowledge=cell_phone", "data.num_images=60", "thresholds.n=20",
          "thresholds.layers=nonzero", "logger=none", "num_threads=1"]
IMAGES = ["task.k_images=1", "task.other_images=2"]  # task=evaluate's and task=edit's


@pytest.fixture(scope="module")
def plugins(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    (root / "knexp_plugin_demo.py").write_text(textwrap.dedent(PLUGINS))
    for name, text in YAMLS.items():
        (root / "conf" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "conf" / name).write_text(text)
    return root


def _run(plugins, tmp_path, *args):
    return run_py(*COMMON, f"hydra.searchpath=[file://{plugins}/conf]", f"data.root={tmp_path}/tw",
                  f"paths.cache_dir={tmp_path}/cache", f"hydra.run.dir={tmp_path}/job", *args, timeout=300,
                  env={"PYTHONPATH": str(plugins)})


def test_a_method_and_an_intervention_from_outside_knexp_run_through_run_py(plugins, tmp_path):
    r = _run(plugins, tmp_path, "task=evaluate", *IMAGES, "method=last_units", "intervention=twice")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    sets, images = metrics["sets"], metrics["images"]["k"] + metrics["images"]["other"]
    assert sets > 0 and metrics["method"] == "last_units" and metrics["intervention"] == "twice"
    # the method's units, layer 0 only
    assert metrics["per_layer"][0] == 3 * sets and sum(metrics["per_layer"]) == 3 * sets
    assert metrics["timing"]["perturbed_captions"] == 2 * images * sets  # the intervention's two rows per image


def test_an_edit_rule_with_its_own_context_from_outside_knexp(plugins, tmp_path):
    r = _run(plugins, tmp_path, "task=edit", *IMAGES, "edit.source=ours", "edit/rule=objects_only", "edit.size=8",
             "edit.fit_other=1", "task.baselines=[random]")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    accepted = json.loads((tmp_path / "job" / "selection.json").read_text())["accepted"]
    assert metrics["rule"] == "objects_only" and 0 < len(accepted) < 8
    assert metrics["variants"]["edit"]["cost"]["neurons"] == len(accepted)  # one neuron per object mask of its context
    assert metrics["variants"]["random"]["cost"]["neurons"] == len(accepted)  # its control shares the context


@pytest.mark.parametrize("option, named", [("method=nowhere", "method"), ("method=broken", "method._target_")])
def test_an_unknown_option_or_target_stops_with_one_line_that_lists_the_options(plugins, tmp_path, option, named):
    r = _run(plugins, tmp_path, "task=identify", option)
    assert r.returncode == 1, r.stderr[-2000:]
    text = r.stderr
    assert named in text and "last_units" in text and "ours" in text and "Traceback" not in text, text[-2000:]
