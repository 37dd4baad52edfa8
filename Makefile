# keras-seht developer commands. Each target sets up .venv itself.
#
#   make demo    SEHT strength sweep vs plain Keras on scikit-learn digits
#                (38 runs; 16 min measured on one busy shared core)
#   make test    ruff and mypy, the doctests, the docs, the wheel check, then
#                the test suite once per Keras backend
#   make docs    build the documentation site into site/ (mkdocs --strict)
#
# Variables: PYTHON (the interpreter that creates .venv), BACKENDS (the
# Keras backends to test, longest first), TEST_JOBS (backends tested at
# once, one core each), PYTEST_ARGS (extra pytest arguments; the default
# leaves out tests marked slow, `make test-all` runs them too),
# DOCTEST_BACKEND (the one backend the docstring examples run under).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BACKENDS ?= jax torch tensorflow
TEST_JOBS ?= 2
PYTEST_ARGS ?= -m "not slow"
DEMO_ARGS ?=
DOCTEST_BACKEND ?= torch

# torch is pinned to the CPU wheel for the dev/CI install (a plain `torch`
# requirement pulls a multi-GB CUDA build); users get the range in
# pyproject.toml. tensorflow-cpu likewise avoids the CUDA extras. Quoted:
# unquoted, the shell reads `>=2.16` as a redirection to a file `=2.16`.
DEV_PINS := torch==2.13.0 'tensorflow-cpu>=2.16'

.PHONY: venv demo readme test test-all lint doctest docs wheel-check \
	keras-suite format clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(DEV_PINS)
	$(BIN)/python -m pip install --quiet -e '.[jax,demo,dev,docs]'
	touch $@

demo: venv
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/python -m keras_seht.experiments.demo $(DEMO_ARGS)

# README.md's generated blocks (the demo's table between its markers) and
# their images, from the committed files in benchmarks/results/
# (scripts/readme_tables.py; `--check` is what tests/test_readme_tables.py
# runs). The demo's file: OMP_NUM_THREADS=1 KERAS_BACKEND=torch make demo,
# then copy demo_output/results.json to benchmarks/results/demo_torch.json.
readme: venv
	$(BIN)/python scripts/readme_tables.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The examples in the docstrings. They hold on every backend; torch runs
# them fastest.
doctest: venv
	KERAS_BACKEND=$(DOCTEST_BACKEND) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/python -m pytest --doctest-modules keras_seht \
		-p no:cacheprovider -q

# The documentation site, into site/ (`mkdocs serve` serves it live).
# --strict: a warning (a broken link, a docstring griffe cannot parse)
# fails the build.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

# Builds the sdist and the wheel, installs the wheel into a fresh virtual
# environment and trains one SEHT step with it under each backend.
wheel-check: venv
	BIN=$(BIN) BACKENDS="$(BACKENDS)" bash scripts/wheel_check.sh

# Keras' own model_test.py and sequential_test.py (from the installed
# keras) with keras_seht.Model / Sequential swapped in, compared with plain
# Keras: a test that passes only for plain Keras fails (about a minute).
keras-suite: venv
	KERAS_BACKEND=torch OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(BIN)/python scripts/keras_suite.py

test: lint doctest docs wheel-check keras-suite
	BIN=$(BIN) BACKENDS="$(BACKENDS)" JOBS=$(TEST_JOBS) \
		bash scripts/test_backends.sh $(PYTEST_ARGS)

test-all:
	$(MAKE) test PYTEST_ARGS=

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache demo_output site
