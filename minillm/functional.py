"""Differentiable operations, each with its forward and its backward side by side.

Scope
    Every op is a small ``Function`` subclass: ``forward`` computes on raw arrays and saves what
    ``backward`` needs; ``backward`` returns d(loss)/d(input) for each input. A plain function
    with the op's name wraps it (``add``, ``matmul``, ``layer_norm``, ...). Broadcasting ops sum
    their gradient back to each input's shape in one place, ``unbroadcast``. Ops keep the dtype
    of their inputs (float32 in training, float64 in ``gradcheck``); constants are cast to the
    tensor's dtype so NumPy 2's promotion rules never turn float32 into float64 behind our back.

    Fused ops (one forward, one hand-derived backward) for the transformer's hot spots:
    ``linear``, ``layer_norm``, ``gelu``, ``softmax``/``log_softmax``, ``cross_entropy`` and
    ``scaled_dot_product_attention``. ``gradcheck`` compares any op's backward with central
    finite differences in float64.

    The NumPy code of each op is the reference. For float32 NumPy arrays, GELU, LayerNorm,
    softmax, attention's softmax-and-mask, cross-entropy and the row scatter-add of the embedding
    backward hand their non-GEMM work to C++ twins (``minillm.fused``, csrc/fused_cpu.cpp) that do
    the same arithmetic in one pass; ``MINILLM_KERNELS=numpy`` or ``MINILLM_NO_EXTENSIONS=1`` keep
    the NumPy code everywhere (tests/test_01_fused.py checks each twin against it).

Sources
    * LayerNorm: Ba, Kiros & Hinton 2016, Eq. 3–4; backward as in llm.c ``layernorm_backward``.
    * GELU, tanh form: Hendrycks & Gimpel 2016 §2 (the approximation GPT-2 uses,
      ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``), = ``torch.nn.functional.gelu(approximate="tanh")``.
    * Scaled dot-product attention: Vaswani et al. 2017 Eq. 1, ``softmax(QKᵀ/√d_k)V``, causal mask
      as in GPT-2; = ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``.
    * Cross-entropy with ``ignore_index=-100`` and mean over non-ignored targets:
      ``torch.nn.functional.cross_entropy``.
    * Inverted dropout: Srivastava et al. 2014 §10 ("scale at training time").

Deviations
    * Masked attention scores are filled with the dtype's most negative finite value, not −inf, so
      a query row whose keys are all masked (a padding row) gives a finite uniform average instead
      of NaN (docs/bugs.md B08). Rows with at least one visible key are exactly as with −inf
      (exp underflows to 0). There is no option to restore −inf: it only adds NaNs.
    * ``cross_entropy`` with ``reduction="mean"`` and no non-ignored target returns 0 (PyTorch
      returns NaN), so a batch without supervised tokens cannot poison training (docs/bugs.md C13).
    * ``max`` over an axis with ties splits the gradient equally among the tied entries (like
      ``torch.amax``; ``torch.max(dim)`` gives it all to one index).
"""
from __future__ import annotations

import builtins
import math
from typing import Sequence

import numpy as np

from minillm import backend, fused
from minillm.tensor import Function, Tensor, is_grad_enabled, no_grad

#: Label value that takes no part in the loss (PyTorch ``CrossEntropyLoss(ignore_index=-100)``).
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- helpers


def _xp(a):
    return backend.get_array_module(a)


