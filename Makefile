# The commands a person types. Everything installs into .venv from constraints.txt.
#   make demo   fine-tune MiniLM on the shipped intents through the real Airflow DAG
#   make test   the whole test suite (what CI runs)
#   make up     Airflow (standalone) and the MLflow UI on 127.0.0.1
#   make bench  the benchmarks behind BENCHMARKS.md (minutes; writes bench/results/)
#   make lint   the import layers (pyproject.toml [tool.importlinter]; make test runs it too)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKOV_VERSION := 3.3.30
# Where a CPU build of torch comes from on machines that lack one locally, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
export FINETUNE_HOME ?= $(CURDIR)/.finetune
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast up bench lock lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, from the CPU index when given: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet $(PIP_TORCH) -c constraints.txt torch
	$(BIN)/pip install --quiet $(PIP_TORCH) -c constraints.txt -e '.[dev]'
	touch $@

# checkov (manifest and Dockerfile checks, tests only) in a venv of its own: in .venv, under our
# pins, pip resolves it to an ancient 2.x.
CHECKOV := .tools/checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv .tools/checkov && .tools/checkov/bin/pip install --quiet checkov==$(CHECKOV_VERSION)

install: $(STAMP)

demo: install
	$(BIN)/finetune run

test: install $(CHECKOV) lint
	$(BIN)/python -m pytest -q -rs --durations=15

test-fast: install $(CHECKOV)
	$(BIN)/python -m pytest -q -m "not slow"

up: install
	@echo "Airflow UI on http://127.0.0.1:8080 (login printed below), MLflow UI on http://127.0.0.1:5000"
	PATH=$(CURDIR)/$(BIN):$$PATH AIRFLOW_HOME=$(FINETUNE_HOME)/airflow AIRFLOW__CORE__DAGS_FOLDER=$(CURDIR)/dags \
	AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__API__HOST=127.0.0.1 $(BIN)/airflow standalone & \
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(FINETUNE_HOME)/mlflow.db \
	  --default-artifact-root $(FINETUNE_HOME)/mlartifacts; wait

bench: install
	$(BIN)/python bench/collect_memory.py --sizes-mb 50 500 --out bench/results/collect.md
	$(BIN)/python bench/validate_1m.py --rows 1000000 --repeats 3  # prints the figures bench/results/validate.md records

lint: install
	$(BIN)/lint-imports --no-cache

lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet $(PIP_TORCH) torch==2.13.0 -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(FINETUNE_HOME)
