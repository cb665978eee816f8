# The README's commands. Everything runs from the project's own virtualenv (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the local CPU wheel; on a CUDA machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= pipeline_config/demo.yaml
STAMP := $(VENV)/.installed

.PHONY: install demo run test test-all lint bench clean-state up down deploy status

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## demo: the whole pipeline offline on the embedded default (local Prefect + MLflow on SQLite)
demo: $(STAMP)
	$(BIN)/squadtune run --config $(CONFIG) $(ARGS)

## run: any config, e.g. make run CONFIG=pipeline_config/gpt2_squad_qlora.yaml ARGS="training.max_steps=100"
run: $(STAMP)
	$(BIN)/squadtune run --config $(CONFIG) $(ARGS)

## test: the fast CPU suite (slow and GPU tests are marked and skipped)
test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu"

lint: $(STAMP)
	$(BIN)/ruff check .

## up: Prefect server, lean MLflow server and a worker per local pool, on 127.0.0.1
up: $(STAMP)
	$(BIN)/python deployments/servers.py up

## deploy: register deployments/prefect.yaml's deployments with the server `make up` started
deploy: $(STAMP)
	. .squadtune/servers/env && cd $(CURDIR) && \
	$(BIN)/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml

## down: stop exactly the processes `make up` started
down:
	$(BIN)/python deployments/servers.py down

status:
	$(BIN)/python deployments/servers.py status

## bench: every benchmark, one JSON line each
bench: $(STAMP)
	$(BIN)/python bench/data.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/eval.py

clean-state:
	rm -rf .squadtune
