"""Dispatch to the C++ twins of the non-GEMM training ops (``minillm._fused``, csrc/fused_cpu.cpp).

Scope
    A training step spends about a third of its time outside matrix products: GELU, LayerNorm,
    the softmax in attention, cross-entropy and the AdamW update. Their NumPy code in
    ``functional.py`` and ``optim.py`` is the reference — the code to read first — and each is
    written as a few whole-array expressions, so every temporary is one more pass over memory.
    The C++ twin of each does the same arithmetic in one pass per row or element (OpenMP across
    rows when there are enough). This module decides which runs and adapts the arguments:

    ================================ ============================================================
    NumPy reference                  C++ twin (csrc/fused_cpu.cpp)
    ================================ ============================================================
    functional.GELU                  gelu_forward / gelu_backward (saves tanh, as the reference)
    functional.LayerNorm             layer_norm_forward / layer_norm_backward (llm.c's layout)
    functional.Softmax               softmax_forward / softmax_backward (last axis)
    functional.ScaledDotProduct-     attention_softmax_forward / _backward: scale, causal and
    Attention (between the GEMMs)    padding masks and softmax, in place on the (B, H, Tq, Tk) scores
    functional.CrossEntropy          cross_entropy_forward / cross_entropy_backward
    optim.adamw_update               adamw_update (bit-identical)
    functional.scatter_add (rows)    scatter_add_rows: the Embedding backward (np.add.at is slow)
    ================================ ============================================================

Dispatch (``accepts``)
    The twin runs when ``minillm._fused`` was built, every array is a NumPy float32 array, and
    ``$MINILLM_KERNELS`` (read at call time, as for the NF4 kernels in ``kernels.py``) is not
    ``numpy``. Anything else — float64 (``gradcheck``), cupy arrays, a pure-Python install,
    ``MINILLM_NO_EXTENSIONS=1`` (read at import) — runs the NumPy reference. ``MINILLM_KERNELS=cpp``
    raises RuntimeError when the extension is missing instead of falling back.

Sources
    llm.c ``train_gpt2.c`` (fused layernorm / softmax / cross-entropy forward and backward on the
    CPU); Cephes ``expf``; ``torch.optim.AdamW`` (operation order).

Deviations
    Results equal the NumPy reference to float32 rounding (relative 1e-5; tests/test_01_fused.py),
    not bit for bit, except AdamW (bit-identical): the exponential is a polynomial and row sums are
    accumulated in another order.
"""
from __future__ import annotations

import math
import os

import numpy as np

from minillm import backend

_F, _MISSING = backend.load_extension("_fused")


def available() -> bool:
    """True when the C++ twins were built and are not disabled (``MINILLM_NO_EXTENSIONS=1``)."""
    return _F is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False ("" when it is True)."""
    return "" if _F is not None else f"minillm._fused not importable ({_MISSING})"


def num_threads() -> int:
    """OpenMP threads the C++ twins use (1 when they are not built)."""
    return _F.num_threads() if _F is not None else 1


def set_num_threads(n: int) -> None:
    """Let the C++ twins use ``n`` OpenMP threads (default 1, see docs/performance.md for why).
    A no-op when they are not built."""
    if _F is not None:
        _F.set_num_threads(int(n))


def accepts(*arrays) -> bool:
    """True when the fused C++ kernels will run on ``arrays`` (see the module docstring).

    Raises RuntimeError when ``MINILLM_KERNELS=cpp`` forces the twin and it was not built.
    """
    mode = os.environ.get("MINILLM_KERNELS", "") or "auto"
    if mode == "numpy":
        return False
    if _F is None:
        if mode == "cpp":
            raise RuntimeError(f"MINILLM_KERNELS=cpp but {unavailable_reason()}")
        return False
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype != np.float32:
            return False
    return True


def _c32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


# ---------------------------------------------------------------------------------- GELU


def gelu_forward(x: np.ndarray):
    """tanh GELU of float32 ``x`` (any shape) -> (y, t), t = tanh(√(2/π)(x + 0.044715x³)) for the
    backward; fuses ``functional.GELU.forward``."""
    return _F.gelu_forward(_c32(x))


def gelu_backward(x: np.ndarray, t: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``g · GELU'(x)`` (shapes of x) from x and the saved t; fuses ``functional.GELU.backward``."""
    return _F.gelu_backward(_c32(x), t, _c32(g))


# ---------------------------------------------------------------------------- LayerNorm


