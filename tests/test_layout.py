"""The package's layers, read from the source: imports point down only, and no private name crosses a module.

Layers, lowest first: the core (`moe_prefix/*.py`), `analysis` (statistics and probes on tensors and
tables), `train` (runs: data, networks, the run loop, the run directory), `tools` (commands).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moe_prefix"
LAYERS = {"core": 0, "analysis": 1, "train": 2, "tools": 3}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "core"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found[name] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) of every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


MODULES = _modules()


def _targets(module: str, names: list[str]) -> list[str]:
    """The modules an import loads: `from package import submodule` loads the submodule."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs if subs and len(subs) == len(names) else [module]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_only(name):
    own = LAYERS[_layer(name)]
    for module, names in _imports(name, MODULES[name]):
        if not module.startswith("moe_prefix"):
            continue
        for target in _targets(module, names):
            assert LAYERS[_layer(target)] <= own, f"{name} ({_layer(name)}) imports {target} ({_layer(target)})"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_crosses_a_module(name):
    for module, names in _imports(name, MODULES[name]):
        if module.startswith("moe_prefix") and module != name:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{name} imports private {private} from {module}"
    text = MODULES[name].read_text()
    for alias in ("data_io._", "rd._", "training._"):
        assert alias not in text, f"{name} reaches into a private name through {alias}"


def test_no_import_circle():
    graph = {
        name: {t for m, names in _imports(name, path) for t in _targets(m, names) if t in MODULES and t != name}
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            cycle = trail[trail.index(node) :] + [node]
            pytest.fail("import circle: " + " -> ".join(cycle))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph[node]):
            visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])
