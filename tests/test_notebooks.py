"""The notebooks as stored: executed with their outputs, small, free of machine paths, clean in nbdev's format,
their markdown free of control characters and of formulas KaTeX cannot parse, and doc processing limited to
imports, exports and show_doc.

`NB_OUTPUTS=00_core,03_prompts pytest tests/test_notebooks.py` checks the outputs of some notebooks only
(`scripts/run_notebooks.py` stores them).
"""
import ast, json, os, re, shutil, subprocess, sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NBS = REPO / "nbs"
NOTEBOOKS = sorted(NBS.glob("*.ipynb"))
SKIP_FLAGS = {"slow", "gpu"}   # settings.ini's tst_flags: the cells nbdev_test (and scripts/run_notebooks.py) skip

# cells that draw a picture: (notebook, a piece of the cell's source); each must store an image/png output
FIGURES = [
    ("04_collage", "make_collage(demo).resize"),
    ("04_collage", "col.resize((112, 112))"),
    ("07_prototypes", 'ylabel="cos(p_0, start)"'),
    ("09a_run_config", "sched = [cosine_lr(t, 40, 300) for t in range(301)]"),
    ("09b_views", 'strip = Image.new("RGB", (6 * 40, 40), "white")'),
    ("09f_train", 'steps_log = read_jsonl(tmp/"run"/"steps.jsonl")'),
    ("10_evaluate", 'buf = io.BytesIO(); fig.savefig(buf, format="png", dpi=72)'),
    ("12_shapes_world", "_strip = Image.new("),
    ("12a_shapes", 'ax.set(ylabel="zero-shot top-1 %"'),
    ("14_report", 'ipd.Image(filename="../docs/report.png"'),
    ("90_experiment", 'for _name in ("per_class.png", "confusion.png")'),
    ("92_ablations", 'Image(filename="../docs/shapes_data_efficiency.png"'),
    ("93_premise", 'Image(filename="../docs/premise.png"'),
    ("94_descriptions_map", "fig = plot_map(fr)"),
]
# calls that return None by design: a cell ending in one of them shows nothing
NO_DISPLAY = {"set_num_threads", "rmtree", "set_grad_checkpointing", "close", "tight_layout", "seed_everything",
              "test_eq", "test_ne", "test_close", "test_fail", "test_is", "test_eq_type"}   # calls that return None
MACHINE_PATHS = re.compile(r"/root/|/home/\w|/tmp/|/var/tmp/|/work/|/Users/\w|[A-Z]:\\\\Users")


def _selected():
    names = os.environ.get("NB_OUTPUTS")
    if not names: return NOTEBOOKS
    chosen = [NBS / f"{n.strip().removesuffix('.ipynb')}.ipynb" for n in names.split(",") if n.strip()]
    missing = [p.name for p in chosen if not p.exists()]
    if missing: raise ValueError(f"NB_OUTPUTS names notebooks that do not exist: {', '.join(missing)}")
    return chosen


def _directives(src):
    d = {}
    for line in src.splitlines():
        if not line.startswith("#|"): break
        words = line[2:].split()
        if words: d[words[0].rstrip(":")] = [w.lower() for w in words[1:]]
    return d


def runs_under_test(cell) -> bool:
    """Whether nbdev_test executes this cell (a code cell without a skip flag or `eval: false`)."""
    if cell["cell_type"] != "code": return False
    src = "".join(cell["source"])
    d = _directives(src)
    return not (SKIP_FLAGS & d.keys() or d.get("eval") == ["false"] or "nbdev_export" + "(" in src)


def shows_something(src) -> bool:
    """Whether a cell's last statement is an expression that displays a value (so the cell must have an output)."""
    code = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("#|", "%", "!")))
    try: tree = ast.parse(code)
    except SyntaxError: return False
    if not tree.body or not isinstance(last := tree.body[-1], ast.Expr): return False
    if code.rstrip().endswith(";"): return False                       # IPython's way of saying "show nothing"
    if isinstance(last.value, ast.Call):
        f = last.value.func
        name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if name in NO_DISPLAY or name in defined: return False         # a None-returning call, or a property test run
    return True


def _text(o):
    parts = [o.get("text", "")] + list(o.get("data", {}).values()) + [o.get("traceback", "")]
    return "".join("".join(p) if isinstance(p, list) else str(p) for p in parts)


