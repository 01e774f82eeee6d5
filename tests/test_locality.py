"""Locality by construction (knexp.editing.preserved, knexp.editing.input_null): the preserved keys' second moments and
AlphaEdit's projection, the input-side edit's closed form against a least-squares solve of its objective, exactness on
rank-deficient preserved keys, the set's activations unchanged at preserved inputs of a tiny model, and the rule
through run.py."""

import itertools
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_py

from knexp.editing import preserved as preserved_module
from knexp.editing.input_null import InputNull, InputSide, input_null_update
from knexp.editing.make import make, making_costs
from knexp.editing.matrix import MatrixEdit, MatrixInputs, alpha_update, memit_update
from knexp.editing.preserved import PreservedKeys, second_moments
from knexp.editing.rules import Zero
from knexp.editing.target import Erase
from knexp.identification.methods import NeuronSet
from knexp.models.hooks.attach import everywhere
from knexp.models.tiny.tiny_vlm import tiny_adapter
from knexp.models.weight_edit import applied


def _low_rank(rng, n: int, d: int, rank: int) -> torch.Tensor:
    """n row vectors in R^d spanning a ``rank``-dimensional subspace, float64."""
    return torch.as_tensor(rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)))


def test_the_update_leaves_rank_deficient_preserved_keys_exactly_alone_and_silences_the_object():
    """With preserved keys X0 of rank 5 in R^16, P is the projector on their 11-dimensional null space, and
    (W + Δ) X0^T = W X0^T to 1e-10 relative; the object's 6 keys lose their response (W + Δ) X1^T."""
    rng = np.random.default_rng(0)
    x0, x1 = _low_rank(rng, 40, 16, 5), torch.as_tensor(rng.standard_normal((6, 16)))
    w = torch.as_tensor(rng.standard_normal((3, 16)))
    projection = PreservedKeys({0: x0.T @ x0 / len(x0)}, len(x0)).null_projection(0, 1e-6)
    assert torch.linalg.matrix_rank(projection).item() == 11
    delta = input_null_update(w, x1, projection, 1e-6)
    assert float(((w + delta) @ x0.T - w @ x0.T).norm() / (w @ x0.T).norm()) < 1e-10
    assert float(((w + delta) @ x1.T).norm()) < 1e-4 * float((w @ x1.T).norm())  # 6 keys, 11 free directions


def test_the_closed_form_is_the_least_squares_solution_of_its_objective():
    """Δ = R P with R minimising ||R P X1^T + W X1^T||^2 + alpha ||R P||^2, solved by torch.linalg.lstsq on the stacked
    system, equals the closed form."""
    rng = np.random.default_rng(1)
    x0, x1 = torch.as_tensor(rng.standard_normal((200, 12))), torch.as_tensor(rng.standard_normal((5, 12)))
    w = torch.as_tensor(rng.standard_normal((4, 12)))
    projection = PreservedKeys({0: x0.T @ x0 / 200}, 200).null_projection(0, 0.5)
    ridge = 0.1
    delta = input_null_update(w, x1, projection, ridge)
    alpha = ridge * float((x1 @ projection @ x1.T).diagonal().mean())
    system = torch.cat([projection @ x1.T, alpha ** 0.5 * projection], dim=1).T  # [m + d, d]: rows of the objective
    target = torch.cat([-(w @ x1.T), torch.zeros(4, 12, dtype=torch.float64)], dim=1).T  # [m + d, U]
    r = torch.linalg.lstsq(system, target, driver="gelsd").solution.T  # [U, d]
    torch.testing.assert_close(r @ projection, delta, rtol=1e-8, atol=1e-10)


class _Inputs:
    """The parts of ``EditInputs`` the input-side rule reads, on a tiny model: the object's keys come from ``objects``
    (MLP inputs of text prompts), the preserved keys from ``preserved`` (a few short prompts: rank-deficient)."""

    def __init__(self, adapter, preserved_texts):
        self.adapter = adapter
        self.texts = preserved_texts

    def preserved(self, layers, positions, site="ffn_in"):
        return second_moments(self.adapter, self.texts, layers, site)


def _mlp_inputs_and_activations(adapter, texts, layer, units):
    """(the MLP inputs [n, d], the set's activations O'[n, U]) of ``layer`` over every position of ``texts``."""
    seen = {"x": [], "o": []}
    hooks = {("ffn_in", layer): lambda x: seen["x"].append(x[0].double()),
             ("ffn", layer): lambda o: seen["o"].append(o[0, :, units].double())}
    with torch.no_grad(), everywhere(adapter, hooks):
        for text in texts:
            adapter.text_logits([text])
    return torch.cat(seen["x"]), torch.cat(seen["o"])


