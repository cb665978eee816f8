# The README's commands. Everything runs from the project's own virtualenv (.venv).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines take the local CPU wheel; on a CUDA machine: make install TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= pipeline_config/demo.yaml
STAMP := $(VENV)/.installed

.PHONY: install demo memorize run test test-all test-gpu lint bench clean-state up down deploy status

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## demo: the whole pipeline offline on the embedded default (local Prefect + MLflow on SQLite)
demo: $(STAMP)
	$(BIN)/squadtune run --config $(CONFIG) $(ARGS)

## memorize: watch the pipeline learn on a CPU: train and evaluate on 6 questions of one dev-set
## article (ARTICLE=N picks another), EM >= 90 against a baseline near 0, about 2 minutes
ARTICLE ?= 5
memorize: $(STAMP)
	$(BIN)/python -m flows.sample_squad ../shared/data/squad/dev-v1.1.json.gz \
		.squadtune/memorize.json --questions 6 --article $(ARTICLE)
	$(BIN)/squadtune run --config pipeline_config/memorize.yaml $(ARGS)

## run: any config, e.g. make run CONFIG=pipeline_config/gpt2_squad_qlora.yaml ARGS="training.max_steps=100"
run: $(STAMP)
	$(BIN)/squadtune run --config $(CONFIG) $(ARGS)

## test: the default CPU suite, under 5 minutes (tests marked slow or gpu are skipped)
test: $(STAMP)
	$(BIN)/python -m pytest --durations=15

## test-all: what CI runs: the default suite and the flow-level, kill, race and server tests
test-all: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" --durations=25

## test-gpu: the tests that need CUDA (the QLoRA recipe in 4-bit + fp16, bf16); on a GPU machine.
## Without CUDA it fails at once: pytest would skip every GPU test and exit 0, a pass that tested
## nothing.
test-gpu: $(STAMP)
	@$(BIN)/python -c "import sys, torch; torch.cuda.is_available() or sys.exit( \
		'make test-gpu needs a CUDA device: torch.cuda.is_available() is False here')"
	$(BIN)/python -m pytest -m gpu -v

lint: $(STAMP)
	$(BIN)/ruff check .

## up: Prefect server, lean MLflow server and a worker per local pool, on 127.0.0.1 and SQLite.
## For a team (README, Operations): BACKEND=postgres (a cluster in the state dir, or
## DATABASE_URL=postgresql://USER@HOST:PORT with the password in PGPASSWORD),
## ARTIFACTS=s3://BUCKET/PATH, BIND=0.0.0.0 (needs the credentials in the environment)
up: $(STAMP)
	$(BIN)/python deployments/servers.py up $(if $(BACKEND),--backend $(BACKEND)) \
		$(if $(DATABASE_URL),--database-url $(DATABASE_URL)) \
		$(if $(ARTIFACTS),--mlflow-artifacts $(ARTIFACTS)) $(if $(BIND),--host $(BIND))

## deploy: register deployments/prefect.yaml's deployments with the server `make up` started
deploy: $(STAMP) data/heldout.json
	. .squadtune/servers/env && cd $(CURDIR) && \
	$(BIN)/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml

## the retrain preset's fixed held-out questions (40 of dev article 0); its training data is
## whatever lands in data/incoming/
data/heldout.json: | $(STAMP)
	mkdir -p data/incoming
	$(BIN)/python -m flows.sample_squad ../shared/data/squad/dev-v1.1.json.gz $@ \
		--questions 40 --article 0

## down: stop exactly the processes `make up` started (its PostgreSQL too); `make up` again finds
## the same data
down:
	$(BIN)/python deployments/servers.py down

status:
	$(BIN)/python deployments/servers.py status

## gpu-wheels: what bench/gpu_check.sh needs on a bare GPU box (Python 3.12 wheels, the dev set,
## the tokenizer) into the git-ignored .whl/, and the size that travels (README: GPU figures)
.PHONY: gpu-wheels
gpu-wheels: $(STAMP)
	$(BIN)/python bench/gpu_kit.py

## bench: every benchmark, one JSON line each
bench: $(STAMP)
	$(BIN)/python bench/data.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/eval.py

clean-state:
	rm -rf .squadtune
