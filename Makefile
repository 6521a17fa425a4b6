# Two entry points from a fresh clone (see README "Quick start"):
#   make run   - set up, then start inference + router on the embedded default model
#   make test  - set up, then run the trial suite, ruff, mypy and the wheel check
#   make dist  - build the release wheel into dist/ (what docs/deployment.md installs)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test trial lint type wheel-check system-deps dist clean

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

# The release wheel, dist/llmrouter-VERSION-py3-none-any.whl, from a throwaway virtualenv so that
# a fresh server needs only python3.11-venv (Debian's python3.11 has no pip of its own).
dist:
	rm -rf dist
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(PYTHON) -m venv "$$tmp/env" && "$$tmp/env/bin/pip" wheel -q --no-deps -w dist .
	@ls dist/llmrouter-*.whl

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp
