"""The package's import rules (docs/ARCHITECTURE.md): no file imports another's private names, and no import cycles,
also none hidden inside functions."""

import ast
from pathlib import Path

import malmen_hf

PACKAGE = Path(malmen_hf.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """
    Every `from X import names` and `import X` of a file, at any depth, with X resolved to an absolute name, and every
    `importlib.import_module("X")` of a module named in full (a module loaded by name is imported all the same).
    """
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            found.append((target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and not name.value.startswith("."):
                found.append((name.value, []))
    return found


def package_graph() -> dict[str, set[str]]:
    """
    Module -> the package's modules it imports (`from . import x` counts as importing `malmen_hf.x`). A public name
    imported from the package root (`from malmen_hf import MalmenEditorModel`) counts as importing the module that
    defines it (the root's lazy export table): that is what runs when the name is first used.
    """
    files = {module_name(path): path for path in PACKAGE.rglob("*.py") if "metric_modules" not in path.parts}
    graph = {}
    for name, path in files.items():
        edges = set()
        for target, names in imports_of(path):
            candidates = [target, *(f"{target}.{imported}" for imported in names)]
            if target == "malmen_hf":
                candidates += [
                    f"malmen_hf.{malmen_hf._EXPORTS[imported]}" for imported in names if imported in malmen_hf._EXPORTS
                ]
            for candidate in candidates:
                if candidate in files and candidate != name:
                    edges.add(candidate)
        graph[name] = edges
    return graph


def test_no_file_imports_another_files_private_names():
    offenders = [
        f"{module_name(path)} imports {name} from {target}"
        for path in PACKAGE.rglob("*.py")
        for target, names in imports_of(path)
        if target.startswith("malmen_hf")
        for name in names
        if name.startswith("_")
    ]
    assert offenders == []


def test_the_package_has_no_import_cycles():
    """`malmen_hf/__init__.py` imports its submodules lazily to export them: it is left out, as nothing imports it."""
    graph = {name: edges - {"malmen_hf"} for name, edges in package_graph().items() if name != "malmen_hf"}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                cycles.append(path[path.index(child) :] + [child])
            elif child not in state:
                visit(child, [*path, child])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
