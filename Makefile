# One command to run the pipeline locally, one to run the tests (see README).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test tools serve-stack wheels

# The SAM CLI pins exact boto3/click versions: it lives in its own tool venv, not in $(VENV).
# tests/test_template.py runs `sam validate --lint` and `sam build` from there (offline).
TOOLS       := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
SAM_CLI     ?= aws-sam-cli==1.170.0

# The real SageMaker serving stack (infra/serving.py): the inference toolkit and TorchServe
# versions of the container (infra/container.py), in a venv of their own, and Java for TorchServe.
SERVE       := .venv-serve
SERVE_STAMP := $(SERVE)/.installed
# The pinned wheels model.tar.gz vendors (code/lib), fetched once (infra/package.py).
WHEELS_STAMP := build/wheels/.fetched

setup: $(STAMP) $(SERVE_STAMP) $(WHEELS_STAMP)

# torch is installed first and pinned: the CPU build of 2.13.0 is what this
# project's machines carry; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

serve-stack: $(SERVE_STAMP)

# Java (TorchServe is a Java server) from Debian when there is none; then the serve venv, torch first.
$(SERVE_STAMP): infra/container.py
	@command -v java >/dev/null 2>&1 || [ -n "$$JAVA_HOME" ] || { \
	  echo "java not found: installing openjdk-17-jre-headless (TorchServe needs Java 11+)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    openjdk-17-jre-headless; }
	$(PYTHON) -m venv $(SERVE)
	$(SERVE)/bin/pip install --quiet --upgrade pip
	$(SERVE)/bin/pip install --quiet "$$($(PYTHON) -m infra.container --serve-torch)"
	$(SERVE)/bin/pip install --quiet $$($(PYTHON) -m infra.container --serve-requirements)
	touch $@

wheels: $(WHEELS_STAMP)

$(WHEELS_STAMP): infra/container.py $(STAMP)
	$(BIN)/python -m infra.package --fetch-wheels > /dev/null
	touch $@

demo: setup
	$(BIN)/dermscore demo

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip
	$(TOOLS)/bin/pip install --quiet '$(SAM_CLI)'
	touch $@

# The layering of the packages (import-linter contracts in pyproject.toml) and ruff come first:
# a broken layer fails in seconds, before the suite runs.
test: setup $(TOOLS_STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	REQUIRE_SAM_CLI=1 REQUIRE_SERVING=1 $(BIN)/python -m pytest
