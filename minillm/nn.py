"""Modules: containers of parameters with a forward pass (the ``torch.nn`` ideas, small).

Scope
    ``Module`` finds its parameters, buffers and sub-modules by walking its attributes (in the
    order they were set), names them with dotted paths like PyTorch (``h.0.attn.q_proj.weight``),
    switches train/eval mode, and saves/loads ``state_dict`` with errors that name every missing
    key, unexpected key and shape mismatch. ``Parameter`` is a Tensor that requires grad.
    ``Linear``, ``Embedding``, ``LayerNorm`` and ``Dropout`` are thin wrappers over functional.py.

Sources
    PyTorch ``torch.nn.Module`` semantics (``named_parameters``, ``state_dict``, ``train``/``eval``,
    ``requires_grad_``); default initialisations of ``nn.Linear`` (kaiming-uniform with a = √5,
    i.e. U(−1/√in, 1/√in) for weight and bias), ``nn.Embedding`` (N(0, 1)) and ``nn.LayerNorm``
    (ones, zeros).

Deviations
    * Initialisation draws from an explicit numpy Generator (``rng``); without one a Generator
      seeded with 0 is used, so construction is always reproducible.
    * ``state_dict`` holds the raw arrays (not copies); ``load_state_dict`` copies values in.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator

import numpy as np

from minillm import backend
from minillm import functional as F
from minillm.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that is a trainable weight of a Module (``requires_grad=True`` by default)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"


def _init_rng(rng) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng(0)


def _xp_array(a: np.ndarray, dtype=None):
    return backend.asarray(a, dtype=dtype or backend.DEFAULT_DTYPE)


class Module:
    """Base class: subclasses set Parameters/Modules as attributes and define ``forward``."""

    training: bool = True
    #: load_state_dict checks buffer shapes; a module whose buffers are replaced wholesale (a 4-bit
    #: layer's quantization state) sets this False.
    strict_buffer_shapes: bool = True

    def __init__(self) -> None:
        self.training = True
        self._buffers: dict[str, object] = {}

    # ------------------------------------------------------------- the tree
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError

    def register_buffer(self, name: str, array) -> None:
        """Register a non-trainable array (saved in state_dict), e.g. a packed 4-bit weight."""
        if "_buffers" not in self.__dict__:
            self._buffers = {}
        self._buffers[name] = array
        if name.isidentifier():
            object.__setattr__(self, name, array)

    def __setattr__(self, name, value):
        if "_buffers" in self.__dict__ and name in self._buffers:
            self._buffers[name] = value
        object.__setattr__(self, name, value)

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        """Direct sub-modules in attribute order (``ModuleList`` items are named 0, 1, ...)."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self) -> Iterator["Module"]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """This module and every descendant, with dotted names ("" for self)."""
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def set_submodule(self, target: str, module: "Module") -> None:
        """Put ``module`` at the dotted path ``target`` (e.g. ``"transformer.h.0.attn.q_proj"``), replacing
        what is there (PyTorch ``Module.set_submodule``); used to swap a Linear for a LoRA or 4-bit layer.
        Raises AttributeError naming the missing part of the path."""
        *path, attr = target.split(".")
        parent = self
        for part in path:
            if not hasattr(parent, part):
                raise AttributeError(f"set_submodule({target!r}): {type(parent).__name__} has no attribute {part!r}")
            parent = getattr(parent, part)
        object.__setattr__(parent, attr, module)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every Parameter with its dotted name; a parameter shared by two modules appears once."""
        seen: set[int] = set()
        for mod_name, mod in self.named_modules(prefix):
            for name, value in vars(mod).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{mod_name}.{name}" if mod_name else name), value

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self) -> Iterator[tuple[str, object]]:
        for mod_name, mod in self.named_modules():
            for name, value in mod.__dict__.get("_buffers", {}).items():
                yield (f"{mod_name}.{name}" if mod_name else name), value

    # ------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "Module":
        """Set training mode (dropout active) on this module and all descendants."""
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        """Evaluation mode: dropout off."""
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> "Module":
        """Set ``requires_grad`` on every parameter (freeze with False)."""
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of scalar parameters (optionally only those with requires_grad)."""
        return int(sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only))

    # ------------------------------------------------------------- state
    def state_dict(self) -> "OrderedDict[str, object]":
        """Name -> array for every parameter and buffer (the arrays themselves, not copies)."""
        sd: OrderedDict[str, object] = OrderedDict()
        for name, p in self.named_parameters():
            sd[name] = p.data
        for name, b in self.named_buffers():
            sd[name] = b
        return sd

    def load_state_dict(self, state_dict: dict, strict: bool = True, source: str = "state_dict") -> None:
        """Copy arrays into this module's parameters and buffers.

        Raises:
            KeyError: (strict) listing every missing and every unexpected key.
            ValueError: listing every shape mismatch as ``name: checkpoint (a, b) vs model (c, d)``.
        ``source`` (e.g. a file name) is named in the messages.
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"{source}: missing keys {missing}; unexpected keys {unexpected}")
        mods = dict(self.named_modules())
        loose = {k for k, _ in self.named_buffers() if not mods[self._owner(k, mods)].strict_buffer_shapes}
        mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in own if k in state_dict and k not in loose
                      and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if mismatched:
            raise ValueError(f"{source}: shape mismatch for " + "; ".join(mismatched))
        params = dict(self.named_parameters())
        for k, value in state_dict.items():
            if k not in own:
                continue
            if k in params:
                p = params[k]
                p.data = backend.get_array_module(p.data).asarray(value, dtype=p.dtype).copy()
            else:
                self._set_buffer(k, value)

    def _set_buffer(self, dotted: str, value) -> None:
        # the owning module is the longest module path that prefixes the key (buffer names may
        # contain dots, e.g. a 4-bit layer's "weight.absmax")
        mods = dict(self.named_modules())
        owner = self._owner(dotted, mods)
        mods[owner].set_buffer(dotted[len(owner) + 1:] if owner else dotted, value)

    @staticmethod
    def _owner(dotted: str, mods: dict) -> str:
        return max((p for p in mods if p == "" or dotted.startswith(p + ".")), key=len)

    def set_buffer(self, name: str, value) -> None:
        """Copy ``value`` into the registered buffer ``name`` (its dtype and array module kept).
        Modules whose buffers derive other state (e.g. a 4-bit layer's QuantState) override it."""
        old = self._buffers[name]
        arr = backend.get_array_module(old).asarray(value, dtype=old.dtype).copy()
        self._buffers[name] = arr
        if name.isidentifier():
            object.__setattr__(self, name, arr)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for name, child in self.named_children():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + ")" if len(lines) > 1 else f"{type(self).__name__}()"


