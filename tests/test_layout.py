"""The layout of poolbridge/: no import cycle, and the child side never imports the parent side.

The graph is read from the source with ``ast``: every import a module runs (at its top or inside a
function) is an edge; imports under ``if TYPE_CHECKING:`` are for type checkers only and are not.
An import inside a function that exists only to dodge a cycle is still an edge, so it fails here.
"""

from __future__ import annotations

import ast
import pathlib

import poolbridge

PACKAGE = pathlib.Path(poolbridge.__file__).parent

# Modules that run in worker processes (and the codec both sides share). None of them may import,
# directly or through another module, anything of the parent side below.
CHILD_SIDE = (
    "_worker_main", "_worker_template", "_worker", "_store", "_paths", "_warmup", "_mapwork", "_wire", "_protocol",
    "backends._ray_actor",
)
PARENT_SIDE = frozenset({
    "_pool", "_aio", "_api", "_calls", "_handles", "_mapping", "_mapengine", "_executor",
    "_supervisor", "_pipes", "_channel", "_monitor", "_spawn", "_shm_channel",
    "_server", "_portops", "_portsend", "_portsinks", "_portwire", "_portproc", "backends.ray", "backends._ray_runtime",
})


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports at run time (package root named "")."""
    name = _module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif node.module and node.module.split(".")[0] == "poolbridge":
                base = []
            else:
                return
            mod = node.module or ""
            if not node.level:
                mod = mod.split(".", 1)[1] if "." in mod else ""
            target = ".".join([*base, *([mod] if mod else [])])
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "poolbridge":
                    found.add(alias.name.partition(".")[2])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) for p in paths}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == "" or dep not in graph:
                continue  # the package root re-exports lazily (PEP 562): it imports nothing at start
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := walk(dep)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)) is not None:
            return found
    return None


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "_supervisor" in graph["_pool"] and "_channel" in graph["_pipes"]
    assert "_pool" not in graph["_aio"]  # a TYPE_CHECKING import is no edge


def test_no_import_cycle() -> None:
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()) or [])


def test_a_cycle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_child_side_never_imports_the_parent_side() -> None:
    graph = import_graph()
    for start in CHILD_SIDE:
        if start not in graph:
            continue
        seen, todo = set(), [start]
        while todo:
            mod = todo.pop()
            if mod in seen or mod not in graph:
                continue
            seen.add(mod)
            todo.extend(graph[mod])
        assert not seen & PARENT_SIDE, f"{start} reaches the parent side: {sorted(seen & PARENT_SIDE)}"
