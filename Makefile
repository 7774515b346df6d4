# The two commands a newcomer needs (each sets up .venv first):
#   make quickstart   train a CNN on the 8x8 digits, wrap it, train RNP
#   make test         the default (fast) test suite
# Slow tests: make test-slow.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-slow lint

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py

# Two worker processes (pytest-xdist): on 2 cores the suite takes about
# half the time of one process, which spends most of it tracing graphs.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
