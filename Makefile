# The README's two commands: `make run` (set up, fetch the default model, serve the app) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup system-deps clean

# The quantized-weights op is compiled for this machine (cached by source hash; without a compiler it says so and
# GGUF models run with float32 weights).
setup: $(STAMP)
	$(BIN)/python -m tpa_core.quant.build

# torch is installed first, on its own, so that pip takes the pinned build and no other package pulls a different one.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Debian packages the tests use: a PostgreSQL server for the store's tests and Chromium for the browser test.
# Installed only where we are root and apt-get exists; the tests that need them skip with a notice otherwise.
system-deps:
	@bash .ci/system-deps.sh

# First run: fetch the default model and index this project's README, docs and source as the demo collection
# `tpa-rag` (later runs find both and start at once). Then serve on http://127.0.0.1:7860.
DEMO_PATHS := README.md docs app tpa_core kernels retrieval

run: setup
	$(BIN)/tpa-rag models fetch
	$(BIN)/tpa-rag serve --demo $(DEMO_PATHS)

test: setup system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
