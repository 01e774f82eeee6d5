"""The package's layering, checked on its source with ``ast``: every import points down one declared order of the
packages (imports inside functions included), no module imports in a circle, the stages take plain objects, tasks stand
alone, and no two modules share a name."""

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "knexp"

# Bottom up: a module may import knexp modules of its own layer or of a layer below, never above. Each entry is a module
# or a package (all its modules); a module belongs to the longest entry that names it.
ORDER = [
    ["knexp.user_errors", "knexp.io", "knexp.paths", "knexp.console"],  # errors, files, locations, the console
    ["knexp.settings", "knexp.checked", "knexp.manifest", "knexp.store", "knexp.resume"],  # checks of settings, caches
    ["knexp.config"],  # Hydra/OmegaConf glue: building a group's object
    ["knexp.counterfactual"],  # inpainting
    ["knexp.data"],  # the data (the toy world inpaints)
    ["knexp.models", "knexp.models.errors", "knexp.models.geometry", "knexp.models.prepared"],
    ["knexp.models.decoding"],
    ["knexp.models.adapters"],
    ["knexp.models.hooks"],
    ["knexp.models.weight_edit"],
    ["knexp.models.zoo"],
    ["knexp.models.tiny"],
    ["knexp.models.captioning", "knexp.models.memory", "knexp.models.registry"],
    ["knexp.identification"],
    ["knexp.editing"],
    ["knexp.evaluation"],
    ["knexp.reporting"],
    ["knexp.job"],
    ["knexp.tasks", "knexp.bench"],
]
EXEMPT = {"knexp"}  # the package's own __init__ re-exports the API (knexp.session)
STAGES = ["counterfactual", "data", "models", "identification", "editing", "evaluation"]


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


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def layer_of(module: str, order: list[list[str]] = ORDER) -> int | None:
    """The index in ``order`` of the longest entry naming ``module`` (itself or a package above it), or None."""
    best, index = "", None
    for i, entries in enumerate(order):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > len(best):
                best, index = entry, i
    return index


def module_of(name: str, known) -> str | None:
    """The knexp module an imported name belongs to (``knexp.a.b.Thing`` -> ``knexp.a.b``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return None


def upward_imports(imports: dict[str, set[str]], order: list[list[str]] = ORDER) -> list[str]:
    """"a imports b" for every import of a module ``b`` of a higher layer than ``a``'s (``imports``: module -> the knexp
    modules it imports)."""
    return sorted(f"{a} imports {b}" for a, used in imports.items() if a not in EXEMPT for b in used
                  if layer_of(b, order) is not None and layer_of(b, order) > layer_of(a, order))


def circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> the modules it imports) as a path, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [])):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    def knexp_modules(name: str, path: Path) -> set[str]:
        used = {module_of(m, MODULES) for m in _imports(path) if m.startswith("knexp")}
        return {m for m in used if m and m != name}

    return {name: knexp_modules(name, path) for name, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if layer_of(m) is None and m not in EXEMPT], "place a new module in ORDER"


def test_every_import_points_down_the_declared_order():
    assert not upward_imports(_graph())


def test_the_order_check_catches_an_upward_import_and_the_circle_check_a_circle():
    """The checks themselves: an upward import (an adapter reading the evaluation) and a two-module circle are found."""
    graph = _graph()
    graph["knexp.models.adapters.adapter"] = graph["knexp.models.adapters.adapter"] | {"knexp.evaluation.protocol"}
    assert upward_imports(graph) == ["knexp.models.adapters.adapter imports knexp.evaluation.protocol"]
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_in_a_circle():
    """Within a package as between packages, imports inside functions included."""
    assert circle(_graph()) is None


@pytest.mark.parametrize("stage", STAGES)
def test_stages_never_import_the_config_libraries(stage):
    bad = {p.name: sorted(m for m in _imports(p) if m.split(".")[0] in ("omegaconf", "hydra")) for p in _modules(stage)}
    assert not {k: v for k, v in bad.items() if v}, "the stages receive plain values (knexp.job builds them)"
    assert _modules(stage), stage


def test_no_task_imports_another_task():
    tasks = {f"knexp.tasks.{p.stem}" for p in _modules("tasks") if p.stem != "__init__"}
    assert len(tasks) >= 8
    for path in _modules("tasks"):
        others = {m for m in _imports(path) if m.startswith("knexp.tasks")} - {f"knexp.tasks.{path.stem}"}
        assert not others, f"{path.name} imports {sorted(others)}"


def test_no_task_reads_the_raw_config():
    """Tasks get plain objects from the job's spec (``knexp.job.spec.JobSpec``), never ``spec.cfg``."""
    for path in _modules("tasks"):
        assert ".cfg" not in path.read_text(), path.name


def test_sub_packages_import_nothing_in_their_init():
    """A package's ``__init__`` is its docstring (the top package re-exports the API lazily)."""
    for name, path in MODULES.items():
        if path.name == "__init__.py" and name not in EXEMPT:
            assert not [m for m in _imports(path) if m.startswith("knexp")], name


def test_no_two_modules_share_a_basename():
    names = Counter(p.name for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not [n for n, c in names.items() if c > 1]


def test_only_the_job_reads_the_config_folder():
    """conf/ is read through Hydra (knexp.job); no other module opens conf/knowledge or a model yaml itself."""
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "job" or path.name == "paths.py":
            continue
        text = path.read_text()
        assert "conf_dir(" not in text and '"conf/' not in text and "OmegaConf.load(" not in text, path


def test_no_module_is_long():
    """The job's modules stay under 250 lines, the models' under 300."""
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert not {n: v for n, v in lengths.items() if n.startswith("knexp.job") and v > 250}
    assert not {n: v for n, v in lengths.items() if n.startswith("knexp.models") and v > 300}
