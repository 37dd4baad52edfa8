# keras-seht developer commands. Each target sets up .venv itself.
#
#   make demo    SEHT vs plain Keras on scikit-learn digits (about a minute)
#   make test    ruff and mypy, then the test suite once per Keras backend
#
# Variables: PYTHON (the interpreter that creates .venv), BACKENDS (the
# Keras backends to test, longest first), TEST_JOBS (backends tested at
# once, one core each), PYTEST_ARGS (extra pytest arguments; the default
# leaves out tests marked slow, `make test-all` runs them too).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS ?= jax torch tensorflow
TEST_JOBS ?= 2
PYTEST_ARGS ?= -m "not slow"
DEMO_ARGS ?=

# torch is pinned to the CPU wheel for the dev/CI install (a plain `torch`
# requirement pulls a multi-GB CUDA build); users get the range in
# pyproject.toml. tensorflow-cpu likewise avoids the CUDA extras.
DEV_PINS := torch==2.13.0 tensorflow-cpu>=2.16

.PHONY: venv demo test test-all lint format clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(DEV_PINS)
	$(BIN)/python -m pip install --quiet -e '.[jax,demo,dev]'
	touch $@

demo: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/python -m keras_seht.experiments.demo $(DEMO_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	BIN=$(BIN) BACKENDS="$(BACKENDS)" JOBS=$(TEST_JOBS) \
		bash scripts/test_backends.sh $(PYTEST_ARGS)

test-all:
	$(MAKE) test PYTEST_ARGS=

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache demo_output
