"""Write the parameters cell of nbs/90_experiment.ipynb from ExperimentConfig (`experiment.papermill_parameters`).

Run after adding or changing a config field: `python scripts/write_parameters.py` (a test fails until the cell matches)."""
import json, sys
from pathlib import Path

from latteclip_nb.experiment import papermill_parameters

NB = Path(__file__).resolve().parents[1]/"nbs"/"90_experiment.ipynb"

def main(check: bool = False) -> int:
    nb = json.loads(NB.read_text(encoding="utf-8"))
    [cell] = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    text = papermill_parameters()
    if "".join(cell["source"]) == text: return 0
    if check:
        print(f"{NB}: its parameters cell differs from ExperimentConfig; run python scripts/write_parameters.py", file=sys.stderr)
        return 1
    lines = text.split("\n")
    cell["source"] = [l + "\n" for l in lines[:-1]] + [lines[-1]]
    NB.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote the parameters cell of {NB}")
    return 0

if __name__ == "__main__": sys.exit(main(check="--check" in sys.argv[1:]))