@pytest.mark.parametrize("nb", _selected(), ids=lambda p: p.stem)
def test_outputs_stored(nb):
    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    missing = [i for i, c in enumerate(cells) if runs_under_test(c) and shows_something("".join(c["source"])) and not c.get("outputs")]
    assert not missing, (f"{nb.name}: cells {missing} end in an expression but store no output: "
                         f"run `python scripts/run_notebooks.py nbs/{nb.name}`")
    if nb.stem != "index":   # every room shows a reader at least one result without running anything
        assert any(c.get("outputs") for c in cells), f"{nb.name} stores no output at all: run `python scripts/run_notebooks.py nbs/{nb.name}`"
    for stem, piece in FIGURES:
        if stem != nb.stem: continue
        hits = [c for c in cells if c["cell_type"] == "code" and piece in "".join(c["source"])]
        assert len(hits) == 1, f"{nb.name}: the figure cell containing {piece!r} is gone or ambiguous: update FIGURES"
        assert any("image/png" in o.get("data", {}) for o in hits[0].get("outputs", [])), f"{nb.name}: the figure of {piece!r} is not stored"
    errors = [i for i, c in enumerate(cells) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{nb.name}: cells {errors} store an error"
    paths = sorted({m for c in cells for o in c.get("outputs", []) for m in MACHINE_PATHS.findall(_text(o))})
    assert not paths, f"{nb.name}: outputs hold machine paths ({', '.join(paths)}): rerun scripts/run_notebooks.py, which replaces them"


def test_sizes():
    sizes = {p.name: p.stat().st_size for p in NOTEBOOKS}
    big = {n: s for n, s in sizes.items() if s >= 1_000_000}
    assert not big, f"notebooks of 1 MB or more: {big}: store smaller figures (lower dpi) or fewer outputs"
    assert sum(sizes.values()) < 10_000_000, f"nbs/ holds {sum(sizes.values()) / 1e6:.1f} MB of notebooks, more than 10 MB"


def test_no_timed_assertions():
    """Timings belong in bench/, never in assertions: a busy machine must not fail a test."""
    timed = re.compile(r"assert\b(?![^\n]*deadline)[^\n]*(perf_counter|time\.time|monotonic|\bt0\b|elapsed|\bsecs\b|_s\s*<|seconds\s*<)")
    hits = [f"{p.name}: {m.group(0)[:80]}" for p in NOTEBOOKS for c in json.loads(p.read_text())["cells"]
            if c["cell_type"] == "code" for m in timed.finditer("".join(c["source"]))]
    hits += [f"{p.name}: {m.group(0)[:80]}" for p in sorted((REPO / "tests").glob("*.py")) if p.name != Path(__file__).name
             for m in timed.finditer(p.read_text())]
    assert not hits, "timed assertions (move the timing to a bench/ script):\n" + "\n".join(hits)


def test_kernelspec():
    bad = [p.name for p in NOTEBOOKS if json.loads(p.read_text())["metadata"].get("kernelspec", {}).get("name") != "python3"]
    assert not bad, f"notebooks without the project's kernelspec (python3): {bad}"


def test_notebooks_open_unchanged_in_jupyterlab():
    """JupyterLab rewrites a notebook's kernelspec and language_info to what the kernel reports when it starts: each notebook
    stores exactly that (the kernel's display name is its name, as the Makefile installs it), so opening one changes nothing."""
    from ipykernel.ipkernel import IPythonKernel
    want = dict(IPythonKernel.language_info)
    assert '--name python3 --display-name python3' in (REPO/"Makefile").read_text()   # nbdev_clean stores the name as display name
    bad = []
    for p in NOTEBOOKS:
        meta = json.loads(p.read_text(encoding="utf-8"))["metadata"]
        info = meta.get("language_info", {})
        if (meta.get("kernelspec") != dict(display_name="python3", language="python", name="python3")
                or {k: v for k, v in info.items() if k != "version"} != {k: v for k, v in want.items() if k != "version"}
                or info.get("version", "").split(".")[:2] != want["version"].split(".")[:2]):
            bad.append(p.name)
    assert not bad, f"{bad} would change when opened: run `python scripts/run_notebooks.py --metadata`"


def test_nbdev_clean_leaves_notebooks_unchanged():
    from nbdev.clean import clean_nb
    from nbdev.config import get_config
    cfg = get_config(path=REPO)
    changed = []
    for p in NOTEBOOKS:
        raw = p.read_text(encoding="utf-8")
        nb = json.loads(raw)
        clean_nb(nb, cfg.clear_all, cfg.get("allowed_metadata_keys").split(), cfg.get("allowed_cell_metadata_keys").split(), cfg.clean_ids)
        if json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n" != raw: changed.append(p.name)
    assert not changed, f"nbdev_clean would change {changed}: run `nbdev_clean --fname nbs`"


def test_doc_processing_runs_only_imports_exports_and_show_doc():
    """nbdev's page processing executes export cells, show_doc cells and every cell with an import; a test cell
    that also imports would run at doc time (slow, and failing on names only other test cells define)."""
    from execnb.nbio import read_nb
    from nbdev.process import NBProcessor
    from nbdev.processors import _do_eval
    bad = []
    for p in NOTEBOOKS:
        for c in NBProcessor(p, nb=read_nb(p), procs=[]).nb.cells:
            if c.cell_type != "code" or not _do_eval(c) or {"export", "exports", "exporti", "exec_doc"} & set(c.directives_): continue
            body = "\n".join(l for l in c.source.splitlines() if not l.startswith("#|"))
            tree = ast.parse(body)
            others = [n for n in tree.body if not isinstance(n, (ast.Import, ast.ImportFrom))]
            setup = "hide" in c.directives_ and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) for n in others)
            if others and not setup and not (p.stem == "90_experiment" and "_params" in body):   # papermill's parameters cell
                bad.append(f"{p.name} cell {c.idx_}: {body.splitlines()[0][:60]}")
    assert not bad, "cells that mix imports with other code (put the imports in a cell of their own):\n" + "\n".join(bad)


