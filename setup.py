"""Build script for minillm.

The pure-Python package always installs. Two compiled extensions are built when possible:

* ``minillm._C``: the C++ CPU twin of the NF4 kernels (``csrc/nf4_cpu.cpp`` + ``csrc/bindings.cpp``),
  pybind11, ``-O3``, OpenMP (``-fopenmp``; built without it if the compiler refuses).
* ``minillm._fused``: the C++ twins of the non-GEMM training ops (GELU, LayerNorm, softmax,
  attention's softmax, cross-entropy, AdamW; ``csrc/fused_cpu.cpp`` + ``csrc/fused_bindings.cpp``),
  same flags but ``-ffp-contract=off`` (the AdamW update is bit-identical to NumPy's) and
  ``-fno-trapping-math -fno-math-errno`` (no value changes; the loops vectorise).
* ``minillm._cuda``: the CUDA kernels (``csrc/nf4_cuda.cu``, compiled by nvcc into an object) linked
  with the pybind11 binding ``csrc/cuda_bindings.cpp`` (compiled by the host compiler, so nvcc never
  sees pybind11) and the STATIC CUDA runtime, so the module imports on machines without the toolkit
  (and without a driver: calling a kernel there raises RuntimeError). Built when a CUDA toolkit is
  found: ``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda``, then ``nvcc`` on ``PATH``. Targets
  sm_80 and sm_90 machine code plus compute_90 PTX (the tensor-core GEMM needs sm_80+).

Environment
    MINILLM_NO_CUDA=1             skip the CUDA extension.
    MINILLM_NO_EXTENSIONS=1       skip both extensions (pure-Python install).
    MINILLM_REQUIRE_EXTENSIONS=1  a failed C++ or CUDA build fails the install (CI) instead of
                                  printing a warning and installing without it.
    MINILLM_NVCC_THREADS=N        nvcc --threads (parallel compilation of the targets; default 2).

Editable installs (``pip install -e .``, PEP 660) build in place: the ``.so`` files land in
``minillm/`` next to ``__init__.py``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False", "no")


REQUIRE = _flag("MINILLM_REQUIRE_EXTENSIONS")


def _warn(msg: str) -> None:
    print(f"\n*** minillm setup.py: WARNING: {msg}\n", file=sys.stderr, flush=True)


def find_cuda_home():
    """The CUDA toolkit root holding bin/nvcc, or None: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _cudart_static(cuda_home: str):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux", "lib")):
        path = os.path.join(cuda_home, sub, "libcudart_static.a")
        if os.path.isfile(path):
            return path
    return None


