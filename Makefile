# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Quieter third-party start-up.
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: env demo test test-fast lint bench clean

env: $(STAMP)

# The environment is created once and reused; it is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	# --no-compile: modules are byte-compiled when first imported instead of all at install (measured here: env
	# 3m08s -> 1m51s; the imports the tests need compile in ~30 s of that).
	$(BIN)/python -m pip install -q --no-compile -e ".[dev,dask]"
	# img2dataset pulls the py3.6 `dataclasses` backport, which breaks Prefect's API server
	# (environment.md); it must not stay installed.
	$(BIN)/python -m pip uninstall -q -y dataclasses
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lvd run configs/demo.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