# ---------------------------------------------------------------- markdown: control characters and formulas

_MATH = re.compile(r"\$\$(.+?)\$\$|(?<![\\$])\$(?!\s)([^$\n]+?)(?<![\s\\])\$(?!\d)", re.S)


def markdown_cells():
    for p in NOTEBOOKS:
        for i, c in enumerate(json.loads(p.read_text(encoding="utf-8"))["cells"]):
            if c["cell_type"] == "markdown": yield p.name, i, "".join(c["source"])


def formulas(md):
    """The TeX of each `$...$` and `$$...$$` formula in markdown, outside code spans and fenced blocks."""
    md = re.sub(r"```.*?```", "", md, flags=re.S)
    md = re.sub(r"`[^`\n]*`", "", md)
    return [(m.group(1) or m.group(2)).strip() for m in _MATH.finditer(md)]


def test_markdown_has_no_control_characters():
    bad = [f"{n} cell {i}: {ch!r} near {md[max(0, k - 20):k + 5]!r}" for n, i, md in markdown_cells()
           for k, ch in enumerate(md) if (ord(ch) < 32 and ch != "\n") or 127 <= ord(ch) < 160]
    assert not bad, "control characters in markdown (a lost backslash, e.g. \\t of \\text?):\n" + "\n".join(bad)


def test_formulas_found():
    assert formulas(r"Eq. 1: $w = \text{sim}(f, p)$ and `$not$` and $$\sum_i x_i$$, costs $5 and $6") == [r"w = \text{sim}(f, p)", r"\sum_i x_i"]


def _katex():
    """(node, the folder holding node_modules/katex), or a reason why the formula check cannot run here."""
    node = shutil.which("node")
    if not node: return None, "node is not installed (apt-get install nodejs npm; then make katex)"
    for base in (REPO / ".venv" / "node", Path(os.environ.get("KATEX_PREFIX", REPO / ".venv" / "node"))):
        if (base / "node_modules" / "katex" / "package.json").exists(): return (node, base), None
    return None, "the katex npm package is missing: `make katex` installs it under .venv/node"


