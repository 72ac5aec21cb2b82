# SPDX-License-Identifier: Apache-2.0
"""The package's shape: imports flow one way, modules and classes stay small, private names stay
in their module.

Run as a script to print the import graph (every import counted, also those inside function
bodies), the sizes and the private names imported across modules::

    python tests/test_layout.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pyro_softmix"
MAX_MODULE_LINES = 650
MAX_CLASS_LINES = 350
MAX_PRIVATE_IMPORTS = 12


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _target(node: ast.ImportFrom | ast.Import, here: str) -> list[tuple[str, list[str]]]:
    """(module, names) for each package module an import statement reads from."""
    out = []
    if isinstance(node, ast.ImportFrom):
        if node.level == 1:  # from .x import a, b   /   from . import x, y
            if node.module:
                out.append((node.module.split(".")[0], [a.name for a in node.names]))
            else:
                out.extend((a.name, []) for a in node.names)
        elif node.module and node.module.split(".")[0] == "pyro_softmix":
            parts = node.module.split(".")
            if len(parts) > 1:
                out.append((parts[1], [a.name for a in node.names]))
            else:
                out.extend((a.name, []) for a in node.names)
    else:
        for a in node.names:
            parts = a.name.split(".")
            if parts[0] == "pyro_softmix" and len(parts) > 1:
                out.append((parts[1], []))
    return [(m, names) for m, names in out if m != here]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Edges module -> modules it imports (anywhere in the file), and the private names
    (leading underscore) imported from another package module, as (importer, source, name)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target, names in _target(node, name):
                    if target in modules:
                        graph[name].add(target)
                        private += [(name, target, n) for n in names if n.startswith("_")]
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layers(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules by depth: each layer imports only from earlier layers (needs no cycle)."""
    depth: dict[str, int] = {}

    def level(node):
        if node not in depth:
            depth[node] = 1 + max((level(n) for n in graph[node]), default=-1)
        return depth[node]

    for node in graph:
        level(node)
    out: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for node, d in sorted(depth.items()):
        out[d].append(node)
    return out


def sizes() -> tuple[dict[str, int], dict[str, int]]:
    """Lines per module, and lines per class (``module.Class``)."""
    modules, classes = {}, {}
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        modules[path.stem] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                classes[f"{path.stem}.{node.name}"] = node.end_lineno - start + 1
    return modules, classes


def test_no_import_cycle_even_inside_functions():
    graph, _ = import_graph()
    assert find_cycle(graph) is None, find_cycle(graph)


def test_modules_and_classes_stay_small():
    modules, classes = sizes()
    assert {m: n for m, n in modules.items() if n > MAX_MODULE_LINES} == {}
    assert {c: n for c, n in classes.items() if n > MAX_CLASS_LINES} == {}


def test_private_names_stay_in_their_module():
    _, private = import_graph()
    assert len(private) <= MAX_PRIVATE_IMPORTS, private


def test_every_public_name_resolves_and_no_module_shadows_one():
    """The package's names are imported on first use: each resolves to its object, and no
    submodule has the name of a public function (importing it would replace the function)."""
    import types

    import pyro_softmix as psm

    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert not set(psm._HOMES) & modules
    for name in psm.__all__:
        value = getattr(psm, name)
        assert isinstance(value, types.ModuleType) == (name in ("datasets", "models", "moe"))
        if not isinstance(value, types.ModuleType):
            assert value.__module__ == f"pyro_softmix.{psm._HOMES[name]}", name


def test_importing_the_package_loads_neither_torch_nor_pyro():
    import subprocess
    import sys

    code = "import sys, pyro_softmix; print(sorted({'torch', 'pyro'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_checker_sees_cycles_and_function_body_imports(tmp_path):
    """The checks above can fail: a lazy import inside a function closes a cycle."""
    tree = ast.parse("def f():\n    from .b import _x\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert _target(node, "a") == [("b", ["_x"])]
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def main() -> None:
    graph, private = import_graph()
    cycle = find_cycle(graph)
    print("import graph (module: the package modules it imports, anywhere in the file)")
    if cycle:
        print("CYCLE:", " -> ".join(cycle))
        order = [sorted(graph)]
    else:
        order = layers(graph)
    for depth, layer in enumerate(order):
        for m in layer:
            print(f"  [{depth}] {m:<16} <- {', '.join(sorted(graph[m])) or '-'}")
    modules, classes = sizes()
    print(f"\nlargest modules (limit {MAX_MODULE_LINES} lines):",
          ", ".join(f"{m} {n}" for m, n in sorted(modules.items(), key=lambda t: -t[1])[:5]))
    print(f"largest classes (limit {MAX_CLASS_LINES} lines):",
          ", ".join(f"{c} {n}" for c, n in sorted(classes.items(), key=lambda t: -t[1])[:5]))
    print(f"private names imported across modules ({len(private)}, limit {MAX_PRIVATE_IMPORTS}):",
          ", ".join(f"{a} <- {b}.{n}" for a, b, n in private) or "none")


if __name__ == "__main__":
    main()
