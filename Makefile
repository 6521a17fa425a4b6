# Two entry points from a fresh clone (see README "Quick start"):
#   make run   - set up, then start inference + router on the embedded default model
#   make test  - set up, then run the trial suite, ruff, mypy and the wheel check
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# llama-server built from the llama.cpp vendored in the pinned llama-cpp-python, for the tests that
# run the router against it; cached outside the checkout and built only when missing (~10 min).
LLAMA_CPP_VERSION := $(shell sed -n 's/.*llama-cpp-python==\([0-9.]*\).*/\1/p' setup.cfg)
LLAMA_SERVER_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llmrouter/llama-server-$(LLAMA_CPP_VERSION)
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/llama-server

.PHONY: run test trial lint type wheel-check system-deps llama-server clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -e '.[inference,model,test,dev]' --config-settings editable_mode=compat
	$(BIN)/twistd --help >/dev/null  # build Twisted's plugin cache once
	touch $@

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" etc/dev/stack

# The README's test command: everything CI checks, from a fresh clone.
test: system-deps trial lint type wheel-check

trial: $(STAMP) $(LLAMA_SERVER)
	LLMR_LLAMA_SERVER="$(LLAMA_SERVER)" $(BIN)/trial $(TRIAL_ARGS) tests

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER): | $(STAMP) system-deps
	bench/build-llama-server "$(LLAMA_SERVER_DIR)"

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
