"""The package's import layering, read from the source (ast), not from what happens to be imported.

A module may import its own layer or any layer below it, never one above, and the imports
between modules (top-level and function-level alike) form no cycle. Layers, lowest first:
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "simscale"

LAYERS = [
    ("config/errors", ["simscale", "simscale.errors", "simscale.config", "simscale.checksum"]),
    ("zero/dist helpers", ["simscale.zero"]),
    # report.py reads a run's metrics files and depends on errors only; the trainer writes it at the
    # end of a run, so it sits below train (issue 24 listed it beside eval and export).
    ("data, model, loss", ["simscale.data", "simscale.model", "simscale.loss", "simscale.knn", "simscale.report",
                           "simscale.events"]),  # events.py: the run ledger train writes and report reads
    ("train", ["simscale.train"]),
    ("eval, export, info", ["simscale.eval", "simscale.export", "simscale.info"]),
    ("cli", ["simscale.cli", "simscale.__main__"]),
]


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names `module` (a package covers its modules)."""
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return level


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """simscale modules `name` imports (the module itself when a name is imported from a package
    and is a module, e.g. `from simscale.train import resume`)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "simscale"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "simscale":
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known and m != name}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
            for m, deps in sorted(graph.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]


def cycles(graph: dict[str, set[str]]) -> list[str]:
    found, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                found.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        layer_of(name)


def test_no_module_imports_a_higher_layer(graph):
    bad = upward_imports(graph)
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_model_and_data_do_not_import_train(graph):
    bad = [(m, d) for m, deps in graph.items() for d in deps
           if m.startswith(("simscale.model", "simscale.data")) and d.startswith("simscale.train")]
    assert not bad


def test_no_import_cycles(graph):
    bad = cycles(graph)
    assert not bad, "import cycles:\n" + "\n".join(bad)


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The walk itself: the model importing the trainer (the arrow this issue removed) and a loop
    inside data/ (the one remote.py and shard_cache.py had) are both reported."""
    fake = {"simscale.model.sim": {"simscale.zero", "simscale.train.zero"}, "simscale.train.zero": set(),
            "simscale.zero": set(), "simscale.data.remote": {"simscale.data.shard_cache"},
            "simscale.data.shard_cache": {"simscale.data.remote"}}
    assert upward_imports(fake) == ["simscale.model.sim (data, model, loss) imports simscale.train.zero (train)"]
    assert cycles(fake) == ["simscale.data.remote -> simscale.data.shard_cache -> simscale.data.remote"]


def test_the_source_walk_sees_function_level_and_from_package_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from simscale.train import resume\n    import simscale.zero\n")
    known = {"simscale.train", "simscale.train.resume", "simscale.zero", "simscale.data.x"}
    assert imports_of("simscale.data.x", src, known) == {"simscale.train.resume", "simscale.zero"}


def _map_rows() -> list[list[str]]:
    """The README's `## Map` table: per row, the paths its first cell names (`a/b.py`, `c.py`)."""
    text = (PACKAGE.parent / "README.md").read_text()
    table = text.split("## Map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        if line.startswith("| `"):
            names = [n for n in line.split("|")[1].replace("`", "").split(",")]
            first = names[0].strip()
            folder = first if first.endswith("/") else first.rpartition("/")[0] + "/"
            rows.append([first] + [folder + n.strip() for n in names[1:]])
    return rows


def test_the_readme_map_names_every_module_and_nothing_else():
    named = {p for row in _map_rows() for p in row}
    root = PACKAGE.parent
    missing = [str(p.relative_to(root)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and str(p.relative_to(root)) not in named
               and not any(str(p.relative_to(root)).startswith(n) for n in named if n.endswith("/"))]
    assert not missing, f"README's map lacks: {missing}"
    gone = [n for n in named if not (root / n).exists()]
    assert not gone, f"README's map names what is not in the tree: {gone}"
