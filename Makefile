# The two commands of the README: `make demo` runs the main job, `make test` runs every test.
PY ?= python3

.PHONY: setup demo test lint bench bench-peers bench-mirror

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m scripts.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest

bench: setup
	$(PY) -m tests.bench.bench_build

bench-peers: setup
	$(PY) -m tests.bench.bench_peers

bench-mirror: setup
	$(PY) -m tests.bench.bench_mirror
