"""The package's import graph, function-local imports included: cycles, folders that
import each other, and local imports of the package's own modules.

    python scripts/import_graph.py            # the summary
    python scripts/import_graph.py --check    # exit 1 unless the architecture holds
    python scripts/import_graph.py --edges    # every module -> module edge

The rules ``--check`` enforces (and ``tests/test_architecture.py`` runs): no cycle between
modules, no two folders (subpackages) importing each other, at most ``MAX_LOCAL`` imports
of the package's own modules inside functions. Imports under ``if TYPE_CHECKING:`` are not
edges (they never run).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "cpt_jax"
MAX_LOCAL = 3
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, here: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".")
    base = base if is_pkg else base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(path: Path, modules: set[str]):
    """[(target module, local: bool, line)] of the package's modules ``path`` imports."""
    here = module_name(path)
    is_pkg = path.name == "__init__.py"
    out = []

    def target(name: str) -> str | None:
        while name and name not in modules:  # `from a.b import c`: c may be a module
            name = name.rpartition(".")[0]
        return name or None

    def walk(node, local: bool):
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                continue
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.Lambda))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, here, is_pkg)
                names = [f"{base}.{a.name}" for a in child.names] or [base]
            else:
                walk(child, inner)
                continue
            for n in names:
                if n.split(".")[0] == PACKAGE:
                    t = target(n)
                    if t and t != here:
                        out.append((t, local, child.lineno))
    walk(ast.parse(path.read_text()), False)
    return out


def folder(module: str) -> str | None:
    """The subpackage a module sits in (``cpt_jax.train.loop`` -> ``train``), None for a
    module at the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (ROOT / parts[1]).is_dir()) \
        else None


def graph():
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(f) for f in files}
    edges = {}
    for f in files:
        edges[module_name(f)] = imports(f, modules)
    return edges


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    adj = {m: sorted({t for t, _, _ in e}) for m, e in edges.items()}
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(adj):
        if v not in index:
            visit(v)
    return out


def mutual_folders(edges) -> list[tuple[str, str]]:
    pairs = set()
    for m, e in edges.items():
        for t, _, _ in e:
            a, b = folder(m), folder(t)
            if a and b and a != b:
                pairs.add((a, b))
    return sorted((a, b) for a, b in pairs if a < b and (b, a) in pairs)


def local_imports(edges) -> list[str]:
    """One entry per import statement inside a function (``from a import b, c`` is one)."""
    return sorted({f"{m}:{line} -> {t}" for m, e in edges.items() for t, local, line in e
                   if local})


def summary(edges) -> dict:
    return {"modules": len(edges), "edges": sum(len({t for t, _, _ in e})
                                                for e in edges.values()),
            "cycles": cycles(edges), "mutual_folders": mutual_folders(edges),
            "local_imports": local_imports(edges)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 unless the rules hold")
    ap.add_argument("--edges", action="store_true", help="print every edge")
    args = ap.parse_args(argv)
    edges = graph()
    if args.edges:
        for m, e in sorted(edges.items()):
            for t in sorted({t for t, _, _ in e}):
                print(f"{m} -> {t}")
    s = summary(edges)
    print(f"{s['modules']} modules, {s['edges']} edges")
    print(f"cycles: {len(s['cycles'])}")
    for c in s["cycles"]:
        print("  " + " <-> ".join(c))
    print(f"folders importing each other: {len(s['mutual_folders'])}")
    for a, b in s["mutual_folders"]:
        print(f"  {a} <-> {b}")
    print(f"function-local imports of the package's own modules: {len(s['local_imports'])} "
          f"(at most {MAX_LOCAL})")
    for line in s["local_imports"]:
        print("  " + line)
    ok = not s["cycles"] and not s["mutual_folders"] and len(s["local_imports"]) <= MAX_LOCAL
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
