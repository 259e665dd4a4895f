# All targets share one virtual environment in .venv; .venv/bin/spendgate is the CLI.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTO_OUT := protos/python
PROTOS := $(wildcard protos/spendgate/v1/*.proto)
NODE_DIR := clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
BUF := $(NODE_DIR)/node_modules/.bin/buf
RELEASED_CONTRACT := protos/released/spendgate-v1.binpb

.PHONY: help venv protos protos-check run test lint bench clean console screenshots dist

help:
	@echo "make run | test | bench | lint | dist | protos | protos-check | clean"

# The installer: uv from PyPI, itself installed by pip; it resolves and installs from the
# same index (PyPI) as pip would, downloading in parallel, and keeps a cache pip does not
# (a second venv on a machine downloads nothing). Our three packages build with the venv's
# own setuptools (no isolated build env each). Unlike pip, uv writes no bytecode unless asked:
# --compile-bytecode does it once here, so no process started later (the tests start hundreds
# of servers and CLIs) compiles grpc, redis and the rest again, which doubled each start's CPU
# where PYTHONDONTWRITEBYTECODE is set. One line per step; a step's full output is shown only
# when it fails.
UV_VERSION := 0.13.9
$(STAMP): pyproject.toml protos/python/pyproject.toml clients/python/pyproject.toml
	@set -e; log=$$(mktemp); trap 'rm -f "$$log"' EXIT; started=$$(date +%s); \
	step() { "$$@" >"$$log" 2>&1 || { cat "$$log" >&2; echo "make venv: failed: $$*" >&2; exit 1; }; }; \
	echo "venv: $(VENV) on $$($(PYTHON) --version)"; \
	step $(PYTHON) -m venv --without-pip $(VENV); \
	echo "venv: installer uv $(UV_VERSION) (pip install uv)"; \
	if $(PYTHON) -m pip --version >/dev/null 2>&1; then \
		step $(PYTHON) -m pip --python $(BIN)/python install --disable-pip-version-check uv==$(UV_VERSION); \
	else \
		step $(BIN)/python -m ensurepip && step $(BIN)/python -m pip install uv==$(UV_VERSION); \
	fi; \
	echo "venv: spendgate, its protos and client (editable) with the dev, bench and SDK extras"; \
	step $(BIN)/uv pip install --python $(BIN)/python pip 'setuptools>=68'; \
	step $(BIN)/uv pip install --python $(BIN)/python --no-build-isolation --compile-bytecode \
		--config-settings editable_mode=compat \
		-e ./protos/python -e './clients/python[anthropic,openai,re2]' -e '.[dev,bench]'; \
	echo "venv: $$(grep -m1 '^Installed' "$$log" || echo 'installed'); ready in $$(( $$(date +%s) - started )) s"
	@touch $(STAMP)

venv: $(STAMP)

# The only way stubs are made. They are committed; protos-check fails when stale.
protos: $(STAMP)
	rm -rf $(PROTO_OUT)/spendgate
	$(BIN)/python -m grpc_tools.protoc -I protos \
		--plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		--python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		--mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) \
		$(PROTOS)
	touch $(PROTO_OUT)/spendgate/v1/py.typed

protos-check: protos
	@git diff --exit-code --stat -- $(PROTO_OUT) || \
		(echo "generated stubs are stale: run 'make protos' and commit" >&2; exit 1)
	@test -z "$$(git status --porcelain -- $(PROTO_OUT))" || \
		(echo "generated stubs are not committed: run 'make protos' and commit" >&2; exit 1)

run: $(STAMP)
	$(BIN)/spendgate serve

# Python suite (real redis-server and servers), then the Node client against a real server.
# Our own (editable) sources are compiled first for the same reason as the venv's packages.
test: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m tests.ensure_redis
	$(BIN)/python -m tests.ensure_chromium
	@$(BIN)/python -m compileall -q server/spendgate_server protos/python/spendgate clients/python/src tests bench
	$(BIN)/pytest
	cd $(NODE_DIR) && npm test

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

console: $(STAMP)
	$(BIN)/spendgate console

# Refresh docs/screenshots from a browser run of the console.
screenshots: $(STAMP)
	SPENDGATE_UPDATE_SCREENSHOTS=1 $(BIN)/pytest tests/console/test_console_browser.py

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(DIST) .pytest_cache .mypy_cache .ruff_cache

# What an application installs (README "Install the client"): the client's and the
# contract's wheels, and the Node client as an npm tarball. Regular (non-editable) builds.
DIST := dist
dist: $(STAMP) $(NODE_STAMP)
	@rm -rf $(DIST) && mkdir -p $(DIST)
	@$(BIN)/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir $(DIST) ./protos/python ./clients/python
	@cd $(NODE_DIR) && npm pack --silent --pack-destination $(abspath $(DIST)) >/dev/null
	@ls -1 $(DIST)

# --- Contract checks and the Node client (clients/node). buf comes from the
# @bufbuild/buf npm package in clients/node: no other install, works offline.

.PHONY: node-deps test-node buf-lint buf-breaking contract-release

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	touch $(NODE_STAMP)

node-deps: $(NODE_STAMP)

# Builds the client from protos/ and runs node --test against a real `spendgate serve`.
test-node: $(STAMP) $(NODE_STAMP)
	cd $(NODE_DIR) && npm test

buf-lint: $(NODE_STAMP)
	$(BUF) lint

# The working protos/ against the last released contract (see protos/released/README.md).
buf-breaking: $(NODE_STAMP)
	$(BUF) breaking --against $(RELEASED_CONTRACT)

# Run at release time only: makes the current protos/ the contract later changes must keep.
contract-release: $(NODE_STAMP) buf-lint
	$(BUF) build --exclude-source-info -o $(RELEASED_CONTRACT)

# --- Fault soak (minutes; not part of make test): several servers on one Redis (AOF
# everysec), concurrent callers, Redis restarted and servers SIGKILLed at random, then
# every session reconciled against Redis. Knobs: SOAK_SECONDS (150), SOAK_SERVERS (3),
# SOAK_CALLERS (24), SOAK_SEED, SOAK_REDIS_CRASH=1 (SIGKILL Redis instead of restarting it).
.PHONY: soak

soak: $(STAMP)
	$(BIN)/python -m tests.ensure_redis
	$(BIN)/python -m tests.soak
