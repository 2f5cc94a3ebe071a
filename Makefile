# Two entry points (see README): `make run` runs the whole pipeline on the default data,
# `make test` runs the test suite. Both set everything up from a fresh clone.
PYTHON ?= python3
SYSTEM_PYTHON := $(shell command -v $(PYTHON))  # resolved before PATH gains the venv
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc.yaml's commands run `python -m pipeline.<stage>`: the venv's python
export PATH := $(abspath $(BIN)):$(PATH)
# offline: no Prefect telemetry; a cold temporary Prefect server may need more than 20 s to start
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

.PHONY: run test lint setup clean-outputs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)
	@test -d .dvc || $(BIN)/dvc init --quiet
	@$(BIN)/dvc config --local core.analytics false

run: setup
	$(BIN)/pipeline run

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
