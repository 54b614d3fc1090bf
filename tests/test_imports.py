"""The r1jax package imports without circles: the graph of the imports each module runs when it is imported is
acyclic. Those are the imports at module level (inside ``if`` / ``try`` / ``with`` and class bodies too) and the ones
inside module-level functions that the module calls while it is imported (a registration at import time); imports
inside functions that run later are not edges."""

import ast
import importlib.util
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_files() -> dict[str, Path]:
    """Module name -> file, for the r1jax package as installed (``package-dir`` maps configs/)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {"r1jax": ROOT / "r1jax", **{name: ROOT / d for name, d in tool.get("package-dir", {}).items()}}
    files = {}
    for package, folder in dirs.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package, *parts])] = path
    return files


def _import_time_nodes(tree: ast.Module) -> list[ast.stmt]:
    """The statements that run when the module is imported, import statements among them."""
    called = {
        node.value.func.id
        for node in tree.body
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
    }
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name in called:
                out += [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]
            continue
        out.append(node)
        fields = ("orelse",) if _type_checking(node) else ("body", "orelse", "finalbody", "handlers")
        for field in fields:
            todo += [n for n in getattr(node, field, []) if isinstance(n, ast.stmt | ast.excepthandler)]
    return out


def _type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (its body never runs)."""
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(files: dict[str, Path], *, deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports at import time. ``import a.b`` and ``from a import b`` count ``a``
    too (importing a submodule runs its package's ``__init__``), except where ``a`` holds the importer: a package is
    initialised before its submodules run. ``deferred``: count the imports inside functions too."""

    def targets(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys()

    def ancestors(module: str) -> set[str]:
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    graph = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree) if deferred else _import_time_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    edges |= targets(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                edges |= targets(base)
                for alias in node.names:
                    edges |= targets(f"{base}.{alias.name}")
        graph[module] = edges - {module} - ancestors(module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest cycle ``[start, ..., start]`` of ``graph``, or None."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return None


def test_import_graph_is_acyclic():
    graph = import_graph(package_files())
    assert {"r1jax.cli", "r1jax.commands", "r1jax.data.datasets", "r1jax.kernels", "r1jax.configs"} <= graph.keys()
    assert "r1jax.commands" in graph["r1jax.cli"]  # the graph sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cli_and_data_have_no_circle_even_through_deferred_imports():
    """The command modules and the data package import each other in one direction only, also where the import is
    deferred into a function: a deferred circle breaks as soon as someone moves the import to the top."""
    graph = import_graph(package_files(), deferred=True)
    mine = [m for m in graph if m.startswith("r1jax.data") or m in ("r1jax.cli", "r1jax.commands", "r1jax.demo",
            "r1jax.search_demo", "r1jax.overrides")]  # fmt: skip
    cycles = [" -> ".join(c) for m in mine if (c := cycle_through(graph, m))]
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_checker_finds_a_registration_circle(tmp_path):
    """The pattern the CLI once had: the parser module imports the command modules at its end, and each of those
    registers itself by calling a function that imports the parser module."""
    (tmp_path / "cli.py").write_text("COMMANDS = []\n\nfrom pkg import commands  # noqa\n")
    (tmp_path / "commands.py").write_text("def _register():\n    from pkg.cli import COMMANDS\n\n\n_register()\n")
    (tmp_path / "later.py").write_text("def run():\n    from pkg import cli\n")
    files = {f"pkg.{name}": tmp_path / f"{name}.py" for name in ("cli", "commands", "later")}
    graph = import_graph(files)
    assert graph["pkg.later"] == set()  # an import inside a function that runs later is no edge
    assert find_cycle(graph) == ["pkg.cli", "pkg.commands", "pkg.cli"]


def test_no_repository_folder_shadows_the_kernels_package():
    """From the repository root (on ``sys.path`` under ``python -m pytest``) ``import kernels`` must not find a folder
    of ours: it would shadow the PyPI ``kernels`` package, which transformers imports when it is installed."""
    spec = importlib.util.find_spec("kernels")
    assert not (ROOT / "kernels").exists()
    assert spec is None or Path(spec.origin or "").resolve().parent.parent != ROOT  # site-packages' own is fine