def unbroadcast(grad, shape: tuple):
    """Sum ``grad`` down to ``shape``: the one place broadcasting is undone in backward.

    Leading axes that broadcasting added are summed away; axes where ``shape`` has size 1 but
    ``grad`` does not are summed with keepdims.
    """
    if grad.shape == shape:
        return grad
    ndim_extra = grad.ndim - len(shape)
    if ndim_extra > 0:
        grad = grad.sum(axis=tuple(range(ndim_extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def _as_tensor(x, like: Tensor) -> Tensor:
    """Wrap a constant (Python number or array) as a Tensor in ``like``'s dtype and module."""
    if isinstance(x, Tensor):
        return x
    xp = _xp(like.data)
    arr = xp.asarray(x)
    if arr.dtype.kind in "fiub" and like.dtype.kind == "f":
        arr = arr.astype(like.dtype, copy=False)
    return Tensor(arr)


def _pair(a, b) -> tuple[Tensor, Tensor]:
    if isinstance(a, Tensor):
        return a, _as_tensor(b, a)
    return _as_tensor(a, b), b


def _norm_axis(axis, ndim: int):
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(a % ndim for a in axis)


def _expand_reduced(g, in_shape: tuple, axis: tuple, keepdims: bool):
    """Broadcast a reduced gradient back to the input shape (backward of sum/mean)."""
    xp = _xp(g)
    if not keepdims:
        for a in sorted(axis):
            g = xp.expand_dims(g, a)
    return xp.broadcast_to(g, in_shape)


# ------------------------------------------------------------------ elementwise binary


class Add(Function):
    """a + b (broadcasting); backward sums the gradient back to each input's shape."""

    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a + b

    def backward(self, g):
        sa, sb = self.shapes
        return (unbroadcast(g, sa) if self.needs_input_grad[0] else None,
                unbroadcast(g, sb) if self.needs_input_grad[1] else None)


class Sub(Function):
    """a − b (broadcasting); d/da = g, d/db = −g, unbroadcast."""

    def forward(self, a, b):
        self.shapes = (a.shape, b.shape)
        return a - b

    def backward(self, g):
        sa, sb = self.shapes
        return (unbroadcast(g, sa) if self.needs_input_grad[0] else None,
                unbroadcast(-g, sb) if self.needs_input_grad[1] else None)


class Mul(Function):
    """a · b elementwise (broadcasting); d/da = g·b, d/db = g·a."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        a, b = self.a, self.b
        return (unbroadcast(g * b, a.shape) if self.needs_input_grad[0] else None,
                unbroadcast(g * a, b.shape) if self.needs_input_grad[1] else None)


class Div(Function):
    """a / b elementwise (broadcasting); d/da = g/b, d/db = −g·a/b²."""

    def forward(self, a, b):
        self.a, self.b = a, b
        return a / b

    def backward(self, g):
        a, b = self.a, self.b
        ga = unbroadcast(g / b, a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(-g * a / (b * b), b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Pow(Function):
    """a ** b; b may be a tensor (then d/db = a^b · ln a, defined for a > 0)."""

    def forward(self, a, b):
        self.a, self.b = a, b
        self.out = a ** b
        return self.out

    def backward(self, g):
        xp = _xp(g)
        a, b = self.a, self.b
        ga = unbroadcast(g * b * a ** (b - 1), a.shape) if self.needs_input_grad[0] else None
        gb = None
        if self.needs_input_grad[1]:
            gb = unbroadcast(g * self.out * xp.log(xp.where(a > 0, a, 1)), b.shape)
        return ga, gb


def add(a, b) -> Tensor:
    """a + b with broadcasting."""
    return Add.apply(*_pair(a, b))


def sub(a, b) -> Tensor:
    """a − b with broadcasting."""
    return Sub.apply(*_pair(a, b))


def mul(a, b) -> Tensor:
    """a · b (elementwise) with broadcasting."""
    return Mul.apply(*_pair(a, b))


def div(a, b) -> Tensor:
    """a / b with broadcasting."""
    return Div.apply(*_pair(a, b))


def neg(a: Tensor) -> Tensor:
    """−a."""
    return Mul.apply(a, _as_tensor(-1, a))


def pow(a, b) -> Tensor:
    """a ** b with broadcasting (b a number or a tensor)."""
    return Pow.apply(*_pair(a, b))


class Maximum(Function):
    """Elementwise max(a, b); the gradient goes to the larger input (to ``a`` on ties)."""

    def forward(self, a, b):
        self.a_wins = a >= b
        self.shapes = (a.shape, b.shape)
        return _xp(a).maximum(a, b)

    def backward(self, g):
        sa, sb = self.shapes
        return (unbroadcast(g * self.a_wins, sa) if self.needs_input_grad[0] else None,
                unbroadcast(g * ~self.a_wins, sb) if self.needs_input_grad[1] else None)


def maximum(a, b) -> Tensor:
    """Elementwise maximum with broadcasting; gradient to the larger input (``a`` on ties)."""
    return Maximum.apply(*_pair(a, b))


def minimum(a, b) -> Tensor:
    """Elementwise minimum: −max(−a, −b)."""
    a, b = _pair(a, b)
    return neg(maximum(neg(a), neg(b)))


class Clip(Function):
    """clip(x, lo, hi); gradient 1 strictly inside [lo, hi] and at the bounds, 0 outside."""

    def forward(self, x, lo, hi):
        xp = _xp(x)
        self.inside = (x >= lo) & (x <= hi)
        return xp.clip(x, lo, hi)

    def backward(self, g):
        return g * self.inside, None, None


def clip(x: Tensor, lo, hi) -> Tensor:
    """Clamp ``x`` to [lo, hi] (``torch.clamp``); lo/hi are numbers or arrays broadcastable to x."""
    xp = _xp(x.data)
    lo = xp.asarray(lo.data if isinstance(lo, Tensor) else lo, dtype=x.dtype)
    hi = xp.asarray(hi.data if isinstance(hi, Tensor) else hi, dtype=x.dtype)
    return Clip.apply(x, lo, hi)


# -------------------------------------------------------------------------- matmul


class MatMul(Function):
    """a (..., M, K) @ b (..., K, N) -> (..., M, N), batch dims broadcast."""

    def forward(self, a, b):
        if a.ndim < 2 or b.ndim < 2:
            raise ValueError(f"matmul needs inputs with ≥ 2 dims, got shapes {a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul shape mismatch: {a.shape} @ {b.shape}")
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        a, b = self.a, self.b
        xp = _xp(g)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(g @ xp.swapaxes(b, -1, -2), a.shape)
        if self.needs_input_grad[1]:
            if b.ndim == 2:  # shared weight: fold every batch dim into one GEMM
                gb = a.reshape(-1, a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
            else:
                gb = unbroadcast(xp.swapaxes(a, -1, -2) @ g, b.shape)
        return ga, gb


def matmul(a, b) -> Tensor:
    """Batched matrix product ``a @ b``; shapes (..., M, K) @ (..., K, N) -> (..., M, N)."""
    return MatMul.apply(*_pair(a, b))


class Linear(Function):
    """y = x Wᵀ + b for x (..., in), W (out, in) (PyTorch's layout), b (out,) or None."""

    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"linear: input (..., {x.shape[-1]}) does not match weight {w.shape} (out, in)")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"linear: bias {b.shape} does not match weight {w.shape} (out, in)")
        self.x, self.w, self.has_b = x, w, b is not None
        y = x.reshape(-1, x.shape[-1]) @ w.T  # (N, in) @ (in, out) -> (N, out)
        if b is not None:
            y += b
        return y.reshape(*x.shape[:-1], w.shape[0])

    def backward(self, g):
        x, w = self.x, self.w
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gx = (g2 @ w).reshape(x.shape) if self.needs_input_grad[0] else None  # (N, in)
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_input_grad[1] else None  # (out, in)
        gb = g2.sum(axis=0) if self.has_b and self.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Affine map ``x @ weight.T + bias`` (``torch.nn.functional.linear``).

    Shapes: x (..., in), weight (out, in), bias (out,) -> (..., out). One GEMM forward, two back.
    """
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)


# ---------------------------------------------------------------------- reductions


class Sum(Function):
    """Σ over axes; backward broadcasts g back over the summed axes."""

    def forward(self, x, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = x.shape, _norm_axis(axis, x.ndim), keepdims
        return x.sum(axis=self.axis, keepdims=keepdims)

    def backward(self, g):
        return _expand_reduced(g, self.shape, self.axis, self.keepdims)


class Max(Function):
    """max over axes; backward sends g to the arg-max entries (shared equally on ties)."""

    def forward(self, x, axis=None, keepdims=False):
        self.x, self.axis, self.keepdims = x, _norm_axis(axis, x.ndim), keepdims
        self.out = x.max(axis=self.axis, keepdims=True)
        return self.out if keepdims else self.out.reshape([s for i, s in enumerate(x.shape) if i not in self.axis])

    def backward(self, g):
        winners = (self.x == self.out).astype(g.dtype)
        winners /= winners.sum(axis=self.axis, keepdims=True)
        return _expand_reduced(g, self.x.shape, self.axis, self.keepdims) * winners


class Var(Function):
    """Variance over axes with Bessel ``correction`` (0 = population, as LayerNorm uses)."""

    def forward(self, x, axis=None, keepdims=False, correction=0):
        self.axis, self.keepdims = _norm_axis(axis, x.ndim), keepdims
        n = int(np.prod([x.shape[a] for a in self.axis]))
        if n - correction <= 0:
            raise ValueError(f"var over {n} elements with correction {correction} divides by zero")
        self.d = x - x.mean(axis=self.axis, keepdims=True)
        self.denom = n - correction
        return (self.d * self.d).sum(axis=self.axis, keepdims=keepdims) / self.denom

    def backward(self, g):
        g = _expand_reduced(g, self.d.shape, self.axis, self.keepdims)
        return g * self.d * (2.0 / self.denom)


def sum(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - mirrors torch.sum
    """Sum over ``axis`` (int, tuple or None = all)."""
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis`` (int, tuple or None = all)."""
    n = int(np.prod([x.shape[a] for a in _norm_axis(axis, x.ndim)]))
    return mul(sum(x, axis, keepdims), 1.0 / n)


def max(x: Tensor, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 - mirrors torch.max
    """Maximum over ``axis``; ties share the gradient equally (as ``torch.amax``)."""
    return Max.apply(x, axis=axis, keepdims=keepdims)


def var(x: Tensor, axis=None, keepdims: bool = False, correction: int = 0) -> Tensor:
    """Variance over ``axis``; ``correction=1`` gives the unbiased estimator."""
    return Var.apply(x, axis=axis, keepdims=keepdims, correction=correction)


# ---------------------------------------------------------------- elementwise unary


class Exp(Function):
    """eˣ; d/dx = eˣ (the saved output)."""

    def forward(self, x):
        self.out = _xp(x).exp(x)
        return self.out

    def backward(self, g):
        return g * self.out


class Log(Function):
    """ln x; d/dx = 1/x."""

    def forward(self, x):
        self.x = x
        return _xp(x).log(x)

    def backward(self, g):
        return g / self.x


class Tanh(Function):
    """tanh x; d/dx = 1 − tanh² x."""

    def forward(self, x):
        self.out = _xp(x).tanh(x)
        return self.out

    def backward(self, g):
        return g * (1 - self.out * self.out)


class Sqrt(Function):
    """√x; d/dx = 1/(2√x)."""

    def forward(self, x):
        self.out = _xp(x).sqrt(x)
        return self.out

    def backward(self, g):
        return g / (2 * self.out)


class ReLU(Function):
    """max(x, 0); d/dx = 1 where x > 0, else 0."""

    def forward(self, x):
        self.pos = x > 0
        return x * self.pos

    def backward(self, g):
        return g * self.pos


_GELU_C = math.sqrt(2.0 / math.pi)


class GELU(Function):
    """0.5·x·(1 + tanh(u)), u = √(2/π)(x + 0.044715x³)  (Hendrycks & Gimpel 2016 §2).

    Written with in-place array operations: on the (B, T, 4C) MLP activations each temporary
    costs a pass over memory, and this op is the largest elementwise cost of a training step.
    On float32 NumPy arrays the C++ twin (``fused.gelu_forward``) does the same in one pass.
    """

    def forward(self, x):
        self.x = x
        self.fused = fused.accepts(x)
        if self.fused:  # the lines below in one pass (csrc/fused_cpu.cpp), saving the same t
            y, self.t = fused.gelu_forward(x)
            return y
        xp = _xp(x)
        c, k = x.dtype.type(_GELU_C), x.dtype.type(0.044715)
        u = x * x
        u *= k
        u += 1
        u *= x
        u *= c  # u = c·(x + k·x³)
        self.t = xp.tanh(u, out=u)
        y = self.t + 1
        y *= x
        y *= x.dtype.type(0.5)
        return y

    def backward(self, g):
        x, t = self.x, self.t
        if self.fused:
            return fused.gelu_backward(x, t, g)
        c, k3, half = x.dtype.type(_GELU_C), x.dtype.type(3 * 0.044715), x.dtype.type(0.5)
        # dy/dx = 0.5·(1 + t) + 0.5·x·(1 − t²)·c·(1 + 3k·x²)
        d = x * x
        d *= k3
        d += 1
        d *= c
        sech2 = t * t
        sech2 -= 1
        sech2 *= -half  # 0.5·(1 − t²)
        d *= sech2
        d *= x
        d += half
        d += half * t
        d *= g
        return d


class Sigmoid(Function):
    """σ(x) = 1/(1 + e^{−x}) computed without overflow; d/dx = σ(1 − σ)."""

    def forward(self, x):
        xp = _xp(x)
        # stable: e^{-|x|} never overflows
        e = xp.exp(-xp.abs(x))
        self.out = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return self.out

    def backward(self, g):
        return g * self.out * (1 - self.out)


class Softplus(Function):
    """log(1 + eˣ) = max(x, 0) + log1p(e^{−|x|}): finite for any x (docs/bugs.md B16)."""

    def forward(self, x):
        xp = _xp(x)
        self.x = x
        return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))

    def backward(self, g):
        xp = _xp(g)
        e = xp.exp(-xp.abs(self.x))
        sig = xp.where(self.x >= 0, 1 / (1 + e), e / (1 + e))
        return g * sig


def exp(x: Tensor) -> Tensor:
    """eˣ elementwise."""
    return Exp.apply(x)


def log(x: Tensor) -> Tensor:
    """Natural log elementwise."""
    return Log.apply(x)


def tanh(x: Tensor) -> Tensor:
    """tanh elementwise."""
    return Tanh.apply(x)


def sqrt(x: Tensor) -> Tensor:
    """√x elementwise."""
    return Sqrt.apply(x)


def relu(x: Tensor) -> Tensor:
    """max(x, 0) elementwise."""
    return ReLU.apply(x)


def gelu(x: Tensor) -> Tensor:
    """GELU, GPT-2's tanh approximation (= ``F.gelu(x, approximate="tanh")``)."""
    return GELU.apply(x)


def sigmoid(x: Tensor) -> Tensor:
    """σ(x) = 1/(1 + e^{−x}), computed without overflow."""
    return Sigmoid.apply(x)


def softplus(x: Tensor) -> Tensor:
    """log(1 + eˣ), stable for |x| up to the float range."""
    return Softplus.apply(x)


def logsigmoid(x: Tensor) -> Tensor:
    """log σ(x) = −softplus(−x); finite for x = −1000 (gives −1000), docs/bugs.md B16."""
    return neg(softplus(neg(x)))


# ------------------------------------------------------------------- shape ops


class Reshape(Function):
    """x.reshape(shape); backward reshapes g back."""

    def forward(self, x, shape):
        self.shape = x.shape
        return x.reshape(shape)

    def backward(self, g):
        return g.reshape(self.shape), None


class Permute(Function):
    """x.transpose(axes); backward applies the inverse permutation."""

    def forward(self, x, axes):
        self.axes = tuple(a % x.ndim for a in axes)
        return x.transpose(self.axes)

    def backward(self, g):
        return g.transpose(tuple(np.argsort(self.axes))), None


def reshape(x: Tensor, shape) -> Tensor:
    """View ``x`` with a new shape (same number of elements; −1 allowed once)."""
    return Reshape.apply(x, tuple(shape))


def permute(x: Tensor, axes) -> Tensor:
    """Reorder axes (``torch.permute``)."""
    return Permute.apply(x, tuple(axes))


def transpose(x: Tensor, axis0: int = -2, axis1: int = -1) -> Tensor:
    """Swap two axes (``torch.transpose``)."""
    axes = list(range(x.ndim))
    axes[axis0], axes[axis1] = axes[axis1], axes[axis0]
    return Permute.apply(x, tuple(axes))


def _is_advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(hasattr(i, "shape") or isinstance(i, (list, Tensor)) for i in items)


def scatter_add(target, index, values) -> None:
    """In place ``target[index] += values`` with repeated indices accumulated (``np.add.at``)."""
    if backend.is_cupy(target):  # pragma: no cover - GPU only
        import cupyx

        cupyx.scatter_add(target, index, values)
    elif (target.ndim == 2 and target.flags.c_contiguous and isinstance(index, np.ndarray) and index.ndim == 1
          and index.dtype.kind in "iu" and values.shape == (index.shape[0], target.shape[1])
          and fused.accepts(target, values)):
        fused.scatter_add_rows(target, index, values)  # whole rows, one pass (csrc/fused_cpu.cpp)
    else:
        np.add.at(target, index, values)


class Index(Function):
    """x[index] for basic (slices, ints) and advanced (integer array) indexing."""

    def forward(self, x, index):
        self.shape, self.index, self.advanced = x.shape, index, _is_advanced(index)
        self.dtype = x.dtype
        return x[index]

    def backward(self, g):
        xp = _xp(g)
        out = xp.zeros(self.shape, dtype=self.dtype)
        if self.advanced:  # repeated indices must accumulate
            scatter_add(out, self.index, g)
        else:
            out[self.index] = g
        return out, None


def index(x: Tensor, index) -> Tensor:
    """``x[index]`` (numpy semantics); index arrays may be Tensors."""
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return Index.apply(x, index)


class Gather(Function):
    """out[..., j, ...] = x[..., index[..., j, ...], ...] along ``axis`` (``torch.gather``)."""

    def forward(self, x, index, axis):
        xp = _xp(x)
        self.shape, self.index, self.axis, self.dtype = x.shape, index, axis % x.ndim, x.dtype
        return xp.take_along_axis(x, index, axis=self.axis)

    def backward(self, g):
        xp = _xp(g)
        out = xp.zeros(self.shape, dtype=self.dtype)
        # open-mesh coordinates of every index entry (what np.indices(..., sparse=True) gives; built
        # by hand because cupy.indices has no ``sparse`` argument)
        nd = self.index.ndim
        idx = [xp.arange(s).reshape((1,) * i + (s,) + (1,) * (nd - i - 1)) for i, s in enumerate(self.index.shape)]
        idx[self.axis] = self.index
        scatter_add(out, tuple(idx), g)
        return out, None, None


def gather(x: Tensor, axis: int, index) -> Tensor:
    """Pick entries of ``x`` along ``axis`` by an integer array of the same ndim (``torch.gather``)."""
    index = index.data if isinstance(index, Tensor) else index
    return Gather.apply(x, index, axis)


class Concat(Function):
    """concatenate along ``axis``; backward splits g at the same boundaries."""

    def forward(self, *xs, axis=0):
        xp = _xp(xs[0])
        self.axis = axis
        self.sizes = [x.shape[axis] for x in xs]
        return xp.concatenate(xs, axis=axis)

    def backward(self, g):
        xp = _xp(g)
        bounds = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(xp.split(g, bounds, axis=self.axis))


def concat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along an existing axis (``torch.cat``)."""
    return Concat.apply(*tensors, axis=axis)


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """Join tensors along a new axis (``torch.stack``)."""
    return concat([reshape(t, t.shape[:axis % (t.ndim + 1)] + (1,) + t.shape[axis % (t.ndim + 1):])
                   for t in tensors], axis=axis)


def split(x: Tensor, split_size_or_sections, axis: int = 0) -> list[Tensor]:
    """Split into chunks of ``split_size`` (int) or of the listed sizes (``torch.split``)."""
    n = x.shape[axis]
    if isinstance(split_size_or_sections, int) and split_size_or_sections < 1:
        raise ValueError(f"split size must be ≥ 1, got {split_size_or_sections}")
    if isinstance(split_size_or_sections, int):
        sizes = [split_size_or_sections] * (n // split_size_or_sections)
        if n % split_size_or_sections:
            sizes.append(n % split_size_or_sections)
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != n:
            raise ValueError(f"split sizes {sizes} do not add up to dimension {axis} of size {n}")
    out, start = [], 0
    for s in sizes:
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(start, start + s)
        out.append(index(x, tuple(idx)))
        start += s
    return out


class Where(Function):
    """where(cond, a, b); g goes to a where cond, to b elsewhere (unbroadcast)."""

    def forward(self, cond, a, b):
        self.cond, self.shapes = cond, (a.shape, b.shape)
        return _xp(a).where(cond, a, b)

    def backward(self, g):
        xp = _xp(g)
        sa, sb = self.shapes
        zero = xp.zeros((), dtype=g.dtype)
        return (None,
                unbroadcast(xp.where(self.cond, g, zero), sa) if self.needs_input_grad[1] else None,
                unbroadcast(xp.where(self.cond, zero, g), sb) if self.needs_input_grad[2] else None)


def where(cond, a, b) -> Tensor:
    """Elementwise ``a if cond else b`` with broadcasting (``cond`` is a boolean array)."""
    cond = cond.data if isinstance(cond, Tensor) else cond
    a, b = _pair(a, b)
    return Where.apply(cond, a, b)


def masked_fill(x: Tensor, mask, value: float) -> Tensor:
    """``x`` with ``value`` where ``mask`` is True (``torch.Tensor.masked_fill``)."""
    return where(mask, _as_tensor(value, x), x)


class Embedding(Function):
    """weight (V, C)[ids (...)] -> (..., C); backward scatters rows back with accumulation."""

    def forward(self, weight, ids):
        self.ids, self.wshape, self.dtype = ids, weight.shape, weight.dtype
        return weight[ids]

    def backward(self, g):
        xp = _xp(g)
        gw = xp.zeros(self.wshape, dtype=self.dtype)
        scatter_add(gw, self.ids.reshape(-1), g.reshape(-1, self.wshape[1]))
        return gw, None


def embedding(ids, weight: Tensor) -> Tensor:
    """Row lookup ``weight[ids]`` (``torch.nn.functional.embedding``); ids int array (B, T)."""
    ids = ids.data if isinstance(ids, Tensor) else ids
    V = weight.shape[0]
    # one host read of a device flag (a cupy sync); the offending id is looked up only on error
    if ids.size and bool(((ids < 0) | (ids >= V)).any()):
        bad = int(ids.max()) if int(ids.max()) >= V else int(ids.min())
        raise IndexError(f"embedding: token id {bad} out of range for a vocabulary of {V}")
    return Embedding.apply(weight, ids)


# ------------------------------------------------------------ softmax family


class Softmax(Function):
    """softmax over ``axis`` (max subtracted first); backward y·(g − Σ g·y)."""

    def forward(self, x, axis=-1):
        xp = _xp(x)
        self.axis = axis
        self.last = axis in (-1, x.ndim - 1) and fused.accepts(x)
        if self.last:  # the lines below in one pass per row (csrc/fused_cpu.cpp)
            self.out = fused.softmax_forward(x)
            return self.out
        e = x - x.max(axis=axis, keepdims=True)
        xp.exp(e, out=e)
        e /= e.sum(axis=axis, keepdims=True)
        self.out = e
        return self.out

    def backward(self, g):
        y = self.out
        if self.last:
            return fused.softmax_backward(y, g), None
        gx = g - (g * y).sum(axis=self.axis, keepdims=True)
        gx *= y
        return gx, None


class LogSoftmax(Function):
    """log-softmax over ``axis`` (stable); backward g − softmax·Σ g."""

    def forward(self, x, axis=-1):
        xp = _xp(x)
        self.axis = axis
        z = x - x.max(axis=axis, keepdims=True)
        self.out = z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
        return self.out

    def backward(self, g):
        xp = _xp(g)
        return g - xp.exp(self.out) * g.sum(axis=self.axis, keepdims=True), None


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Numerically stable softmax (the row max is subtracted first; docs/bugs.md B08)."""
    return Softmax.apply(x, axis=axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """Numerically stable log-softmax: log_softmax([1000, 0]) = [0, −1000] (docs/bugs.md B16)."""
    return LogSoftmax.apply(x, axis=axis)


class CrossEntropy(Function):
    """Fused log-softmax + negative log-likelihood over the last axis."""

    def forward(self, logits, targets, ignore_index=IGNORE_INDEX, reduction="mean"):
        xp = _xp(logits)
        V = logits.shape[-1]
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
                             f"got {targets.shape}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"cross_entropy: unknown reduction {reduction!r} (mean, sum or none)")
        l2 = logits.reshape(-1, V)
        t = targets.reshape(-1)
        valid = t != ignore_index
        t_safe = xp.where(valid, t, 0)
        out_of_range = (t_safe < 0) | (t_safe >= V)
        # the range check and the count of supervised targets in ONE host read (one cupy sync)
        n_bad, count = (int(v) for v in backend.to_numpy(xp.stack([out_of_range.sum(), valid.sum()])))
        if n_bad:
            bad = t_safe[out_of_range][0]
            raise IndexError(f"cross_entropy: target {int(bad)} out of range for {V} classes")
        self.shape, self.reduction, self.t, self.valid = logits.shape, reduction, t_safe, valid
        self.fused = fused.accepts(logits)
        if self.fused:  # the three lines below in one pass per row (csrc/fused_cpu.cpp)
            nll, self.lse = fused.cross_entropy_forward(l2, t_safe, -1)  # lse = log Σ exp(logits)
            nll *= valid
            self.z = l2
        else:
            z = l2 - l2.max(axis=1, keepdims=True)
            lse = xp.log(xp.exp(z).sum(axis=1))
            nll = (lse - z[xp.arange(z.shape[0]), t_safe]) * valid  # (N,)
            self.z, self.lse = z, lse
        if reduction == "none":
            return nll.reshape(targets.shape)
        total = nll.sum()
        if reduction == "sum":
            return total
        self.count = count
        return total / builtins.max(self.count, 1)

    def backward(self, g):
        xp = _xp(g)
        if self.reduction == "none":
            scale = g.reshape(-1) * self.valid
        elif self.reduction == "sum":
            scale = g * self.valid
        else:
            scale = (g / builtins.max(self.count, 1)) * self.valid
        scale = scale.astype(self.z.dtype)
        if self.fused:  # (softmax − onehot)·scale in one pass per row (csrc/fused_cpu.cpp)
            return fused.cross_entropy_backward(self.z, self.lse, self.t, scale).reshape(self.shape), None
        p = self.z - self.lse[:, None]
        xp.exp(p, out=p)  # softmax, (N, V)
        p[xp.arange(p.shape[0]), self.t] -= 1
        p *= scale[:, None]
        return p.reshape(self.shape), None


def cross_entropy(logits: Tensor, targets, ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``logits`` (..., V) against integer ``targets`` (...).

    Targets equal to ``ignore_index`` (−100) contribute nothing. ``reduction``: "mean" divides by
    the number of non-ignored targets (0 if there are none, not NaN), "sum" returns the total
    (nats), "none" the per-position loss. Matches ``torch.nn.functional.cross_entropy``.
    Raises ValueError on a shape mismatch and IndexError on a target outside [0, V).
    """
    targets = targets.data if isinstance(targets, Tensor) else targets
    return CrossEntropy.apply(logits, targets, ignore_index=ignore_index, reduction=reduction)


# ------------------------------------------------------------------ layer norm


class LayerNorm(Function):
    """y = (x − μ)/√(σ² + ε) · w + b over the last axis (Ba et al. 2016, Eq. 3–4)."""

    def forward(self, x, w, b, eps=1e-5):
        xp = _xp(x)
        self.w = w
        if fused.accepts(x, w, b):  # the lines below in one pass per row (csrc/fused_cpu.cpp)
            y, self.mean, self.rstd = fused.layer_norm_forward(x, w, b, eps)
            self.x, self.xhat = x, None  # backward recomputes xhat from x, mean and rstd
            return y
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(axis=-1, keepdims=True)
        self.rstd = 1.0 / xp.sqrt(var + x.dtype.type(eps))  # (..., 1)
        xc *= self.rstd
        self.xhat = xc  # (..., C)
        y = xc * w
        y += b
        return y

    def backward(self, g):
        xhat, rstd = self.xhat, self.rstd
        if xhat is None:
            need_w = self.needs_input_grad[1] or self.needs_input_grad[2]
            return fused.layer_norm_backward(g, self.x, self.w, self.mean, rstd, self.needs_input_grad[0], need_w)
        C = xhat.shape[-1]
        gw = (g * xhat).reshape(-1, C).sum(axis=0) if self.needs_input_grad[1] else None
        gb = g.reshape(-1, C).sum(axis=0) if self.needs_input_grad[2] else None
        gx = None
        if self.needs_input_grad[0]:
            gxhat = g * self.w
            gx = rstd * (gxhat - gxhat.mean(axis=-1, keepdims=True)
                         - xhat * (gxhat * xhat).mean(axis=-1, keepdims=True))
        return gx, gw, gb


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Layer normalisation over the last axis; x (..., C), weight and bias (C,). Fused backward."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"layer_norm: input (..., {x.shape[-1]}) vs weight {weight.shape}")
    return LayerNorm.apply(x, weight, bias, eps=eps)


# -------------------------------------------------------------------- dropout


class Dropout(Function):
    """x · keep, where keep is the 0/(1/(1−p)) mask drawn by ``dropout``."""

    def forward(self, x, keep):
        self.keep = keep
        return x * keep

    def backward(self, g):
        return g * self.keep, None


def dropout(x: Tensor, p: float, rng: np.random.Generator | None, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability ``p``, scale the rest by 1/(1−p).

    Identity when ``training`` is False or p == 0. ``rng`` (a numpy Generator) makes the mask
    reproducible; it is required in training with p > 0. Raises ValueError for p outside [0, 1).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout in training needs a numpy Generator (explicit seed)")
    keep = (rng.random(x.shape) >= p).astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))
    keep = backend.get_array_module(x.data).asarray(keep)
    return Dropout.apply(x, keep)


# -------------------------------------------------------------- attention


class ScaledDotProductAttention(Function):
    """softmax(Q Kᵀ/√d + mask) V for q (B, H, Tq, D), k and v (B, H, Tk, D) (Vaswani et al. Eq. 1).

    Causal: query i sits at absolute position (Tk − Tq + i) — the KV-cache case — and sees keys
    j ≤ Tk − Tq + i. ``key_padding_mask`` (B, Tk), True/1 = a real token that may be attended to.
    """

    def forward(self, q, k, v, causal=True, key_padding_mask=None, scale=None):
        xp = _xp(q)
        Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
        self.scale = q.dtype.type(1.0 / math.sqrt(D) if scale is None else scale)
        att = q @ xp.swapaxes(k, -1, -2)  # (B, H, Tq, Tk), scaled below
        self.q, self.k, self.v = q, k, v
        self.fused = fused.accepts(att)
        if self.fused:  # the scale, masks and softmax below in one pass per row, in place (csrc/fused_cpu.cpp)
            self.causal, self.kpm, self.visible = causal, key_padding_mask, None
            self.p = fused.attention_softmax_forward(att, self.scale, causal, key_padding_mask)
            return self.p @ v  # (B, H, Tq, D)
        att *= self.scale
        visible = None
        if causal:
            visible = xp.tril(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq)  # (Tq, Tk)
        if key_padding_mask is not None:
            kpm = key_padding_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, Tk)
            visible = kpm if visible is None else (visible & kpm)
        if visible is not None:
            xp.copyto(att, xp.finfo(att.dtype).min, where=~visible)
        att -= att.max(axis=-1, keepdims=True)
        p = xp.exp(att, out=att)
        p /= p.sum(axis=-1, keepdims=True)
        self.p, self.visible = p, visible
        return p @ v  # (B, H, Tq, D)

    def backward(self, g):
        xp = _xp(g)
        p, q, k, v = self.p, self.q, self.k, self.v
        gv = xp.swapaxes(p, -1, -2) @ g if self.needs_input_grad[2] else None  # (B, H, Tk, D)
        gp = g @ xp.swapaxes(v, -1, -2)  # (B, H, Tq, Tk)
        if self.fused:  # the softmax backward below in one pass per row, in place (csrc/fused_cpu.cpp)
            gs = fused.attention_softmax_backward(p, gp, self.scale, self.causal, self.kpm)
        else:
            gs = gp - (gp * p).sum(axis=-1, keepdims=True)  # softmax backward
            gs *= p
            gs *= self.scale
            if self.visible is not None:  # masked scores were constants: no gradient flows into them
                gs *= self.visible
        gq = gs @ k if self.needs_input_grad[0] else None
        gk = xp.swapaxes(gs, -1, -2) @ q if self.needs_input_grad[1] else None
        return gq, gk, gv


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 key_padding_mask=None, scale: float | None = None) -> Tensor:
    """Fused attention; shapes q (B, H, Tq, D), k/v (B, H, Tk, D) -> (B, H, Tq, D).

    ``key_padding_mask``: array (B, Tk), nonzero where the key is a real token. Masked scores are
    filled with the most negative finite float, so fully masked query rows stay finite (B08).
    Matches ``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=True`` when
    Tq == Tk and no padding.
    """
    if q.shape[-1] != k.shape[-1] or k.shape != v.shape or q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"attention shape mismatch: q {q.shape}, k {k.shape}, v {v.shape} "
                         "(need q (B, H, Tq, D), k and v (B, H, Tk, D))")
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.data if isinstance(key_padding_mask, Tensor) else key_padding_mask
        if key_padding_mask.shape != (k.shape[0], k.shape[-2]):
            raise ValueError(f"key_padding_mask {key_padding_mask.shape} must be (B, Tk) = {(k.shape[0], k.shape[-2])}")
    return ScaledDotProductAttention.apply(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)


# -------------------------------------------------------------------- gradcheck


def gradcheck(fn, inputs: Sequence[Tensor], eps: float = 1e-6, atol: float = 1e-6, rtol: float = 1e-4,
              seed: int = 0, raise_on_fail: bool = True) -> bool:
    """Check ``fn``'s analytic gradients against central finite differences in float64.

    ``fn(*inputs)`` must return a Tensor. With a fixed random projection R (so every output
    element matters), the scalar L = Σ fn(x)·R is differentiated by backward and by
    (L(x + ε e_i) − L(x − ε e_i)) / 2ε for every element i of every input that requires grad.
    Inputs are copied to float64 first. Returns True, or raises AssertionError naming the input,
    the element index, the analytic and numeric values and the worst error (or returns False when
    ``raise_on_fail`` is False). Source: minitorch ``grad_check``; PyTorch ``torch.autograd.gradcheck``.
    """
    xs = [Tensor(backend.get_array_module(t.data).ascontiguousarray(t.data, dtype=np.float64), requires_grad=t.requires_grad)
          if t.dtype.kind == "f" else t for t in inputs]
    out = fn(*xs)
    xp = _xp(out.data)
    R = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))

    def scalar() -> float:
        with no_grad():
            return float((fn(*xs).data * R).sum())

    assert is_grad_enabled(), "gradcheck needs grad mode on"
    (out * Tensor(R)).sum().backward()
    for n, x in enumerate(xs):
        if not x.requires_grad:
            continue
        analytic = x.grad if x.grad is not None else xp.zeros_like(x.data)
        numeric = xp.zeros_like(x.data)
        flat = x.data.reshape(-1)
        for i in range(flat.size):
            orig = flat[i].item()
            flat[i] = orig + eps
            up = scalar()
            flat[i] = orig - eps
            down = scalar()
            flat[i] = orig
            numeric.reshape(-1)[i] = (up - down) / (2 * eps)
        err = xp.abs(analytic - numeric)
        bad = err > atol + rtol * xp.abs(numeric)
        if bool(bad.any()):
            i = int(xp.argmax(err - (atol + rtol * xp.abs(numeric))))
            idx = np.unravel_index(i, x.shape)
            msg = (f"gradcheck failed for input {n} (shape {x.shape}) at index {tuple(int(j) for j in idx)}: "
                   f"analytic {analytic.reshape(-1)[i].item():.8g} vs numeric {numeric.reshape(-1)[i].item():.8g}; "
                   f"{int(bad.sum())} of {x.size} elements off, max |error| {float(err.max()):.3g}")
            if raise_on_fail:
                raise AssertionError(msg)
            return False
    return True
