"""Build lca._C: the CPython/NumPy binding and the C CPU engine (OpenMP).

Switches (environment):
  LCA_CUDA=auto|1|0   CUDA engine: there are no CUDA sources in this release yet, so 1 only
                      checks that nvcc is present ($CUDA_HOME/bin or PATH); auto and 0 build
                      the CPU engine alone.
  LCA_DEBUG=1         -O0 -g, for gdb.
  LCA_SANITIZE=1      AddressSanitizer + UndefinedBehaviorSanitizer (needs LD_PRELOAD of libasan).
"""
import glob
import os
import shutil

import numpy as np
from setuptools import Extension, setup



def find_nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.access(cand, os.X_OK) else shutil.which("nvcc")


cuda = os.environ.get("LCA_CUDA", "auto").lower()
if cuda not in ("auto", "1", "0"):
    raise SystemExit(f"LCA_CUDA must be auto, 1 or 0, got {cuda!r}")
if cuda == "1" and find_nvcc() is None:
    raise SystemExit("LCA_CUDA=1 but nvcc was found neither in $CUDA_HOME/bin nor on PATH")

cflags = ["-std=gnu11", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers"]
ldflags = ["-fopenmp"]
if os.environ.get("LCA_DEBUG") == "1":
    cflags += ["-O0", "-g"]
else:
    cflags += ["-O3", "-fno-math-errno", "-fno-trapping-math"]
if os.environ.get("LCA_SANITIZE") == "1":
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    cflags += san + ["-O1", "-g"]
    ldflags += san

ext = Extension(
    "lca._C",
    sources=["csrc/module.c"] + sorted(glob.glob("csrc/cpu/*.c")),
    include_dirs=["csrc", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=["csrc/lca.h"] + glob.glob("csrc/cpu/*.h") + glob.glob("csrc/cpu/*.inc"),
)

setup(ext_modules=[ext])
