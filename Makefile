# The README's two commands: `make run` (set up, fetch the default model, serve the app) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup system-deps lock clean

# The quantized-weights op is compiled for this machine (cached by source hash; without a compiler it says so and
# GGUF models run with float32 weights).
setup: $(STAMP)
	$(BIN)/python -m tpa_core.quant.build

# torch is installed first, on its own, so that pip takes the pinned build and no other package pulls a different one.
# Everything else installs at the exact versions of requirements.lock, the set the suite last passed with.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev,postgres]'
	touch $@

# Regenerate requirements.lock from the newest versions that resolve: a fresh environment, the whole suite in it,
# and only when it passes the new lock replaces the old one. Then run `make test` and commit the lock.
LOCK_VENV := .lock-venv
lock: system-deps
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[dev,postgres]'
	$(LOCK_VENV)/bin/python -m pytest -q -p no:cacheprovider
	$(LOCK_VENV)/bin/python .ci/write_lock.py > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf $(LOCK_VENV)

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
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache
