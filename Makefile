# jupyter-acp: the two commands a newcomer needs are `make run` and `make test`.
#
#   make run    venv + package + JupyterLab, then start it with the extension and the demo agent
#   make test   venv + test extras + system packages (bubblewrap, a Docker engine when root),
#               ruff and mypy, then the whole suite
#   make bench  the side-by-side benchmarks in bench/
#   make lint   ruff, then mypy (settings in pyproject.toml's [tool.mypy])

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DOCKER_ENV := .docker-env
PYTEST_ARGS ?=
# Test files run in this many processes (pytest-xdist, one file per process at a time: a file's
# module fixtures, e.g. the JupyterHub rig, stay in one process). Most of a test's time is
# agents and servers starting, so two processes on two cores nearly halve the wall time.
PYTEST_WORKERS ?= 2
JUPYTER_ARGS ?=

.PHONY: run test bench lint venv labext sandbox-deps system-deps docker agents hub jstest clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,lab,docker,hub]'
	@rm -f $(VENV)/.installed-* && touch $@

# The built JupyterLab extension, rebuilt when its sources change after the install (the
# editable install builds it only once; a stale build would be what the browser test runs).
LABEXT := jupyter_acp/labextension/package.json
labext: $(LABEXT)

$(LABEXT): $(wildcard labextension/src/*.ts labextension/src/*/*.ts labextension/style/* labextension/schema/*) labextension/package.json | $(STAMP)
	cd labextension && PATH="$(abspath $(BIN)):$$PATH" jlpm install >/dev/null && PATH="$(abspath $(BIN)):$$PATH" jlpm build
	@touch $@

# bubblewrap: the sandbox agents run in where there is no Docker engine (without it, the demo
# agent runs as a plain local process with no terminals). Installed when missing and we are root.
sandbox-deps:
	@if ! command -v bwrap >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "bubblewrap is missing (apt-get install bubblewrap); agents run unsandboxed and its tests are skipped"; fi; \
	fi

# System packages the tests need. Installed when missing and we are root (CI, fresh machines);
# otherwise the sandbox tests say what is missing (and fail in CI, see .ci/run).
system-deps: sandbox-deps
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (for tests/test_browser.py)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing (apt-get install chromium); the browser test will be skipped"; fi; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing postgresql (for tests/test_ledger_faults.py: the ledger on a real server)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "postgresql is missing (apt-get install postgresql); its ledger test will be skipped"; fi; \
	fi

# A Docker engine and the locally built sandbox image (no registry is ever contacted).
# scripts/docker-engine prints the DOCKER_HOST to use as its last line.
docker:
	@rm -f $(DOCKER_ENV)
	@if [ -x scripts/docker-engine ]; then \
	  if host=$$(scripts/docker-engine | tail -n 1) && [ -n "$$host" ]; then \
	    echo "export $$host" > $(DOCKER_ENV); . ./$(DOCKER_ENV); \
	    scripts/sandbox-image || { echo "could not build the sandbox image"; rm -f $(DOCKER_ENV); }; \
	  else echo "no Docker engine here; the docker tests will be skipped"; fi; \
	fi

# Real ACP agents (Qwen Code, Gemini CLI, Claude Code, Codex) at pinned npm versions in .cache/agents (idempotent),
# for tests/test_real_agents.py; without npm those tests are skipped (and fail in CI).
agents:
	@scripts/agents >/dev/null || echo "could not install the real agents; their tests will be skipped"

# configurable-http-proxy at a pinned npm version in .cache/chp (idempotent), the proxy of the real
# JupyterHub in tests/test_hub_e2e.py; without npm those tests are skipped (and fail in CI).
hub:
	@scripts/hub-deps >/dev/null || echo "could not install configurable-http-proxy; the JupyterHub tests will be skipped"

# The JupyterLab extension's unit tests (vitest; node_modules come from `pip install`'s build).
jstest: venv
	cd labextension && PATH="$(abspath $(BIN)):$$PATH" jlpm install >/dev/null && PATH="$(abspath $(BIN)):$$PATH" jlpm test

lint: venv
	$(BIN)/ruff check jupyter_acp tests bench
	$(BIN)/python -m mypy

test: venv labext system-deps docker agents hub lint jstest
	@if [ -f $(DOCKER_ENV) ]; then . ./$(DOCKER_ENV); fi; \
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: venv labext system-deps docker
	@if [ -f $(DOCKER_ENV) ]; then . ./$(DOCKER_ENV); fi; \
	for b in sandbox_start docker_pool relay fanout scale hub_gateway; do echo "== bench/$$b.py"; \
	  $(BIN)/python bench/$$b.py || exit 1; done
	@echo "== bench/chat_stream.py"; $(BIN)/python bench/chat_stream.py --label current

run: venv labext sandbox-deps
	@echo "Starting JupyterLab with jupyter-acp (open the URL below; the demo agent needs no setup)"
	$(BIN)/jupyter lab $$( [ "$$(id -u)" = 0 ] && echo --allow-root ) $(JUPYTER_ARGS)

clean:
	rm -rf $(VENV) $(DOCKER_ENV) .pytest_cache .ruff_cache .mypy_cache
