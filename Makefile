# One command to run the pipeline locally, one to run the tests (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test

setup: $(STAMP)

# torch is installed first and pinned: the CPU build of 2.13.0 is what this
# project's machines carry; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/dermscore demo

test: $(STAMP)
	$(BIN)/python -m pytest
