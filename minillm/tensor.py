"""Tensor: an array, its gradient, and the graph that produced it (reverse-mode autograd).

Scope
    A ``Tensor`` wraps one array of the backend's array module (numpy, or cupy on a GPU) and, when
    it was computed from tensors that require gradients, the ``Function`` that made it. Calling
    ``loss.backward()`` sorts the graph topologically (iteratively, so deep graphs do not hit the
    recursion limit) and runs each function's ``backward`` in reverse order, *summing* the
    gradients that reach a node along every path before passing them on — which is what makes a
    re-used intermediate node correct (docs/bugs.md B06, micrograd #2).

    The differentiable operations themselves live in ``functional.py`` (forward and backward side
    by side); this file holds the graph machinery and the operator sugar (``a + b``, ``a @ b``).

Sources
    Reverse-mode automatic differentiation: Griewank & Walther, "Evaluating Derivatives" (2008),
    ch. 3; the design follows micrograd (topological sort, ``+=`` accumulation) and early tinygrad
    (one small ``Function`` class per op with ``forward``/``backward`` next to each other).
    Semantics follow PyTorch: ``.grad`` is kept on leaf tensors only and *accumulates* across
    ``backward()`` calls until ``zero_grad``; ``no_grad()`` disables graph recording.

Deviations from PyTorch
    * The graph is freed after ``backward()`` (as PyTorch's default ``retain_graph=False``); pass
      ``retain_graph=True`` to keep it. Going through a freed graph again raises, as in PyTorch.
    * Gradients of non-leaf tensors are never stored (PyTorch's ``retain_grad`` is not offered).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from minillm import backend

_grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Context manager: operations inside record no graph (inference, optimizer steps)."""
    global _grad_enabled
    prev, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = prev


def is_grad_enabled() -> bool:
    """True when operations record the graph (outside ``no_grad``)."""
    return _grad_enabled


class Function:
    """One differentiable operation: ``forward`` on raw arrays, ``backward`` on raw arrays.

    Subclasses implement ``forward(self, *arrays, **kwargs) -> array`` and
    ``backward(self, grad) -> tuple`` returning one gradient (or None) per positional input of
    ``forward``, each of that input's shape. ``self`` is the context: forward stores what
    backward needs on it. ``self.needs_input_grad[i]`` says whether input i needs a gradient, so
    backward can skip work. Use ``Op.apply(*inputs, **kwargs)``; inputs that are not Tensors are
    passed through as constants.
    """

    __slots__ = ("inputs", "needs_input_grad", "__dict__")

    def forward(self, *args: Any, **kwargs: Any):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, grad):  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> "Tensor":
        ctx = cls()
        raw = [a.data if isinstance(a, Tensor) else a for a in args]
        needs = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        out = ctx.forward(*raw, **kwargs)
        if _grad_enabled and any(needs):
            ctx.inputs = args
            ctx.needs_input_grad = needs
            t = Tensor(out, requires_grad=True)
            t._ctx = ctx
            return t
        return Tensor(out)


class _Freed:
    """Stands in for the Function of a non-leaf tensor whose graph ``backward`` has freed."""

    inputs = ()

    def backward(self, grad):
        raise RuntimeError("backward through a graph a second time: its buffers were freed by the first "
                           "backward(); pass retain_graph=True to the first call")


_FREED = _Freed()


