# fastcxr — set-up, demo, tests, figures. Every target creates or reuses the virtual environment.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FASTCXR := $(VENV)/bin/fastcxr
RUNS ?= runs
DEMO_RUN ?= demo-compare

# The tested set: every package pinned, with hashes (uv pip compile; see README, Development).
LOCK ?= requirements.lock
# Where pip is capped (this project's machines cap torch at the release on their disk), the
# lock is refreshed under the same cap.
LOCK_CONSTRAINTS ?= $(wildcard /etc/xdg/pip/constraints.txt)

.PHONY: install lock demo ablation backbones figures bench gpu-check test test-fast lint clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

## Refresh the lock to the newest releases pyproject.toml's ranges allow, install it, run the tests.
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --upgrade \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  $(if $(LOCK_CONSTRAINTS),-c $(LOCK_CONSTRAINTS)) -o $(LOCK)
	$(MAKE) test

## The main job: Experiment II (three formulations) on the built-in synthetic dataset.
demo: install
	$(FASTCXR) compare --name $(DEMO_RUN) --runs $(RUNS)

## Experiment I (progressive unfreezing) on the built-in synthetic dataset; run again, it shows
## the finished result (as demo does; --overwrite in the command retrains).
ablation: install
	$(FASTCXR) unfreeze-ablation --name demo-ablation --runs $(RUNS)

## Experiment I on three backbone families (torchvision ResNet-18, timm ConvNeXt-atto and
## EfficientNet-B0, from scratch at 48 px on the built-in data): one table each.
BACKBONES ?= resnet18 convnext_atto efficientnet_b0
backbones: install
	for a in $(BACKBONES); do \
	  $(FASTCXR) unfreeze-ablation --arch $$a --stages head,conv5,conv4_block-1,conv4 \
	    --name backbones-$$a --runs $(RUNS) || exit 1; \
	done

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
	$(PY) -m pytest -q --durations=15 tests

## The edit loop: everything not marked slow.
test-fast: install
	$(PY) -m pytest -q -m "not slow" --durations=10 tests

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(RUNS) reports/build
