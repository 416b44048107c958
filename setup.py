"""Build lca._C: the CPython/NumPy binding and the C CPU engine (OpenMP).

Switches (environment):
  LCA_CUDA=auto|1|0   the CUDA engine (csrc/cuda/*.cu, compiled by nvcc, CUDA runtime linked
                      statically so `import lca` needs no GPU): auto builds it when nvcc is
                      found ($CUDA_HOME/bin or PATH), 1 requires it, 0 skips it.
  LCA_CUDA_ARCHS      nvcc -gencode list, default sm_80 + sm_90 machine code and compute_80 PTX.
                      Files named *_sm90a.cu (Hopper wgmma kernels) are compiled for sm_90a
                      alone, when nvcc knows that target (else left out, with LCA_NO_SM90A
                      defined for the other .cu files).
  LCA_DEBUG=1         -O0 -g, for gdb.
  LCA_SANITIZE=1      AddressSanitizer + UndefinedBehaviorSanitizer (needs LD_PRELOAD of libasan).
  LCA_SANITIZE=fuzz   with CC=clang LDSHARED="clang -shared": libFuzzer coverage counters and
                      undefined behaviour as a trap; loads only once atheris' libFuzzer runs
                      (tests/fuzz/fuzz_lca.py, .ci/fuzz.sh).
"""
import concurrent.futures
import glob
import os
import shutil
import subprocess

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext



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
elif os.environ.get("LCA_SANITIZE") == "fuzz":      # clang: coverage counters, UB traps
    cflags += ["-fsanitize-coverage=inline-8bit-counters,pc-table,trace-cmp,indirect-calls",
               "-fsanitize=undefined", "-fsanitize-trap=undefined",
               "-fno-omit-frame-pointer", "-O1", "-g"]

nvcc = find_nvcc() if cuda != "0" else None
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
sm90a_flags = ["-gencode=arch=compute_90a,code=sm_90a"]


def nvcc_knows_sm90a():
    """sm_90a (wgmma) came with CUDA 12.0."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        major = int(out.split("release ")[1].split(".")[0])
    except (OSError, IndexError, ValueError):
        return False
    return major >= 12


if nvcc and not nvcc_knows_sm90a():
    cuda_sources = [s for s in cuda_sources if not s.endswith("_sm90a.cu")]
    sm90a_flags = None
archs = os.environ.get("LCA_CUDA_ARCHS", "-gencode=arch=compute_80,code=sm_80 "
                       "-gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_80,code=compute_80")


class BuildExt(build_ext):
    """Compiles the .cu files with nvcc (only those newer than their objects) and links them."""

    def build_extensions(self):
        if nvcc and cuda_sources:
            home = os.path.dirname(os.path.dirname(nvcc))
            # the .cu files are independent: compile them side by side
            workers = min(len(cuda_sources), os.cpu_count() or 1)
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                objects = list(pool.map(self.nvcc_compile, cuda_sources))
            for e in self.extensions:
                e.extra_objects += objects
                e.depends += objects     # relink when an object is newer than the module
                e.define_macros.append(("LCA_WITH_CUDA", "1"))
                e.library_dirs.append(os.path.join(home, "lib64"))
                e.libraries += ["cudart_static", "dl", "rt", "pthread", "stdc++"]
        super().build_extensions()

    def nvcc_compile(self, src):
        obj = os.path.join(self.build_temp, "cuda", os.path.basename(src) + ".o")
        deps = [src, "csrc/lca.h", "setup.py"] + glob.glob("csrc/cuda/*.cuh")
        if os.path.exists(obj) and all(os.path.getmtime(obj) >= os.path.getmtime(d) for d in deps):
            return obj
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        if src.endswith("_sm90a.cu"):
            targets = sm90a_flags
        else:
            targets = archs.split() + ([] if sm90a_flags else ["-DLCA_NO_SM90A=1"])
        cmd = [nvcc, "-O3", "-std=c++17", "-Icsrc", "-Xcompiler", "-fPIC", "-Xptxas",
               "-warn-spills", *targets, "-c", src, "-o", obj]
        print(" ".join(cmd))
        subprocess.check_call(cmd)
        return obj


ext = Extension(
    "lca._C",
    sources=["csrc/module.c"] + sorted(glob.glob("csrc/cpu/*.c")),
    include_dirs=["csrc", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
    depends=["csrc/lca.h"] + glob.glob("csrc/cpu/*.h") + glob.glob("csrc/cpu/*.inc"),
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
