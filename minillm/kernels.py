"""Fused NF4 dequantize-matmul kernels and their dispatch (chapter 11).

Scope
    ``y = x @ W.T`` where W (N = out_features, K = in_features) is stored as 4-bit codes plus
    per-block absmax (``minillm.quant.quantize_4bit``), computed WITHOUT first materialising W in
    float32: each kernel decodes the bytes it needs on the fly. Three implementations of one
    contract, validated against one reference:

    ======== ======================================= ============================================
    backend  where                                   used for
    ======== ======================================= ============================================
    numpy    ``quant.dequantize_4bit`` then ``@``    the reference; always available
    cpp      ``minillm._C`` (csrc/nf4_cpu.cpp)       numpy inputs: OpenMP + AVX2/FMA, bit-exact
                                                     dequant, fused row/panel matmul
    cuda     ``minillm._cuda`` (csrc/nf4_cuda.cu)    cupy inputs: dequant v1-v2, GEMV v1-v4
                                                     (M <= 8), GEMM v1 (SIMT) / v2 (tensor cores)
                                                     / v3 (dequantize, then cuBLAS via cupy)
    ======== ======================================= ============================================

    The ladder (as llm.c's ``dev/cuda``: a reference first, then numbered faster versions): NumPy reference -> C++ twin -> CUDA v1 naive
    (one thread per output) -> v2 shared-memory code table (coalesced loads, one block per row) ->
    v3 128-bit loads + warp-shuffle reductions (one warp per row; bitsandbytes'
    ``kgemm_4bit_inference_naive``) -> a tiled GEMM that dequantizes W tiles into shared memory and
    multiplies them on tensor cores (wmma). Every version is kept and selectable with ``version=``;
    ``version=0`` picks the best one the arguments allow. The source files explain each kernel's
    memory access pattern and tiling.

Dispatch (``matmul_4bit``, ``dequantize_4bit``)
    * cupy input -> ``cuda`` (GEMV for M <= 8 rows of x, fused GEMM above, dequantize + cuBLAS
      from ``GEMM_DEQUANT_MIN_M`` rows on for float32/float16), else the NumPy reference on cupy
      arrays (computed with cupy: ``backend.get_array_module`` goes by the array's type);
    * numpy input -> ``cpp`` when ``minillm._C`` was built, else the NumPy reference.
    Force a path with ``kernel="numpy" | "cpp" | "cuda"`` or the environment variable
    ``MINILLM_KERNELS`` (same values, read at call time; "auto" = the rules above).
    ``MINILLM_NO_EXTENSIONS=1`` (read at import, ``backend.load_extension``) makes this module ignore
    both extensions, as on a machine where they were never built. ``available()`` says what exists.

Errors
    A CUDA function called where no GPU/driver is usable raises RuntimeError naming the cause (the
    extension checks ``cudaGetDeviceCount`` before any launch; nothing crashes). Shape mismatches
    raise ValueError naming both shapes; an absmax whose dtype does not match the state's nesting
    raises ValueError (``QuantState.validate``). ``MINILLM_CUDA_SYNC=1`` synchronizes and checks
    after every launch, so a kernel fault is raised by the call that caused it.

Sources
    Dettmers et al. 2023, QLoRA (arXiv:2305.14314) §3 (NF4, double quantization); bitsandbytes 0.50
    ``functional.py`` ``dequantize_4bit`` / ``gemv_4bit``, ``csrc/kernels.cu``
    ``kgemm_4bit_inference_naive`` and ``kDequantizeBlockwise``; NVIDIA CUDA C++ Programming Guide,
    "Warp Matrix Functions" (wmma); Karpathy's llm.c ``dev/cuda`` (the versioned-kernel layout).

Deliberate deviations
    * The GEMV's 128-bit path requires ``K % 32 == 0`` and ``blocksize % 32 == 0`` (bitsandbytes
      requires ``K % blocksize == 0``); other shapes use the general GEMV v2 rather than failing.
    * bitsandbytes dequantizes W to the compute dtype before a cuBLAS GEMM for M > 1
      (``MatMul4Bit``); here 8 < M < ``GEMM_DEQUANT_MIN_M`` (256) uses the fused GEMM (v2 on tensor
      cores for 16-bit x, v1 SIMT for float32) and larger M dequantize-then-cuBLAS; the threshold
      is a measured guess that ``make gpu-check``'s benchmark (v1/v2/v3 per M) is there to revise.
    * cupy has no bfloat16 dtype: bfloat16 arrays are passed as uint16 bit patterns
      (``to_bfloat16_bits`` / ``from_bfloat16_bits``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Optional

import numpy as np

from minillm import quant
from minillm.backend import is_cupy, load_extension, to_numpy

KERNELS = ("auto", "numpy", "cpp", "cuda")
#: Largest number of x rows the CUDA GEMV handles (more rows go to the GEMM).
GEMV_MAX_M = 8
#: From this many x rows on, ``version=0`` computes float32/float16 products as dequantize-then-
#: cuBLAS (GEMM "version 3") instead of the fused tiled GEMM: cuBLAS's tiles beat the fused
#: kernels once the dequantization is amortised over enough rows (the benchmark measures both per
#: M; bitsandbytes does the same for every M > 1). bfloat16 (no cupy dtype) stays fused.
GEMM_DEQUANT_MIN_M = 256
_DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


_C, _C_MISSING = load_extension("_C")
_cuda, _CUDA_MISSING = load_extension("_cuda")


def available() -> dict:
    """Which backends can run here: ``{"numpy": True, "cpp": bool, "cuda": bool}``.

    ``cuda`` is True only if the CUDA extension was built AND it sees a device (and cupy imports,
    since the CUDA path takes cupy arrays). ``unavailable_reasons()`` says why one is False.
    """
    return {"numpy": True, "cpp": _C is not None, "cuda": _cuda_usable() == ""}


def unavailable_reasons() -> dict:
    """For each backend that is not available, a one-line reason (empty dict if all are)."""
    out = {}
    if _C is None:
        out["cpp"] = f"minillm._C not importable ({_C_MISSING})"
    why = _cuda_usable()
    if why:
        out["cuda"] = why
    return out


def _cuda_usable() -> str:
    if _cuda is None:
        return f"minillm._cuda not importable ({_CUDA_MISSING})"
    if _cuda.device_count() < 1:
        return f"no usable CUDA device ({_cuda.device_error() or 'cudaGetDeviceCount = 0'})"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "cupy is not installed (pip install -e '.[cuda]')"
    return ""


def _require_cuda() -> None:
    """Raise RuntimeError (with the cause) unless the CUDA extension can launch kernels here."""
    if _cuda is None:
        raise RuntimeError(
            f"the CUDA kernels are not available: minillm._cuda not importable ({_CUDA_MISSING}); "
            "rebuild with a CUDA toolkit (pip install -e .) or use numpy arrays"
        )
    if _cuda.device_count() < 1:
        raise RuntimeError(
            "the CUDA kernels need an NVIDIA GPU: minillm._cuda found no usable device "
            f"({_cuda.device_error() or 'cudaGetDeviceCount = 0'}); use numpy arrays instead"
        )


def select_backend(x, kernel: Optional[str] = None) -> str:
    """The backend ``matmul_4bit``/``dequantize_4bit`` will use for array ``x``: "numpy", "cpp" or "cuda".

    ``kernel`` (or ``$MINILLM_KERNELS`` when None) is "auto" (default), "numpy", "cpp" or "cuda".
    Raises ValueError for an unknown name or a forced backend that cannot take this array
    ("cpp" with a cupy array, "cuda" with a numpy array), RuntimeError when the forced backend's
    extension is missing.
    """
    kernel = kernel or os.environ.get("MINILLM_KERNELS", "") or "auto"
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r} (argument or MINILLM_KERNELS)")
    on_gpu = is_cupy(x)
    if kernel == "auto":
        if on_gpu:
            return "cuda" if _cuda is not None else "numpy"
        return "cpp" if _C is not None else "numpy"
    if kernel == "cpp":
        if on_gpu:
            raise ValueError("kernel='cpp' runs on numpy arrays; got a cupy array (use 'cuda' or 'numpy')")
        if _C is None:
            raise RuntimeError(f"kernel='cpp' forced but minillm._C is not importable ({_C_MISSING})")
    if kernel == "cuda" and not on_gpu:
        _require_cuda()
        raise ValueError("kernel='cuda' runs on cupy arrays; got a numpy array (cupy.asarray it first)")
    return kernel


# ------------------------------------------------------------------------------------------------
# argument plumbing
# ------------------------------------------------------------------------------------------------


def _check_state(packed, qs: quant.QuantState) -> int:
    """Validate packed/absmax sizes and dtypes against the state; return n (number of weight elements).

    Raises ValueError for a nested (uint8) absmax where float32 is expected or the reverse, and for
    a state marked double-quantized without its nested part (``QuantState.validate``): the kernels
    would read the wrong bytes.
    """
    qs.validate()
    n = qs.numel
    nbytes = int(packed.size)
    if nbytes < (n + 1) // 2:
        raise ValueError(f"packed has {nbytes} bytes; quant_state.shape {tuple(qs.shape)} ({n} codes) needs {(n + 1) // 2}")
    if packed.dtype != np.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    nblocks = -(-n // qs.blocksize)
    if int(qs.absmax.size) != nblocks:
        raise ValueError(f"absmax has {qs.absmax.size} entries; {n} elements in blocks of {qs.blocksize} need {nblocks}")
    if qs.nested:
        n2 = -(-nblocks // qs.state2.blocksize)
        if int(qs.state2.absmax.size) != n2:
            raise ValueError(f"nested absmax2 has {qs.state2.absmax.size} entries, expected {n2}")
        if qs.state2.code is None or int(qs.state2.code.size) != 256:
            raise ValueError("nested code (quant_state.state2.code) must have 256 entries")
    return n


def _code16(qs: quant.QuantState) -> np.ndarray:
    code = qs.code if qs.code is not None else quant.get_4bit_type(qs.quant_type)
    code = np.ascontiguousarray(to_numpy(code), dtype=np.float32).reshape(-1)
    if code.size != 16:
        raise ValueError(f"quant_state.code must have 16 entries for a 4-bit state, got {code.size}")
    return code


def _weight_shape(qs: quant.QuantState) -> tuple[int, int]:
    if len(qs.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D weight (N=out, K=in); quant_state.shape is {tuple(qs.shape)}")
    return int(qs.shape[0]), int(qs.shape[1])


def _cpu_absmax_kwargs(qs: quant.QuantState) -> dict:
    qs.validate()  # a uint8 absmax must never be cast to float32 values 0..255 (nor the reverse)
    if not qs.nested:
        return {"absmax": np.ascontiguousarray(to_numpy(qs.absmax), dtype=np.float32).reshape(-1)}
    return {
        "absmax": np.ascontiguousarray(to_numpy(qs.absmax)).reshape(-1),
        "absmax2": np.ascontiguousarray(to_numpy(qs.state2.absmax), dtype=np.float32).reshape(-1),
        "code2": np.ascontiguousarray(to_numpy(qs.state2.code), dtype=np.float32).reshape(-1),
        "offset": float(np.float32(to_numpy(qs.offset))),
        "blocksize2": int(qs.state2.blocksize),
    }


def _cuda_absmax_args(qs: quant.QuantState, cp):
    """(keep-alive list, kwargs of device pointers) for the _cuda functions.

    Raises ValueError (``QuantState.validate``) when the absmax dtype does not match the nesting:
    a uint8 absmax handed over as float32 (or the reverse) would be read as the wrong bytes.
    """
    qs.validate()
    if not qs.nested:
        absmax = cp.ascontiguousarray(cp.asarray(qs.absmax, dtype=cp.float32).reshape(-1))
        return [absmax], dict(absmax=absmax.data.ptr, qabsmax=0, absmax2=0, code2=0, offset=0.0, blocksize2=256)
    q = cp.ascontiguousarray(cp.asarray(qs.absmax).reshape(-1))
    a2 = cp.ascontiguousarray(cp.asarray(qs.state2.absmax, dtype=cp.float32).reshape(-1))
    c2 = cp.ascontiguousarray(cp.asarray(qs.state2.code, dtype=cp.float32).reshape(-1))
    kw = dict(
        absmax=0,
        qabsmax=q.data.ptr,
        absmax2=a2.data.ptr,
        code2=c2.data.ptr,
        offset=float(np.float32(to_numpy(qs.offset))),
        blocksize2=int(qs.state2.blocksize),
    )
    return [q, a2, c2], kw


def _launch_kw(cp) -> dict:
    """CuPy's current stream and device for a _cuda launch (the extension's static CUDA runtime
    has its own current device, so it is told which one; see csrc/cuda_bindings.cpp)."""
    return {"stream": cp.cuda.get_current_stream().ptr, "device": cp.cuda.Device().id}


def _cuda_dtype(a, bfloat16: bool) -> int:
    name = "bfloat16" if bfloat16 else str(a.dtype)
    if bfloat16 and a.dtype != np.uint16:
        raise ValueError(f"bfloat16 data must be passed as uint16 bit patterns, got {a.dtype}")
    if name not in _DTYPE_CODE:
        raise ValueError(f"the CUDA kernels take float32, float16 or bfloat16 (as uint16 bits), got {a.dtype}")
    return _DTYPE_CODE[name]


def to_device(packed, quant_state: quant.QuantState):
    """Copy a 4-bit weight to the GPU once: (cupy packed, QuantState with cupy absmax arrays).

    The 16-entry code stays on the host (it is passed to the kernels by value); the nested
    absmax2 and 256-entry code go to the device. Raises RuntimeError without cupy/GPU.
    """
    _require_cuda()
    import cupy as cp

    return cp.asarray(packed), state_on_device(quant_state)


def state_on_device(quant_state: quant.QuantState) -> quant.QuantState:
    """The QuantState with its absmax (and nested absmax2 / 256-entry code) as cupy arrays, made
    once so a layer's every forward does not re-upload them (the 16-entry code stays on the host:
    it is passed to the kernels by value). Arrays already on the device are not copied.
    Needs cupy (not the extension): the NumPy reference on cupy arrays uses it too.
    Raises ValueError for a half-nested state (``QuantState.validate``).
    """
    import cupy as cp

    quant_state.validate()
    state2 = quant_state.state2
    if state2 is not None:
        state2 = dataclasses.replace(state2, absmax=cp.asarray(state2.absmax, dtype=cp.float32),
                                     code=cp.asarray(state2.code, dtype=cp.float32))
    return dataclasses.replace(quant_state, absmax=cp.asarray(quant_state.absmax), state2=state2)


def decode_absmax(quant_state: quant.QuantState) -> quant.QuantState:
    """A nested 4-bit state on the GPU -> the equivalent plain state (float32 absmax (nblocks,)).

    ``absmax[b] = code2[qabsmax[b]] * absmax2[b // blocksize2] + offset``, computed once by a CUDA
    kernel and bit-identical to ``QuantState.dequantize_absmax`` (bitsandbytes decodes the nested
    absmax the same way before ``gemv_4bit``). The kernels then read 4 bytes per block instead of 1
    but skip two dependent loads per 32 elements; the benchmark measures both. A plain state is
    returned unchanged. Raises RuntimeError without a usable GPU.
    """
    if not quant_state.nested:
        return quant_state
    _require_cuda()
    import cupy as cp

    keep, kw = _cuda_absmax_args(quant_state, cp)
    nblocks = int(quant_state.absmax.size)
    out = cp.empty(nblocks, dtype=cp.float32)
    _cuda.decode_absmax(kw["qabsmax"], kw["absmax2"], kw["code2"], kw["offset"], kw["blocksize2"], nblocks,
                        out.data.ptr, **_launch_kw(cp))
    del keep
    return dataclasses.replace(quant_state, absmax=out, offset=None, state2=None)


# ------------------------------------------------------------------------------------------------
# bfloat16 helpers (numpy and cupy)
# ------------------------------------------------------------------------------------------------


def to_bfloat16_bits(a):
    """float32 array -> uint16 array of bfloat16 bit patterns, round to nearest even (no NaN handling)."""
    bits = a.astype(np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def from_bfloat16_bits(b):
    """uint16 array of bfloat16 bit patterns -> float32 array (exact)."""
    return (b.astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------


def dequantize_4bit(packed, quant_state: quant.QuantState, *, kernel: Optional[str] = None, version: int = 0,
                    out_dtype: Optional[str] = None):
    """Dequantize a 4-bit weight: ``out[j] = code[q_j] * absmax[j // blocksize]`` (QLoRA §3).

    packed: uint8 ((n + 1) // 2, 1) (any shape with that many bytes), numpy or cupy.
    quant_state: ``minillm.quant.QuantState`` (plain or nested absmax; any 16-entry code).
    Returns an array of ``quant_state.shape``: numpy/cpp paths in ``quant_state.dtype`` (computed in
    float32, then cast, exactly as ``quant.dequantize_4bit``); the cuda path in ``out_dtype``
    ("float32" default, "float16", or "bfloat16" = uint16 bits). Bit-identical to the reference in
    float32 on every backend. ``version`` selects the CUDA rung (0 best, 1 naive, 2 vectorised).
    Raises ValueError on size mismatches, RuntimeError when a forced backend is missing.
    """
    backend = select_backend(packed, kernel)
    if backend == "numpy":
        return quant.dequantize_4bit(packed, quant_state)
    n = _check_state(packed, quant_state)
    if backend == "cpp":
        flat = np.ascontiguousarray(packed).reshape(-1)
        out = _C.dequantize(flat, _code16(quant_state), n=n, blocksize=int(quant_state.blocksize),
                            **_cpu_absmax_kwargs(quant_state))
        return out.reshape(quant_state.shape).astype(np.dtype(quant_state.dtype), copy=False)
    _require_cuda()
    import cupy as cp

    out_dtype = out_dtype or "float32"
    if out_dtype not in _DTYPE_CODE:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype!r}")
    flat = cp.ascontiguousarray(packed).reshape(-1)
    keep, kw = _cuda_absmax_args(quant_state, cp)
    out = cp.empty(n, dtype=cp.uint16 if out_dtype == "bfloat16" else out_dtype)
    _cuda.dequantize(flat.data.ptr, _code16(quant_state), n=n, blocksize=int(quant_state.blocksize),
                     out=out.data.ptr, dtype=_DTYPE_CODE[out_dtype], version=int(version),
                     **_launch_kw(cp), **kw)
    del keep
    return out.reshape(quant_state.shape)


def matmul_4bit(x, packed, quant_state: quant.QuantState, *, kernel: Optional[str] = None, version: int = 0,
                bfloat16: bool = False):
    """``y = x @ W.T`` with W (N, K) the dequantized 4-bit weight (bitsandbytes ``matmul_4bit`` forward).

    x: (..., K). numpy: float32 (other dtypes are cast to float32); result float32 (..., N).
    cupy: float32, float16, or bfloat16 given as uint16 bits with ``bfloat16=True``; result in
    x's dtype, float32 accumulation (other dtypes, e.g. float64, are cast to float32 and give a
    float32 result, as on the CPU); M = prod(x.shape[:-1]) <= 8 runs the GEMV, larger M the GEMM.
    ``version``: CUDA rung (0 = best; GEMV 1-3, GEMM 1-2), ignored on the CPU.
    W is dequantized in float32 (code[q] * absmax), NOT first rounded to ``quant_state.dtype``: the
    compute dtype here is float32 (bitsandbytes casts W to its compute dtype, bf16 in QLoRA).
    Accuracy: cpp equals the NumPy reference to float32 rounding (tests: <= 1e-5 of max|y|); CUDA
    16-bit paths are bounded by 2 * unit roundoff * (|x| @ |W|.T) (see tests/test_11_kernels.py).
    Raises ValueError if x.shape[-1] != K (naming both shapes) or on dtype/size errors;
    RuntimeError when the CUDA path is asked for without a usable GPU.
    """
    N, K = _weight_shape(quant_state)
    if x.shape[-1] != K:
        raise ValueError(f"x.shape {tuple(x.shape)} does not match the weight: quant_state.shape (N, K) = {(N, K)} needs x.shape[-1] == {K}")
    backend = select_backend(x, kernel)
    lead = tuple(x.shape[:-1])
    if backend == "numpy":
        # W in float32, the compute dtype, whatever quant_state.dtype says (as the other backends)
        W = quant.dequantize_4bit(packed, dataclasses.replace(quant_state, dtype="float32"))  # (N, K)
        if not is_cupy(x):
            x = np.asarray(x, dtype=np.float32)
        return x @ W.T  # (..., N)
    _check_state(packed, quant_state)
    if backend == "cpp":
        x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, K)  # (M, K)
        y = _C.matmul(x2, np.ascontiguousarray(packed).reshape(-1), _code16(quant_state), N=N,
                      blocksize=int(quant_state.blocksize), **_cpu_absmax_kwargs(quant_state))
        return y.reshape(lead + (N,))
    _require_cuda()
    import cupy as cp

    if not bfloat16 and x.dtype not in (cp.float32, cp.float16):
        x = x.astype(cp.float32)  # float64 (gradcheck) or integers: cast, as the numpy and cpp paths do
    dtype = _cuda_dtype(x, bfloat16)
    x2 = cp.ascontiguousarray(x).reshape(-1, K)  # (M, K)
    M = int(x2.shape[0])
    if M > GEMV_MAX_M and (version == 3 or (version == 0 and M >= GEMM_DEQUANT_MIN_M and not bfloat16)):
        return _gemm_dequant_cublas(x2, packed, quant_state, bfloat16).reshape(lead + (N,))
    y = cp.empty((M, N), dtype=x2.dtype)
    if M > 0:
        keep, kw = _cuda_absmax_args(quant_state, cp)
        pk = cp.ascontiguousarray(packed).reshape(-1)  # held until after the (asynchronous) launch
        fn = _cuda.gemv if M <= GEMV_MAX_M else _cuda.gemm
        fn(x2.data.ptr, dtype, M, K, pk.data.ptr, _code16(quant_state),
           N=N, blocksize=int(quant_state.blocksize), y=y.data.ptr, version=int(version),
           **_launch_kw(cp), **kw)
        del keep
    return y.reshape(lead + (N,))


def _gemm_dequant_cublas(x2, packed, quant_state: quant.QuantState, bfloat16: bool):
    """GEMM "version 3": W dequantized by the CUDA kernel into x's dtype, then ``x2 @ W.T`` by
    cuBLAS (cupy.matmul; float32 accumulation for float16, no TF32 unless CUPY_TF32=1). float32 or
    float16 x (M, K) -> (M, N); bfloat16 raises ValueError (cupy has no bfloat16 dtype)."""
    if bfloat16:
        raise ValueError("gemm version 3 (dequantize + cuBLAS) takes float32 or float16 x; "
                         "bfloat16 has no cupy dtype (use version 2)")
    W = dequantize_4bit(packed, quant_state, kernel="cuda", out_dtype=str(x2.dtype))  # (N, K)
    return x2 @ W.T


def cuda_gemv(x, packed, quant_state, *, version: int = 0, bfloat16: bool = False):
    """The CUDA GEMV alone (1 <= M <= 8 rows of x), any ``version`` 0-4. Same contract as ``matmul_4bit``.

    v3 and v4 need K % 32 == 0, blocksize % 32 == 0 and 16-byte aligned x and packed (v4 also a
    power-of-two blocksize); asked for anyway they raise ValueError. ``version=0`` picks v4, else
    v3, else v2."""
    _require_cuda()
    if int(np.prod(x.shape[:-1])) > GEMV_MAX_M:
        raise ValueError(f"cuda_gemv takes at most {GEMV_MAX_M} rows of x, got x.shape {tuple(x.shape)}")
    return matmul_4bit(x, packed, quant_state, kernel="cuda", version=version, bfloat16=bfloat16)


def cuda_gemm(x, packed, quant_state, *, version: int = 0, bfloat16: bool = False):
    """The CUDA GEMM alone (any M >= 1), ``version`` 0-3: 1 = SIMT tiles, 2 = tensor cores (16-bit
    inputs only), 3 = dequantize then cuBLAS (float32/float16 only), 0 = 2 for 16-bit x else 1."""
    _require_cuda()
    import cupy as cp

    N, K = _weight_shape(quant_state)
    if x.shape[-1] != K:
        raise ValueError(f"x.shape {tuple(x.shape)} does not match quant_state.shape (N, K) = {(N, K)}")
    _check_state(packed, quant_state)
    dtype = _cuda_dtype(x, bfloat16)
    x2 = cp.ascontiguousarray(x).reshape(-1, K)
    if version == 3:
        return _gemm_dequant_cublas(x2, packed, quant_state, bfloat16).reshape(tuple(x.shape[:-1]) + (N,))
    y = cp.empty((x2.shape[0], N), dtype=x2.dtype)
    keep, kw = _cuda_absmax_args(quant_state, cp)
    pk = cp.ascontiguousarray(packed).reshape(-1)  # held until after the (asynchronous) launch
    _cuda.gemm(x2.data.ptr, dtype, int(x2.shape[0]), K, pk.data.ptr,
               _code16(quant_state), N=N, blocksize=int(quant_state.blocksize), y=y.data.ptr,
               version=int(version), **_launch_kw(cp), **kw)
    del keep
    return y.reshape(tuple(x.shape[:-1]) + (N,))


# ------------------------------------------------------------------------------------------------
# benchmark (called by `minillm bench kernel` and .ci/gpu-check)
# ------------------------------------------------------------------------------------------------


def _time_cpu(fn, repeats: int) -> float:
    fn()  # warm-up (page faults, OpenMP pool)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _bench_cpu(sizes, m_list, repeats: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    rows = []
    for K, N in sizes:
        W = rng.standard_normal((N, K), dtype=np.float32)
        for nested in (False, True):
            packed, qs = quant.quantize_4bit(W, blocksize=64, compress_statistics=nested)
            t_deq_ref = _time_cpu(lambda: quant.dequantize_4bit(packed, qs), repeats)
            t_deq = _time_cpu(lambda: dequantize_4bit(packed, qs, kernel="cpp"), repeats) if _C else None
            for M in m_list:
                x = rng.standard_normal((M, K), dtype=np.float32)
                t_ref = _time_cpu(lambda: matmul_4bit(x, packed, qs, kernel="numpy"), repeats)
                t_cpp = _time_cpu(lambda: matmul_4bit(x, packed, qs, kernel="cpp"), repeats) if _C else None
                rows.append({
                    "device": "cpu", "M": M, "K": K, "N": N, "double_quant": nested,
                    "numpy_matmul_ms": 1e3 * t_ref,
                    "cpp_matmul_ms": None if t_cpp is None else 1e3 * t_cpp,
                    "cpp_speedup": None if t_cpp is None else t_ref / t_cpp,
                    "cpp_gflops": None if t_cpp is None else 2 * M * N * K / t_cpp / 1e9,
                    "numpy_dequant_ms": 1e3 * t_deq_ref,
                    "cpp_dequant_ms": None if t_deq is None else 1e3 * t_deq,
                })
    return rows


def _raw_launch(fn_name: str, x2, packed, quant_state: quant.QuantState, version: int):
    """A zero-argument callable that launches ``_cuda.<fn_name>`` (gemv or gemm) on x2 (M, K) with
    every argument (pointers, code table, absmax layout, output) prepared NOW, so timing it measures
    the kernel, not the Python plumbing around it (benchmark only)."""
    import cupy as cp

    N, K = _weight_shape(quant_state)
    _check_state(packed, quant_state)
    M = int(x2.shape[0])
    dtype = _cuda_dtype(x2, False)
    keep, kw = _cuda_absmax_args(quant_state, cp)
    pk = cp.ascontiguousarray(packed).reshape(-1)
    y = cp.empty((M, N), dtype=x2.dtype)
    code, fn, lk = _code16(quant_state), getattr(_cuda, fn_name), _launch_kw(cp)
    args = (x2.data.ptr, dtype, M, K, pk.data.ptr, code)
    kwargs = dict(N=N, blocksize=int(quant_state.blocksize), y=y.data.ptr, version=int(version), **lk, **kw)

    def launch():
        fn(*args, **kwargs)

    launch.keep = (keep, pk, y, x2)  # the device arrays live as long as the callable
    return launch


def _bench_cuda(sizes, gemv_m, gemm_m, repeats: int, seed: int) -> dict:
    _require_cuda()
    import cupy as cp

    l2_flush = cp.empty(512 * 2**20, dtype=cp.uint8)  # > L2 (50 MiB on H100/H200): every rep starts cold

    def timed(fn) -> float:
        """Median ms over `repeats` launches, each after an L2 flush, timed with CUDA events.

        The flush (a 512 MiB memset, ~0.1-0.2 ms) also keeps the GPU busy while Python enqueues the
        start event, the kernel and the end event, so host launch overhead is not in the timing
        (the GEMV/GEMM rows time raw launches with their arguments prepared beforehand, so the host
        work per launch is a few microseconds).
        """
        fn()
        cp.cuda.get_current_stream().synchronize()
        times = []
        for _ in range(repeats):
            l2_flush.fill(0)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        return float(np.median(times))

    def host_us(fn, n: int = 50) -> float:
        """Mean host microseconds per call (no flush, not synchronized per call)."""
        fn()
        cp.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        cp.cuda.get_current_stream().synchronize()
        return 1e6 * (t1 - t0) / n

    rng = np.random.default_rng(seed)
    out = {"gemv": [], "gemm": [], "copy": [], "decode_absmax": [], "gemm_dispatch_min_m": GEMM_DEQUANT_MIN_M}
    for K, N in sizes:
        W = rng.standard_normal((N, K), dtype=np.float32)
        packed_h, qs_h = quant.quantize_4bit(W, blocksize=64, compress_statistics=True)
        packed, qs = to_device(packed_h, qs_h)
        qs_plain = decode_absmax(qs)  # float32 absmax on the device, decoded once
        t_dec = timed(lambda: decode_absmax(qs))
        out["decode_absmax"].append({"K": K, "N": N, "nblocks": int(qs.absmax.size), "ms": t_dec})
        nbytes = {"nested": int(packed.size) + int(qs.absmax.size) + 4 * int(qs.state2.absmax.size),
                  "decoded": int(packed.size) + 4 * int(qs_plain.absmax.size)}
        # bandwidth yardstick: a device-to-device copy of the same number of bytes (read + write)
        src = cp.zeros(int(packed.size), dtype=cp.uint8)
        dst = cp.empty_like(src)
        t_copy = timed(lambda: dst.data.copy_from_device_async(src.data, src.nbytes))  # cudaMemcpyAsync D2D
        copy_gbs = 2 * src.size / (t_copy * 1e-3) / 1e9
        out["copy"].append({"K": K, "N": N, "bytes": int(src.size), "ms": t_copy, "GB_per_s": copy_gbs})
        for M in gemv_m:
            for dt in ("float16", "float32"):
                x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32)).astype(dt)
                for v, absmax in ((1, "nested"), (2, "nested"), (3, "nested"), (4, "nested"), (4, "decoded")):
                    if v == 1 and K * N > 4096 * 4096:
                        continue  # the naive kernel is only there to be slow; skip the big case
                    state = qs if absmax == "nested" else qs_plain
                    t = timed(_raw_launch("gemv", x, packed, state, v))
                    moved = nbytes[absmax] + x.nbytes + M * N * x.itemsize
                    gbs = moved / (t * 1e-3) / 1e9
                    out["gemv"].append({"M": M, "K": K, "N": N, "dtype": dt, "version": v, "absmax": absmax,
                                        "ms": t, "GB_per_s": gbs, "fraction_of_copy_bandwidth": gbs / copy_gbs})
                # the whole Python call (argument checks, pointer plumbing) vs the raw launch, host side
                out["gemv"][-1]["host_us_matmul_4bit"] = host_us(lambda: matmul_4bit(x, packed, qs_plain))
                out["gemv"][-1]["host_us_raw_launch"] = host_us(_raw_launch("gemv", x, packed, qs_plain, 0))
        for M in gemm_m:
            flops = 2.0 * M * N * K
            for dt in ("float16", "float32"):
                x = cp.asarray(rng.standard_normal((M, K), dtype=np.float32)).astype(dt)
                W_dq = dequantize_4bit(packed, qs, kernel="cuda", out_dtype=dt)  # (N, K)
                t_ref = timed(lambda: x @ W_dq.T)
                row = {"M": M, "K": K, "N": N, "dtype": dt, "cupy_matmul_ms": t_ref,
                       "cupy_matmul_TFLOPs": flops / (t_ref * 1e-3) / 1e12}
                if dt == "float16":  # the field names of earlier runs, kept comparable
                    row["cupy_fp16_matmul_ms"], row["cupy_fp16_matmul_TFLOPs"] = t_ref, row["cupy_matmul_TFLOPs"]
                t_deq = timed(lambda: dequantize_4bit(packed, qs, kernel="cuda", out_dtype=dt))
                row["dequant_ms"] = t_deq
                for v in ((1, 2, 3) if dt == "float16" else (1, 3)):
                    fn = (_raw_launch("gemm", x, packed, qs, v) if v != 3
                          else (lambda: cuda_gemm(x, packed, qs, version=3)))
                    t = timed(fn)
                    row[f"v{v}_ms"] = t
                    row[f"v{v}_TFLOPs"] = flops / (t * 1e-3) / 1e12
                row["dispatched_version"] = 3 if M >= GEMM_DEQUANT_MIN_M else (2 if dt == "float16" else 1)
                out["gemm"].append(row)
    return out


def bench_kernel(device: str = "cpu", sizes=None, repeats: int = 5, m_list=None, gemm_m=None,
                 out: Optional[str] = None, seed: int = 0) -> dict:
    """Benchmark the dequant-matmul backends; returns (and optionally writes as JSON) the results.

    device "cpu": numpy reference vs the C++ twin, K = N in ``sizes`` (default (4096,)), M in
    ``m_list`` (default (1, 64)); times are the best of ``repeats`` (ms), speedup = numpy / cpp.
    device "cuda": GEMV (M in ``m_list``, default (1,)) per version in GB/s and as a fraction of a
    device-to-device copy measured in the same run; GEMM (M in ``gemm_m``, default (256, 1024)) per
    version in TFLOP/s vs cupy's float16 matmul on the dequantized weight; sizes default (4096, 8192);
    medians of ``repeats`` event-timed launches, each after an L2 flush.
    ``out``: JSON path, written atomically. Raises RuntimeError for "cuda" without a usable GPU.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    sizes = [(int(s), int(s)) if np.isscalar(s) else (int(s[0]), int(s[1])) for s in
             (sizes or ((4096,) if device == "cpu" else (4096, 8192)))]
    info = {"device": device, "available": available(), "repeats": repeats, "seed": seed,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device == "cpu":
        info["threads"] = _C.num_threads() if _C else 1
        info["results"] = _bench_cpu(sizes, tuple(m_list or (1, 64)), repeats, seed)
    else:
        info["results"] = _bench_cuda(sizes, tuple(m_list or (1,)), tuple(gemm_m or (256, 1024)), repeats, seed)
    if out:
        d = os.path.dirname(os.path.abspath(out))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, out)
    return info


def main(argv=None) -> int:
    """``python -m minillm.kernels [--device cpu|cuda] [--sizes 4096 8192] [--repeats 5] [--out f.json]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m minillm.kernels", description="NF4 kernel benchmark")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="K = N values")
    p.add_argument("--m", type=int, nargs="+", default=None, help="x rows (cpu matmul / cuda GEMV)")
    p.add_argument("--gemm-m", type=int, nargs="+", default=None, help="x rows for the cuda GEMM")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = bench_kernel(a.device, a.sizes, a.repeats, a.m, a.gemm_m, a.out)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
