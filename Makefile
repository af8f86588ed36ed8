# The README's two Quickstart commands live here: `make pipeline` and `make test`.
# Each creates the virtual environment first when it is missing or older than pyproject.toml.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mlsd-installed

.PHONY: setup pipeline test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "mlsd-ray needs Python >= 3.10, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $(STAMP)

pipeline: $(STAMP)
	$(BIN)/mlsd pipeline $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check mlsd_ray tests bench

bench: $(STAMP)
	$(BIN)/python bench/data_throughput.py

clean:
	rm -rf mlsd-home .pytest_cache
