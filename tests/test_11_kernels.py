"""Chapter 11: the NF4 dequant-matmul kernels (minillm/kernels.py, csrc/).

One validator for every rung of the ladder: the NumPy reference ``quant.dequantize_4bit`` then
``x @ W.T``.

* C++ twin (runs here): dequantize is bit-identical to the reference; the fused matmul is within
  1e-5 of max|y| of NumPy's float32 BLAS result and within 1e-5 * (|x| @ |W|.T) of a float64 one,
  over odd shapes (numel not a multiple of the blocksize, odd K and N, K not a multiple of the CPU
  tile 256, M = 1, 3, 17), plain and double-quantized absmax, blocksizes 32..4096, NF4 and FP4.
* Packaging (runs here): the extensions were compiled when a compiler/nvcc exists; the package
  imports and falls back to NumPy without them; CUDA entry points raise a clear RuntimeError on a
  machine without a GPU.
* ``cuda`` tests (GPU machines only; .ci/gpu-check): dequant bit-exact (float32, and float16 /
  bfloat16 equal to the reference rounded once); GEMV v1-v3 and GEMM v1-v2 within
  |y - ref| <= (2 u + 1e-5) * (|x| @ |W|.T), u = 2^-11 (float16), 2^-8 (bfloat16), 0 (float32),
  with ref computed in float64 from the 16-bit-rounded x.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:  # hypothesis is a dev extra; the GPU check machine may not have it
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

from minillm import kernels, quant

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_EXT = os.environ.get("MINILLM_REQUIRE_EXTENSIONS") == "1"


@pytest.fixture
def cext():
    """minillm._C, or skip (a failure under MINILLM_REQUIRE_EXTENSIONS=1)."""
    if kernels._C is None:
        if REQUIRE_EXT:
            pytest.fail(f"minillm._C is required but missing: {kernels._C_MISSING}")
        pytest.skip(f"minillm._C not built: {kernels._C_MISSING}")
    return kernels._C


def _weight(rng, N, K, blocksize, nested, quant_type="nf4"):
    W = rng.standard_normal((N, K), dtype=np.float32)
    packed, qs = quant.quantize_4bit(W, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return packed, qs


# (N, K, blocksize, nested): numel N*K is odd or not a multiple of the blocksize in most cases;
# blocks span rows whenever K is not a multiple of the blocksize.
SHAPES = [
    (7, 13, 64, False),  # 91 elements: 2 blocks, odd numel (padding nibble)
    (33, 95, 64, True),  # odd K and N, nested
    (5, 1, 64, False),  # K = 1
    (17, 300, 128, True),  # K > tile boundary 256, not a multiple of 16
    (31, 257, 256, False),  # K = tile + 1
    (3, 4099, 4096, True),  # one block spans rows, partial last block
    (64, 128, 64, True),  # everything aligned
    (129, 511, 32, False),  # odd N > CPU panel, smallest blocksize
    # issue 18 item 13: shapes the GPU kernels' special paths must meet (also run on the GPU below)
    (37, 96, 32, True),  # GEMV v3: partial row group (37 % 4 warps), blocksize 32, K % 32 == 0
    (37, 40, 32, True),  # GEMM vectorised tile load with a partial K tile (40 = 32 + 8), blocksize 32
    (70, 200, 64, False),  # partial N tile and partial K tile (200 % 32 = 8), plain absmax
]


# ------------------------------------------------------------------------------------------------
# the C++ twin vs the NumPy reference
# ------------------------------------------------------------------------------------------------


def test_cpp_code_table_is_the_reference_table(cext):
    assert cext.nf4_code().dtype == np.float32
    np.testing.assert_array_equal(cext.nf4_code().view(np.uint32), quant.NF4_CODE.view(np.uint32))
    assert cext.nf4_code().view(np.uint32)[1] == 0xBF3239B1


@pytest.mark.parametrize("N,K,blocksize,nested", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cpp_dequantize_bit_exact(cext, rng, N, K, blocksize, nested, quant_type):
    packed, qs = _weight(rng, N, K, blocksize, nested, quant_type)
    ref = quant.dequantize_4bit(packed, qs)
    out = kernels.dequantize_4bit(packed, qs, kernel="cpp")
    assert out.dtype == np.float32 and out.shape == (N, K)
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


def _check_matmul(y, x, W, packed, qs):
    ref32 = x @ W.T  # NumPy's float32 BLAS
    ref64 = x.astype(np.float64) @ W.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(W).astype(np.float64).T  # (M, N) sum of |terms|
    assert y.dtype == np.float32 and y.shape == ref32.shape
    assert np.abs(y - ref32).max() <= 1e-5 * max(np.abs(ref32).max(), 1e-30)
    assert np.all(np.abs(y - ref64) <= 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("N,K,blocksize,nested", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 17])
def test_cpp_matmul_matches_reference(cext, rng, N, K, blocksize, nested, M):
    packed, qs = _weight(rng, N, K, blocksize, nested)
    W = quant.dequantize_4bit(packed, qs)
    x = rng.standard_normal((M, K), dtype=np.float32)
    y = kernels.matmul_4bit(x, packed, qs, kernel="cpp")
    _check_matmul(y, x, W, packed, qs)


if given is not None:

    @settings(max_examples=30, deadline=None)
    @given(
        N=st.integers(1, 40),
        K=st.integers(1, 300),
        M=st.integers(1, 20),
        blocksize=st.sampled_from([32, 64, 128, 256]),
        nested=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def test_cpp_random_shapes(N, K, M, blocksize, nested, seed):
        if kernels._C is None:
            pytest.skip("minillm._C not built")
        rng = np.random.default_rng(seed)
        packed, qs = _weight(rng, N, K, blocksize, nested)
        W = quant.dequantize_4bit(packed, qs)
        np.testing.assert_array_equal(kernels.dequantize_4bit(packed, qs, kernel="cpp").view(np.uint32), W.view(np.uint32))
        x = rng.standard_normal((M, K), dtype=np.float32)
        _check_matmul(kernels.matmul_4bit(x, packed, qs, kernel="cpp"), x, W, packed, qs)


def test_cpp_matmul_large_row_panel_path(cext, rng):
    """M = 64 takes the panel (outer-product) path; K = N = 1024 spans several K tiles."""
    packed, qs = _weight(rng, 1024, 1024, 64, True)
    W = quant.dequantize_4bit(packed, qs)
    x = rng.standard_normal((64, 1024), dtype=np.float32)
    _check_matmul(kernels.matmul_4bit(x, packed, qs, kernel="cpp"), x, W, packed, qs)


def test_matmul_batched_leading_dims_and_float16_state(cext, rng):
    W = rng.standard_normal((20, 70), dtype=np.float32).astype(np.float16)
    packed, qs = quant.quantize_4bit(W, blocksize=64)
    x = rng.standard_normal((2, 3, 70), dtype=np.float32)
    y = kernels.matmul_4bit(x, packed, qs)
    assert y.shape == (2, 3, 20) and y.dtype == np.float32
    # W is used in float32 (the compute dtype), not rounded to the stored float16 first
    W32 = quant.dequantize_4bit(packed, dataclasses.replace(qs, dtype="float32"))
    ref = x @ W32.T
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(kernels.matmul_4bit(x, packed, qs, kernel="numpy"), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    d = kernels.dequantize_4bit(packed, qs, kernel="cpp")
    assert d.dtype == np.float16
    np.testing.assert_array_equal(d, quant.dequantize_4bit(packed, qs))


def test_bad_input_raises_value_error(cext, rng):
    packed, qs = _weight(rng, 8, 64, 64, False)
    with pytest.raises(ValueError, match=r"x.shape \(3, 63\).*\(8, 64\)"):
        kernels.matmul_4bit(np.zeros((3, 63), np.float32), packed, qs)
    with pytest.raises(ValueError, match="absmax"):
        cext.matmul(np.zeros((1, 64), np.float32), packed.reshape(-1), quant.NF4_CODE, qs.absmax[:-1], 8, 64)
    with pytest.raises(ValueError, match="packed holds"):
        cext.dequantize(packed.reshape(-1)[:10], quant.NF4_CODE, qs.absmax, 512, 64)
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernels.matmul_4bit(np.zeros((1, 64), np.float32), packed, qs, kernel="fast")


def _misaligned(a: np.ndarray, xp=np) -> np.ndarray:
    """A C-contiguous copy of ``a`` whose data pointer is NOT 16-byte aligned (one element in)."""
    buf = xp.zeros(a.size + 1, dtype=a.dtype)
    out = buf[1:].reshape(a.shape)
    out[...] = xp.asarray(a)
    return out


@pytest.mark.parametrize("nested", [False, True])
def test_cpp_matmul_misaligned_x_and_packed(cext, rng, nested):
    """x and packed at addresses that are not 16-byte aligned (a view one element into a buffer)."""
    packed, qs = _weight(rng, 37, 96, 32, nested)
    W = quant.dequantize_4bit(packed, qs)
    x = _misaligned(rng.standard_normal((3, 96), dtype=np.float32))
    pm = _misaligned(packed)
    assert x.ctypes.data % 16 and pm.ctypes.data % 16 and x.flags.c_contiguous
    _check_matmul(kernels.matmul_4bit(x, pm, qs, kernel="cpp"), x, W, packed, qs)
    np.testing.assert_array_equal(kernels.dequantize_4bit(pm, qs, kernel="cpp").view(np.uint32), W.view(np.uint32))
    np.testing.assert_array_equal(kernels.matmul_4bit(x, pm, qs, kernel="numpy"), x @ W.T)


def _half_nested_states(rng):
    """(packed, {what: QuantState}) of states whose absmax dtype does not match their nesting."""
    packed, qs_n = _weight(rng, 9, 64, 32, True)
    _, qs_p = _weight(rng, 9, 64, 32, False)
    return packed, {
        "uint8 absmax without state2": dataclasses.replace(qs_n, state2=None, offset=None),
        "float32 absmax with state2": dataclasses.replace(qs_p, state2=qs_n.state2, offset=qs_n.offset),
        "state2 without absmax2": dataclasses.replace(qs_n, state2=dataclasses.replace(qs_n.state2, absmax=None)),
        "nested without offset": dataclasses.replace(qs_n, offset=None),
    }


@pytest.mark.parametrize("kernel", ["numpy", "cpp"])
def test_absmax_dtype_not_matching_nesting_raises(rng, kernel):
    """A nested (uint8) absmax where float32 is expected, or the reverse, or a state marked nested
    without its nested part: ValueError on the NumPy and C++ paths, never bytes read as floats."""
    if kernel == "cpp" and kernels._C is None:
        pytest.skip("minillm._C not built")
    packed, bad = _half_nested_states(rng)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    for what, qs in bad.items():
        with pytest.raises(ValueError, match="nested|double-quantized|uint8"):
            kernels.matmul_4bit(x, packed, qs, kernel=kernel)
        with pytest.raises(ValueError, match="nested|double-quantized|uint8"):
            kernels.dequantize_4bit(packed, qs, kernel=kernel)


def test_cuda_absmax_args_refuse_wrong_absmax_dtype(rng):
    """The CUDA argument builder checks before touching cupy (so this runs without a GPU)."""
    _, bad = _half_nested_states(rng)
    for what, qs in bad.items():
        with pytest.raises(ValueError, match="nested|double-quantized|uint8"):
            kernels._cuda_absmax_args(qs, None)
        with pytest.raises(ValueError, match="nested|double-quantized|uint8"):
            kernels._cpu_absmax_kwargs(qs)


# ------------------------------------------------------------------------------------------------
# dispatch and packaging
# ------------------------------------------------------------------------------------------------


def test_get_array_module_follows_the_array_type_not_the_backend(monkeypatch):
    """A cupy array gets cupy even when backend.use("cuda") never ran (the NumPy-reference fallback
    on cupy arrays); numpy arrays get numpy. A stand-in cupy module, so this runs anywhere."""
    import types

    from minillm import backend

    fake_cupy = types.ModuleType("cupy")
    FakeArray = type("ndarray", (), {"__module__": "cupy._core.core"})
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    assert backend.device() == "cpu"
    assert backend.get_array_module(np.zeros(2), FakeArray()) is fake_cupy
    assert backend.get_array_module(np.zeros(2)) is np
    assert backend.get_array_module() is np


def test_get_array_module_does_not_import_cupy():
    code = ("import sys, numpy as np\nfrom minillm import backend, kernels, quant\n"
            "backend.get_array_module(np.zeros(2))\n"
            "p, qs = quant.quantize_4bit(np.ones((4, 64), np.float32))\n"
            "quant.dequantize_4bit(p, qs)\nprint('cupy' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "MINILLM_DEVICE"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"



def test_dispatch_and_forcing(rng, monkeypatch):
    packed, qs = _weight(rng, 9, 40, 64, True)
    x = rng.standard_normal((2, 40), dtype=np.float32)
    monkeypatch.delenv("MINILLM_KERNELS", raising=False)
    assert kernels.select_backend(x) == ("cpp" if kernels._C is not None else "numpy")
    monkeypatch.setenv("MINILLM_KERNELS", "numpy")
    assert kernels.select_backend(x) == "numpy"
    ref = x @ quant.dequantize_4bit(packed, qs).T
    np.testing.assert_array_equal(kernels.matmul_4bit(x, packed, qs), ref)  # the reference itself
    monkeypatch.setenv("MINILLM_KERNELS", "warp")
    with pytest.raises(ValueError, match="MINILLM_KERNELS"):
        kernels.select_backend(x)


def test_without_cpp_extension_falls_back_to_numpy(rng, monkeypatch):
    monkeypatch.setattr(kernels, "_C", None)
    monkeypatch.setattr(kernels, "_C_MISSING", "simulated")
    monkeypatch.delenv("MINILLM_KERNELS", raising=False)
    assert kernels.available()["cpp"] is False and "simulated" in kernels.unavailable_reasons()["cpp"]
    packed, qs = _weight(rng, 5, 33, 64, False)
    x = rng.standard_normal((3, 33), dtype=np.float32)
    assert kernels.select_backend(x) == "numpy"
    np.testing.assert_array_equal(kernels.matmul_4bit(x, packed, qs), x @ quant.dequantize_4bit(packed, qs).T)
    with pytest.raises(RuntimeError, match="minillm._C"):
        kernels.matmul_4bit(x, packed, qs, kernel="cpp")


_SUBPROCESS_CHECK = r"""
import json, sys
import numpy as np
import minillm, minillm.kernels as k, minillm.quant as q
rng = np.random.default_rng(0)
W = rng.standard_normal((6, 50), dtype=np.float32)
p, qs = q.quantize_4bit(W, compress_statistics=True)
x = rng.standard_normal((2, 50), dtype=np.float32)
same = bool(np.array_equal(k.matmul_4bit(x, p, qs), x @ q.dequantize_4bit(p, qs).T))
print(json.dumps({"available": k.available(), "same": same,
                  "loaded": sorted(m for m in sys.modules if m in ("minillm._C", "minillm._cuda"))}))
