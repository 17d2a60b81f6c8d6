"""The architecture, checked: the rooms' import rules and no import cycles (every import counts,
including those inside functions)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import facefed

PKG = Path(facefed.__file__).parent
ROOMS = ("common", "client", "server")


def modules() -> dict[str, Path]:
    out = {}
    for room in ROOMS:
        for f in (PKG / room).rglob("*.py"):
            rel = f.relative_to(PKG).with_suffix("")
            parts = ["facefed", *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The facefed modules `name` imports (a `from pkg import mod` names the module when it is one)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("facefed.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("facefed"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_only_the_facefed_namespace_is_installed(tmp_path):
    """Outside the checkout, `facefed.common` imports and a bare `common` (a generic name) does not."""
    code = (
        "import importlib.util as u, sys; import facefed.common, facefed.client, facefed.server; "
        "sys.exit(0 if all(u.find_spec(r) is None for r in ('common', 'client', 'server')) else 1)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env).returncode == 0


def test_common_imports_neither_side_and_the_sides_never_import_each_other():
    bad = []
    for mod, deps in graph().items():
        room = mod.split(".")[1]
        for d in deps:
            other = d.split(".")[1]
            if (room == "common" and other != "common") or {room, other} == {"client", "server"}:
                bad.append(f"{mod} -> {d}")
    assert not bad, "layer violations:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package importing its own submodules (re-exports in __init__) is not a cycle of concepts
            if len(comp) > 1 and not all(
                c.startswith(min(comp, key=len) + ".") or c == min(comp, key=len) for c in comp
            ):
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_a_cycle_is_detected_when_there_is_one(tmp_path):
    """The checker itself: two modules importing each other are reported."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import facefed.x.b\n")
    b.write_text("from facefed.x import a\n")
    known = {"facefed.x.a", "facefed.x.b"}
    assert imports_of("facefed.x.a", a, known) == {"facefed.x.b"}
    assert imports_of("facefed.x.b", b, known) == {"facefed.x.a"}
