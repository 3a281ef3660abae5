# The two commands of the README: `make demo` runs the main job, `make test` runs every test.
PY ?= python3

.PHONY: setup demo test lint bench bench-peers bench-mirror dist

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

# dist/wheelhouse (our wheel and every dependency's) and dist/sociable-<version>-<arch>.tar.gz
# (the wheelhouse, the units, the docs and install.sh): docs/install.md
dist: setup
	rm -rf dist/wheelhouse
	$(PY) -m pip wheel --quiet --disable-pip-version-check --wheel-dir dist/wheelhouse .
	$(PY) -m snapshotter.install.bundle --wheelhouse dist/wheelhouse --out dist