class BuildExt(build_ext):
    """build_ext that compiles the .cu with nvcc first, adds OpenMP where it works, and turns a
    failed optional build into a warning (unless MINILLM_REQUIRE_EXTENSIONS=1)."""

    def run(self):
        self._failed = set()  # names of optional extensions whose build failed
        # An editable install builds in place, so `import minillm._C` finds the .so next to the sources.
        if getattr(self, "editable_mode", False):
            self.inplace = True
        super().run()

    def _without_failed(self, method, *args):
        keep = self.extensions
        self.extensions = [e for e in keep if e.name not in getattr(self, "_failed", ())]
        try:
            return method(*args)
        finally:
            self.extensions = keep

    # setuptools copies (in place / editable) and lists (wheel contents) every extension's output;
    # skip the ones that failed so the pure-Python package still installs.
    def copy_extensions_to_source(self):
        return self._without_failed(super().copy_extensions_to_source)

    def get_outputs(self):
        return self._without_failed(super().get_outputs)

    def get_output_mapping(self):
        return self._without_failed(super().get_output_mapping)

    def build_extension(self, ext):
        t0 = time.time()
        try:
            if ext.name == "minillm._cuda":
                self._compile_cuda(ext)
                super().build_extension(ext)
            else:
                self._build_with_openmp(ext)
        except Exception as e:  # compiler missing, compile error, link error
            if REQUIRE:
                raise RuntimeError(f"building {ext.name} failed and MINILLM_REQUIRE_EXTENSIONS=1: {e}") from e
            _warn(f"building {ext.name} failed ({type(e).__name__}: {e}); installing without it "
                  "(minillm.kernels falls back to the NumPy reference).")
            self._failed.add(ext.name)
            return
        print(f"minillm setup.py: {ext.name} ready ({time.time() - t0:.1f} s)", flush=True)

    def _build_with_openmp(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            if "-fopenmp" not in ext.extra_compile_args:
                raise
            _warn(f"building {ext.name} with OpenMP failed ({e}); retrying single-threaded")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
            super().build_extension(ext)

    def _compile_cuda(self, ext):
        cuda_home = ext.cuda_home
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        os.makedirs(self.build_temp, exist_ok=True)
        obj = os.path.abspath(os.path.join(self.build_temp, "nf4_cuda.o"))
        src = os.path.join(CSRC, "nf4_cuda.cu")
        ext.extra_objects = [obj, ext.cudart]
        deps = [src, os.path.join(CSRC, "nf4.h")]
        if os.path.exists(obj) and all(os.path.getmtime(obj) >= os.path.getmtime(d) for d in deps):
            return  # object up to date
        threads = os.environ.get("MINILLM_NVCC_THREADS", "2")
        cmd = [
            nvcc, "-c", src, "-o", obj,
            "-O3", "-std=c++17", f"-I{CSRC}", "--threads", threads,
            "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            "-gencode", "arch=compute_80,code=sm_80",
            "-gencode", "arch=compute_90,code=sm_90",
            "-gencode", "arch=compute_90,code=compute_90",
        ]
        print("minillm setup.py:", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"minillm setup.py: nvcc took {time.time() - t0:.1f} s", flush=True)


def extensions():
    if _flag("MINILLM_NO_EXTENSIONS"):
        return []
    try:
        import pybind11
    except ImportError:
        if REQUIRE:
            raise
        _warn("pybind11 is not installed; skipping the C++/CUDA extensions.")
        return []
    include = [pybind11.get_include(), CSRC]
    cxx_args = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-ffp-contract=fast", "-fopenmp"]
    exts = [
        Extension(
            "minillm._C",
            sources=[os.path.join(CSRC, "bindings.cpp"), os.path.join(CSRC, "nf4_cpu.cpp")],
            include_dirs=include,
            depends=[os.path.join(CSRC, "nf4.h")],
            extra_compile_args=list(cxx_args),
            extra_link_args=["-fopenmp"],
            language="c++",
        ),
        Extension(
            "minillm._fused",
            sources=[os.path.join(CSRC, "fused_bindings.cpp"), os.path.join(CSRC, "fused_cpu.cpp")],
            include_dirs=include,
            depends=[os.path.join(CSRC, "fused_cpu.h")],
            # No FMA contraction (AdamW stays bit-identical); no trapping math / errno, which change no
            # value but let g++ if-convert the clamps in exp and vectorise sqrt (measured: 4-10x).
            extra_compile_args=[a if a != "-ffp-contract=fast" else "-ffp-contract=off" for a in cxx_args]
            + ["-fno-trapping-math", "-fno-math-errno"],
            extra_link_args=["-fopenmp"],
            language="c++",
        ),
    ]
    if _flag("MINILLM_NO_CUDA"):
        return exts
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("minillm setup.py: no CUDA toolkit found; building the CPU extension only.", flush=True)
        return exts
    cudart = _cudart_static(cuda_home)
    if cudart is None:
        msg = f"CUDA toolkit at {cuda_home} has no libcudart_static.a; skipping minillm._cuda."
        if REQUIRE:
            raise RuntimeError(msg)
        _warn(msg)
        return exts
    ext = Extension(
        "minillm._cuda",
        sources=[os.path.join(CSRC, "cuda_bindings.cpp")],
        include_dirs=include,
        depends=[os.path.join(CSRC, "nf4.h"), os.path.join(CSRC, "nf4_cuda.cu")],
        extra_compile_args=["-O2", "-g0", "-std=c++17", "-fvisibility=hidden"],
        extra_link_args=["-lpthread", "-ldl", "-lrt"],
        language="c++",
    )
    ext.cuda_home, ext.cudart = cuda_home, cudart
    exts.append(ext)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
