"""Execute notebooks in place and store their outputs, small and free of machine paths.

Runs the cells `nbdev_test` runs (cells flagged with a `tst_flags` flag from settings.ini, `#| slow` and `#| gpu`,
and `#| eval: false` cells are skipped and keep the outputs they have), with the notebook's folder as the working
directory, one notebook per process. Progress bars are off, figures are PNG at a modest dpi, absolute paths of this
machine in text outputs become `<repo>`, `<cache>`, `<tmp>`, `<venv>`, `<python>` or `~`, and the result is passed
through `nbdev_clean`, so the stored notebook is what nbdev keeps. Prints each notebook's size afterwards.

    python scripts/run_notebooks.py                          # every notebook under nbs/
    python scripts/run_notebooks.py nbs/03_prompts.ipynb     # some of them
    python scripts/run_notebooks.py --slow nbs/93_premise.ipynb   # the #| slow cells too (the recorded runs)
"""
import argparse, json, os, re, site, subprocess, sys, sysconfig, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DPI = 72   # figures: small PNGs, legible in JupyterLab and the docs

# the environment of a run: no progress bars, no colour codes, the non-interactive inline backend
QUIET_ENV = {"TQDM_DISABLE": "1", "TQDM_MININTERVAL": "1e9", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_VERBOSITY": "error", "NO_COLOR": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}


def machine_paths() -> list:
    """(absolute path of this machine, placeholder) pairs, longest first, for scrubbing text outputs."""
    from latteclip_nb.core import cache_root
    pairs = [(str(cache_root()), "<cache>"), (str(REPO), "<repo>"), (sys.prefix, "<venv>"),
             (sys.base_prefix, "<python>"), (sysconfig.get_paths()["purelib"], "<venv>/site-packages")]
    pairs += [(p, "<venv>/site-packages") for p in site.getsitepackages()]
    pairs += [(str(Path(p).resolve()), v) for p, v in pairs]
    pairs.append((str(Path.home()), "~"))
    return sorted({p: v for p, v in pairs if p and p != "/"}.items(), key=lambda pv: -len(pv[0]))


_TMP = re.compile(r"(?:%s)/[^\s/'\")\]},:]+" % "|".join(re.escape(t) for t in sorted({tempfile.gettempdir(), "/tmp", "/var/tmp"}, key=len, reverse=True)))


def scrub(text: str, pairs) -> str:
    """`text` without absolute machine paths and without progress-bar redraws (text before a carriage return)."""
    text = "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
    text = _TMP.sub("<tmp>", text)
    for p, v in pairs: text = text.replace(p, v)
    return text


def _scrub_nb(nb, pairs):
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if "text" in o:   # stored as a list of lines, as Jupyter writes it
                o["text"] = scrub("".join(o["text"]) if isinstance(o["text"], list) else o["text"], pairs).splitlines(True)
            data = o.get("data", {})
            for k, v in list(data.items()):
                if k.startswith("text/"): data[k] = scrub("".join(v) if isinstance(v, list) else v, pairs).splitlines(True)
                if k == "application/vnd.jupyter.widget-view+json": del data[k]   # a progress widget
            if "image/png" in data: data.pop("image/jpeg", None)                     # one picture, as PNG
            if o.get("output_type") == "error": o["traceback"] = [scrub(t, pairs) for t in o.get("traceback", [])]
        if "outputs" in cell:   # drop outputs left empty (e.g. a stream that only drew a progress bar)
            cell["outputs"] = [o for o in cell["outputs"] if o.get("data") or o.get("text") or o.get("output_type") == "error"]


def kernel_metadata() -> dict:
    """The notebook metadata JupyterLab writes once the project's kernel starts; stored as is, a notebook opens unchanged."""
    from ipykernel.ipkernel import IPythonKernel
    return dict(kernelspec=dict(display_name="python3", language="python", name="python3"),   # the Makefile installs it so
                language_info=dict(IPythonKernel.language_info))                                 # what the kernel reports


def set_metadata(fn: Path) -> bool:
    """Store `kernel_metadata()` in notebook `fn` (nothing else changes); whether it changed."""
    raw = fn.read_text(encoding="utf-8")
    nb = json.loads(raw)
    nb["metadata"].update(kernel_metadata())
    new = json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"   # nbdev_clean's layout
    if new != raw: fn.write_text(new, encoding="utf-8")
    return new != raw


def run_one(fn: Path, slow: bool) -> None:
    """Execute `fn` as nbdev_test does (skipping the flagged cells unless `slow`), store outputs, clean it."""
    os.environ.update(QUIET_ENV); os.environ["IN_TEST"] = "1"
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.clean import clean_nb
    cfg = get_config()
    flags = set(cfg.tst_flags.split()) - ({"slow"} if slow else set())
    nb = read_nb(fn)
    proc = NBProcessor(fn, nb=read_nb(fn), procs=[])   # the same cells, with nbdev's parsed directives
    directives = {c.id: (c.directives_ or {}) for c in proc.nb.cells if c.cell_type == "code"}

    def skip(cell):
        if cell.cell_type != "code" or "nbdev_export" + "(" in cell.source: return True
        d = directives.get(cell.id, {})
        if d.get("eval:", [""])[0].lower() == "false": return True
        return bool(flags & d.keys())

    for c in nb.cells:   # outputs of the cells about to run are replaced; skipped cells keep theirs
        if not skip(c): c.outputs = []
    sys.path.insert(0, str(REPO))
    k = CaptureShell(fn)
    k.run_cell(f"import matplotlib as _mpl; _mpl.rcParams['figure.dpi'] = {DPI}; _mpl.rcParams['savefig.dpi'] = {DPI}; del _mpl")
    k.run_cell("%config InlineBackend.figure_formats = ['png']")
    with working_directory(fn.parent):
        k.run_all(nb, exc_stop=True, preproc=skip)
    _scrub_nb(nb, machine_paths())
    nb.metadata.update(kernel_metadata())
    clean_nb(nb, allowed_metadata_keys=cfg.get("allowed_metadata_keys").split(),
             allowed_cell_metadata_keys=cfg.get("allowed_cell_metadata_keys").split(), clean_ids=cfg.clean_ids)
    write_nb(nb, fn)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Execute notebooks in place and store their outputs (the cells nbdev_test runs).")
    ap.add_argument("notebooks", nargs="*", help="notebooks to run (default: every nbs/*.ipynb)")
    ap.add_argument("--slow", action="store_true", help="run the #| slow cells too (minutes to an hour each)")
    ap.add_argument("--metadata", action="store_true", help="only store the kernel's metadata in the notebooks (runs nothing)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # run a single notebook in this process
    a = ap.parse_args(argv)
    if a.metadata:
        for n in [Path(n) for n in a.notebooks] or sorted((REPO/"nbs").glob("*.ipynb")):
            if set_metadata(n): print(f"{n.name}: kernel metadata stored")
        return 0
    if a.one:
        run_one(Path(a.notebooks[0]).resolve(), a.slow); return 0
    nbs = [Path(n) for n in a.notebooks] or sorted((REPO/"nbs").glob("*.ipynb"))
    missing = [str(n) for n in nbs if not n.is_file()]
    if missing: sys.exit(f"run_notebooks: no such notebook: {', '.join(missing)}")
    failed = []
    for n in nbs:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--one", str(n.resolve())] + (["--slow"] if a.slow else []),
                           env={**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
        if r.returncode: failed.append(n.name)
        print(f"{n.name:28} {'failed' if r.returncode else 'ok':7} {time.perf_counter() - t0:6.0f} s  {n.stat().st_size / 1e3:8.1f} kB", flush=True)
    total = sum(p.stat().st_size for p in (REPO/"nbs").glob("*.ipynb"))
    print(f"{'all of nbs/':28} {'':7} {'':8}  {total / 1e3:8.1f} kB")
    if failed: sys.exit(f"run_notebooks: failed: {' '.join(failed)} (their stored notebooks are unchanged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
