#!/usr/bin/env bash
# Runs the torch-free tests (tests/core/) under one CPython, against a built wheel:
#   tools/test_core_python.sh VERSION VENV_DIR WHEEL REQUIREMENTS_FILE [PYTEST_ARGS...]
# (PYTEST_ARGS default to tests/core).
# VERSION is "3.10", "3.13", ...; the interpreter is pyenv's newest patch release of it, else
# `pythonVERSION` on PATH. VENV_DIR is created on first use (pytest and hypothesis only, from
# REQUIREMENTS_FILE) and reused; the wheel is reinstalled every time, without dependencies:
# the tests need neither torch nor numpy, and the package imports without them.
set -euo pipefail
version=$1 venv=$2 wheel=$3 requirements=$4
shift 4

find_python() {
    local candidate
    for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".* 2>/dev/null | sort -V -r); do
        if [[ $candidate =~ /$version\.[0-9]+$ && -x $candidate/bin/python$version ]]; then
            echo "$candidate/bin/python$version"
            return
        fi
    done
    if command -v "python$version" >/dev/null && "python$version" -c '' 2>/dev/null; then
        command -v "python$version"
        return
    fi
    echo "error: no CPython $version found (pyenv install $version, or put python$version on PATH)" >&2
    return 1
}

python=$(find_python)
if [[ ! -x $venv/bin/python ]] || ! cmp -s "$requirements" "$venv/requirements.txt"; then
    echo "==> venv for CPython $version: $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -r "$requirements"
    cp "$requirements" "$venv/requirements.txt"
fi
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
echo "==> torch-free tests under $("$venv/bin/python" -c 'import platform; print(platform.python_implementation(), platform.python_version())')"
# pyproject.toml's addopts name pytest-benchmark's flag, and this venv has no pytest-benchmark.
# `import ckptmap` finds the installed wheel: the checkout's package is under python/, never
# on sys.path here.
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts="-ra --strict-markers" \
    "${@:-tests/core}"
