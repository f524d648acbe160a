# memberguard: `make demo` runs the main job on the embedded `local` backend, `make test` runs every check.
# Both bootstrap their own virtual environment in .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LAB ?= /tmp/memberguard-demo

.PHONY: venv system go protos demo test crash-matrix bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Real dqlite for the tests: Debian's go-dqlite, and Go with go-dqlite's sources to build the test node.
system:
	@if ! command -v dqlite-demo >/dev/null || ! command -v go >/dev/null \
	    || [ ! -d /usr/share/gocode/src/github.com/canonical/go-dqlite ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    go-dqlite golang-go golang-github-canonical-go-dqlite-dev libsqlite3-dev libdqlite-dev pkg-config gcc; \
	fi

go: system
	bash coordinator/dqlite/build-go.sh

protos: venv
	$(BIN)/python protos/generate.py

test: venv go
	$(BIN)/pytest -q -p no:cacheprovider

# The real engine's crash matrix in full: every step boundary of a join and a removal, with each of five targets
# killed there (`make test` runs each boundary once, its target rotating); -s prints each case's outcome.
crash-matrix: venv go
	MEMBERGUARD_CRASH_MATRIX=full $(BIN)/pytest -q -s -p no:cacheprovider tests/test_crash_matrix_dqlite.py

demo: venv
	@set -e; \
	rm -rf $(LAB); \
	trap '$(BIN)/memberguard lab down --dir $(LAB) >/dev/null 2>&1 || true' EXIT; \
	echo "== bring a 3-node lab up (coordinator + 3 agents, mutual TLS)"; \
	$(BIN)/memberguard lab up --dir $(LAB) --nodes 3; \
	echo; echo "== check: every source on every node agrees"; \
	$(BIN)/memberguard check --lab $(LAB); \
	echo; echo "== make a divergence: delete n3's truststore record on n2 (scenario S9)"; \
	rm $(LAB)/nodes/n2/truststore/n3.yaml; \
	echo; echo "== check again (exit status 1: a blocking discrepancy)"; \
	$(BIN)/memberguard check --lab $(LAB) || echo "(check exited with $$?)"; \
	echo; echo "== bring the lab down"; \
	$(BIN)/memberguard lab down --dir $(LAB)

bench: venv go
	$(BIN)/python -m coordinator.bench
	$(BIN)/python -m coordinator.bench --backend dqlite --sizes 3,5
	$(BIN)/python -m coordinator.bench --dqlite-client --calls 1000
	$(BIN)/python -m coordinator.bench --operations --calls 20
	$(BIN)/python -m coordinator.bench --operations --backend dqlite --calls 20

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