class ModuleList(Module):
    """A list of modules whose items are named by index (``h.0``, ``h.1``, ...)."""

    def __init__(self, modules=()):
        super().__init__()
        self._n = 0
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        object.__setattr__(self, str(self._n), module)
        self._n += 1

    def __getitem__(self, i: int) -> Module:
        return getattr(self, str(range(self._n)[i]))

    def __setitem__(self, i: int, module: Module) -> None:
        object.__setattr__(self, str(range(self._n)[i]), module)

    def __len__(self) -> int:
        return self._n

    def __iter__(self):
        return (getattr(self, str(i)) for i in range(self._n))


class Linear(Module):
    """y = x Wᵀ + b; weight (out_features, in_features) as in PyTorch, bias (out_features,).

    Init as ``torch.nn.Linear``: U(−1/√in, 1/√in) for weight and bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None):
        super().__init__()
        rng = _init_rng(rng)
        bound = 1.0 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_xp_array(rng.uniform(-bound, bound, (out_features, in_features))))
        self.bias = Parameter(_xp_array(rng.uniform(-bound, bound, (out_features,)))) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        return F.linear(x, self.weight, self.bias)

    def __repr__(self) -> str:
        return f"Linear(in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """Lookup table weight (num_embeddings, embedding_dim); init N(0, 1) as ``torch.nn.Embedding``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rng=None):
        super().__init__()
        rng = _init_rng(rng)
        self.weight = Parameter(_xp_array(rng.standard_normal((num_embeddings, embedding_dim))))

    def forward(self, ids) -> Tensor:
        """ids int (...) -> (..., embedding_dim)."""
        return F.embedding(ids, self.weight)

    def __repr__(self) -> str:
        return f"Embedding{tuple(self.weight.shape)}"


class LayerNorm(Module):
    """Layer normalisation over the last axis with learned weight (ones) and bias (zeros)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(_xp_array(np.ones(normalized_shape)))
        self.bias = Parameter(_xp_array(np.zeros(normalized_shape)))

    def forward(self, x: Tensor) -> Tensor:
        """x (..., C) -> (..., C)."""
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def __repr__(self) -> str:
        return f"LayerNorm({self.weight.shape[0]}, eps={self.eps})"


class Dropout(Module):
    """Inverted dropout with probability ``p``, active only in training mode.

    ``rng`` is the numpy Generator that draws the masks (share one per model for reproducibility).
    """

    def __init__(self, p: float = 0.0, rng: np.random.Generator | None = None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.rng, training=self.training)

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


def disable_dropout(model: Module) -> int:
    """Set every ``Dropout``'s p (and a GPT's ``config.dropout``) to 0, as TRL's ``disable_dropout_in_model``,
    so two forwards of the same model (policy and reference at step 0) are bit-identical
    (docs/bugs.md C20). The training mode is left as it is. Returns how many Dropout modules there are."""
    if hasattr(model, "config") and hasattr(model.config, "dropout"):
        model.config.dropout = 0.0
    n = 0
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = 0.0
            n += 1
    return n