class Tensor:
    """An n-dimensional array with reverse-mode autograd.

    Args:
        data: array-like; kept as an array of the current backend module (numpy/cupy). Python
            floats and float64 lists become float32 (``backend.DEFAULT_DTYPE``) unless ``dtype``
            is given; existing arrays keep their dtype (float64 is kept, for gradcheck).
        requires_grad: record operations on this tensor so ``backward`` reaches it.
        dtype: optional dtype to cast to.

    Attributes:
        data: the array. grad: array of the same shape, or None (leaves only).
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "__weakref__")
    __array_priority__ = 100  # numpy_array * tensor -> Tensor.__rmul__

    def __init__(self, data: Any, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        xp = backend.get_array_module(data) if hasattr(data, "dtype") else backend.xp()
        if not hasattr(data, "dtype"):
            data = xp.asarray(data)
            if dtype is None and data.dtype.kind == "f":
                dtype = backend.DEFAULT_DTYPE
        if dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx: Function | None = None

    # ---------------------------------------------------------------- basics
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        rg = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{rg})"

    def numpy(self) -> np.ndarray:
        """A host numpy array of the data (a copy from the GPU when on cupy)."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph (no gradient flows through it)."""
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        self.requires_grad = flag
        return self

    # -------------------------------------------------------------- autograd
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Back-propagate from this tensor to every leaf that requires a gradient.

        Args:
            grad: d(something)/d(self), same shape as self; defaults to 1 for a one-element tensor.
            retain_graph: keep the graph so backward can run again through it.

        Raises:
            RuntimeError: if self does not require grad, grad is omitted for a non-scalar, or the
            graph was already freed by an earlier backward without retain_graph (as PyTorch).
            ValueError: if grad's shape differs from self's.

        Leaf gradients accumulate into ``.grad`` (``+=``), as in PyTorch.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() needs an explicit grad for a tensor of shape {self.shape}")
            grad = xp.ones_like(self.data)
        grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"backward: grad of shape {grad.shape} for a tensor of shape {self.shape}")

        # Topological order by iterative depth-first search (post-order).
        order: list[Tensor] = []
        visited: set[int] = set()
        stack: list[tuple[Tensor, bool]] = [(self, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            if node._ctx is not None:
                for parent in node._ctx.inputs:
                    if isinstance(parent, Tensor) and parent.requires_grad and id(parent) not in visited:
                        stack.append((parent, False))

        # Reverse order: every consumer of a node runs before the node passes its gradient on.
        grads: dict[int, Any] = {id(self): grad}
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            ctx = node._ctx
            if ctx is None:  # a leaf: accumulate like PyTorch
                node.grad = g.copy() if node.grad is None else node.grad + g  # a copy: g may be a shared read-only view
                continue
            in_grads = ctx.backward(g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for parent, pg, need in zip(ctx.inputs, in_grads, ctx.needs_input_grad):
                if not need or pg is None:
                    continue
                if pg.shape != parent.shape:
                    raise RuntimeError(
                        f"{type(ctx).__name__}.backward returned a gradient of shape {pg.shape} "
                        f"for an input of shape {parent.shape}"
                    )
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg
            if not retain_graph:
                node._ctx = _FREED

    # ---------------------------------------------------- operator sugar
    # Implemented in functional.py; imported lazily to keep this file about the graph.
    def __add__(self, other):
        return F.add(self, other)

    def __radd__(self, other):
        return F.add(other, self)

    def __sub__(self, other):
        return F.sub(self, other)

    def __rsub__(self, other):
        return F.sub(other, self)

    def __mul__(self, other):
        return F.mul(self, other)

    def __rmul__(self, other):
        return F.mul(other, self)

    def __truediv__(self, other):
        return F.div(self, other)

    def __rtruediv__(self, other):
        return F.div(other, self)

    def __neg__(self):
        return F.neg(self)

    def __pow__(self, exponent):
        return F.pow(self, exponent)

    def __rpow__(self, base):
        return F.pow(base, self)

    def __matmul__(self, other):
        return F.matmul(self, other)

    def __rmatmul__(self, other):
        return F.matmul(other, self)

    def __getitem__(self, index):
        return F.index(self, index)

    def sum(self, axis=None, keepdims=False):
        return F.sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims=False):
        return F.mean(self, axis, keepdims)

    def max(self, axis=None, keepdims=False):
        return F.max(self, axis, keepdims)

    def var(self, axis=None, keepdims=False, correction=0):
        return F.var(self, axis, keepdims, correction)

    def exp(self):
        return F.exp(self)

    def log(self):
        return F.log(self)

    def tanh(self):
        return F.tanh(self)

    def sqrt(self):
        return F.sqrt(self)

    def relu(self):
        return F.relu(self)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return F.reshape(self, shape)

    def transpose(self, axis0=-2, axis1=-1):
        return F.transpose(self, axis0, axis1)

    def permute(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return F.permute(self, axes)

    @property
    def T(self):
        return F.transpose(self, -2, -1)

    def softmax(self, axis=-1):
        return F.softmax(self, axis)

    def log_softmax(self, axis=-1):
        return F.log_softmax(self, axis)


from minillm import functional as F  # noqa: E402  (circular: functional imports Tensor)
