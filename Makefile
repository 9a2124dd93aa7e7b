# Two entry points: `make demo` (the main job on the built-in models) and `make test`.
# Each creates .venv on first use. torch goes in first: `torch==2.13.0` takes the CPU
# build on disk; letting pip resolve it through another package pulls GBs of CUDA wheels.
VENV ?= .venv
BIN := $(VENV)/bin
PROMPTS ?= benchmarks/prompts/spec_bench_20.jsonl

$(BIN)/.installed: pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[builtins,test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/specray generate --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --chat \
		--prompt "Write a Python function that checks whether a number is prime." --max-new-tokens 96
	$(BIN)/specray bench --target qwen2.5-coder-1.5b --draft qwen2.5-coder-0.5b --chat \
		--prompts $(PROMPTS) --limit 3 --max-new-tokens 64 --out bench-out/demo

# Two workers (pytest-xdist): the tests are mostly single-threaded and the machines have 2
# cores. Grouping and order: tests/conftest.py. The slowest tests are listed at the end.
WORKERS ?= 2
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# Style (ruff) and architecture (import-linter: layers top to bottom, no import cycles),
# both configured in pyproject.toml. CI runs it before the tests.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

.PHONY: install demo test lint
