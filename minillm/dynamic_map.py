"""The 8-bit dynamic-exponent code (the "dynamic map") that double quantization stores the absmax in.

Scope
    ``create_dynamic_map``: the 256 sorted float32 values bitsandbytes uses for 8-bit blockwise
    quantization, reproduced bit for bit (including ``torch.linspace``'s float32 rounding). QLoRA's
    double quantization (``minillm.quant.quantize_4bit(..., compress_statistics=True)``) quantizes
    the per-block absmax constants with it (``quant.quantize_blockwise``).

Sources
    * Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning", arXiv:1511.04561
      (the dynamic exponent map).
    * bitsandbytes 0.50 ``bitsandbytes/functional.py`` ``create_dynamic_map``; PyTorch
      ``aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp`` (``linspace``).

Deviations
    None: the values equal bitsandbytes' (tests/test_06_quant.py compares them within 1 ulp).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on the CPU, reproduced.

    ATen computes step = (end - start) / (steps - 1) in float32, the first half as start + i*step
    and the second half as end - (steps - 1 - i)*step (``aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp``),
    each as one fused multiply-add (a single rounding), emulated here in float64. This matters
    only to reproduce ``create_dynamic_map`` bit for bit (bitsandbytes builds it with torch on the CPU).
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], dtype=np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    half = steps // 2
    out = np.where(
        i < half,
        np.float64(start32) + step * i,  # fma(step, i, start)
        np.float64(end32) - step * (steps - 1 - i),  # fma(-step, steps-1-i, end)
    )
    return out.astype(np.float32)


@lru_cache(maxsize=None)
def _dynamic_map_cached(signed: bool, max_exponent_bits: int, total_bits: int) -> np.ndarray:
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = _torch_linspace_f32(0.1, 1.0, fraction_items)
        means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2.0)).astype(np.float32)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    if additional_items > 0:
        boundaries = _torch_linspace_f32(0.1, 1.0, additional_items + 1)
        means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2.0)).astype(np.float32)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    data.append(0.0)
    data.append(1.0)
    if len(data) != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
            f"total_bits={total_bits}) produced {len(data)} values, expected {2 ** total_bits}"
        )
    data += [0.0] * (256 - len(data))
    out = np.sort(np.array(data, dtype=np.float32))
    out.setflags(write=False)
    return out


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The 8-bit dynamic-exponent quantization map (Dettmers 2016; bitsandbytes ``create_dynamic_map``).

    For i = 0..max_exponent_bits-1 it adds +-10^(i - (max_exponent_bits-1)) times the midpoints of
    linspace(0.1, 1, 2^i + 1) (signed), then 0 and +1.0, and sorts. Signed, default arguments:
    256 float32 values, index 127 = 0.0, index 255 = +1.0, index 0 = -0.99296874 (there is no -1.0),
    smallest nonzero |v| = 5.5e-7. This is the map QLoRA's double quantization uses for the absmax
    constants (the paper calls it "8-bit Floats"; the code uses this map).

    Returns a read-only float32 array of shape (256,). Raises ValueError when the arguments do not
    produce 2^total_bits values.
    """
    return _dynamic_map_cached(bool(signed), int(max_exponent_bits), int(total_bits))