def test_formulas_parse_with_katex(tmp_path):
    found, why = _katex()
    if not found: pytest.skip(why)
    node, base = found
    items = [{"where": f"{n} cell {i}", "tex": t} for n, i, md in markdown_cells() for t in formulas(md)]
    assert items, "no formulas found in the notebooks: the formula extraction is broken"
    (tmp_path / "items.json").write_text(json.dumps(items))
    script = ("const katex = require('katex'); const items = require(process.argv[process.argv.length - 1]); let bad = [];"
              "for (const it of items) { try { katex.renderToString(it.tex, {throwOnError: true, strict: 'ignore'}); }"
              " catch (e) { bad.push(it.where + ': $' + it.tex + '$: ' + e.message.split('\\n')[0]); } }"
              "console.log(JSON.stringify(bad));")
    out = subprocess.run([node, "-e", script, str(tmp_path / "items.json")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NODE_PATH": str(base / "node_modules")}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    bad = json.loads(out.stdout)
    assert not bad, "formulas KaTeX cannot parse:\n" + "\n".join(bad)


def test_katex_catches_a_broken_formula(tmp_path):
    found, why = _katex()
    if not found: pytest.skip(why)
    node, base = found
    out = subprocess.run([node, "-e", "try { require('katex').renderToString('T_\\text{class}\\\\frac{', {throwOnError: true}); console.log('ok') }"
                                      " catch (e) { console.log('error') }"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "NODE_PATH": str(base / "node_modules")})
    assert out.stdout.strip() == "error", out.stdout + out.stderr


# ---------------------------------------------------------------- README.md is generated from nbs/index.ipynb

def _words(text):
    """Letters and digits only: what survives Quarto's re-rendering of tables, quotes, escapes and spacing."""
    return re.sub(r"[^0-9A-Za-z]+", "", re.sub(r"<!-- WARNING: THIS FILE WAS AUTOGENERATED! DO NOT EDIT! -->", "", text))


def test_readme_matches_index():
    cells = json.loads((NBS / "index.ipynb").read_text(encoding="utf-8"))["cells"]
    page = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "<!-- WARNING: THIS FILE WAS AUTOGENERATED! DO NOT EDIT! -->" in readme, "README.md is generated: run nbdev_readme"
    a, b = _words(page), _words(readme)
    if a != b:
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise AssertionError(f"README.md and nbs/index.ipynb differ (index ...{a[max(0, k - 60):k + 40]}... against README "
                             f"...{b[max(0, k - 60):k + 40]}...): edit nbs/index.ipynb, then run nbdev_readme")


def test_sidebar_lists_every_notebook():
    """nbs/sidebar.yml (the documentation's table of contents) names every notebook, in reading order, and every
    markdown page of nbs/ (results, speed, ...), in sections."""
    lines = [l.strip() for l in (NBS / "sidebar.yml").read_text().splitlines()]
    listed = [l[2:] for l in lines if l.startswith("- ") and l.endswith(".ipynb")]
    assert listed == ["index.ipynb"] + sorted(p.name for p in NOTEBOOKS if p.name != "index.ipynb")
    pages = [l.split(":", 1)[1].strip() for l in lines if l.startswith("href:")]
    assert sorted(pages) == sorted(p.name for p in NBS.glob("*.md"))
    assert [l for l in lines if l.startswith("- section:")], "the sidebar is divided into sections"


def test_markdown_pages_link_what_exists():
    """README.md and the pages nbs/*.md link files that exist, each relative to the page it stands in."""
    for page in [REPO / "README.md", *sorted(NBS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:|#", target): continue
            assert (page.parent / target.split("#")[0]).exists(), f"{page.relative_to(REPO)} links {target}, which does not exist"


def test_page_processing_of_every_notebook_succeeds(tmp_path):
    """`nbdev_readme` and `nbdev_docs` first run nbdev's page processing (`proc_nbs`: exports, imports, show_doc) over
    every notebook; it must succeed on each (a show_doc of a function whose annotation names a module imported only
    inside it stops it). Run on a copy, so no `_proc` folder is left in the repository."""
    shutil.copytree(NBS, tmp_path / "nbs")
    for f in ("settings.ini", "README.md", "LICENSE"): shutil.copy(REPO / f, tmp_path / f)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", "from nbdev.serve import proc_nbs; proc_nbs('nbs', n_workers=1)"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    failed = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("Exception: Error in notebook")]
    assert r.returncode == 0, "\n".join(failed[:5]) or (r.stdout + r.stderr)[-3000:]
