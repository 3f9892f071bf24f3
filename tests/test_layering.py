"""The package's modules import only downwards, with no loop.

Layers, from the bottom (a module may import only from a lower layer):

    _version, _core, fileio, stats      leaves
    nn, datasets                        C handles, data sets
    the package (__init__)              the facade: imports _core and nn
    presets, checkpoint, datasources    configurations, checkpoint files, any data set
    training, plots                     fit / evaluate, figures
    runs                                the unit of work (build, fit, record)
    study                               the multi-seed grid
    cli                                 the command line
    __main__

Both import time (module level) and function-level imports count: an import
inside a function is still a dependency, and hiding one there is how loops
crept in before.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import adaloss

PKG = Path(adaloss.__file__).resolve().parent
LAYERS = [
    {"_version", "_core", "fileio", "stats", "metrics"},
    {"nn", "datasets"},
    {"__init__"},
    {"presets", "checkpoint", "datasources"},
    {"training", "plots"},
    {"runs"},
    {"study"},
    {"cli"},
    {"__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# Upward imports allowed on purpose, each with its reason. Only deprecated
# aliases may appear here, and they go when the aliases go.
ALLOWED_UPWARD = {
    ("checkpoint", "training"): "checkpoint.save_training/load_latest, deprecated aliases "
                                "resolved on first use by checkpoint.__getattr__",
}


def modules() -> list[str]:
    return sorted(p.stem for p in PKG.glob("*.py"))


def imports_of(name: str) -> set[str]:
    """The package modules `name` imports, anywhere in its source."""
    tree = ast.parse((PKG / f"{name}.py").read_text(), f"{name}.py")
    found = set()
    submodules = set(modules()) | {"_core"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] != "adaloss":
                    continue
                rest = parts[1:]
            elif node.level == 1:
                rest = (node.module or "").split(".") if node.module else []
            else:
                raise AssertionError(f"{name}: relative import beyond the package")
            if rest:
                found.add(rest[0])
            else:   # from . import x, y: submodules, or names of the package itself
                for alias in node.names:
                    found.add(alias.name if alias.name in submodules else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "adaloss":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name) for name in modules()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, dsts in sorted(edges.items()):
        if src not in LEVEL:
            bad.append(f"{src}: module not placed in a layer")
            continue
        for dst in sorted(dsts):
            if dst not in LEVEL:
                bad.append(f"{src} -> {dst}: module not placed in a layer")
            elif LEVEL[dst] >= LEVEL[src] and (src, dst) not in ALLOWED_UPWARD:
                bad.append(f"{src} -> {dst}: imports from layer {LEVEL[dst]}, not below its "
                           f"own {LEVEL[src]}")
    return bad


def without_allowed(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    return {src: {d for d in dsts if (src, d) not in ALLOWED_UPWARD}
            for src, dsts in edges.items()}


def test_every_module_is_placed_in_a_layer():
    assert set(modules()) - {"__init__"} <= set(LEVEL), sorted(set(modules()) - set(LEVEL))


def test_imports_go_only_downwards_and_make_no_loop():
    edges = graph()
    assert violations(edges) == []
    assert find_cycle(without_allowed(edges)) is None
    # the modules the old loops ran through
    assert "training" not in edges["checkpoint"] - {d for s, d in ALLOWED_UPWARD if s == "checkpoint"}
    assert "cli" not in edges["study"] and "study" not in edges["plots"]


def test_the_allowed_upward_imports_sit_in_deprecation_shims():
    for (src, dst) in ALLOWED_UPWARD:
        tree = ast.parse((PKG / f"{src}.py").read_text())
        top = {alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
               for alias in node.names} | {node.module for node in tree.body
                                           if isinstance(node, ast.ImportFrom) and node.module}
        assert dst not in top, f"{src} imports {dst} at module level"
        shim = [f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"]
        assert shim and dst in {a.name for n in ast.walk(shim[0]) if isinstance(n, ast.ImportFrom)
                                for a in n.names}


def test_the_check_catches_an_upward_edge_and_a_loop():
    edges = graph()
    edges["nn"] = edges["nn"] | {"training"}          # a low module importing a high one
    assert any(v.startswith("nn -> training") for v in violations(edges))
    assert find_cycle(without_allowed(edges)) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_parser_sees_function_level_and_aliased_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    (tmp_path / "nn.py").write_text("")
    (tmp_path / "plots.py").write_text("")
    (tmp_path / "m.py").write_text(
        "from . import nn as _nn\nfrom . import __version__\n"
        "def f():\n    from .plots import save\n    import adaloss.stats\n")
    assert imports_of("m") == {"nn", "__init__", "plots", "stats"}


@pytest.mark.parametrize("name", [m for m in modules() if m != "__main__"])
def test_each_module_imports_alone_in_a_fresh_interpreter(name):
    proc = subprocess.run([sys.executable, "-c", f"import adaloss.{name}"], capture_output=True,
                          text=True, cwd=PKG.parent)
    assert proc.returncode == 0, proc.stderr


def test_python_m_adaloss_runs():
    proc = subprocess.run([sys.executable, "-m", "adaloss", "--version"], capture_output=True,
                          text=True, cwd=PKG.parent)
    assert proc.returncode == 0 and proc.stdout.startswith("adaloss "), proc.stderr
