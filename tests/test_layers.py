"""The packages' layers, read from the import statements (docs/architecture.md):

    flexolmo.base                      imports no other package of the project
    flexolmo.model, index              import flexolmo.base only
    flexolmo.evaluation, tracing       import the layers below (tracing never imports api/cli)
    api, cli                           the shells on top

and no module imports itself back through others (no cycle), lazy imports inside functions
included.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flexolmo", "index", "tracing", "api", "cli")

# layer of each package prefix (longest prefix wins); a module may import only lower or equal layers'
# packages listed in ALLOWED
ALLOWED = {
    "flexolmo.base": {"flexolmo.base"},
    "flexolmo.model": {"flexolmo.base", "flexolmo.model"},
    "index": {"flexolmo.base", "index"},
    "flexolmo.evaluation": {"flexolmo.base", "flexolmo.model", "flexolmo.evaluation"},
    "tracing": {"flexolmo.base", "flexolmo.model", "index", "tracing"},
    "api": {"flexolmo.base", "flexolmo.model", "index", "tracing", "api"},
    "cli": {"flexolmo.base", "flexolmo.model", "flexolmo.evaluation", "index", "tracing", "api", "cli"},
    "flexolmo": {"flexolmo"},  # the package's own __init__
}


def modules() -> dict[str, Path]:
    out = {}
    for top in PACKAGES:
        for p in (ROOT / top).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (module-level and inside functions)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import module` imports the module
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in PACKAGES and m in known}


def layer(name: str) -> str:
    return max((p for p in ALLOWED if name == p or name.startswith(p + ".")), key=len)


def test_no_upward_import():
    mods = modules()
    bad = []
    for name, path in mods.items():
        allowed = ALLOWED[layer(name)]
        for dep in imports_of(name, path, set(mods)):
            if layer(dep) not in allowed and dep != "flexolmo":
                bad.append(f"{name} -> {dep}")
    assert not bad, "imports against the layers:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    mods = modules()
    graph = {n: {d for d in imports_of(n, p, set(mods)) if d != n and not n.startswith(d + ".")}
             for n, p in mods.items()}
    # Tarjan's strongly connected components; any component of more than one module is a cycle
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not sccs, "import cycles: " + "; ".join(" <-> ".join(c) for c in sccs)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule above can fail: a base module importing tracing is reported."""
    p = tmp_path / "x.py"
    p.write_text("from tracing.trace import Tracer\n")
    assert imports_of("flexolmo.base.x", p, {"tracing.trace"}) == {"tracing.trace"}
    assert layer("tracing.trace") not in ALLOWED[layer("flexolmo.base.x")]
