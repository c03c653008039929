# ckptmap developer entry point. `make help` lists the targets.
# VENV: where the virtual environment lives (CI points it at a cache outside the clone).
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= dev-opt
# The other CPythons the torch-free tests (tests/core/) run under, against the abi3 wheel;
# their small venvs (pytest and hypothesis only) live in PYVENVS/<version>.
PYTHONS ?= 3.10 3.12 3.13
PYVENVS ?= .venv-pythons
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
SHELL := bash
# Each stage prints one line; a tool's own output appears only when it fails.
stage = @printf '==> %s\n'
quiet = out=$$($(1) 2>&1) || { printf '%s\n' "$$out"; exit 1; }

.PHONY: help venv build wheel test test-rust test-py test-pythons lint fmt bench demo fuzz

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# Installs what pyproject.toml asks for when that list changed since the last install (by
# content, not by date: a fresh clone reusing a venv installs nothing).
venv:  ## create the virtual environment with every dependency
	@if [ ! -x $(PY) ]; then \
	  printf '==> venv: %s (%s)\n' "$(VENV)" "$$(python3 -V)"; \
	  python3 -m venv $(VENV); \
	fi
	@$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  o = p['optional-dependencies']; \
	  print('\n'.join(p['dependencies'] + o['s3'] + o['test'][1:] + o['bench'] + ['maturin>=1.8,<2', 'ruff>=0.8', 'mypy>=1.10']))" \
	  > $(VENV)/requirements.new
	@if ! cmp -s $(VENV)/requirements.new $(VENV)/requirements.txt; then \
	  printf '==> %s\n' "dependencies: torch and the rest, from pyproject.toml (the first time takes minutes)"; \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(PY) tools/pip_install.py -r $(VENV)/requirements.new && \
	  mv $(VENV)/requirements.new $(VENV)/requirements.txt && \
	  rm -f $(VENV)/lib/python3*/site-packages/ckptmap.pth; \
	fi

# `maturin develop` installs the package in editable mode (and pip-installs its dependencies,
# which the venv stage already did): once per venv and checkout. Later builds only rebuild the
# extension in place (--skip-install). A stale extension of another ABI would shadow it.
build: venv  ## build the Rust extension into the venv (PROFILE=release for benchmarks)
	$(stage) "build: the Rust extension ($(PROFILE) profile)"
	@rm -f python/ckptmap/_core.cpython-*.so
	@if grep -qsx '$(CURDIR)/python' $(VENV)/lib/python3*/site-packages/ckptmap.pth; then \
	  $(call quiet,maturin develop --skip-install --profile $(PROFILE)); \
	else \
	  $(call quiet,env PIP_QUIET=1 maturin develop --profile $(PROFILE)); \
	fi

wheel: venv  ## the release wheel into dist/: one abi3 wheel for CPython 3.10 and later
	$(stage) "wheel: release build (abi3, CPython >= 3.10)"
	@rm -f dist/ckptmap-*.whl
	@$(call quiet,maturin build --release --out dist)
	@ls dist/ckptmap-*.whl

test: build test-rust test-py  ## the whole test suite: Rust unit tests, then pytest

test-rust:  ## Rust unit tests and proptests (no Python needed)
	$(stage) "Rust tests"
	cargo test -q

test-py: build  ## pytest + hypothesis
	$(stage) "Python tests"
	$(PY) -m pytest -q

# pytest and hypothesis, at the versions pyproject.toml asks for.
$(PYVENVS)/requirements.txt: pyproject.toml | venv
	@mkdir -p $(PYVENVS)
	@$(PY) -c "import tomllib; t = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	  print('\n'.join(r for r in t['optional-dependencies']['test'] \
	                  if r.split('>')[0].split('<')[0] in ('pytest', 'hypothesis')))" > $@

test-pythons: wheel $(PYVENVS)/requirements.txt  ## the torch-free tests (tests/core/) under each of PYTHONS, against the wheel
	@for v in $(PYTHONS); do \
	  tools/test_core_python.sh $$v $(PYVENVS)/$$v "$$(ls dist/ckptmap-*.whl)" $(PYVENVS)/requirements.txt || exit 1; \
	done

lint: venv  ## ruff, rustfmt and clippy
	$(stage) "lint: ruff, stubtest, rustfmt, clippy"
	$(VENV)/bin/ruff check python tests benches tools
	$(VENV)/bin/ruff format --check python tests benches tools
	$(PY) -m mypy.stubtest ckptmap._core
	cargo fmt --check
	cargo clippy -q --all-targets -- -D warnings
	cargo clippy -q --all-targets --features python -- -D warnings

fmt:  ## format Rust and Python
	cargo fmt
	$(VENV)/bin/ruff format python tests benches tools

demo:  ## the main job on its built-in default
	@$(MAKE) -s build
	$(stage) "demo"
	@$(VENV)/bin/ckptmap demo

fuzz:  ## a bounded (60 s) libFuzzer run of the safetensors header parser (nightly + cargo-fuzz)
	cd fuzz && mkdir -p target/corpus && cargo +nightly fuzz run header target/corpus corpus/header -- -max_total_time=60 -max_len=4096

# BENCH_ARGS: more benches/report.py arguments, e.g. --small (reduced sizes, a smoke run).
BENCH_ARGS ?=
bench:  ## every benchmark side by side, one run (release build): results, report, README tables
	@$(MAKE) -s build PROFILE=release
	$(PY) benches/report.py --readme $(BENCH_ARGS)
