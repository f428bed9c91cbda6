"""The package's shape, checked from its source: no import cycles, short functions where the
train/data/evals seam is, and function-level imports only for optional heavy dependencies.

Everything here reads the source with `ast` (nothing is imported), so it runs in milliseconds.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bigs_jax"
# Third-party modules a function may import late: heavy or optional, needed by one code path.
LATE_IMPORTS_ALLOWED = {"torch", "tensorflow", "tensorflow_datasets", "seqio", "sklearn",
                        "rouge_score", "pydoc_data"}
MAX_FUNCTION_LINES = 80
SHORT_FUNCTION_PACKAGES = ("train", "data", "evals")


def _modules() -> dict[str, ast.Module]:
    """Dotted module name -> parsed source, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _imported(node: ast.AST, module: str) -> list[str]:
    """The package modules an import statement loads (`from pkg import mod` names mod)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = module.split(".")[: len(module.split(".")) - node.level + (
            1 if module in _PACKAGES else 0)]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


_PACKAGES = {m for m in MODULES
             if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}


def _load_closure(name: str) -> list[str]:
    """`name` and its parent packages: importing a.b.c runs a, a.b and a.b.c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)
            if ".".join(parts[:i]) in MODULES]


def _module_level_graph() -> dict[str, set[str]]:
    graph = {}
    for name, tree in MODULES.items():
        deps = set()
        for node in tree.body:  # module level only: function bodies run later
            for target in _imported(node, name):
                deps.update(_load_closure(target))
        deps.discard(name)
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _module_level_graph()
    assert len(graph) > 50  # the walk found the package
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_function_level_imports_only_for_optional_dependencies():
    late = []
    for name, tree in MODULES.items():
        for fn in _functions(tree):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    for target in (_imported(node, name) if isinstance(node, ast.ImportFrom)
                                   else [a.name for a in node.names]):
                        if target.split(".")[0] not in LATE_IMPORTS_ALLOWED:
                            late.append(f"{name}:{node.lineno} {target}")
    assert late == []


@pytest.mark.parametrize("package", SHORT_FUNCTION_PACKAGES)
def test_functions_are_short_at_the_seam(package):
    long = [f"{name}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for name, tree in MODULES.items() if name.startswith(f"bigs_jax.{package}")
            for fn in _functions(tree) if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
