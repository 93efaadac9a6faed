# Two commands on a fresh machine:  `make main` (set up, fetch data if needed, run the permuted-MNIST comparison)
# and `make test` (set up, fetch data if needed, run the test suite). Everything else is a step of those.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines settle on the local torch 2.13.0 CPU wheel; with an NVIDIA driver present, pip keeps
# (or picks) a CUDA build instead. Force either with `make setup TORCH_PIN=...`.
TORCH_PIN ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,-c requirements/cpu-constraints.txt)
# Data: $AGENTNET_DATA if set, else the shared checkout beside this repo, else the user cache.
AGENTNET_DATA ?= $(or $(wildcard $(abspath ../shared/data)),$(HOME)/.cache/agentnet/data)
export AGENTNET_DATA

.PHONY: setup data main test test-slow benchmarks clean
setup: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml requirements/cpu-constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN) -e ".[dev,marl,mlflow,wandb]"
	touch $@

data: setup
	$(BIN)/agentnet-fetch-mnist --root "$(AGENTNET_DATA)"

# The main job: the permuted-MNIST strategy comparison as a Hydra multirun (joblib, one process per
# core), 3 replicas (seeds) per strategy trained as one batched model, then one report table. Extra overrides: make main ARGS="seed=0,1,2 cl=ewc".
SWEEP ?= outputs/main/$(shell date +%Y-%m-%d_%H-%M-%S)
main: data
	$(BIN)/agentnet -m benchmark=pmnist_quick strategy=bp,lfnn,lfnn_local,attention replicas=3 threads=1 \
		hydra.sweep.dir=$(SWEEP) $(ARGS)
	$(BIN)/agentnet-report $(SWEEP)

# The default suite runs in pytest-xdist workers, one per logical CPU (at most 4: each holds torch and MNIST).
TEST_WORKERS ?= logical
test: data
	$(BIN)/pytest -n $(TEST_WORKERS) --maxprocesses=4 $(PYTEST_ARGS)

test-slow: data
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

# Speed and accuracy figures for docs/benchmarks.md (tens of minutes on 2 cores; cl_reference: hours).
benchmarks: data
	$(BIN)/python benchmarks/step_time.py --models mlp_275k,mlp_400x2,mlp_1000x2,cnn_mnist_438k,resnet_blocks
	$(BIN)/python benchmarks/env_overhead.py
	$(BIN)/python benchmarks/table1_mnist.py

clean:
	rm -rf $(VENV) outputs multirun tunes .pytest_cache
