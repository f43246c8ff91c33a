# The two quick-start commands:
#   make serve   set up, build the default models, serve them on http://127.0.0.1:8000
#   make test    set up, lint, type-check and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8000
BIN := $(VENV)/bin
# The model-building extra needs torch. 2.13.0 resolves to a CPU wheel on the project's
# build machines; elsewhere point pip at a CPU wheel index to keep the download small.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup prepare serve test lint bench clean

# The build toolchain is pinned (constraints/prepare.txt): what a model build contains
# depends on those versions.
$(VENV)/.installed: pyproject.toml constraints/prepare.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c constraints/prepare.txt -e '.[prepare,dev]'
	touch $@

setup: $(VENV)/.installed

prepare: setup
	$(BIN)/npugate prepare

serve: prepare
	$(BIN)/npugate serve --port $(PORT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest
	$(BIN)/python benchmarks/guardrail.py

bench: prepare
	$(BIN)/python benchmarks/chat_precision.py
	$(BIN)/python benchmarks/chat_stream.py
	$(BIN)/python benchmarks/chat_concurrency.py
	$(BIN)/python benchmarks/limits.py
	$(BIN)/python benchmarks/prompt_cache.py
	$(BIN)/python benchmarks/responses.py
	$(BIN)/python benchmarks/tenants.py
	$(BIN)/python benchmarks/structured.py
	$(BIN)/python benchmarks/tools.py
	$(BIN)/python benchmarks/embeddings.py
	$(BIN)/python benchmarks/batch_invariance.py
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