"""

_BLOCK_EXTENSIONS = r"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("minillm._C", "minillm._cuda"):
            raise ImportError(f"simulated: {name} was never built")
        return None
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize("how", ["env", "import-blocked"])
def test_import_without_any_extension(how):
    env = {k: v for k, v in os.environ.items() if k != "MINILLM_KERNELS"}
    code = _SUBPROCESS_CHECK
    if how == "env":
        env["MINILLM_DISABLE_EXTENSIONS"] = "1"
    else:
        env.pop("MINILLM_DISABLE_EXTENSIONS", None)
        code = _BLOCK_EXTENSIONS + code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"available": {"numpy": True, "cpp": False, "cuda": False}, "same": True, "loaded": []}


@pytest.mark.skipif(kernels.available()["cuda"], reason="this machine has a usable GPU")
def test_cuda_entry_points_raise_clear_runtime_error(rng):
    packed, qs = _weight(rng, 8, 64, 64, False)
    x = rng.standard_normal((1, 64), dtype=np.float32)
    for call in (
        lambda: kernels.matmul_4bit(x, packed, qs, kernel="cuda"),
        lambda: kernels.cuda_gemv(x, packed, qs),
        lambda: kernels.cuda_gemm(x, packed, qs),
        lambda: kernels.to_device(packed, qs),
    ):
        with pytest.raises(RuntimeError, match="CUDA|cupy|GPU"):
            call()
    if kernels._cuda is not None:  # the raw binding checks the device before touching any pointer
        assert kernels._cuda.device_count() == 0
        with pytest.raises(RuntimeError, match="no usable CUDA device|no CUDA device"):
            kernels._cuda.gemv(0, 0, 1, 64, 0, quant.NF4_CODE, 0, 0, 0, 0, 0.0, 256, 8, 64, 0)
        with pytest.raises(RuntimeError, match="no usable CUDA device|no CUDA device"):
            kernels._cuda.gemm(0, 0, 9, 64, 0, quant.NF4_CODE, 0, 0, 0, 0, 0.0, 256, 8, 64, 0, device=0)


def test_cuda_sync_after_launch_switch(monkeypatch):
    """MINILLM_CUDA_SYNC=1 (read at each call) turns on the synchronize-and-check after every launch."""
    if kernels._cuda is None:
        pytest.skip(f"minillm._cuda not built: {kernels._CUDA_MISSING}")
    monkeypatch.setenv("MINILLM_CUDA_SYNC", "1")
    assert kernels._cuda.sync_after_launch() is True
    monkeypatch.setenv("MINILLM_CUDA_SYNC", "0")
    assert kernels._cuda.sync_after_launch() is False
    monkeypatch.delenv("MINILLM_CUDA_SYNC")
    assert kernels._cuda.sync_after_launch() is False


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _extensions_wanted() -> bool:
    return os.environ.get("MINILLM_NO_EXTENSIONS") != "1" and os.environ.get("MINILLM_DISABLE_EXTENSIONS") != "1"


@pytest.mark.skipif(not _extensions_wanted() or not (shutil.which("c++") or shutil.which("g++")),
                    reason="no C++ compiler, or extensions disabled")
def test_cpp_extension_was_compiled():
    spec = importlib.util.find_spec("minillm._C")
    assert spec is not None and spec.origin and Path(spec.origin).is_file(), "minillm._C was not built: pip install -e ."
    assert kernels._C is not None, kernels._C_MISSING


@pytest.mark.skipif(not _extensions_wanted() or os.environ.get("MINILLM_NO_CUDA") == "1" or not _find_nvcc(),
                    reason="no nvcc, or MINILLM_NO_CUDA=1")
def test_cuda_extension_was_compiled():
    """With nvcc present the CUDA kernels must compile (CI fails here if nf4_cuda.cu breaks)."""
    spec = importlib.util.find_spec("minillm._cuda")
    assert spec is not None and spec.origin and Path(spec.origin).is_file(), "minillm._cuda was not built"
    assert kernels._cuda is not None, kernels._CUDA_MISSING
    for name in ("dequantize", "gemv", "gemm", "device_count", "sync_after_launch", "decode_absmax"):
        assert hasattr(kernels._cuda, name)


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "gpu-check")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (ROOT / ".ci" / "gpu-check").read_text()
    assert "setup.py build_ext --inplace" in text and "pip install" not in text.split("set -uo pipefail")[1]
    assert "MINILLM_CUDA_SYNC=1" in text and "${OUT:-${GPU_CHECK_OUT:-runs/gpu-check}}" in text


def test_cuda_extra_matches_the_cuda_13_toolkit():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    assert len(extra) == 1 and extra[0].startswith("cupy-cuda13x")


def test_bench_kernel_cpu_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = kernels.bench_kernel("cpu", sizes=[256], m_list=[1, 8], repeats=1, out=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    assert len(res["results"]) == 4  # 2 values of M x (plain, nested)
    assert all(r["numpy_matmul_ms"] > 0 for r in res["results"])


# ------------------------------------------------------------------------------------------------
# GPU: every CUDA rung against the same reference (skipped without a GPU)
# ------------------------------------------------------------------------------------------------

UNIT_ROUNDOFF = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
GPU_SHAPES = [(64, 256, 64, False), (96, 512, 64, True), (33, 95, 64, True), (17, 300, 128, False), (7, 4099, 4096, True),
              (37, 96, 32, True), (37, 40, 32, True), (70, 200, 64, False)]  # item 13: see SHAPES


def _gpu_x(cp, x32, dtype):
    """x on the GPU in dtype, and the float32 values the kernel actually sees."""
    if dtype == "bfloat16":
        bits = kernels.to_bfloat16_bits(x32)
        return cp.asarray(bits), kernels.from_bfloat16_bits(bits)
    xd = x32.astype(dtype)
    return cp.asarray(xd), xd.astype(np.float32)


def _gpu_y(y, dtype):
    y = y.get()
    return kernels.from_bfloat16_bits(y) if dtype == "bfloat16" else y.astype(np.float32)


def _check_gpu(y, xs, W, dtype):
    ref = xs.astype(np.float64) @ W.astype(np.float64).T
    scale = np.abs(xs).astype(np.float64) @ np.abs(W).astype(np.float64).T
    bound = (2 * UNIT_ROUNDOFF[dtype] + 1e-5) * scale + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err <= bound), f"max err/bound {np.max(err / bound):.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("N,K,blocksize,nested", GPU_SHAPES)
@pytest.mark.parametrize("version", [1, 2])
def test_cuda_dequantize_bit_exact(rng, N, K, blocksize, nested, version):
    import cupy as cp

    packed, qs = _weight(rng, N, K, blocksize, nested)
    ref = quant.dequantize_4bit(packed, qs)
    dp, dqs = kernels.to_device(packed, qs)
    out = kernels.dequantize_4bit(dp, dqs, kernel="cuda", version=version).get()
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
    np.testing.assert_array_equal(kernels.dequantize_4bit(dp, dqs, version=version, out_dtype="float16").get(),
                                  ref.astype(np.float16))
    np.testing.assert_array_equal(kernels.dequantize_4bit(dp, dqs, version=version, out_dtype="bfloat16").get(),
                                  kernels.to_bfloat16_bits(ref))
    cp.cuda.get_current_stream().synchronize()


@pytest.mark.cuda
@pytest.mark.parametrize("N,K,blocksize,nested", [s for s in GPU_SHAPES if s[3]])
def test_cuda_decode_absmax_bit_exact(rng, N, K, blocksize, nested):
    """The nested absmax decoded once on the GPU equals QuantState.dequantize_absmax bit for bit."""
    packed, qs = _weight(rng, N, K, blocksize, nested)
    dp, dqs = kernels.to_device(packed, qs)
    plain = kernels.decode_absmax(dqs)
    assert not plain.nested and plain.absmax.dtype == np.float32
    np.testing.assert_array_equal(plain.absmax.get().view(np.uint32), qs.dequantize_absmax().view(np.uint32))
    np.testing.assert_array_equal(kernels.dequantize_4bit(dp, plain).get(), quant.dequantize_4bit(packed, qs))


@pytest.mark.cuda
@pytest.mark.parametrize("N,K,blocksize,nested", GPU_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("M", [1, 3, 8])
def test_cuda_gemv_all_versions(rng, N, K, blocksize, nested, dtype, M):
    import cupy as cp

    packed, qs = _weight(rng, N, K, blocksize, nested)
    W = quant.dequantize_4bit(packed, qs)
    dp, dqs = kernels.to_device(packed, qs)
    xg, xs = _gpu_x(cp, rng.standard_normal((M, K), dtype=np.float32), dtype)
    for state in (dqs, kernels.decode_absmax(dqs)):  # nested as stored, and decoded once to float32
        for version in (1, 2, 3, 4, 0):
            if version in (3, 4) and (K % 32 or blocksize % 32):
                with pytest.raises(ValueError, match="K % 32"):
                    kernels.cuda_gemv(xg, dp, state, version=version, bfloat16=dtype == "bfloat16")
                continue
            y = kernels.cuda_gemv(xg, dp, state, version=version, bfloat16=dtype == "bfloat16")
            _check_gpu(_gpu_y(y, dtype), xs, W, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("N,K,blocksize,nested", GPU_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("M", [9, 64, 130, 300])
def test_cuda_gemm_all_versions(rng, N, K, blocksize, nested, dtype, M):
    import cupy as cp

    packed, qs = _weight(rng, N, K, blocksize, nested)
    W = quant.dequantize_4bit(packed, qs)
    dp, dqs = kernels.to_device(packed, qs)
    xg, xs = _gpu_x(cp, rng.standard_normal((M, K), dtype=np.float32), dtype)
    bf = dtype == "bfloat16"
    for version in (1, 2, 3, 0):
        if version == 2 and dtype == "float32":
            with pytest.raises(ValueError, match="float16 or bfloat16"):
                kernels.cuda_gemm(xg, dp, dqs, version=2)
            continue
        if version == 3 and bf:
            with pytest.raises(ValueError, match="bfloat16"):
                kernels.cuda_gemm(xg, dp, dqs, version=3, bfloat16=True)
            continue
        _check_gpu(_gpu_y(kernels.cuda_gemm(xg, dp, dqs, version=version, bfloat16=bf), dtype), xs, W, dtype)
    # the dispatcher: M > 8 -> GEMM (dequantize + cuBLAS from GEMM_DEQUANT_MIN_M on), batched dims kept
    y = kernels.matmul_4bit(xg.reshape(1, M, K), dp, dqs, bfloat16=bf)
    assert y.shape == (1, M, N)
    _check_gpu(_gpu_y(y.reshape(M, N), dtype), xs, W, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("M", [1, 3, 64])
def test_cuda_misaligned_x(rng, dtype, M):
    """x one element into its buffer (not 16-byte aligned): version 0 picks a kernel that can take
    it (GEMV v2 instead of v3, the GEMM reads x element-wise), v3 refuses it with ValueError."""
    import cupy as cp

    packed, qs = _weight(rng, 37, 96, 32, True)
    W = quant.dequantize_4bit(packed, qs)
    dp, dqs = kernels.to_device(packed, qs)
    x32 = rng.standard_normal((M, 96), dtype=np.float32).astype(dtype)
    xg = _misaligned(cp.asarray(x32), cp)
    assert xg.data.ptr % 16 != 0 and xg.flags.c_contiguous
    _check_gpu(_gpu_y(kernels.matmul_4bit(xg, dp, dqs), dtype), x32.astype(np.float32), W, dtype)
    if M <= kernels.GEMV_MAX_M:
        with pytest.raises(ValueError, match="K % 32"):
            kernels.cuda_gemv(xg, dp, dqs, version=3)


@pytest.mark.cuda
def test_cuda_float64_x_is_cast_like_the_cpu(rng):
    """float64 x (gradcheck) is cast to float32 on the GPU as on the NumPy/C++ paths."""
    import cupy as cp

    packed, qs = _weight(rng, 33, 95, 64, True)
    dp, dqs = kernels.to_device(packed, qs)
    x = rng.standard_normal((2, 95))
    y = kernels.matmul_4bit(cp.asarray(x), dp, dqs)
    ref = kernels.matmul_4bit(x, packed, qs, kernel="numpy")
    assert y.dtype == cp.float32 and ref.dtype == np.float32
    np.testing.assert_allclose(y.get(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.cuda
def test_numpy_reference_on_cupy_arrays_stays_on_the_gpu(rng, monkeypatch):
    """kernel="numpy" (and the auto path with minillm._cuda missing) on cupy arrays computes with
    cupy, without backend.use("cuda")."""
    import cupy as cp

    packed, qs = _weight(rng, 33, 95, 64, True)
    dp, dqs = kernels.to_device(packed, qs)
    x = rng.standard_normal((3, 95), dtype=np.float32)
    ref = kernels.matmul_4bit(x, packed, qs, kernel="numpy")
    y = kernels.matmul_4bit(cp.asarray(x), dp, dqs, kernel="numpy")
    assert isinstance(y, cp.ndarray)
    np.testing.assert_allclose(y.get(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    monkeypatch.setattr(kernels, "_cuda", None)
    d = kernels.dequantize_4bit(dp, dqs)
    assert isinstance(d, cp.ndarray)
    np.testing.assert_array_equal(d.get(), quant.dequantize_4bit(packed, qs))


@pytest.mark.cuda
def test_linear4bit_keeps_its_quant_state_on_the_device(on_cuda, rng):
    """On the GPU a Linear4bit moves absmax/absmax2/code2 to the device once, not every forward."""
    import cupy as cp

    from minillm.linear4bit import Linear4bit
    from minillm.tensor import Tensor

    W = rng.standard_normal((48, 128), dtype=np.float32)
    layer = Linear4bit(W)
    qs = layer.compute_quant_state()
    assert isinstance(qs.absmax, cp.ndarray) and isinstance(qs.state2.absmax, cp.ndarray)
    assert layer.compute_quant_state() is qs  # cached
    x = rng.standard_normal((3, 128), dtype=np.float32)
    y = layer(Tensor(cp.asarray(x))).data.get()
    on_cuda.use("cpu")
    ref = Linear4bit(W)(Tensor(x)).data
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.cuda
def test_cuda_bench_smoke(tmp_path):
    res = kernels.bench_kernel("cuda", sizes=[1024], m_list=[1], gemm_m=[256], repeats=2, out=str(tmp_path / "b.json"))
    assert res["results"]["gemv"] and res["results"]["gemm"] and res["results"]["copy"][0]["GB_per_s"] > 0


# ----------------------------------------------------------------------------------------------
# The whole engine on CuPy (one switch: minillm.backend.use("cuda")). GPU only.


@pytest.fixture
def on_cuda():
    from minillm import backend

    backend.use("cuda")
    try:
        yield backend
    finally:
        backend.use("cpu")


def _engine_grads(seed: int, qlora: bool):
    """Loss and the gradient of every trainable parameter after one forward/backward of a small GPT
    (optionally QLoRA through the 4-bit kernels), then greedy KV-cache generation with the same
    (not yet updated) weights, on whatever device the backend is set to; returns host arrays."""
    from minillm import backend
    from minillm.lora import inject_lora
    from minillm.model import GPT, GPTConfig
    from minillm.linear4bit import quantize_model

    cfg = GPTConfig(vocab_size=97, block_size=48, n_layer=2, n_head=2, n_embd=64)
    model = GPT(cfg, seed=seed)
    if qlora:
        quantize_model(model)
        inject_lora(model, "all-linear", r=4, lora_alpha=8, init_lora_weights=False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ids = np.random.default_rng(seed).integers(0, 97, (4, 32))
    _, loss = model(backend.asarray(ids), labels=backend.asarray(ids))
    loss.backward()
    grads = {n: backend.to_numpy(p.grad) for n, p in named}
    gen = model.generate(ids[:2, :8], max_new_tokens=16, temperature=0)
    return float(loss.item()), grads, gen.new_tokens


#: per-tensor tolerance on gradients: max |g_gpu - g_cpu| <= GRAD_RTOL * max |g_cpu| + GRAD_FLOOR * G,
#: G = the largest gradient entry of the whole model. float32 summation-order noise is ~1e-7 of a
#: tensor's largest entry; a wrong gradient is O(1). The floor is for gradients that are zero in
#: exact arithmetic and hold only rounding noise: the key projection's bias (softmax ignores a
#: constant added to every score), max |g| ~ 1e-11 on the CPU.
GRAD_RTOL, GRAD_FLOOR = 1e-4, 1e-7


@pytest.mark.cuda
@pytest.mark.parametrize("qlora", [False, True])
def test_cupy_gradients_equal_numpy(on_cuda, qlora):
    """The CuPy forward/backward (full model, or QLoRA through the CUDA kernel) gives the NumPy loss
    and, per tensor, the NumPy gradients to 1e-4 of the tensor's largest entry; greedy KV-cache
    generation gives the same tokens. Gradients are compared BEFORE any optimizer step: AdamW with
    eps = 1e-8 turns a gradient of 1e-8 into a move of ~lr, so float32 noise of 1e-10 in such a
    gradient would move a parameter by ~1e-5 and say nothing about the backward."""
    gpu = _engine_grads(0, qlora)
    on_cuda.use("cpu")
    cpu = _engine_grads(0, qlora)
    _assert_same_step(gpu, cpu)


def _assert_same_step(got, ref):
    """Loss to 1e-5, gradients per tensor (GRAD_RTOL, GRAD_FLOOR), generated tokens equal."""
    assert got[0] == pytest.approx(ref[0], rel=1e-5)
    assert got[1].keys() == ref[1].keys()
    G = max(float(np.abs(g).max()) for g in ref[1].values())
    for name, g_ref in ref[1].items():
        g = got[1][name]
        assert g.dtype == g_ref.dtype == np.float32 and g.shape == g_ref.shape, name
        err, scale = float(np.abs(g - g_ref).max()), float(np.abs(g_ref).max())
        assert err <= GRAD_RTOL * scale + GRAD_FLOOR * G, f"{name}: max err {err:.3g}, max |g| {scale:.3g}, G {G:.3g}"
    np.testing.assert_array_equal(got[2], ref[2])


def test_gradient_comparison_holds_between_cpu_kernels(cext, monkeypatch):
    """The tolerance of test_cupy_gradients_equal_numpy, exercised here: QLoRA through the C++ twin
    vs the NumPy reference (different summation orders in every 4-bit matmul) passes it, and a
    gradient off by 1% in one entry of one tensor fails it."""
    monkeypatch.setenv("MINILLM_KERNELS", "cpp")
    got = _engine_grads(0, True)
    monkeypatch.setenv("MINILLM_KERNELS", "numpy")
    ref = _engine_grads(0, True)
    assert any(not np.array_equal(got[1][k], ref[1][k]) for k in ref[1])  # the orders do differ
    _assert_same_step(got, ref)
    name = next(iter(ref[1]))
    i = np.unravel_index(np.argmax(np.abs(ref[1][name])), ref[1][name].shape)
    got[1][name] = got[1][name].copy()
    got[1][name][i] *= np.float32(1.01)
    with pytest.raises(AssertionError, match=name.replace(".", r"\.")):
        _assert_same_step(got, ref)


def _optimizer_step(paged: bool, steps: int = 2):
    """``steps`` AdamW (or PagedAdamW, several pages with evictions) updates of fixed parameters
    with fixed gradients whose magnitudes span 1e-9..1e-1, on the current backend; host arrays."""
    from minillm import backend
    from minillm.nn import Parameter
    from minillm.optim import AdamW
    from minillm.paged_optim import PagedAdamW

    rng = np.random.default_rng(7)
    params, grads = [], []
    for shape in [(64, 48), (300,), (5000,)]:
        params.append(Parameter(backend.asarray(0.02 * rng.standard_normal(shape, dtype=np.float32))))
        mag = (10.0 ** rng.uniform(-9, -1, shape)).astype(np.float32)
        grads.append(backend.asarray(mag * rng.standard_normal(shape, dtype=np.float32)))
    opt = (PagedAdamW(params, lr=1e-3, page_size=4096, device_budget=4 * 4096) if paged
           else AdamW(params, lr=1e-3))
    for _ in range(steps):
        for p, g in zip(params, grads):
            p.grad = g.copy()
        opt.step()
    return [backend.to_numpy(p.data) for p in params]


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [False, True])
def test_cupy_optimizer_step_equals_numpy_on_identical_gradients(on_cuda, paged):
    """AdamW / PagedAdamW (side-stream paging) on the GPU, fed the same gradients as on the CPU
    (including ones near eps = 1e-8), move every parameter like the NumPy step: elementwise float32
    ops, so to a few ulps of the update (lr = 1e-3)."""
    gpu = _optimizer_step(paged)
    on_cuda.use("cpu")
    cpu = _optimizer_step(paged)
    for a, b in zip(gpu, cpu):
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
