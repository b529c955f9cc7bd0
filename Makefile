# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-fast coverage lint install data browser curl clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU wheel before anything else, so no CUDA build is ever pulled in.
$(VENV)/.installed: pyproject.toml setup.py src/vitkit/data/_jpeg.c | $(BIN)/activate
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST from Debian's package (the only source reachable here).
data:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null || \
	    $$SUDO sh -c 'apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null'; }

# Debian's Chromium, for the end-to-end test of the web page (the test tools' own browser
# downloads cannot be used here).
browser:
	@command -v chromium >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q chromium >/dev/null || \
	    $$SUDO sh -c 'apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null'; }

demo: install data
	$(BIN)/python -m vitkit.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# curl, which fetches shards from http(s) addresses (webdataset's gopen runs it).
curl:
	@command -v curl >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q curl >/dev/null || \
	    $$SUDO sh -c 'apt-get update -q >/dev/null && apt-get install -y -q curl >/dev/null'; }

# Everything: lint, the layers of ARCHITECTURE.md, and every test (training, browsers, real data).
test: install data browser curl
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest -n 2

# The quick specification: every module and subcommand touched, in under a minute.
test-fast: install
	$(BIN)/pytest -n 2 -m "not slow" -q

# What the fast subset touches, module by module (htmlcov/index.html).
coverage: install
	$(BIN)/pytest -n 2 -m "not slow" -q --cov=vitkit --cov-report=term --cov-report=html

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache .import_linter_cache htmlcov .coverage
