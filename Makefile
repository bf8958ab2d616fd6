# Two commands on a fresh machine: `make demo` (the main job on the embedded synthetic benchmark) and
# `make test`. Each creates .venv and installs what it needs. torch is pinned first: a looser requirement
# would pull the CUDA build (gigabytes) where only the CPU one is wanted.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test test-fast lint install browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_PIN)
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Debian's chromium + chromedriver for the browser test of `dedn app`; tests/test_app.py skips with a
# reason where they are absent (e.g. not root, no apt).
browser:
	@if [ ! -x /usr/bin/chromedriver ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
			|| echo "warning: could not install chromium; the browser test will be skipped"; \
	fi

demo: $(VENV)/.installed
	$(VENV)/bin/dedn demo

test: $(VENV)/.installed browser
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
