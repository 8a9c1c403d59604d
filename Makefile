# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
CODE := connector tests $(wildcard bench)

.PHONY: run test lint format bench screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(STAMP)

settings.toml: | $(STAMP)
	$(BIN)/connector init

run: $(STAMP) settings.toml
	$(BIN)/connector migrate
	$(BIN)/connector serve

test: $(TEST_STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/lint-imports

format: $(TEST_STAMP)
	$(BIN)/ruff format $(CODE)
	$(BIN)/ruff check --fix $(CODE)

screenshots: $(TEST_STAMP)
	CONNECTOR_UPDATE_SCREENSHOTS=1 $(BIN)/pytest tests/web/test_browser.py

bench: $(TEST_STAMP)
	$(BIN)/python -m bench.outbound

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
