"""4-bit NormalFloat (NF4), FP4 and INT4 blockwise quantization with double quantization.

Scope
    The array-level core of QLoRA's storage format, written to reproduce bitsandbytes bit for bit:

    * the code tables ``NF4_CODE``, ``FP4_CODE``, ``INT4_CODE`` (16 float32 values each) and the
      derivation ``create_normal_map`` (NF4 from N(0, 1) quantiles); the 8-bit "dynamic" map used
      for double quantization is built in ``minillm/dynamic_map.py``;
    * ``quantize_4bit`` / ``dequantize_4bit``: blockwise absmax scaling, nearest code, two codes
      per byte;
    * ``quantize_blockwise`` / ``dequantize_blockwise``: 8-bit blockwise quantization with a
      256-entry code, used to compress the absmax constants (double quantization);
    * ``QuantState`` with bitsandbytes' serialized form (``as_dict(packed=True)`` /
      ``from_dict``) so a 4-bit weight can be stored in safetensors (a layer's keys:
      ``linear4bit.state_dict_4bit``);
    * ``bits_per_parameter`` / ``quant_state_nbytes``: storage measured from the arrays.

    The ``Linear4bit`` layer (4-bit frozen base weight + autograd) is in ``minillm/linear4bit.py``;
    the fused dequant-matmul kernels live in ``minillm/kernels.py`` and use ``dequantize_4bit`` here
    as their NumPy reference.

Sources
    * Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314:
      §3 "4-bit NormalFloat Quantization" (the quantile idea; Eq. 4), §3 "Double
      Quantization" (memory 32/64 = 0.5 -> 8/64 + 32/(64*256) = 0.127 bits/parameter).
    * Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning", arXiv:1511.04561
      (the dynamic exponent map).
    * bitsandbytes 0.50: ``bitsandbytes/functional.py`` (``get_4bit_type``, ``create_normal_map``,
      ``create_dynamic_map``, ``quantize_4bit``, ``dequantize_4bit``, ``QuantState``),
      ``bitsandbytes/backends/default/ops.py`` (torch reference of the kernels),
      ``csrc/kernels.cu`` (``kQuantizeBlockwise``, ``dQuantizeNF4``, ``dQuantizeFP4``).

Conventions (all as bitsandbytes; see docs/reference.md §2)
    * The tensor is flattened row-major and cut into blocks of ``blocksize`` consecutive elements
      (blocks may span rows). The last block may be partial; its absmax is over its own elements.
    * ``scaled = x * (1 / max(absmax, 1e-38))`` in float32 (reciprocal, then multiply, as the CUDA
      kernel), clamped to [-1, 1]. An all-zero block gets absmax 0 and code "zero" (no NaN).
    * Nearest code by comparing with the float32 midpoints of neighbouring codes; an exact tie goes
      to the LOWER code (NF4: index = #{midpoints < scaled}); FP4 is sign-magnitude: sign =
      (x < 0), ties go to the smaller magnitude, as ``dQuantizeFP4``.
    * Two codes per byte, element 2j in the HIGH nibble: ``byte = q[2j] << 4 | q[2j+1]``; packed
      shape ((n + 1) // 2, 1); odd n is padded with the code of 0.0 (7 for NF4).
    * Dequantization: ``out[j] = code[q_j] * absmax[j // blocksize]`` in float32, then cast to the
      original dtype.
    * Double quantization: ``offset = mean(absmax)`` (float32), ``qabsmax, absmax2 =
      quantize_blockwise(absmax - offset, blocksize=256)`` with the dynamic map; dequantized
      ``absmax_i = dyn[qabsmax_i] * absmax2[i // 256] + offset``.

Deliberate deviations
    * The NF4 code is bitsandbytes' table, built from quantiles at evenly spaced probabilities
      (``offset`` = 0.9677 down to 0.5; 8 positive, 7 negative values and an exact zero), not from
      Eq. 4 of the QLoRA paper as printed (the mean of neighbouring quantiles of 2^k + 1 evenly
      spaced probabilities, symmetric, no exact zero). The table is what every QLoRA checkpoint
      uses, so it is what a 4-bit file must be decoded with; notebook 06 computes both codes side by
      side. No option restores Eq. 4 (a file quantized with it could not be read by bitsandbytes).
    * ``create_normal_map`` returns the 16 sorted values, not bitsandbytes' 256-entry tensor padded
      with zeros (take ``np.pad(v, (0, 240))`` for that layout), and uses the standard library's
      ``statistics.NormalDist().inv_cdf`` instead of scipy. It is shown and tested, never used at run
      time: the table is hard-coded (bitsandbytes #1772: recomputing does not reproduce it bit-exactly).
    * FP4 follows the CUDA kernel: exact ties go to the smaller magnitude, and tiny negatives get -0
      (index 8). bitsandbytes' torch default backend (what runs on the CPU) ties to the lower value and
      picks between the two zeros by an argsort of equal values (we measured index 8 for tiny positives
      and 0 for tiny negatives). Both dequantize to the same numbers except at exact ties; no option.
    * The partial last block is scaled by the reciprocal like every other block (CUDA); the torch
      default backend divides there. They can differ only at an exact tie.
    * The double-quantization offset mean(absmax) is summed in float64 and rounded once to float32
      (deterministic on any backend); torch's float32 cascade sum may differ from it by an ulp.
    * 8-bit ``quantize_blockwise`` picks the exact nearest code (CUDA ``dQuantize`` / default backend);
      bitsandbytes 0.50's native CPU kernel uses a lookup-table approximation that occasionally picks
      the neighbouring code (tests/test_06_quant.py measures it).
    * Only ``quant_storage=uint8`` is supported (bitsandbytes can view the bytes as another dtype for
      FSDP); numpy has no bfloat16, so the stored dtype is one of float16/float32/float64.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

from minillm.backend import get_array_module, to_numpy
from minillm.dynamic_map import create_dynamic_map

# --------------------------------------------------------------------------------------------
# Code tables
# --------------------------------------------------------------------------------------------

#: NF4 code, index -> value (bitsandbytes ``get_4bit_type("nf4")`` and ``csrc/kernels.cu``
#: ``nf4_dequantization_lut``). Hard-coded; all values exact in float32; code[1] has float32
#: bits 0xbf3239b1. Sorted, so the code index order is the value order. Index 7 is exact zero.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_CODE.setflags(write=False)

#: FP4 (E2M1 with bitsandbytes' bias) in bit-pattern order: index = sign bit (0b1000) + 3 bits;
#: magnitudes by pattern 0b000..0b111 = [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12 (bitsandbytes
#: ``get_4bit_type("fp4")``; computed in float32 as there: data / 12). Index 8 (-0) stores +0.0.
FP4_CODE = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32)
    / np.float32(12.0)
).astype(np.float32)
FP4_CODE.setflags(write=False)

#: INT4 symmetric absmax code, for comparison (bitsandbytes ``get_4bit_type("int4")``, same order):
#: index i = 0..7 holds (7 - i)/7 and index 8 + p holds -p/7, so 15 distinct levels {-7..7}/7
#: (indices 7 and 8 both store 0.0): the round-to-nearest "absmax INT4" baseline the QLoRA paper
#: compares NF4 with. Quantized by nearest value (ties to the lower value; 0.0 -> index 7).
INT4_CODE = (
    np.array([7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7], dtype=np.float32)
    / np.float32(7.0)
).astype(np.float32)
INT4_CODE.setflags(write=False)

_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}
QUANT_TYPES = tuple(_CODES)

#: Valid 4-bit block sizes (bitsandbytes ``dequantize_4bit``): powers of two 32..4096.
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Block size of the second-level (double) quantization of the absmax values (QLoRA §3).
NESTED_BLOCKSIZE = 256


def get_4bit_type(quant_type: str) -> np.ndarray:
    """The 16-entry float32 code table of ``quant_type`` ("nf4", "fp4" or "int4"), index -> value.

    Mirrors bitsandbytes ``functional.get_4bit_type``. Raises ValueError for another name.
    """
    try:
        return _CODES[quant_type]
    except KeyError:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}") from None


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> np.ndarray:
    """Derive the NF4 code from quantiles of N(0, 1) as bitsandbytes ``create_normal_map`` does.

    This is bitsandbytes' construction, not QLoRA's Eq. 4 as printed (§3): Eq. 4 averages
    neighbouring quantiles of 2^k + 1 evenly spaced probabilities, q_i = ½(Q(i/(2^k+1)) +
    Q((i+1)/(2^k+1))), symmetric around 0 and without an exact zero; the shipped NF4 table (and
    this function) instead takes the quantiles themselves at evenly spaced probabilities from
    ``offset`` to 0.5, 8 on the positive side and 7 on the negative side plus an exact zero
    (§3's "asymmetric data type" remark). See the module's deviations.

    Positives: Phi^-1 at 9 evenly spaced probabilities from ``offset`` down to 0.5, dropping 0.5
    (8 values); negatives: -Phi^-1 at 8 points offset..0.5 dropping 0.5 (7 values); plus one exact
    zero; sorted and divided by the maximum, so the range is exactly [-1, 1]. The asymmetry (8
    positive, 7 negative) gives an exact zero with 2^4 values. With ``use_extra_value=False``
    both sides get 7 values and the result has 15 entries plus a second zero.

    The probabilities are spaced in float32 (as ``torch.linspace``), Phi^-1 is
    ``statistics.NormalDist().inv_cdf`` in float64, the division by the max in float32.

    Returns a float32 array of shape (16,), sorted. Matches ``NF4_CODE`` within ~1e-6 but not bit
    for bit (bitsandbytes #1772): use ``NF4_CODE``; this function is for teaching and tests.
    """
    inv_cdf = statistics.NormalDist().inv_cdf
    n_pos = 9 if use_extra_value else 8
    p_pos = np.linspace(offset, 0.5, n_pos).astype(np.float32)[:-1]
    p_neg = np.linspace(offset, 0.5, 8).astype(np.float32)[:-1]
    v1 = [inv_cdf(float(p)) for p in p_pos]
    v3 = [-inv_cdf(float(p)) for p in p_neg]
    zeros = [0.0] * (16 - len(v1) - len(v3))
    values = np.sort(np.array(v1 + zeros + v3, dtype=np.float32))
    return (values / values.max()).astype(np.float32)


# --------------------------------------------------------------------------------------------
# QuantState
# --------------------------------------------------------------------------------------------


def _dtype_of(a) -> np.dtype:
    """dtype of a numpy/cupy array (or of ``np.asarray(a)`` for anything else)."""
    return np.dtype(a.dtype) if hasattr(a, "dtype") else np.asarray(a).dtype


@dataclass(eq=False)
class QuantState:
    """Everything needed to dequantize a 4-bit (or 8-bit blockwise) array (bitsandbytes ``QuantState``).

    Fields
        absmax: per-block scale. float32 (nblocks,) with nblocks = ceil(n / blocksize); when nested
            (double quantization) the uint8 codes (nblocks,) of ``absmax - offset`` in the dynamic map.
        shape: shape of the original array (tuple of ints).
        dtype: numpy dtype name of the original array ("float32", "float16", "float64").
        blocksize: elements per block (int).
        quant_type: "nf4" | "fp4" | "int4" for 4-bit states; "dynamic" for the nested 8-bit state.
        code: the code table, float32 (16,) for 4-bit, (256,) for the dynamic map.
        offset: float32 scalar (np.float32) mean of the absmax when nested, else None.
        state2: the nested QuantState of the absmax (absmax2 float32 (ceil(nblocks/256),),
            code = dynamic map (256,), blocksize 256), or None.
    """

    absmax: Any
    shape: tuple
    dtype: str = "float32"
    blocksize: int = 64
    quant_type: Optional[str] = "nf4"
    code: Any = None
    offset: Any = None
    state2: Optional["QuantState"] = None

    @property
    def nested(self) -> bool:
        """True when the absmax values are themselves quantized (double quantization)."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original array."""
        return int(math.prod(self.shape))

    def validate(self) -> "QuantState":
        """Check that the absmax layout matches the nesting; returns self.

        A 4-bit state is either plain (float absmax (nblocks,), no offset, no state2) or nested
        (uint8 absmax codes, float32 offset, state2 with a float absmax2 and the 256-entry dynamic
        code). Any mix (uint8 absmax without its nested part, a nested state without absmax2, code
        or offset, a float absmax marked nested) would be decoded into values off by orders of
        magnitude by every backend, so it raises ValueError naming what is missing instead.
        The nested 8-bit state itself (quant_type "dynamic") needs a float absmax.
        """
        kind = _dtype_of(self.absmax).kind
        if self.quant_type == "dynamic":
            if kind != "f":
                raise ValueError(f"the nested (dynamic) state's absmax2 must be float32, got dtype {_dtype_of(self.absmax)}")
            return self
        if self.state2 is None:
            if kind != "f":
                raise ValueError(
                    f"quant_state.absmax has dtype {_dtype_of(self.absmax)} (double-quantized codes) but the state "
                    "has no nested part (state2: nested_absmax, nested_quant_map, nested_offset); it would "
                    "decode to garbage. A plain 4-bit state needs a float32 absmax.")
            if self.offset is not None:
                raise ValueError("quant_state has a nested offset but no nested state (state2: nested_absmax, "
                                 "nested_quant_map); it is marked double-quantized without its nested part")
            return self
        missing = [name for name, v in (("offset (nested_offset)", self.offset),
                                        ("state2.absmax (nested_absmax)", self.state2.absmax),
                                        ("state2.code (nested_quant_map)", self.state2.code)) if v is None]
        if missing:
            raise ValueError(f"quant_state is marked double-quantized but lacks {', '.join(missing)}")
        if _dtype_of(self.absmax) != np.uint8:
            raise ValueError(f"quant_state is double-quantized (state2 set) but absmax has dtype "
                             f"{_dtype_of(self.absmax)}; a nested state stores uint8 codes of the absmax")
        if _dtype_of(self.state2.absmax).kind != "f":
            raise ValueError(f"nested absmax2 (state2.absmax) must be float32, got dtype {_dtype_of(self.state2.absmax)}")
        if int(self.state2.code.size) != 256:
            raise ValueError(f"nested code (state2.code) must have 256 entries, got {int(self.state2.code.size)}")
        return self

    def dequantize_absmax(self):
        """The float32 per-block absmax (nblocks,): ``self.absmax``, or for a nested state
        ``dyn[qabsmax_i] * absmax2[i // 256] + offset`` (bitsandbytes ``dequantize_4bit``)."""
        self.validate()
        if not self.nested:
            return self.absmax
        xp = get_array_module(self.absmax)
        absmax = dequantize_blockwise(self.absmax, self.state2)
        return (absmax + xp.float32(self.offset)).astype(xp.float32)

    # ---- serialization, mirroring bitsandbytes QuantState.as_dict / from_dict ----------------

    def as_dict(self, packed: bool = False) -> dict:
        """The state as a dict (bitsandbytes ``QuantState.as_dict``).

        ``packed=False``: keys quant_type, absmax, blocksize, quant_map, dtype, shape, and when
        nested nested_absmax, nested_blocksize, nested_quant_map, nested_dtype, nested_offset.
        ``packed=True``: only arrays, fit for safetensors: absmax, quant_map, nested_absmax,
        nested_quant_map and ``quant_state.bitsandbytes__<quant_type>``, a uint8 array holding the
        UTF-8 JSON of the non-array items (same key order and JSON as bitsandbytes). Arrays are
        numpy (host) copies.
        """
        d: dict = {
            "quant_type": self.quant_type,
            "absmax": to_numpy(self.absmax),
            "blocksize": int(self.blocksize),
            "quant_map": to_numpy(self.code).astype(np.float32).copy(),
            "dtype": str(self.dtype),
            "shape": tuple(int(s) for s in self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update(
                {
                    "nested_absmax": to_numpy(self.state2.absmax),
                    "nested_blocksize": int(self.state2.blocksize),
                    "nested_quant_map": to_numpy(self.state2.code).astype(np.float32).copy(),
                    "nested_dtype": str(self.state2.dtype),
                    "nested_offset": float(self.offset),
                }
            )
        if not packed:
            return d
        arrays = {k: v for k, v in d.items() if isinstance(v, np.ndarray)}
        rest = {k: v for k, v in d.items() if not isinstance(v, np.ndarray)}
        blob = np.frombuffer(json.dumps(rest).encode("utf-8"), dtype=np.uint8).copy()
        arrays[f"quant_state.bitsandbytes__{self.quant_type}"] = blob
        return arrays

    @classmethod
    def from_dict(cls, qs_dict: dict) -> "QuantState":
        """Rebuild a state from ``as_dict`` output, packed or not, keys with or without a prefix
        such as ``"weight."`` (bitsandbytes ``QuantState.from_dict``). Arrays come back as numpy.

        Raises ValueError when neither the packed JSON blob nor the unpacked items are present, or
        when there is more than one blob, or a required key is missing, or the state is marked
        double-quantized without all of its nested part (or has uint8 absmax codes without it):
        see ``validate``.
        """
        d = dict(qs_dict)
        blob_keys = [k for k in d if "quant_state" in k and isinstance(d[k], np.ndarray)]
        if not any(k.split(".")[-1] == "quant_type" for k in d):
            if len(blob_keys) != 1:
                raise ValueError(
                    "expected exactly one 'quant_state.bitsandbytes__<nf4|fp4|int4>' item or the unpacked "
                    f"items; found blob keys {blob_keys}"
                )
        for k in blob_keys:
            blob = d.pop(k)
            d.update(json.loads(bytes(np.asarray(blob, dtype=np.uint8)).decode("utf-8")))
        d = {k.split(".")[-1]: v for k, v in d.items()}
        for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if key not in d:
                raise ValueError(f"quant state is missing {key!r}; have {sorted(d)}")
        state2 = None
        offset = None
        nested_keys = ("nested_absmax", "nested_quant_map", "nested_offset", "nested_blocksize", "nested_dtype")
        present = [k for k in nested_keys if k in d]
        if present and len(present) < len(nested_keys):
            raise ValueError(
                f"quant state is marked double-quantized ({', '.join(present)}) but lacks "
                f"{', '.join(k for k in nested_keys if k not in d)}; it cannot be decoded")
        if present:
            offset = np.float32(d["nested_offset"])
            nested_absmax = np.asarray(d["nested_absmax"], dtype=np.float32)
            state2 = cls(
                absmax=nested_absmax,
                shape=tuple(np.asarray(d["absmax"]).shape),
                dtype=str(d["nested_dtype"]),
                blocksize=int(d["nested_blocksize"]),
                quant_type="dynamic",
                code=np.asarray(d["nested_quant_map"], dtype=np.float32),
            )
        return cls(
            absmax=np.asarray(d["absmax"]),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d["dtype"]),
            blocksize=int(d["blocksize"]),
            quant_type=str(d["quant_type"]),
            code=np.asarray(d["quant_map"], dtype=np.float32),
            offset=offset,
            state2=state2,
        ).validate()


# --------------------------------------------------------------------------------------------
# Helpers: validation, nearest code, packing
# --------------------------------------------------------------------------------------------


def _check_blocksize(blocksize: int, valid=VALID_BLOCKSIZES) -> int:
    if not isinstance(blocksize, (int, np.integer)) or int(blocksize) not in valid:
        raise ValueError(f"blocksize must be a power of two in {valid[0]}..{valid[-1]}, got {blocksize!r}")
    return int(blocksize)


def _check_finite(A, what: str = "A") -> None:
    xp = get_array_module(A)
    finite = xp.isfinite(A)
    if not bool(finite.all()):
        bad = ~finite.reshape(-1)
        count = int(bad.sum())
        first = int(xp.argmax(bad))
        value = float(A.reshape(-1)[first])
        raise ValueError(
            f"cannot quantize {what} of shape {tuple(A.shape)}: {count} non-finite value(s) (NaN/inf); "
            f"first at flat index {first} (value {value})"
        )


@lru_cache(maxsize=None)
def _midpoints(code_bytes: bytes) -> np.ndarray:
    code = np.frombuffer(code_bytes, dtype=np.float32)
    return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


def code_midpoints(code: np.ndarray) -> np.ndarray:
    """The float32 midpoints (len(code) - 1,) between neighbouring entries of a SORTED code:
    ``(c_i + c_{i+1}) / 2`` in float32. For NF4 these equal the CUDA kernel's literals."""
    return _midpoints(np.ascontiguousarray(code, dtype=np.float32).tobytes())


@lru_cache(maxsize=None)
def _fp4_tables() -> tuple[np.ndarray, np.ndarray]:
    """FP4: midpoints of the sorted magnitudes (7,) and the 3-bit pattern of each sorted magnitude (8,)."""
    mags = FP4_CODE[:8]
    order = np.argsort(mags, kind="stable").astype(np.uint8)  # sorted magnitude index -> 3-bit pattern
    return code_midpoints(mags[order]), order


@lru_cache(maxsize=None)
def _sorted_tables(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Any other code: midpoints of the sorted values (15,) and the code index of each sorted value (16,)."""
    code = _CODES[quant_type]
    order = np.argsort(code, kind="stable").astype(np.uint8)
    return code_midpoints(code[order]), order


def _nearest_code(scaled, quant_type: str):
    """uint8 code index of each float32 ``scaled`` value in [-1, 1].

    NF4 (sorted code): index = #{midpoints < x}, so an exact tie goes to the lower code
    (``dQuantizeNF4`` tests ``x > threshold``). FP4 (``dQuantizeFP4``): sign bit = (x < 0), the
    magnitude by the sorted-magnitude midpoints with ``>``, so ties go to the smaller magnitude.
    INT4: nearest value in sorted order, ties to the lower value.
    """
    xp = get_array_module(scaled)
    if quant_type == "nf4":
        return _count_greater(scaled, code_midpoints(NF4_CODE))  # #{m < x}: ties -> lower
    if quant_type == "fp4":
        mid, pattern_np = _fp4_tables()
        sign = (scaled < 0).astype(xp.uint8) << 3
        mag_idx = _count_greater(xp.abs(scaled), mid)  # |x| > m: ties -> smaller magnitude
        return (sign | xp.asarray(pattern_np)[mag_idx.astype(xp.int64)]).astype(xp.uint8)
    mid, order_np = _sorted_tables(quant_type)
    return xp.asarray(order_np)[_count_greater(scaled, mid).astype(xp.int64)].astype(xp.uint8)


def _count_greater(x, midpoints: np.ndarray):
    """uint8 #{i : midpoints[i] < x} per element: searchsorted(side='left') for a few sorted midpoints,
    as len(midpoints) vectorised compares (~10x faster than searchsorted in NumPy for 15 midpoints)."""
    xp = get_array_module(x)
    out = xp.zeros(x.shape, dtype=xp.uint8)
    for m in midpoints.tolist():
        out += x > xp.float32(m)
    return out


def zero_code(quant_type: str) -> int:
    """The code of 0.0 used to pad an odd element count: 7 for NF4, 0 for FP4, 7 for INT4."""
    return int(_nearest_code(np.zeros(1, dtype=np.float32), quant_type)[0])


def pack_4bit(codes, pad_code: int = 7):
    """Pack 4-bit codes (uint8 (n,), values 0..15) two per byte, element 2j in the HIGH nibble.

    Returns uint8 of shape ((n + 1) // 2, 1); an odd n is padded with ``pad_code`` (the code of 0.0,
    7 for NF4) in the last low nibble. Raises ValueError if a code is > 15.
    """
    xp = get_array_module(codes)
    q = xp.asarray(codes).reshape(-1).astype(xp.uint8)
    if q.size and int(q.max()) > 15:
        raise ValueError(f"4-bit codes must be in 0..15, got max {int(q.max())}")
    if q.size % 2:
        q = xp.concatenate([q, xp.full((1,), pad_code, dtype=xp.uint8)])
    return ((q[0::2] << 4) | q[1::2]).astype(xp.uint8).reshape(-1, 1)


def unpack_4bit(packed, n: int):
    """Inverse of ``pack_4bit``: the first ``n`` 4-bit codes (uint8 (n,)) of ``packed`` (uint8, any shape).

    Raises ValueError if ``packed`` holds fewer than n codes.
    """
    xp = get_array_module(packed)
    b = xp.asarray(packed).reshape(-1)
    if b.dtype != xp.uint8:
        raise ValueError(f"packed 4-bit data must be uint8, got {b.dtype}")
    if 2 * b.size < n:
        raise ValueError(f"packed array of {b.size} bytes holds {2 * b.size} codes, fewer than n={n}")
    q = xp.empty(2 * b.size, dtype=xp.uint8)
    q[0::2] = b >> 4
    q[1::2] = b & 0x0F
    return q[:n]


def _blockwise_absmax_scaled(flat, blocksize: int):
    """(absmax float32 (nblocks,), scaled float32 (n,)) for a flat float32 array."""
    xp = get_array_module(flat)
    n = flat.size
    nblocks = -(-n // blocksize)
    padded = flat
    if nblocks * blocksize != n:  # zeros leave max|x| of the partial block unchanged
        padded = xp.concatenate([flat, xp.zeros(nblocks * blocksize - n, dtype=xp.float32)])
    blocks = padded.reshape(nblocks, blocksize)  # (nblocks, blocksize)
    # max|x| per block as max(max x, -min x): the same value, without an |x| temporary (2x faster)
    absmax = (xp.maximum(blocks.max(axis=1), -blocks.min(axis=1)) + xp.float32(0.0)).astype(xp.float32)  # (nblocks,), -0 -> +0
    recip = (xp.float32(1.0) / xp.maximum(absmax, xp.float32(1e-38))).astype(xp.float32)
    scaled = (blocks * recip[:, None]).astype(xp.float32, copy=False)  # (nblocks, blocksize)
    xp.clip(scaled, xp.float32(-1.0), xp.float32(1.0), out=scaled)
    return absmax, scaled.reshape(-1)[:n]


# --------------------------------------------------------------------------------------------
# 8-bit blockwise (the dynamic map), used by double quantization
# --------------------------------------------------------------------------------------------


def quantize_blockwise(A, code=None, blocksize: int = NESTED_BLOCKSIZE):
    """8-bit blockwise quantization with a sorted 256-entry code (bitsandbytes ``quantize_blockwise``,
    default backend): absmax per block of ``blocksize`` flattened elements, scaled = x / absmax
    (reciprocal-multiply, float32, clamped to [-1, 1]), nearest code via midpoints, ties -> lower.

    A: float array, any shape. code: sorted float32 (256,) (default ``create_dynamic_map()``).
    Returns (uint8 codes of A's shape, absmax float32 (ceil(n / blocksize),)).
    Raises ValueError for NaN/inf in A, an unsorted code, or a blocksize outside 32..4096.
    """
    xp = get_array_module(A)
    blocksize = _check_blocksize(blocksize)
    A = xp.asarray(A)
    _check_finite(A)
    code_np = create_dynamic_map() if code is None else to_numpy(code).astype(np.float32)
    if code_np.ndim != 1 or code_np.size < 2 or np.any(np.diff(code_np) < 0):
        raise ValueError(f"code must be a sorted 1-D array, got shape {code_np.shape}")
    flat = A.reshape(-1).astype(xp.float32)
    absmax, scaled = _blockwise_absmax_scaled(flat, blocksize)
    q = xp.searchsorted(xp.asarray(code_midpoints(code_np)), scaled, side="left").astype(xp.uint8)
    return q.reshape(A.shape), absmax


def dequantize_blockwise(A, quant_state: QuantState = None, *, absmax=None, code=None, blocksize: int = NESTED_BLOCKSIZE):
    """Inverse of ``quantize_blockwise``: ``out[j] = code[A_j] * absmax[j // blocksize]`` (float32, A's shape).

    Pass either a ``quant_state`` (absmax, code, blocksize from it) or ``absmax`` (+ optional code,
    default the dynamic map, and blocksize). Raises ValueError if absmax has the wrong length.
    """
    xp = get_array_module(A)
    if quant_state is not None:
        absmax, code, blocksize = quant_state.absmax, quant_state.code, quant_state.blocksize
    if absmax is None:
        raise ValueError("dequantize_blockwise needs a quant_state or absmax")
    code_x = xp.asarray(create_dynamic_map() if code is None else code, dtype=xp.float32)
    q = xp.asarray(A)
    n = q.size
    nblocks = -(-n // blocksize)
    absmax = xp.asarray(absmax, dtype=xp.float32).reshape(-1)
    if absmax.size != nblocks:
        raise ValueError(f"absmax has {absmax.size} entries; {n} values in blocks of {blocksize} need {nblocks}")
    vals = code_x[q.reshape(-1).astype(xp.int64)]
    out = vals * xp.repeat(absmax, blocksize)[:n]
    return out.astype(xp.float32).reshape(q.shape)


# --------------------------------------------------------------------------------------------
# 4-bit quantization
# --------------------------------------------------------------------------------------------


def quantize_4bit(A, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = False):
    """Blockwise 4-bit quantization (bitsandbytes ``functional.quantize_4bit``; QLoRA §3).

    A: float16/float32/float64 array of any shape with n elements, flattened row-major.
    Per block of ``blocksize`` consecutive elements: absmax = max|x| (float32); scaled = x * (1 /
    max(absmax, 1e-38)) clamped to [-1, 1]; code = nearest entry of the ``quant_type`` table (ties to
    the lower code; FP4/INT4 sign-magnitude). Codes packed two per byte (element 2j high nibble);
    odd n padded with the code of 0.0.
    ``compress_statistics=True`` (double quantization, QLoRA §3): offset = mean(absmax) (float32),
    absmax - offset is 8-bit quantized in blocks of 256 with the dynamic map.

    Returns (packed uint8 of shape ((n + 1) // 2, 1), QuantState); the state's absmax is float32
    (nblocks,) or, when nested, uint8 (nblocks,) with state2 holding absmax2 float32 (ceil(nblocks / 256),).
    Raises ValueError for NaN/inf in A (naming the count and first flat index), an empty A, a
    blocksize that is not a power of two in 32..4096, or an unknown quant_type.
    """
    xp = get_array_module(A)
    blocksize = _check_blocksize(blocksize)
    get_4bit_type(quant_type)
    A = xp.asarray(A)
    if A.size == 0:
        raise ValueError(f"cannot quantize an empty array of shape {tuple(A.shape)}")
    if A.dtype.kind != "f":
        raise ValueError(f"quantize_4bit needs a floating-point array, got dtype {A.dtype}")
    _check_finite(A)
    flat = A.reshape(-1).astype(xp.float32)  # (n,)
    absmax, scaled = _blockwise_absmax_scaled(flat, blocksize)  # (nblocks,), (n,)
    q = _nearest_code(scaled, quant_type)  # (n,) uint8 0..15
    packed = pack_4bit(q, pad_code=zero_code(quant_type))  # ((n+1)//2, 1)
    code = get_4bit_type(quant_type)
    if compress_statistics:
        offset = np.float32(float(absmax.astype(xp.float64).mean()))  # float64 sum, one rounding
        qabsmax, absmax2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        state2 = QuantState(
            absmax=absmax2,
            shape=tuple(absmax.shape),
            dtype="float32",
            blocksize=NESTED_BLOCKSIZE,
            quant_type="dynamic",
            code=create_dynamic_map(),
        )
        qs = QuantState(
            absmax=qabsmax,
            shape=tuple(A.shape),
            dtype=str(A.dtype),
            blocksize=blocksize,
            quant_type=quant_type,
            code=code,
            offset=offset,
            state2=state2,
        )
    else:
        qs = QuantState(
            absmax=absmax, shape=tuple(A.shape), dtype=str(A.dtype), blocksize=blocksize, quant_type=quant_type, code=code
        )
    return packed, qs


def dequantize_4bit(packed, quant_state: QuantState):
    """Inverse of ``quantize_4bit`` (bitsandbytes ``functional.dequantize_4bit``, default backend).

    ``out[j] = code[q_j] * absmax[j // blocksize]`` in float32 (absmax first dequantized when nested:
    ``dyn[qabsmax_i] * absmax2[i // 256] + offset``), then cast to ``quant_state.dtype`` and reshaped
    to ``quant_state.shape``. packed: uint8 ((n + 1) // 2, 1) (any shape with that many bytes).
    Returns an array of ``quant_state.shape`` and dtype, in packed's array module (numpy or cupy).
    Raises ValueError if packed or absmax does not match the state's shape/blocksize.
    """
    xp = get_array_module(packed)
    n = quant_state.numel
    codes = unpack_4bit(packed, n)  # (n,) uint8
    absmax = xp.asarray(quant_state.dequantize_absmax(), dtype=xp.float32).reshape(-1)
    nblocks = -(-n // quant_state.blocksize)
    if absmax.size != nblocks:
        raise ValueError(
            f"absmax has {absmax.size} entries; {n} elements in blocks of {quant_state.blocksize} need {nblocks}"
        )
    code = xp.asarray(quant_state.code if quant_state.code is not None else get_4bit_type(quant_state.quant_type))
    vals = code.astype(xp.float32)[codes.astype(xp.int64)]  # (n,) float32
    nfull = (n // quant_state.blocksize) * quant_state.blocksize
    out = xp.empty(n, dtype=xp.float32)
    out[:nfull] = (vals[:nfull].reshape(-1, quant_state.blocksize) * absmax[: n // quant_state.blocksize, None]).reshape(-1)
    if nfull < n:
        out[nfull:] = vals[nfull:] * absmax[-1]
    return out.reshape(quant_state.shape).astype(np.dtype(quant_state.dtype))


# --------------------------------------------------------------------------------------------
# Storage accounting
# --------------------------------------------------------------------------------------------


def quant_state_nbytes(quant_state: QuantState, include_code: bool = False) -> int:
    """Bytes held by the quantization constants of a state, measured from its arrays.

    absmax (float32 (nblocks,) = 4 bytes/block, or uint8 when nested = 1 byte/block) + when nested
    absmax2 (4 bytes per 256 blocks) + the float32 offset (4 bytes). The code tables (64 bytes for a
    4-bit code, 1024 for the dynamic map; shared by all layers in practice) count only with
    ``include_code=True``. Units: bytes.
    """
    xp_nbytes = int(quant_state.absmax.nbytes)
    if include_code and quant_state.code is not None:
        xp_nbytes += int(quant_state.code.nbytes)
    if quant_state.nested:
        xp_nbytes += quant_state_nbytes(quant_state.state2, include_code=include_code)
        xp_nbytes += np.dtype(np.float32).itemsize  # the offset
    return xp_nbytes


def bits_per_parameter(packed, quant_state: QuantState, include_code: bool = False) -> float:
    """Storage in bits per original element: 8 * (packed.nbytes + constants bytes) / n.

    Measured from the arrays (QLoRA §3): blocksize 64 gives 4 + 32/64 = 4.5 without double
    quantization and 4 + 8/64 + 32/(64*256) ~= 4.127 with it (plus a negligible 32 bits of offset).
    """
    return 8.0 * (int(packed.nbytes) + quant_state_nbytes(quant_state, include_code)) / quant_state.numel
