# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install what they need. torch/torchvision are pinned here (the versions this
# machine serves from disk); pyproject.toml declares ranges so other torch builds work too.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-quick test-mobile lint install

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/resnetlab train

test: $(BIN)/.installed
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

test-quick: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests

# TFLite needs ~800 MB (JAX) and downgrades pydantic: it gets an environment of its own.
MOBILE_VENV ?= .venv-mobile
test-mobile:
	test -x $(MOBILE_VENV)/bin/python || $(PYTHON) -m venv $(MOBILE_VENV)
	$(MOBILE_VENV)/bin/pip install -q $(TORCH_PIN)
	$(MOBILE_VENV)/bin/pip install -q -e ".[test,tflite,coreml]"
	RESNETLAB_MOBILE_EXTRAS=1 $(MOBILE_VENV)/bin/python -m pytest -q tests/test_export_mobile.py
