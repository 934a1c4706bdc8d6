# Two entry points: `make train` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/unet_isbi
CONFIG ?= configs/unet.py

.PHONY: train test lint format clean-venv

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python scripts/train.py --config=$(CONFIG) --workdir=$(WORKDIR)
	$(BIN)/python scripts/evaluate.py --config=$(CONFIG) --workdir=$(WORKDIR) --best

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
