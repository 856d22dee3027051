"""The package's structure: imports run one way (no module imports a name through a module that only re-exports it, and
the imports, those inside functions too, form no circle), and no function is longer than a reader can hold (60 lines)."""
import ast, sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1]/"latteclip_nb"
MODULES = sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_"))

def _tree(m): return ast.parse((PKG/f"{m}.py").read_text(encoding="utf-8"))

def _defined(m) -> set:
    "Names a module defines at its top level (functions, classes, assignments), not those it imports."
    out = set()
    for node in _tree(m).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                out |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
    return out

def _imports(m) -> list:
    "(line, imported module, names) for every import of a package module in `m`, at any depth."
    out = []
    for node in ast.walk(_tree(m)):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 and mod: out.append((node.lineno, mod, [a.name for a in node.names]))
            elif (node.level == 1 and not mod) or mod == "latteclip_nb":   # from . import x / from latteclip_nb import x
                out += [(node.lineno, a.name, []) for a in node.names if a.name in MODULES]
            elif mod.startswith("latteclip_nb."): out.append((node.lineno, mod.split(".")[1], [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1], []) for a in node.names if a.name.startswith("latteclip_nb.")]
    return out

def test_names_come_from_their_home():
    defined = {m: _defined(m) for m in MODULES}
    wrong = [f"{m}.py:{line} takes {n} from {src}, which does not define it" for m in MODULES for line, src, names in _imports(m)
             for n in names if n != "*" and n not in defined[src] and n not in MODULES]
    assert not wrong, "\n".join(wrong)

def test_no_import_circle():
    graph = {m: sorted({src for _, src, _ in _imports(m) if src != m}) for m in MODULES}
    state, path, circles = {}, [], []
    def visit(m):
        state[m] = "open"; path.append(m)
        for n in graph[m]:
            if state.get(n) == "open": circles.append(" -> ".join(path[path.index(n):] + [n]))
            elif n not in state: visit(n)
        state[m] = "done"; path.pop()
    for m in MODULES:
        if m not in state: visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)

def test_the_check_finds_a_circle(tmp_path, monkeypatch):
    "The circle test can fail: two modules that import each other inside functions are found."
    (tmp_path/"a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path/"b.py").write_text("def g():\n    from latteclip_nb.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", ["a", "b"])
    with pytest.raises(AssertionError, match="a -> b -> a"): test_no_import_circle()


def test_no_function_above_60_lines():
    long = [f"{m}.py:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for m in MODULES for n in ast.walk(_tree(m))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, "functions above 60 lines (split them into named stages):\n" + "\n".join(long)
