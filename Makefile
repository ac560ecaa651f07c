# Two commands for a newcomer: `make run` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run run-postgres test demo cluster-demo bench bench-smoke clean

# The stamps reinstall only when pyproject.toml changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-postgres: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[postgres]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/vmserver $(ARGS)

# The server on a throwaway PostgreSQL kept in .pgdata/ (needs PostgreSQL's programs: apt-get
# install postgresql); PostgreSQL stops when the server does. ARGS go to the server.
run-postgres: $(VENV)/.installed-postgres
	$(BIN)/python -m vmserver.backends.pg_sandbox run --dir .pgdata -- $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(ARGS)

# Starts a server on a temporary database, runs the fleet demo against it, stops it.
demo: $(VENV)/.installed
	$(BIN)/python -m vmclient demo --spawn-server $(ARGS)

# The fleet demo against several servers (default 2) on one throwaway PostgreSQL in a temporary
# directory, removed after; ARGS go to python -m vmserver.cluster_demo (--servers N --vms K).
# The directory is opened to all so that PostgreSQL, run as postgres when we are root, reaches it.
cluster-demo: $(VENV)/.installed-postgres
	@dir=$$(mktemp -d /tmp/vmserver-cluster-demo.XXXXXX) && trap 'rm -rf "$$dir"' EXIT && chmod 755 "$$dir" && \
	$(BIN)/python -m vmserver.backends.pg_sandbox run --dir "$$dir/pg" \
		--command "$(BIN)/python -m vmserver.cluster_demo" -- $(ARGS)

# The benchmark suite (about 7 minutes; pins servers and load to separate cores). See benchmarks/BENCHMARKS.md.
# Figure 13 runs on a throwaway PostgreSQL: the driver comes with the postgres extra; figure 15 needs aiohttp (http).
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[postgres,http]'
	touch $@ $(VENV)/.installed-postgres $(VENV)/.installed

bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.run $(ARGS)

bench-smoke: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks.run --smoke $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
