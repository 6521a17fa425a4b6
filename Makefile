# Two entry points from a fresh clone (see README "Quick start"):
#   make run   - set up, then start inference + router on the embedded default model
#   make test  - set up, then run the trial suite, ruff, mypy and the wheel check
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test trial lint type wheel-check fuzz system-deps clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -e '.[inference,model,test,dev]' --config-settings editable_mode=compat
	$(BIN)/twistd --help >/dev/null  # build Twisted's plugin cache once
	touch $@

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" etc/dev/stack

# The README's test command: everything CI checks, from a fresh clone.
test: system-deps trial lint type wheel-check fuzz

trial: $(STAMP)
	$(BIN)/trial $(TRIAL_ARGS) tests

# Coverage-guided fuzzing (atheris) of every parser of peer input, from the seed corpus, about
# a minute in all; any uncaught exception fails (docs/security-testing.md has the long run).
FUZZ_TARGETS := envelope plaintext sse keydoc guardrails
FUZZ_SECONDS ?= 12
fuzz: $(STAMP)
	@for target in $(FUZZ_TARGETS); do \
	  out=$$(mktemp -d); \
	  if ! $(BIN)/python -m tests.fuzz.targets $$target -max_total_time=$(FUZZ_SECONDS) \
	      -artifact_prefix=$$out/ $$out tests/fuzz/corpus/$$target >$$out/log 2>&1; then \
	    tail -n 40 $$out/log; echo "fuzz: $$target FAILED; the input is kept in $$out"; exit 1; \
	  fi; \
	  echo "fuzz: $$target: $$(grep -E '^#[0-9]+[[:space:]]+DONE' $$out/log | tail -n 1)"; \
	  rm -rf $$out; \
	done

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
