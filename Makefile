# ckptmap developer entry point. `make help` lists the targets.
# VENV: where the virtual environment lives (CI points it at a cache outside the clone).
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= dev-opt
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help venv build test test-rust test-py lint fmt bench demo fuzz

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.deps-stamp: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  o = p['optional-dependencies']; \
	  print('\n'.join(p['dependencies'] + o['s3'] + o['test'][1:] + o['bench'] + ['maturin>=1.8,<2', 'ruff>=0.8', 'mypy>=1.10']))" \
	  > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	touch $@

venv: $(VENV)/.deps-stamp  ## create the virtual environment with every dependency

build: venv  ## build the Rust extension into the venv (PROFILE=release for benchmarks)
	$(VENV)/bin/maturin develop -q --profile $(PROFILE)

test: build test-rust test-py  ## the whole test suite: Rust unit tests, then pytest

test-rust:  ## Rust unit tests and proptests (no Python needed)
	cargo test -q

test-py: build  ## pytest + hypothesis
	$(PY) -m pytest -q

lint: venv  ## ruff, rustfmt and clippy
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(PY) -m mypy.stubtest ckptmap._core
	cargo fmt --check
	cargo clippy -q --all-targets -- -D warnings
	cargo clippy -q --all-targets --features python -- -D warnings

fmt:  ## format Rust and Python
	cargo fmt
	$(VENV)/bin/ruff format python tests benches

demo:  ## the main job on its built-in default
	$(MAKE) -s build
	$(VENV)/bin/ckptmap demo

fuzz:  ## a bounded (60 s) libFuzzer run of the safetensors header parser (nightly + cargo-fuzz)
	cd fuzz && mkdir -p target/corpus && cargo +nightly fuzz run header target/corpus corpus/header -- -max_total_time=60 -max_len=4096

bench:  ## benchmarks side by side (release build); writes benches/results/latest.md + ratios.png
	$(MAKE) -s build PROFILE=release
	cargo bench
	$(PY) benches/report.py
