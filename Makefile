# magic — every target runs inside .venv, which `make install` creates from a fresh clone.
# `make demo` and `make test` are each the only command a newcomer needs.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKERS ?= $(shell nproc 2>/dev/null || echo 1)  # retraining processes for the ground truth

.PHONY: help install install-peer demo test test-slow test-slurm test-browser lint bench clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install magic (editable) with its dev tools

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

METHODS := magic grad-dot tracin trak ekfac source
TUNED := trak ekfac tracin source  # the baselines with hyperparameters: tuned on validation ids, never reported

demo: install  ## the whole pipeline on the embedded default (digits MLP): train -> attribute -> ground truth -> tune -> LDS
	$(BIN)/magic train
	$(BIN)/magic retrain-ground-truth --workers $(WORKERS)
	set -e; for m in $(TUNED); do $(BIN)/magic tune --method $$m; done
	set -e; for m in $(METHODS); do $(BIN)/magic attribute --test-ids 0:50 --method $$m; done
	$(BIN)/magic score
	@echo "report: runs/default/report/index.html (and report.md)"

TEST_PROCS ?= 2  # pytest-xdist processes; each test file runs whole in one (its module fixtures built once)

test: install  ## the test suite (fast; what CI runs): about 7 minutes on 2 cores
	$(BIN)/python -m pytest -q -m "not slow and not slurm and not browser" -n $(TEST_PROCS) --dist loadfile

test-slow: install  ## the slow tests only (longer end-to-end checks)
	$(BIN)/python -m pytest -q -m slow

test-slurm: install  ## the SLURM tests, against a single-node cluster started here (needs root and Debian's packages)
	scripts/slurm_local.sh start
	set -e; trap 'scripts/slurm_local.sh stop' EXIT; \
	  SLURM_CONF=$$(scripts/slurm_local.sh env | cut -d= -f2) $(BIN)/python -m pytest -q -m slurm

test-browser: install  ## the report page in headless Chromium (installs Debian's chromium if missing; needs root)
	command -v chromium >/dev/null || { apt-get install -y -q --no-install-recommends chromium >/dev/null || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }
	$(BIN)/python -m pytest -q -m browser

PEER := .venv-peer  # bergson's environment, apart from .venv (its transformers and datasets never reach the tests)

install-peer:  ## .venv-peer: magic and bergson 2.5.1 for scripts/bench_peer.py (bergson's torchaudio pin would replace torch: left out)
	test -d $(PEER) || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install -e '.[hf,files,peer]'
	$(PEER)/bin/python -m pip install --no-deps 'bergson==2.5.1'

lint: install  ## ruff
	$(BIN)/ruff check magic_cli tests scripts

bench: install  ## attribution cost vs training on every offline experiment, ground-truth rate, training overhead
	$(BIN)/python scripts/bench.py

clean:  ## remove runs/ (not .venv)
	rm -rf runs
