# fastcxr — set-up, demo, tests, figures. Every target creates or reuses the virtual environment.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FASTCXR := $(VENV)/bin/fastcxr
RUNS ?= runs
DEMO_RUN ?= demo-compare

.PHONY: install demo ablation figures bench gpu-check test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

## The main job: Experiment II (three formulations) on the built-in synthetic dataset.
demo: install
	$(FASTCXR) compare --name $(DEMO_RUN) --runs $(RUNS)

## Experiment I (progressive unfreezing) on the built-in synthetic dataset.
ablation: install
	$(FASTCXR) unfreeze-ablation --name demo-ablation --runs $(RUNS)

## Report figures + results.md from the demo comparison (runs it first if absent).
figures: install
	test -f $(RUNS)/$(DEMO_RUN)/compare.json || $(FASTCXR) compare --name $(DEMO_RUN) --runs $(RUNS)
	$(FASTCXR) report $(RUNS)/$(DEMO_RUN) --out reports/build --template reports/template.md

## Training speed on this machine's GPU (the study's model and stages), saved as JSON.
BENCH_ARGS ?=
bench: install
	mkdir -p reports/build
	set -o pipefail; $(FASTCXR) bench --json $(BENCH_ARGS) | tee reports/build/bench.json.part
	mv reports/build/bench.json.part reports/build/bench.json

## The GPU path checked in one command (pytest -m gpu, bench, compiled bench, an end-to-end
## compare --preset paper with NVML utilisation): gpu-check.json + gpu-check.log in
## GPU_CHECK_OUT. SMOKE=1 runs the same code path on a CPU, tiny. On a machine whose Python
## already has the dependencies (a GPU node): make gpu-check PY=python3
GPU_CHECK_OUT ?= reports/build/gpu
GPU_CHECK_ARGS ?=
gpu-check: $(if $(filter $(VENV)/bin/python,$(PY)),install)
	$(PY) scripts/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(SMOKE),--smoke) $(GPU_CHECK_ARGS)

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(RUNS) reports/build
