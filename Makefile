# The README's commands. Everything runs from the project's own virtualenv (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the local CPU wheel; on a CUDA machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= pipeline_config/demo.yaml
STAMP := $(VENV)/.installed

.PHONY: install demo run test test-all lint bench clean-state

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

clean-state:
	rm -rf .squadtune
