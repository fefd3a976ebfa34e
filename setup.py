"""Build sft_kernels._C with torch.utils.cpp_extension against the installed torch.

CPU sources are always built.  CUDA sources (csrc/cuda/*.cu plus their torch
glue csrc/cuda/*.cpp) are built only when torch was built with CUDA *and* nvcc
is found; one line says which was built.  They are built for
``TORCH_CUDA_ARCH_LIST`` if set, else ``8.0;9.0`` (sm_80 and sm_90).  ``SFT_NATIVE=1`` adds
``-march=native``; the default ISA is the compiler's portable baseline (hot
loops use target_clones for AVX2/AVX-512 where the compiler supports it).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

#: The torch releases the extension is built and tested against (pyproject.toml's dependency).
MIN_TORCH = (2, 13)

_INSTALL_HINT = (
    "install torch first, then build this package without build isolation, so that the extension is\n"
    "compiled against the torch it will run with:\n"
    "    pip install torch==2.13.0 'setuptools>=64' wheel ninja\n"
    "    pip install --no-build-isolation .\n"
    "(on Linux, torch from PyPI is the CUDA build, several GB; the CPU build:\n"
    "    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)\n"
    "`make install` does all of this."
)

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:
    # The usual cause is plain `pip install .`: pip builds in an isolated environment holding only
    # pyproject.toml's build requirements, which leave torch out on purpose (see there), so the
    # build would otherwise die on a bare "No module named 'torch'".
    raise SystemExit(
        f"sft_kernels: cannot build the C++ extension: torch is not importable by {sys.executable} "
        f"({exc}).\nIf torch is installed, this is an isolated build: add --no-build-isolation. Otherwise "
        + _INSTALL_HINT
    ) from None

# After torch: without torch there is nothing to build, whatever else is missing.
from setuptools import setup  # noqa: E402

if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < MIN_TORCH:
    # A warning, not an error: `make gpu-check` builds (with --no-deps) against the GPU machine's older
    # torch on purpose, to find out whether the CUDA path works there.
    print(f"sft_kernels: warning: torch {torch.__version__} is older than {MIN_TORCH[0]}.{MIN_TORCH[1]}, the "
          "release the extension is built and tested against", file=sys.stderr)

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_available() -> bool:
    if os.environ.get("SFT_NO_CUDA") == "1":
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return bool(torch.version.cuda) and CUDA_HOME is not None and bool(nvcc)


def _extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DPy_LIMITED_API=0x03090000"]
    if os.environ.get("SFT_NATIVE") == "1":
        cxx.append("-march=native")
    if os.environ.get("SFT_DEBUG") == "1":
        cxx = [f for f in cxx if f != "-O3"] + ["-O0", "-g"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda = _cuda_available()
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    if cuda and cuda_sources:
        nvcc = ["-O3", "--fmad=false", "-lineinfo"]
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        print(f"sft_kernels: building CPU + CUDA kernels (CUDA {torch.version.cuda}, "
              f"arch {os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
        ext = CUDAExtension(
            "sft_kernels._C",
            sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DSFT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    else:
        why = "no CUDA sources" if cuda else "torch has no CUDA or nvcc is missing"
        print(f"sft_kernels: building CPU kernels only ({why})", file=sys.stderr)
        ext = CppExtension(
            "sft_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return [ext]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
