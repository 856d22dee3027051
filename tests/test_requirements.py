"""The core requirements (settings.ini) cover everything the package imports or needs to load models."""
import ast
import re
import sys
from configparser import ConfigParser
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirements(key="requirements"):
    cfg = ConfigParser(delimiters=["="]); cfg.read(ROOT / "settings.ini", encoding="utf-8")
    reqs = {}
    for r in cfg["DEFAULT"][key].split():
        name = re.split(r"[<>=!~\[;]", r, 1)[0]
        reqs[re.sub(r"[-_.]+", "-", name).lower()] = r
    return reqs


def imported_modules():
    "Top-level modules imported anywhere in the package (lazy imports inside functions included)."
    mods = set()
    for f in (ROOT / "latteclip_nb").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import): mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module: mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - {"latteclip_nb", "__future__"}


def module_level_imports():
    "Top-level modules imported at module level (at import time of the package), not inside functions."
    mods = set()
    for f in (ROOT / "latteclip_nb").glob("*.py"):
        for node in ast.parse(f.read_text(encoding="utf-8")).body:
            for n in ast.walk(node) if isinstance(node, (ast.Try, ast.If)) else [node]:
                if isinstance(n, ast.Import): mods |= {a.name.split(".")[0] for a in n.names}
                elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module: mods.add(n.module.split(".")[0])
    return mods


def test_every_import_is_a_core_requirement():
    reqs, dists = requirements(), packages_distributions()
    optional = set(requirements("track_requirements"))   # the [track] extra: imported only where --report-to asks for it
    missing = {}
    for m in sorted(imported_modules()):
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(m, [m])}
        if not names & set(reqs) and not (names & optional and m not in module_level_imports()): missing[m] = sorted(names)
    assert not missing, f"imported but not in settings.ini requirements: {missing}"


def test_tracking_is_an_optional_extra():
    track, dev = requirements("track_requirements"), requirements("dev_requirements")
    assert {"tensorboard", "wandb"} <= set(track) and not {"tensorboard", "wandb"} & set(requirements())
    assert "tensorboard" in dev   # so that the tests read a real TensorBoard event file
    assert not {"tensorboard", "wandb"} & module_level_imports()


def test_load_time_needs_and_major_bounds():
    reqs = requirements()
    assert "accelerate" in reqs  # transformers needs it for device_map / 4-bit loading (see test_captioners' NF4 test)
    for name, major in [("transformers", "<6"), ("openai", "<4"), ("bitsandbytes", "<1"), ("open-clip-torch", "<4"),
                        ("accelerate", "<2")]:
        assert major in reqs[name], f"{name} needs an upper bound: {reqs[name]}"
    assert ">=5" in reqs["transformers"]  # the code uses the transformers 5 API (dtype=, transformers serve, v5 names)