def test_after_an_input_side_edit_the_sets_activations_at_preserved_inputs_are_unchanged():
    """On a tiny model (d_model 32), preserved keys from two short prompts (fewer positions than the width): the edited
    model gives the set's neurons the same activations there, to 1e-5 relative, and their up factors at the object's
    keys (each prompt's last token) are cut by more than 90%."""
    adapter = tiny_adapter("embedded", layers=2)
    preserved = ["the image shows a cat", "two plus two"]
    objects = ["a banana on a table", "yellow banana"]
    units = torch.tensor([1, 4, 7])
    neurons = NeuronSet("test", "", np.array([1, 1, 1]), units.numpy(), np.zeros(3))
    context = InputSide(_Inputs(adapter, preserved), per_unit=1.0)
    # the object's keys: the last token of each prompt (a first token's input is the same in every prompt)
    keys = torch.stack([_mlp_inputs_and_activations(adapter, [text], 1, units)[0][-1] for text in objects])
    context._keys[1] = keys
    rule = InputNull(threshold=1e-6, ridge=1e-6)
    edit = rule.make(adapter, neurons, None, context)
    assert edit.provenance["preserved_positions"] < 32 and edit.at(1, "up_proj").delta.shape == (3, 32)
    _, before = _mlp_inputs_and_activations(adapter, preserved, 1, units)
    up = adapter.ffn_linear(1, "up_proj").weight[units].double()
    with applied(adapter, edit):
        _, after = _mlp_inputs_and_activations(adapter, preserved, 1, units)
        up_edited = adapter.ffn_linear(1, "up_proj").weight[units].double()
    assert float((after - before).norm() / before.norm()) < 1e-5
    assert float((keys @ up_edited.T).norm()) < 0.1 * float((keys @ up.T).norm())


