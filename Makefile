# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install what they need. torch/torchvision are pinned here (the versions this
# machine serves from disk); pyproject.toml declares ranges so other torch builds work too.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-quick test-mobile lint install browser

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed browser

# The serve page's test drives a real headless Chromium (tests/test_serve_page.py): Debian's chromium and
# chromium-driver, installed with apt-get when missing (as root, or through sudo). Without them the test
# skips, saying so; with CI=true it fails.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null; then \
	  echo "no apt-get here: install chromium and chromedriver for the serve page's browser test"; \
	else \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver \
	    || echo "could not install chromium and chromium-driver: the serve page's browser test will skip (fail in CI)"; \
	fi

demo: $(BIN)/.installed
	$(BIN)/resnetlab train

test: $(BIN)/.installed browser
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q

test-quick: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests

# TFLite needs ~800 MB (JAX) and downgrades pydantic: it gets an environment of its own, installed from the
# versions resolved and tested together (constraints/mobile.txt; unpinned, pip backtracks to a litert-torch
# that swaps torch for an older one).
MOBILE_VENV ?= .venv-mobile
test-mobile:
	test -x $(MOBILE_VENV)/bin/python || $(PYTHON) -m venv $(MOBILE_VENV)
	$(MOBILE_VENV)/bin/pip install -q $(TORCH_PIN)
	$(MOBILE_VENV)/bin/pip install -q -c constraints/mobile.txt -e ".[test,tflite,coreml]"
	RESNETLAB_MOBILE_EXTRAS=1 $(MOBILE_VENV)/bin/python -m pytest -q tests/test_export_mobile.py
