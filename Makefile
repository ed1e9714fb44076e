# mel — the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Prefect state stays under the repo, never in $HOME; telemetry off.
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/mel run --config configs/tiny.yaml

test: setup
	$(BIN)/python -m pytest -q tests

# Each benchmark prints its numbers, ends with `name: value` and rewrites its section of docs/BENCHMARKS.md.
# Run on a quiet machine: other load on the 2 cores skews every timing.
BENCHES := update_step mel_overhead generation store demo orchestration
bench: setup
	for b in $(BENCHES); do echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py || exit 1; done

# A standalone Prefect server (UI on http://127.0.0.1:4200) and a process worker for pool mel-process, state in
# ./.prefect; then `.venv/bin/mel deploy --run` deploys prefect.yaml's campaign and runs it. Ctrl-C stops both.
serve: setup
	$(BIN)/mel serve

clean:
	rm -rf runs .prefect .pytest_cache
