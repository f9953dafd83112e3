"""The library's import graph, read from the source (imports inside functions too): every
import points down the layers below, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "biovita"

# Lowest first: a module may import from its own part or from the parts of a lower layer.
LAYERS = [
    {"errors"},
    {"locations", "structured", "taxonomy", "prompts", "ray_patches"},
    {"runtime"},
    {"frontends"},
    {"models"},
    {"config", "predict"},
    {"tracking"},
    {"data"},
    {"embed"},
    {"bench", "serve"},
    {"train"},
    {"cli", "__init__"},
]
LAYER = {part: k for k, parts in enumerate(LAYERS) for part in parts}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str) -> str:
    """`biovita.data.store` -> `data`; `biovita` itself -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> dict[str, set[str]]:
    """module -> the biovita modules it imports (a `from biovita.x import y` of a module y is y)."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.startswith("biovita")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("biovita"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    out.add(sub if sub in modules else node.module)
        graph[name] = {m for m in out if m != name}
    return graph


def test_every_part_has_a_layer():
    parts = {_part(m) for m in imports()}
    assert parts <= set(LAYER), parts - set(LAYER)


def test_every_import_points_down():
    up = sorted(f"{m} -> {t}" for m, targets in imports().items() for t in targets
                if _part(t) != _part(m) and LAYER[_part(t)] >= LAYER[_part(m)])
    assert not up, up


def test_no_circles():
    graph = imports()
    state: dict[str, int] = {}
    circles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles
