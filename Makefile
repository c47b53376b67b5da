# The commands a person types. Everything installs into .venv from constraints.txt.
#   make demo   fine-tune MiniLM on the shipped intents through the real Airflow DAG
#   make demo-llm  the causal-LM loop offline: a small Llama on the shipped support chats
#   make demo-dpo  preference tuning (DPO) offline: demo-llm's Llama and recipe, then DPO on the shipped pairs
#   make test   the whole test suite (what CI runs)
#   make up     Airflow (standalone) and the MLflow UI on 127.0.0.1, in the background (docs/ui.md)
#   make down   stop what `make up` (and `make serve`) started
#   make serve  the champion behind MLflow's scoring server on 127.0.0.1:5001 (POST /invocations)
#   make bench  the benchmarks behind BENCHMARKS.md (writes bench/results/*.json, then the tables)
#   make images the four images of docker/ (needs a Docker engine; docs/deploy.md)
#   make lint   the import layers ([tool.importlinter]), ruff (lint + format check) and mypy over
#               pipeline/ ([tool.ruff], [tool.mypy] in pyproject.toml); make test runs it first
#   make format ruff's formatter and its safe lint fixes, in place
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKOV_VERSION := 3.3.30
UV_VERSION := 0.13.9
UV := $(BIN)/uv
# Where a CPU build of torch comes from on machines that lack one locally, e.g.
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
export FINETUNE_HOME ?= $(CURDIR)/.finetune
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
AIRFLOW_PORT ?= 8080
MLFLOW_PORT ?= 5000

.PHONY: install demo demo-llm demo-dpo test test-fast up down serve bench bench-memory lock lint format clean images

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, by pip, so pip's own config (find-links, indexes) picks the local CPU wheel, or the CPU
	# index when given: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet $(PIP_TORCH) -c constraints.txt torch uv==$(UV_VERSION)
	# the rest by uv, the same pins (constraints.txt) resolved in seconds where pip takes minutes; torch,
	# already there at its pin, stays
	$(UV) pip install --python $(BIN)/python --quiet -c constraints.txt -e '.[dev]'
	# DeepSpeed's C++ ops (CPU collectives, CPU Adam) built here, once, into .venv/torch_extensions,
	# not inside the first training, silently, for minutes (pipeline/train/ops.py)
	$(BIN)/python -c "from pipeline.train import ops; ops.main()"
	touch $@

# checkov (manifest and Dockerfile checks, tests only) in a venv of its own: in .venv, under our
# pins, pip resolves it to an ancient 2.x.
CHECKOV := .tools/checkov/bin/checkov
$(CHECKOV): $(STAMP)
	$(PYTHON) -m venv .tools/checkov && $(UV) pip install --python .tools/checkov/bin/python --quiet checkov==$(CHECKOV_VERSION)

install: $(STAMP)

demo: install
	$(BIN)/finetune run

# The causal-LM loop offline: a small Llama built here (finetune demo-model: a tokenizer trained on
# the shipped texts, random weights), the shipped support chats, ZeRO-3, the perplexity gate and a
# floor under stop_rate (pipeline/configs/support_chat_demo.yaml).
DEMO_LLM_SETTINGS ?= --config pipeline/configs/support_chat_demo.yaml
demo-llm: install
	$(BIN)/finetune run $(DEMO_LLM_SETTINGS) --set base_model="$$($(BIN)/finetune demo-model | tail -n 1)"

# Preference tuning offline: the Llama of demo-llm fine-tuned by demo-llm's recipe (that run's published
# model), then DPO on the shipped pairs (pipeline/configs/support_preference.yaml) against it, ZeRO-3 + LoRA,
# the reward-accuracy gate (the SFT model's own figure is the bar). ZeRO-2: DEMO_DPO_ZERO=2.
DEMO_DPO_ZERO ?= 3
DEMO_DPO_SETTINGS ?= --set train.zero_stage=$(DEMO_DPO_ZERO) --set train.num_processes=2 --set train.learning_rate=5e-4
demo-dpo: install
	sft=$$($(BIN)/finetune run $(DEMO_LLM_SETTINGS) --set base_model="$$($(BIN)/finetune demo-model | tail -n 1)" \
		| tail -n 1 | $(BIN)/python -c "import json, sys; print(json.load(sys.stdin)['run_id'])") && \
	$(BIN)/finetune run --config pipeline/configs/support_preference.yaml \
		--set base_model="$(FINETUNE_HOME)/artifacts/runs/$$sft/train/model" $(DEMO_DPO_SETTINGS)

# The suite's temp dirs on tmpfs where it has room: every test's MLflow and Airflow SQLite stores
# live there, and SQLite syncs to disk on each commit, which on a shared disk cost more wall time
# than the tests' own work (a fresh MLflow store: 5-10 s on disk, under 1 s on tmpfs). Passing
# tests' dirs are removed as they finish, so the suite holds only what the running test and the
# session fixtures wrote. TEST_TMPDIR=/tmp make test keeps them on disk.
TEST_TMPDIR ?= $(shell d=/dev/shm; [ -d $$d ] && [ -w $$d ] && \
	[ "$$(df -Pk $$d | awk 'NR==2 {print $$4}')" -gt 4000000 ] && echo $$d || echo $${TMPDIR:-/tmp})
# Tests run in TEST_WORKERS processes (pytest-xdist), one per core up to 4, each worker given the
# next test as it frees up (--dist load); grouping by module with the training modules first made two
# trainings share the 2 cores most of the run (BENCHMARKS.md has the runs). TEST_WORKERS=0 runs the
# tests in one process, one after another.
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))
PYTEST := TMPDIR=$(TEST_TMPDIR) $(BIN)/python -m pytest -o tmp_path_retention_policy=failed -n $(TEST_WORKERS) \
	--dist load

# The JUnit report is what bench/suite.py sums per module for BENCHMARKS.md.
test: install $(CHECKOV) lint
	$(PYTEST) -q -rs --durations=15 --junitxml=$(FINETUNE_HOME)/test-report.xml

test-fast: install $(CHECKOV)
	$(PYTEST) -q -m "not slow"

# Both UIs in the background on 127.0.0.1 over the embedded stores under $(FINETUNE_HOME); pid files
# in $(FINETUNE_HOME)/run, logs in $(FINETUNE_HOME)/logs (pipeline/services.py). A second `up` finds
# the running copy. Ports: make up AIRFLOW_PORT=8081 MLFLOW_PORT=5001 (never 8793/8794: log servers).
up: install
	AIRFLOW_PORT=$(AIRFLOW_PORT) MLFLOW_PORT=$(MLFLOW_PORT) $(BIN)/python -m pipeline.services up

# The champion of the config's model_name (or MODEL=...) on 127.0.0.1:$(SERVE_PORT); make down stops it.
SERVE_PORT ?= 5001
serve: install
	SERVE_PORT=$(SERVE_PORT) $(BIN)/python -m pipeline.services serve $(if $(MODEL),--model $(MODEL))

down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m pipeline.services down; else echo "nothing to stop: no $(VENV)"; fi

# Each script writes bench/results/<name>.json (figures, machine, commit, date, command); report.py
# regenerates BENCHMARKS.md's tables from them. About 45 minutes on 2 cores; one at a time:
#   make bench BENCH=training_tax
BENCH ?= training_tax orchestration data_throughput
bench: install
	for name in $(BENCH); do $(BIN)/python bench/$$name.py || exit 1; done
	$(BIN)/python bench/report.py

bench-memory: install
	$(BIN)/python bench/collect_memory.py --sizes-mb 50 500 --out bench/results/collect.md
	$(BIN)/python bench/validate_1m.py --rows 1000000 --repeats 3  # prints the figures bench/results/validate.md records

LINT_PATHS := pipeline dags plugins tests bench
lint: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy pipeline

format: install
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

# The four images of docker/, tagged as k8s/ and the deployment's config name them, where a Docker
# engine runs (docs/deploy.md); here hadolint and checkov check the Dockerfiles (tests/pipeline/test_k8s.py).
#   make images IMAGE_REGISTRY=registry.internal:5000   then docker push each one it names
IMAGE_REGISTRY ?= registry.example.com
IMAGE_TAG ?= 0.1.0
MLFLOW_IMAGE_TAG ?= 3.17.2
images:
	@command -v docker >/dev/null || { echo "make images: no docker command here; run it where a Docker engine is (docs/deploy.md)" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make images: docker is installed but reaches no Docker engine (docker info fails); start one or build elsewhere (docs/deploy.md)" >&2; exit 1; }
	docker build -f docker/step-cpu.Dockerfile -t $(IMAGE_REGISTRY)/finetune/step-cpu:$(IMAGE_TAG) .
	docker build -f docker/step-cuda.Dockerfile -t $(IMAGE_REGISTRY)/finetune/step-cuda:$(IMAGE_TAG) .
	docker build -f docker/airflow.Dockerfile -t $(IMAGE_REGISTRY)/finetune/airflow:$(IMAGE_TAG) .
	docker build -f docker/mlflow.Dockerfile -t $(IMAGE_REGISTRY)/finetune/mlflow:$(MLFLOW_IMAGE_TAG) .

lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet --upgrade pip
	.lock-venv/bin/pip install --quiet $(PIP_TORCH) torch==2.13.0 -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf $(FINETUNE_HOME)
