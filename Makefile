# One command to run the pipeline locally, one to run the tests (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test tools

# The SAM CLI pins exact boto3/click versions: it lives in its own tool venv, not in $(VENV).
# tests/test_template.py runs `sam validate --lint` and `sam build` from there (offline).
TOOLS       := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
SAM_CLI     ?= aws-sam-cli==1.170.0

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

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip
	$(TOOLS)/bin/pip install --quiet '$(SAM_CLI)'
	touch $@

# The layering of the packages (import-linter contracts in pyproject.toml) and ruff come first:
# a broken layer fails in seconds, before the suite runs.
test: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	REQUIRE_SAM_CLI=1 $(BIN)/python -m pytest
