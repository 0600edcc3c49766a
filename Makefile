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
	# Byte-compiled on purpose: these machines set PYTHONDONTWRITEBYTECODE=1, so without it every process (each test's
	# subprocess too) compiles what it imports again (measured: CI 15.5 -> 21 min). pip compiles file by file on one
	# core; compileall on every core writes the same .pyc files (pip install 217 s, against 126 s + 62 s on 2 cores).
	# Like pip, it skips what does not compile (torch ships a Python 3.12-only test file), hence `|| true`.
	$(BIN)/python -m pip install -q --no-compile -e ".[dev,dask,ray]"
	# The default face detector is facenet-pytorch's MTCNN (its weights ship inside the MIT wheel; docs/safety.md has
	# the benchmark that chose it). Its metadata pins torch<2.3, a stale pin: its code runs on our torch and numpy
	# (tests/curation/test_faces_default.py), so it is installed without its dependencies.
	$(BIN)/python -m pip install -q --no-compile --no-deps facenet-pytorch==2.6.0
	$(BIN)/python -m compileall -qq -j 0 $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || true
	# img2dataset pulls the py3.6 `dataclasses` backport, which breaks Prefect's API server
	# (environment.md); it must not stay installed.
	$(BIN)/python -m pip uninstall -q -y dataclasses
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lvd run configs/demo.yaml $(ARGS)

# Test modules are spread over TEST_WORKERS processes (pytest-xdist); a module's tests stay in one process, so its
# module-scoped fixtures (e.g. the reference pipeline run of tests/flows/test_pipeline.py) are built once.
TEST_WORKERS ?= 2

# Idle OpenMP threads sleep instead of spinning: with TEST_WORKERS processes on few cores, spinning threads of one
# worker steal the cores of the other (a 50-step training test measured 16 s with PASSIVE, minutes without, on 2 cores).
test: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope $(ARGS)

test-fast: $(STAMP)
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