def layer_norm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float):
    """LayerNorm of x (..., C) with weight and bias (C,): returns (y (..., C), mean (N,), rstd (N,)),
    N the number of rows; fuses ``functional.LayerNorm.forward``."""
    return _F.layer_norm_forward(_c32(x), _c32(w), _c32(b), float(eps))


def layer_norm_backward(g, x, w, mean, rstd, need_dx: bool, need_dw: bool):
    """(dx (..., C) or None, dweight (C,) or None, dbias (C,) or None) from the saved x, mean and
    rstd; fuses ``functional.LayerNorm.backward``."""
    return _F.layer_norm_backward(_c32(g), _c32(x), _c32(w), mean, rstd, bool(need_dx), bool(need_dw))


# ------------------------------------------------------------------------------ softmax


def softmax_forward(x: np.ndarray) -> np.ndarray:
    """Softmax over the LAST axis of float32 x; fuses ``functional.Softmax.forward``."""
    return _F.softmax_forward(_c32(x))


def softmax_backward(y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``y · (g − Σ g·y)`` over the last axis; fuses ``functional.Softmax.backward``."""
    return _F.softmax_backward(_c32(y), _c32(g))


def _kpm(key_padding_mask):
    if key_padding_mask is None:
        return None
    return np.ascontiguousarray(key_padding_mask != 0).view(np.uint8)


def attention_softmax_forward(att: np.ndarray, scale: float, causal: bool, key_padding_mask=None) -> np.ndarray:
    """Scores ``att`` = q·kᵀ (B, H, Tq, Tk), C-contiguous float32, turned IN PLACE into attention
    probabilities: ×scale, causal mask (query i sees keys j ≤ Tk − Tq + i), key padding mask (B, Tk)
    (nonzero = real token), stable softmax; a row without a visible key becomes uniform, as in the
    reference. Returns ``att``. Fuses the middle of ``functional.ScaledDotProductAttention.forward``."""
    _F.attention_softmax_forward(att, float(scale), bool(causal), _kpm(key_padding_mask))
    return att


def attention_softmax_backward(p: np.ndarray, gp: np.ndarray, scale: float, causal: bool,
                               key_padding_mask=None) -> np.ndarray:
    """``gp`` = dL/dp (B, H, Tq, Tk), C-contiguous float32, turned IN PLACE into dL/dscores:
    p·(gp − Σ gp·p)·scale on visible entries, 0 on masked ones. Returns ``gp``."""
    _F.attention_softmax_backward(_c32(p), gp, float(scale), bool(causal), _kpm(key_padding_mask))
    return gp


# ------------------------------------------------------------------------ cross-entropy


def cross_entropy_forward(logits2d: np.ndarray, targets: np.ndarray, ignore_index: int):
    """(nll (N,), lse (N,)) for logits (N, V) and int targets (N,); nll is 0 where the target is
    ``ignore_index``. Raises IndexError for another target outside [0, V). Fuses the forward of
    ``functional.CrossEntropy`` (before the reduction)."""
    return _F.cross_entropy_forward(_c32(logits2d), np.ascontiguousarray(targets, dtype=np.int64), int(ignore_index))


def cross_entropy_backward(logits2d, lse, targets, scale) -> np.ndarray:
    """(softmax(logits) − onehot(targets)) · scale[:, None], (N, V); scale (N,) float32 carries the
    reduction and is 0 on ignored rows. Fuses ``functional.CrossEntropy.backward``."""
    return _F.cross_entropy_backward(_c32(logits2d), lse, np.ascontiguousarray(targets, dtype=np.int64), _c32(scale))


def scatter_add_rows(target: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """In place ``target[index[i]] += values[i]`` for target (V, C) C-contiguous float32, integer
    index (N,) in [-V, V) (negative counts from the end) and values (N, C), repeated indices accumulated in order; fuses
    ``functional.scatter_add`` (``np.add.at``) for whole rows. Raises IndexError out of range."""
    _F.scatter_add_rows(target, np.ascontiguousarray(index, dtype=np.int64), _c32(values))


# -------------------------------------------------------------------------------- AdamW


def adamw_update(p, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """``optim.adamw_update`` in one pass, in place on C-contiguous float32 p, m, v (g is read).

    The float32 constants are the ones the reference computes, so the result is bit-identical.
    Raises ValueError when an array is not C-contiguous float32 of p's size.
    """
    dt = np.float32
    _F.adamw_update(p, _c32(g), m, v, dt(1 - lr * weight_decay), bool(weight_decay), dt(beta1), dt(1 - beta1),
                    dt(beta2), dt(1 - beta2), dt(math.sqrt(1 - beta2 ** step)), dt(eps),
                    dt(lr / (1 - beta1 ** step)))