def test_input_null_through_run_py_edits_up_proj_rows_and_refuses_a_swap(tmp_path):
    common = ["task=edit", "model=tiny_llava", "knowledge=cell_phone", "data.num_images=60", "thresholds.n=20",
              "thresholds.layers=nonzero", "task.k_images=1", "task.other_images=2", "edit.size=8",
              "edit.source=ours", "edit.fit_other=1", "edit/rule=input_null", "task.baselines=[random]", "logger=none",
              "num_threads=1", f"data.root={tmp_path}/tw", f"paths.cache_dir={tmp_path}/cache"]
    r = run_py(*common, f"hydra.run.dir={tmp_path}/job", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    cost = metrics["variants"]["edit"]["cost"]
    assert metrics["rule"] == "input_null" and cost["neurons"] == 8 and cost["parameters_changed"] == 8 * 32
    assert cost["prepare_seconds"] > 0  # the preserved keys, timed apart from the closed form
    assert (tmp_path / "cache" / "preserved").is_dir()
    swap = run_py(*common, "edit.op=swap", f"hydra.run.dir={tmp_path}/swap", timeout=120)
    lines = [line for line in swap.stderr.splitlines() if line.strip()]
    assert swap.returncode == 1 and len(lines) == 1 and "edit.op='swap'" in lines[0] and "erase only" in lines[0]


def test_make_runs_a_rules_prepare_on_its_context_and_reports_its_seconds_apart(catalog):
    """A rule with its own ``prepare`` gets it called once on the context, and the costs carry ``prepare_seconds``; a
    rule without one reports no such entry."""
    calls = []

    class WithPrepare(Zero):
        def prepare(self, adapter, neurons, context):
            calls.append(context)

    adapter, target = tiny_adapter("embedded", layers=2), Erase(catalog["banana"])
    neurons = NeuronSet("test", "", np.array([0, 1]), np.array([3, 5]), np.zeros(2))
    edit, _ = make(adapter, WithPrepare(), neurons, target, "context")
    assert calls == ["context"] and set(making_costs(edit)) == {"prepare_seconds"}
    assert making_costs(edit)["prepare_seconds"] >= 0 and edit.provenance["knowledge"] == "banana"
    plain, _ = make(adapter, Zero(), neurons, target, None)
    assert making_costs(plain) == {}


def test_the_preserved_keys_pass_logs_its_progress(caplog, monkeypatch):
    """With 11 s between clock reads, every prompt is due a line: "preserved keys (ffn_in): i/3 prompts"; C_l is still
    the mean outer product over the positions counted."""
    clock = itertools.count(0, 11)
    monkeypatch.setattr(preserved_module, "time", SimpleNamespace(time=lambda: next(clock)))
    adapter = tiny_adapter("embedded", layers=2)
    with caplog.at_level(logging.INFO, logger="knexp.progress"):
        keys = second_moments(adapter, ["a cat", "two plus two", "a red bus"], [1])
    lines = [r.getMessage() for r in caplog.records if r.name == "knexp.progress"]
    assert [line.rsplit(" (", 1)[0] for line in lines] == [f"preserved keys (ffn_in): {i}/3 prompts" for i in (1, 2, 3)]
    assert keys.positions > 0 and torch.allclose(keys.second[1], keys.second[1].T)


@pytest.mark.parametrize("threshold, kept", [(1e-9, 0), (1.0, 8)])
def test_the_null_projection_keeps_the_directions_below_the_relative_threshold(threshold, kept):
    values = torch.tensor([1e-3, 1e-2, 0.1, 1.0, 2.0, 3.0, 5.0, 10.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.as_tensor(np.random.default_rng(2).standard_normal((8, 8))))
    keys = PreservedKeys({0: q @ torch.diag(values) @ q.T}, 100)
    assert round(float(torch.trace(keys.null_projection(0, threshold)))) == kept
    middle = keys.null_projection(0, 0.05)  # eigenvalues <= 0.5: the three smallest
    torch.testing.assert_close(middle, q[:, :3] @ q[:, :3].T)


# ---- whole-matrix rules (knexp.editing.matrix) ----------------------------------------------------------------------

def test_alpha_edits_update_leaves_rank_deficient_preserved_keys_alone_and_writes_the_residual():
    """Preserved activations of rank 6 in R^20 (d_ff 20): U spans their 14-dimensional null space, and (W + Delta) K0^T
    = W K0^T to 1e-10 relative; the object's 4 keys get the residual R written, to 1e-3 relative (small ridge)."""
    rng = np.random.default_rng(3)
    k0, keys = _low_rank(rng, 60, 20, 6), torch.as_tensor(rng.standard_normal((4, 20)))
    w, residual = torch.as_tensor(rng.standard_normal((8, 20))), torch.as_tensor(rng.standard_normal((4, 8)))
    basis = PreservedKeys({0: k0.T @ k0 / len(k0)}, len(k0)).null_basis(0, 1e-9)
    assert basis.shape == (20, 14)
    delta = alpha_update(residual, keys, torch.zeros(0, 20, dtype=torch.float64), basis, 1e-8)
    assert float(((w + delta) @ k0.T - w @ k0.T).norm() / (w @ k0.T).norm()) < 1e-10
    assert float((delta @ keys.T - residual.T).norm() / residual.norm()) < 1e-3


def test_alpha_edits_closed_form_is_the_least_squares_solution_of_its_objective():
    """Delta = G U^T with G minimising ||G U^T K^T - R^T||^2 + ||G U^T Kp^T||^2 + alpha ||G||^2, solved by
    torch.linalg.lstsq on the stacked system, equals the closed form (and AlphaEdit's own formula)."""
    rng = np.random.default_rng(4)
    k0, keys, kept = (torch.as_tensor(rng.standard_normal(shape)) for shape in ((300, 12), (5, 12), (7, 12)))
    residual, ridge = torch.as_tensor(rng.standard_normal((5, 6))), 0.1
    basis = PreservedKeys({0: k0.T @ k0 / 300}, 300).null_basis(0, 0.6)
    r = basis.shape[1]
    assert 0 < r < 12
    delta = alpha_update(residual, keys, kept, basis, ridge)
    alpha = ridge * float((keys @ basis).pow(2).sum(1).mean())
    system = torch.cat([keys @ basis, kept @ basis, alpha ** 0.5 * torch.eye(r, dtype=torch.float64)])  # [m+n+r, r]
    target = torch.cat([residual, torch.zeros(7 + r, 6, dtype=torch.float64)])  # [m+n+r, d_out]
    g = torch.linalg.lstsq(system, target, driver="gelsd").solution.T  # [d_out, r]
    torch.testing.assert_close(g @ basis.T, delta, rtol=1e-8, atol=1e-10)
    p = basis @ basis.T  # AlphaEdit's form: R^T K P (Kp^T Kp P + K^T K P + alpha I)^-1
    theirs = residual.T @ keys @ p @ torch.linalg.inv(kept.T @ kept @ p + keys.T @ keys @ p + alpha * torch.eye(12))
    torch.testing.assert_close(theirs, delta, rtol=1e-7, atol=1e-9)


def test_memits_closed_form_is_the_least_squares_solution_of_its_objective():
    """Delta minimising ||Delta K^T - R^T||^2 + ||Delta Kp^T||^2 + lam m tr(Delta A Delta^T) + alpha ||Delta||^2,
    A = L L^T, by lstsq on the stacked system [K; Kp; sqrt(lam m) L^T; sqrt(alpha) I], equals the closed form."""
    rng = np.random.default_rng(5)
    k0, keys, kept = (torch.as_tensor(rng.standard_normal(shape)) for shape in ((100, 10), (4, 10), (6, 10)))
    residual, lam, ridge = torch.as_tensor(rng.standard_normal((4, 3))), 0.7, 0.2
    second = k0.T @ k0 / 100
    delta = memit_update(residual, keys, kept, second, lam, ridge)
    root = torch.linalg.cholesky(second)  # A = L L^T
    alpha = ridge * float(keys.pow(2).sum(1).mean())
    system = torch.cat([keys, kept, (lam * 4) ** 0.5 * root.T, alpha ** 0.5 * torch.eye(10, dtype=torch.float64)])
    target = torch.cat([residual, torch.zeros(26, 3, dtype=torch.float64)])
    torch.testing.assert_close(torch.linalg.lstsq(system, target, driver="gelsd").solution.T, delta, rtol=1e-8,
                               atol=1e-10)


class _MatrixInputs:
    """The parts of ``EditInputs`` the whole-matrix rules read, on a tiny model: two images of k (random pixels) with
    their counterfactuals (the left half, k's mask, moved by a little noise: a residual to write that a float32 delta
    holds exactly enough); the preserved keys from a few short prompts (fewer positions than d_ff: rank-deficient)."""

    def __init__(self, adapter, preserved_texts):
        rng = np.random.default_rng(6)
        self.adapter, self.texts, self.locality, self.batch_size = adapter, preserved_texts, [], 2
        mask = np.zeros((64, 64), bool)
        mask[:, :32] = True
        self.views = []
        for _ in range(2):
            image = rng.integers(20, 235, (64, 64, 3)).astype(np.uint8)
            without = image.astype(int) + mask[..., None] * rng.integers(-2, 3, (64, 64, 3))
            self.views.append((image, without.astype(np.uint8), mask))

    def k_views(self):
        return self.views

    def preserved(self, layers, positions, site="ffn_in"):
        return second_moments(self.adapter, self.texts, layers, site)


def _preserved_prompts(adapter) -> list:
    """Two short text prompts and an image without k (random pixels): fewer positions than d_ff, and image tokens
    whose activations share directions with the keys."""
    image = np.random.default_rng(7).integers(20, 235, (64, 64, 3)).astype(np.uint8)
    return ["the image shows a cat", "two plus two", adapter.prepare([image])]


def _preserved_activations(adapter, texts, layers):
    """{layer: O [n, d_ff] float64} over every position of ``texts`` (strings, or prepared prompts)."""
    seen: dict[int, list] = {layer: [] for layer in layers}
    hooks = {("ffn", layer): (lambda rows: lambda o: rows.append(o[0].double()))(seen[layer]) for layer in layers}
    with torch.no_grad(), everywhere(adapter, hooks):
        for text in texts:
            adapter.text_logits([text]) if isinstance(text, str) else adapter.run_hooks(text)
    return {layer: torch.cat(rows) for layer, rows in seen.items()}


def test_an_alpha_edit_of_a_tiny_model_acts_on_no_preserved_activation_and_memits_does():
    """On a tiny LLaVA (d_ff 64, 16 image tokens), preserved activations from two short prompts and an image
    (rank-deficient): each layer's update
    of alpha_edit is zero on them, ||Delta O^T|| <= 1e-5 ||Delta|| ||O|| (a float32 delta holds about 1e-7), while it
    closes most of the gap to the counterfactual's residual at the object's tokens; memit, which only penalises, acts
    on them, and moves the prompts' logits over 100 times as much."""
    adapter = tiny_adapter("llava", layers=3)
    preserved = _preserved_prompts(adapter)
    neurons = NeuronSet("test", "", np.array([0]), np.array([1]), np.zeros(1))
    activations = _preserved_activations(adapter, preserved, [0, 1])
    before = torch.cat([adapter.text_logits([t])[0] for t in preserved[:2]]).double()

    def made(rule):
        edit = rule.make(adapter, neurons, None, MatrixInputs(_MatrixInputs(adapter, preserved), 1.0, "object"))
        acting = {layer: float((edit.at(layer).delta.double() @ o.T).norm() / (edit.at(layer).delta.norm() * o.norm()))
                  for layer, o in activations.items()}
        with applied(adapter, edit):
            after = torch.cat([adapter.text_logits([t])[0] for t in preserved[:2]]).double()
        return edit, acting, float((after - before).norm() / before.norm())

    edit, acting, moved = made(MatrixEdit(layers=[0, 1], threshold=1e-9, ridge=1e-2))
    d_model = adapter.down_proj(1).out_features
    assert edit.provenance["preserved_positions"] < 64 and edit.at(1).delta.shape == (d_model, 64)
    assert edit.provenance["target_closed"] > 0.5 and edit.parameters_changed == 2 * d_model * 64
    assert max(acting.values()) < 1e-5
    _, acting_memit, moved_memit = made(MatrixEdit(name="memit", layers=[0, 1], project=False, lam=1e-3))
    assert min(acting_memit.values()) > 1e-2 and moved_memit > 100 * moved


def test_alpha_edit_through_run_py_edits_whole_matrices_without_a_random_control(tmp_path):
    """task=edit with edit/rule=alpha_edit on a tiny LLaVA: one whole down_proj matrix changed, keys from the
    identification images and edit.fit_k more, no random control (the rule does not read the set), the file loads
    with model.edit; a window reaching the last layer, a swap, and the alpha_edit baseline whose yaml's window does not
    fit the model are refused in one line."""
    base = ["model=tiny_llava", "knowledge=cell_phone", "data.num_images=60", "thresholds.n=20",
            "thresholds.layers=nonzero", "logger=none", "num_threads=1", f"data.root={tmp_path}/tw",
            f"paths.cache_dir={tmp_path}/cache"]
    common = [*base, "task.k_images=1", "task.other_images=2", "edit.size=8", "edit.source=ours", "edit.fit_other=1",
              "edit.fit_k=1"]
    r = run_py("task=edit", *common, "edit/rule=alpha_edit", "edit.rule.layers=[0]", "task.baselines=[random]",
               f"hydra.run.dir={tmp_path}/job", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    cost, made = metrics["variants"]["edit"]["cost"], metrics["rule_label"]
    assert set(metrics["variants"]) == {"unedited", "edit"} and made.startswith("alpha_edit(layers=[0]")
    assert cost["parameters_changed"] == 32 * 64 and cost["prepare_seconds"] > 0
    loaded = run_py("task=caption_eval", *base, f"model.edit={tmp_path}/job/edit.safetensors",
                    f"hydra.run.dir={tmp_path}/loaded", timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    matrix = ["edit/rule=alpha_edit", "edit.rule.layers=[0]"]
    refusals = ((["edit/rule=alpha_edit", "edit.rule.layers=[1]"], ["edit.rule.layers", "below 1"]),
                ([*matrix, "edit.op=swap"], ["edit.op='swap'", "erase only"]),
                (["edit/rule=zero", "task.baselines=[alpha_edit]"], ["task.baselines", "alpha_edit.yaml"]))
    for i, (bad, words) in enumerate(refusals):
        refused = run_py("task=edit", *common, *bad, f"hydra.run.dir={tmp_path}/bad{i}", timeout=120)
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode == 1 and len(lines) == 1 and all(w in lines[0] for w in words), refused.stderr
        assert not (tmp_path / f"bad{i}" / "selection.json").exists()  # refused before identification


def test_an_alpha_edit_without_any_key_changes_nothing_and_says_so(caplog):
    """Images of k whose masks are empty give no key: the edit has no delta and a warning names the object."""
    adapter = tiny_adapter("llava", layers=3)
    inputs = _MatrixInputs(adapter, _preserved_prompts(adapter))
    inputs.views = [(image, without, np.zeros_like(mask)) for image, without, mask in inputs.views]
    inputs.target = SimpleNamespace(knowledge=SimpleNamespace(name="banana"))
    neurons = NeuronSet("test", "", np.array([0]), np.array([1]), np.zeros(1))
    with caplog.at_level(logging.WARNING, logger="knexp.editing.matrix"):
        edit = MatrixEdit(layers=[0, 1]).make(adapter, neurons, None, MatrixInputs(inputs, 1.0, "object"))
    assert edit.deltas == [] and edit.provenance["keys"] == 0
    assert any("banana" in r.getMessage() and "changes nothing" in r.getMessage() for r in caplog.records)


def test_a_null_basis_is_decomposed_once_per_layer_and_threshold(monkeypatch):
    """An edit and its random control ask for the same basis: one eigendecomposition serves both."""
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(1) or eigh(m))
    x = torch.as_tensor(np.random.default_rng(8).standard_normal((30, 6)))
    keys = PreservedKeys({0: x.T @ x / 30}, 30)
    first, again = keys.null_basis(0, 0.5), keys.null_basis(0, 0.5)
    assert again is first and len(calls) == 1
    keys.null_basis(0, 0.1)
    assert len(calls) == 2
