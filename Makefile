PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ccfs-installed

.PHONY: install test lint demo bench bench-check clean

install: $(STAMP)

# Re-runs only when the package metadata changes: idempotent on a machine that already has it.
$(STAMP): setup.py pyproject.toml scripts/install_system_deps.sh
	bash scripts/install_system_deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel setuptools
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -c "import ffcv.loader, torch, numba; print('ccfs-fast installed: torch', torch.__version__)"
	touch $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

demo: install
	$(BIN)/ccfs-fast demo $(ARGS)

bench: install
	$(BIN)/ccfs-fast bench loader --json benchmarks/results/loader_throughput.json
	$(BIN)/ccfs-fast bench select --json benchmarks/results/select_kernel.json
	$(BIN)/ccfs-fast bench phase --json benchmarks/results/curriculum_wallclock.json

# the quick form of every CPU benchmark against the committed figures: exit 1 when a ratio fell by > 15%
bench-check: install
	$(BIN)/ccfs-fast bench select --quick --against benchmarks/results/select_kernel.json
	$(BIN)/ccfs-fast bench loader --quick --against benchmarks/results/loader_throughput_quick.json
	$(BIN)/ccfs-fast bench phase --quick --rows cifar10 --repeats 3 --against benchmarks/results/curriculum_wallclock_quick.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
