# The two commands of the README. Both create the environment when it is missing (idempotent).
#   make run    set up, fetch the real assets, run the main job
#   make test   set up, lint, type-check and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raymeta-installed

.PHONY: env run test lint bench-env

$(STAMP): pyproject.toml
	@echo "==> environment: $(VENV) (torch==2.13.0 first, pinned; then raymeta and its pinned dependencies)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

env: $(STAMP)

bench-env: $(STAMP)  # the peers bench/speed.py compares against (higher, TorchOpt)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"

EVAL = --setting bb_class_to_class --k 4 --variants direct --modes icl --max-test-examples 10
TRAIN = $(BIN)/raymeta train configs/main.yaml

run: $(STAMP)
	@echo "==> fetching and verifying the real assets (SmolLM2-135M, GPT-2 BPE, BIG-bench; cached after the first run)"
	$(BIN)/raymeta fetch
	@echo "==> MAML-en-LLM meta-training of SmolLM2 on Ray (configs/main.yaml); resumes if interrupted"
	$(TRAIN) $$(test -d runs/main/maml_en_llm/checkpoints && echo --resume)
	@echo "==> MetaICL on the same budget"
	$(TRAIN) method=metaicl out=runs/main/metaicl $$(test -d runs/main/metaicl/checkpoints && echo --resume)
	@echo "==> evaluating the raw model and both meta-trained models (k=4, 5 seeds, 10 test examples per task)"
	$(BIN)/raymeta eval --model builtin $(EVAL) --out runs/main/eval-raw
	$(BIN)/raymeta eval --model runs/main/maml_en_llm/checkpoints/step-000015 $(EVAL) --out runs/main/eval-maml_en_llm
	$(BIN)/raymeta eval --model runs/main/metaicl/checkpoints/step-000015 $(EVAL) --out runs/main/eval-metaicl
	$(BIN)/raymeta table runs/main/eval-raw runs/main/eval-maml_en_llm runs/main/eval-metaicl
	$(BIN)/raymeta compare runs/main/eval-maml_en_llm runs/main/eval-metaicl

lint: $(STAMP)
	@echo "==> ruff and mypy"
	$(BIN)/ruff check raymeta tests bench
	$(BIN)/ruff format --check raymeta tests bench
	$(BIN)/mypy raymeta

test: lint
	@echo "==> tests (the first run also fetches the real assets into ~/.cache/raymeta, about 2 minutes)"
	$(BIN)/python -m pytest -q
