# Two entry points: `make demo` (the offline experiment) and `make test` (everything CI runs).
# Both build .venv on first use, exactly as a newcomer's machine would.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test sync-check nbtest pytest demo clean outputs docs katex reproduce

install: $(STAMP)

$(STAMP): settings.ini setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name python3
	@$(MAKE) --no-print-directory katex
	touch $(STAMP)

sync-check: $(STAMP)
	$(BIN)/nbdev_export
	git diff --exit-code -- latteclip_nb
	@untracked=$$(git ls-files --others --exclude-standard -- latteclip_nb); \
	 if [ -n "$$untracked" ]; then echo "nbdev_export made untracked files: $$untracked"; exit 1; fi

nbtest: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 --timing

# the formula test (tests/test_notebooks.py) parses every formula with KaTeX through node; without node it skips
katex:
	@if [ -f $(VENV)/node/node_modules/katex/package.json ]; then :; \
	 elif command -v npm >/dev/null; then npm install --silent --no-audit --no-fund --prefix $(VENV)/node katex@0.16 || echo "katex: npm install failed, the formula test will skip"; \
	 else echo "katex: npm not found (apt-get install nodejs npm), the formula test will skip"; fi

pytest: $(STAMP)
	$(BIN)/pytest -q tests

# execute the notebooks in place and store their outputs (NB="nbs/03_prompts.ipynb ..." for some, SLOW=1 for #| slow cells)
outputs: $(STAMP)
	$(PY) scripts/run_notebooks.py $(if $(SLOW),--slow) $(NB)

# the documentation site (nbdev_docs renders the notebooks with Quarto into _docs/)
docs: $(STAMP)
	@command -v quarto >/dev/null || $(BIN)/pip install --quiet quarto-cli >/dev/null 2>&1 || true
	@if command -v quarto >/dev/null || [ -x $(BIN)/quarto ]; then PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nbdev_docs; \
	 else echo "make docs needs Quarto: install it from https://quarto.org/docs/get-started/ (or pip install quarto-cli where GitHub is reachable), then run make docs again"; exit 1; fi

# rerun the recorded run of every generated block, in README.md and the nbs/*.md pages (BLOCKS="shapes-results premise" for some), and fail when
# its top-1 moved by more than half a point
reproduce: $(STAMP)
	$(PY) scripts/reproduce.py $(BLOCKS)

# every part runs even when an earlier one fails, so one failure does not hide the others; the summary names
# each part's result and the target fails if any part did
test: $(STAMP)
	@fail=""; \
	 $(MAKE) --no-print-directory sync-check || fail="$$fail sync-check"; \
	 $(MAKE) --no-print-directory nbtest || fail="$$fail nbtest"; \
	 $(MAKE) --no-print-directory pytest || fail="$$fail pytest"; \
	 if [ -n "$$fail" ]; then echo "make test: FAILED:$$fail"; exit 1; fi; \
	 echo "make test: sync-check, nbtest and pytest passed"

demo: $(STAMP)
	mkdir -p out
	$(BIN)/papermill nbs/90_experiment.ipynb out/demo.ipynb -p out_dir out/demo --log-output --no-progress-bar
	@$(PY) -c "import json; from latteclip_nb.sweep import result_table; print(result_table(json.load(open('out/demo/metrics.json'))))"
	@echo "executed notebook: out/demo.ipynb   metrics and figures: out/demo/"
	@if [ -f out/demo/report.html ]; then echo "report page: $(CURDIR)/out/demo/report.html"; \
	 else echo "no report page was written: $(BIN)/latteclip-report out/demo writes it"; fi

clean:
	rm -rf $(VENV) out
