# memberguard: `make demo` runs the main job on the embedded `local` backend, `make test` runs every check.
# Both bootstrap their own virtual environment in .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LAB ?= /tmp/memberguard-demo

.PHONY: venv system go microcluster protos demo test-fast test crash-matrix crash-anywhere bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Real dqlite for the tests, from Debian: libdqlite 1.11.1, its libraft and SQLite to link the Go programs against
# (go-dqlite's bindings include raft.h), and go-dqlite's dqlite-demo (tests/dqlite). Go itself is not Debian's:
# build.sh takes /usr/local/go/bin/go.
system:
	@if ! command -v dqlite-demo >/dev/null || ! command -v pkg-config >/dev/null || ! command -v gcc >/dev/null \
	    || [ ! -f /usr/include/dqlite.h ] || [ ! -f /usr/include/raft.h ] || [ ! -f /usr/include/sqlite3.h ]; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    go-dqlite libdqlite-dev libraft-dev libsqlite3-dev pkg-config gcc; \
	fi

# The Go programs, in module mode with pinned versions (coordinator/lab/go): the dqlite test node and benchmark,
# and microcluster's own example daemon and CLI (build/bin/microd, build/bin/microctl).
go: system
	bash coordinator/lab/go/build.sh

microcluster: system
	bash coordinator/lab/go/build.sh microcluster

protos: venv
	$(BIN)/python protos/generate.py

# The tests that start no process (the pure core, codecs, file readers, the status table): no Go, no lab.
test-fast: venv
	$(BIN)/pytest -q -p no:cacheprovider -m unit

test: venv go
	$(BIN)/pytest -q -p no:cacheprovider

# The crash matrices in full (tests/matrix.py): every step boundary of a join and a removal with every target killed
# there (the coordinator at each moment of a step on the local backend, each of two agents, and on the real engine each
# of five processes), and of a repair; `make test` takes one case per step, the variants taking turns.
# -s prints each case's outcome.
crash-matrix: venv go
	MEMBERGUARD_CRASH_MATRIX=full $(BIN)/pytest -q -s -p no:cacheprovider tests/test_join.py tests/test_operations.py \
		tests/test_crash_matrix_agents.py tests/test_crash_matrix_dqlite.py tests/test_crash_matrix_repair.py

# Random-kill crash tests (tests/test_crash_anywhere.py) at length: 17 trials per backend and kill target, 51 per
# backend (`make test` runs 3, their delays rotating with the date); -s prints each trial's delay and outcome.
crash-anywhere: venv go
	MEMBERGUARD_CRASH_TRIALS=17 $(BIN)/pytest -q -s -p no:cacheprovider tests/test_crash_anywhere.py

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

# The plot's matplotlib is the `bench` extra, which `make venv` leaves out.
bench: venv go
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m coordinator.lab.bench --plot build/bench-check.png
	$(BIN)/python -m coordinator.lab.bench --backend dqlite --sizes 3,5
	$(BIN)/python -m coordinator.lab.bench --dqlite-client --calls 1000
	$(BIN)/python -m coordinator.lab.bench --microcluster --calls 1000 --changes 20
	$(BIN)/python -m coordinator.lab.bench --backend microcluster --sizes 3
	$(BIN)/python -m coordinator.lab.bench --operations --calls 20
	$(BIN)/python -m coordinator.lab.bench --operations --backend dqlite --calls 20

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
