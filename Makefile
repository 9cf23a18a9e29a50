# Two commands: `make demo` (set up, then pretrain + evaluate on generated data) and `make test`.
# Both create .venv on first use. Without a GPU the CPU build paths are used (DALI's CPU backend).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Every package is installed at the version pinned in the lock: requirements/lock.txt, pip-compile of
# pyproject.toml with the cuda13 DALI build (also the CPU-only choice), the test and bench extras and
# requirements/lock.in's torch pins. requirements/runtime.txt is its runtime-only part (no test tools, no
# matplotlib, the same versions): what docker/Dockerfile installs.
LOCK ?= requirements/lock.txt

.PHONY: demo test test-slow lint lock cifar10 goldens

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/activate
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Refresh both locks after changing a dependency (pip-tools in a throwaway venv: it pins pip's own resolution).
# The runtime lock is constrained by the full one, so that the image runs exactly the versions the tests ran.
LOCKENV := /tmp/simclr-lockenv
PIP_COMPILE := $(LOCKENV)/bin/pip-compile --quiet --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
lock:
	$(PYTHON) -m venv $(LOCKENV)
	$(LOCKENV)/bin/pip install -q "pip-tools==7.6.2"
	$(PIP_COMPILE) --extra cuda13 --extra test --extra bench --output-file requirements/lock.txt pyproject.toml requirements/lock.in
	$(PIP_COMPILE) --extra cuda13 --constraint requirements/lock.txt --output-file requirements/runtime.txt pyproject.toml requirements/lock.in

# The demo starts a fresh run every time (--overwrite true): a rerun, after editing configs/demo.yaml too, shows
# the whole pipeline again (seeded: the same numbers on one machine, a little different on another CPU) instead of
# refusing a changed config or resuming a finished run.
demo: $(VENV)/.installed
	$(BIN)/simclr-shards write synthetic "data/demo/train/train-%06d.tar" --per_class 1770 --seed 0 --quiet
	$(BIN)/simclr-shards write synthetic "data/demo/val/val-%06d.tar" --per_class 100 --seed 1 --quiet
	$(BIN)/python train.py --config configs/demo.yaml --overwrite true
	$(BIN)/python evaluate.py --checkpoint runs/demo --train_shards data/demo/train --val_shards data/demo/val \
		--protocol all --k 20,200 --compare_random_init true --json runs/demo/eval.json

# make test: everything but the tests marked slow (end-to-end runs of minutes each: fresh-venv install, both-Triton
# sm_90a compiles, the GPU check's dry runs, long training and fault matrices); make test-slow: those. CI runs both.
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow tests

# mypy over the package simclr_dali from this checkout (tools/typecheck.py): no unresolved import, and the remaining
# type errors counted against tools/mypy_baseline.json (the count may only go down).
lint: $(VENV)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python tools/typecheck.py

# TensorFlow's own image ops on real images (tests/goldens/tf_*.py), written as the small .npz files the
# augmentation tests compare with. tensorflow-cpu lives in a throwaway venv: never a project dependency.
TF_VENV ?= /tmp/simclr-tfenv
goldens:
	test -x $(TF_VENV)/bin/python || ($(PYTHON) -m venv $(TF_VENV) && $(TF_VENV)/bin/pip install -q "tensorflow-cpu==2.21.0" pillow)
	for script in tests/goldens/tf_*.py; do $(TF_VENV)/bin/python $$script || exit 1; done

# The CIFAR-10 recipe end to end (writes shards once, pretrains, evaluates every epoch, then the torchvision
# baseline for the same training time): bench/results/cifar10_<device>.json + .png. ~80 min on 2 CPU cores.
cifar10: $(VENV)/.installed
	$(BIN)/python bench.py cifar10 $(CIFAR10_ARGS)

# The GPU check of a lent device session (bench/GPU_CHECK.md; tools/gpu_check, never installed). gpu-stage, here: the
# pieces that bring DALI, webdataset, jsonargparse and an ImageNet subset to the GPU machine (.gpu/simclr/lite, pNNN;
# git-ignored), and the call plan. gpu-check, there (its own python3 has torch; no venv is built): one group of
# stages (GPU_CHECK_GROUP: data, torch, extra; the data path first), rows appended under GPU_CHECK_OUT as they land.
# gpu-plan: the device-time plan, checked against the stage caps. A user's own GPU: `simclr-bench gpu-check`.
GPU_CHECK_OUT ?= runs/gpu_check
GPU_CHECK_GROUP ?= data
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
.PHONY: gpu-check gpu-stage gpu-plan

gpu-stage:
	PYTHON=$(GPU_PYTHON) bash tools/gpu_check/stage.sh

gpu-check:
	$(GPU_PYTHON) -m tools.gpu_check --group $(GPU_CHECK_GROUP) --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

gpu-plan:
	$(GPU_PYTHON) -m tools.gpu_check --plan
