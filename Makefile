# The two commands of the README. Both create the environment when it is missing (idempotent).
#   make run    set up, fetch the real assets, run the main job
#   make test   set up, lint, type-check and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raymeta-installed

.PHONY: env run test lint

$(STAMP): pyproject.toml
	@echo "==> environment: $(VENV) (torch==2.13.0 first, pinned; then raymeta and its pinned dependencies)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

env: $(STAMP)

run: $(STAMP)
	@echo "==> fetching and verifying the real assets (SmolLM2-135M, GPT-2 BPE, BIG-bench; cached after the first run)"
	$(BIN)/raymeta fetch
	@echo "==> main job: MetaICL evaluation of raw SmolLM2-135M on the built-in setting bb_class_to_class"
	$(BIN)/raymeta eval --setting bb_class_to_class --max-test-examples 10 --truncation shared --out runs/main

lint: $(STAMP)
	@echo "==> ruff and mypy"
	$(BIN)/ruff check raymeta tests bench
	$(BIN)/ruff format --check raymeta tests bench
	$(BIN)/mypy raymeta

test: lint
	@echo "==> tests (the first run also fetches the real assets into ~/.cache/raymeta, about 2 minutes)"
	$(BIN)/python -m pytest -q
