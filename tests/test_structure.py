"""The package's layering, checked on its source with ``ast``: the stages take plain objects, tasks stand alone, models
are layered bottom up, and no two modules share a name."""

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "knexp"


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` gives ``a`` and ``a.b``), at any depth."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("stage", ["identification", "evaluation", "models"])
def test_stages_never_import_the_config_libraries(stage):
    bad = {p.name: sorted(m for m in _imports(p) if m.split(".")[0] in ("omegaconf", "hydra")) for p in _modules(stage)}
    assert not {k: v for k, v in bad.items() if v}, "the stages receive plain values (knexp.job builds them from the config)"
    assert _modules(stage), stage


def test_no_task_imports_another_task():
    tasks = {f"knexp.tasks.{p.stem}" for p in _modules("tasks") if p.stem != "__init__"}
    assert len(tasks) >= 8
    for path in _modules("tasks"):
        others = {m for m in _imports(path) if m.startswith("knexp.tasks")} - {f"knexp.tasks.{path.stem}"}
        assert not others, f"{path.name} imports {sorted(others)}"


def test_models_are_layered_and_adapters_import_nothing_above_them():
    decoding = {"knexp.models.prefix_cache", "knexp.models.prefill", "knexp.models.decode_step", "knexp.models.streaming"}
    base = {"knexp.models.errors", "knexp.models.geometry", "knexp.models.batching", "knexp.models.prepared"} | decoding
    layers = {  # each module may import knexp modules from these only (besides knexp.user_errors, knexp.io, knexp.store and
        # knexp.settings, the checks of settings)
        "errors": set(), "geometry": set(), "batching": {"knexp.models.errors"}, "prepared": set(),
        "prefix_cache": {"knexp.models.prepared"}, "decode_step": set(),
        "prefill": {"knexp.models.prepared", "knexp.models.prefix_cache"},
        "streaming": {"knexp.models.prepared", "knexp.models.prefill", "knexp.models.decode_step", "knexp.models.batching"},
        "adapter": base, "spliced": base | {"knexp.models.adapter"}, "families": {"knexp.models.errors", "knexp.models.geometry"},
        "vlm": base | {"knexp.models.adapter", "knexp.models.families"},
        "hooks": {"knexp.models.adapter", "knexp.models.prepared", "knexp.models.prefix_cache"},
    }
    for name, allowed in layers.items():
        used = {m for m in _imports(PACKAGE / "models" / f"{name}.py") if m.startswith("knexp.")}
        shared = {"knexp.user_errors", "knexp.io", "knexp.store", "knexp.settings"}
        used = {m for m in used if not any(m == a or m.startswith(a + ".") for a in allowed | shared)}
        assert not used, f"models/{name}.py imports {sorted(used)} from above its layer"
    assert "knexp" not in " ".join(_imports(PACKAGE / "models" / "__init__.py")), "the package's __init__ imports nothing"


def test_no_module_of_models_imports_in_a_circle():
    """The import graph of ``knexp.models`` (module -> the knexp.models modules it imports, at any depth) has no cycle."""
    names = {p.stem for p in _modules("models") if p.stem != "__init__"}
    graph = {n: {m.split(".")[2] for m in _imports(PACKAGE / "models" / f"{n}.py") if m.startswith("knexp.models.")} & names
             for n in names}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != "open", f"import circle: {' -> '.join([*path, node, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for name in sorted(names):
        if name not in state:
            visit(name, [])
    assert "adapter" in graph and graph["prefill"] and not graph["prepared"] & names


def test_no_two_modules_share_a_basename():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not [n for n, c in names.items() if c > 1]


def test_only_the_job_reads_the_config_folder():
    """conf/ is read through Hydra's composition alone (knexp.job); no module opens conf/knowledge or a model yaml itself."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name in ("job.py", "paths.py"):
            continue
        assert "conf_dir(" not in text and '"conf/' not in text and "OmegaConf.load(" not in text, path
