"""Facts about the shape of the fastkd package: its import graph, circles in it, the longest
functions, and the files of each loss family.

    python scripts/architecture_report.py            # a text report
    python scripts/architecture_report.py --json     # the same as JSON

Every ``import`` counts, at module level or inside a function: a lazy import hides a circle
from the interpreter, not from the reader. ``tests/test_architecture.py`` holds the package to
"no circle".
"""
from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastkd"
FAMILIES = ("logit", "feature", "relation")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules) -> str | None:
    """The fastkd module an imported name refers to (``fastkd.a.b`` or its package)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str, path: Path, modules) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one.
            names = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != mod:
                out.add(target)
    # ``from fastkd.a import b`` names the package fastkd.a too: keep the submodule only.
    return {t for t in out if not any(o.startswith(t + ".") for o in out)}


def import_graph() -> dict[str, list[str]]:
    modules = package_modules()
    return {m: sorted(imports_of(m, p, modules)) for m, p in modules.items()}


def cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            # A package's __init__ importing its own submodules is how packages re-export,
            # not a circle of dependencies: skip edges from a package to its children.
            if w.startswith(v + "."):
                continue
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def python_functions(limit: int = 10) -> list[tuple[int, str]]:
    rows = []
    for mod, path in package_modules().items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1,
                             f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)[:limit]


_CPP_HEAD = re.compile(r"^[A-Za-z_][\w:<>,\s\*&]*\b(\w+)\s*\([^;]*$")


def cpp_functions(limit: int = 10) -> list[tuple[int, str]]:
    """Function bodies in csrc/ by brace matching from a line that opens a definition at
    column 0 (the project's style); an estimate, good enough to rank them."""
    rows = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix not in (".cpp", ".cu", ".cuh", ".h"):
            continue
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = _CPP_HEAD.match(lines[i])
            if m and not lines[i].startswith(("struct", "class", "namespace", "#", "//")):
                depth, start, j, opened = 0, i, i, False
                while j < len(lines):
                    depth += lines[j].count("{") - lines[j].count("}")
                    opened = opened or "{" in lines[j]
                    if opened and depth <= 0:
                        break
                    if not opened and lines[j].rstrip().endswith(";"):
                        break
                    j += 1
                if opened:
                    rows.append((j - start + 1, f"{path.relative_to(ROOT)}:{start + 1} {m.group(1)}"))
                    i = j
            i += 1
    return sorted(rows, reverse=True)[:limit]


def family_files() -> dict[str, list[str]]:
    out = {}
    for fam in FAMILIES:
        files = [str(p.relative_to(ROOT)) for p in sorted((PACKAGE / fam).glob("*.py"))]
        files += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").rglob(f"*{fam}*"))]
        out[fam] = files
    return out


def report() -> dict:
    graph = import_graph()
    return {"import_graph": graph, "cycles": cycles(graph),
            "longest_python_functions": python_functions(), "longest_cpp_functions": cpp_functions(),
            "family_files": family_files()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rep = report()
    if args.json:
        print(json.dumps(rep, indent=1))
        return
    print("import circles:", rep["cycles"] or "none")
    print("\nimport graph (fastkd modules each module imports, lazy imports included):")
    for mod, deps in rep["import_graph"].items():
        print(f"  {mod} -> {', '.join(d for d in deps) or '-'}")
    for key in ("longest_python_functions", "longest_cpp_functions"):
        print(f"\n{key.replace('_', ' ')}:")
        for n, where in rep[key]:
            print(f"  {n:4d}  {where}")
    print("\nfiles per family:")
    for fam, files in rep["family_files"].items():
        print(f"  {fam} ({len(files)}): {', '.join(files)}")


if __name__ == "__main__":
    main()
