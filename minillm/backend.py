"""The array backend: NumPy on the CPU, CuPy on an NVIDIA GPU.

Scope
    Everything in minillm computes on arrays of one *array module* ``xp``: ``numpy`` by default,
    ``cupy`` after ``minillm.backend.use("cuda")`` (or with the environment variable
    ``MINILLM_DEVICE=cuda``). Code never imports numpy for array math on tensors; it asks for the
    module of the arrays it holds (``get_array_module``) so the same code serves both.

Sources
    CuPy's NumPy-compatible API and ``cupy.get_array_module`` (docs.cupy.dev, "Basics of CuPy").

Deviations
    None: this is plumbing, not an algorithm from a paper.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import numpy as np

#: dtype of every parameter and activation on the CPU (float32, like PyTorch's default).
DEFAULT_DTYPE = np.float32

_xp: ModuleType = np
_device: str = "cpu"


def _import_cupy() -> ModuleType:
    try:
        import cupy  # type: ignore

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("cupy found no CUDA device")
        return cupy
    except Exception as e:  # ImportError, CUDARuntimeError, RuntimeError
        raise RuntimeError(
            "minillm.backend.use('cuda') needs cupy and an NVIDIA GPU "
            f"(pip install -e '.[cuda]'); it failed with: {type(e).__name__}: {e}"
        ) from e


def use(device: str) -> ModuleType:
    """Select the array module for new tensors: ``"cpu"`` (numpy) or ``"cuda"`` (cupy).

    Returns the module. Raises ValueError for another name, RuntimeError (naming the cause) when
    ``"cuda"`` is asked for on a machine without cupy or a GPU.
    """
    global _xp, _device
    if device == "cpu":
        _xp, _device = np, "cpu"
    elif device == "cuda":
        _xp, _device = _import_cupy(), "cuda"
    else:
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda'")
    return _xp


def xp() -> ModuleType:
    """The array module new tensors are created with (numpy or cupy)."""
    return _xp


def device() -> str:
    """The current device name, ``"cpu"`` or ``"cuda"``."""
    return _device


def get_array_module(*arrays) -> ModuleType:
    """The array module of the given arrays: cupy if any of them is a cupy array, else numpy.

    Decided by the arrays' types alone (as ``cupy.get_array_module``), whatever ``use()`` selected:
    a cupy array handed to NumPy-reference code on a "cpu" backend still gets cupy, never a silent
    ``np.asarray`` of device memory. cupy is not imported for numpy inputs: a cupy array can only
    exist once cupy has been imported, so it is taken from ``sys.modules``.
    """
    for a in arrays:
        if is_cupy(a):
            return sys.modules.get("cupy") or _import_cupy_module()
    return np


def _import_cupy_module() -> ModuleType:
    import cupy  # type: ignore  # only reached with a cupy array in hand

    return cupy


def is_cupy(a) -> bool:
    """True if ``a`` is a cupy array."""
    return type(a).__module__.startswith("cupy")


def to_numpy(a) -> np.ndarray:
    """A host (numpy) copy or view of ``a``, whatever its module."""
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def asarray(a, dtype=None):
    """``a`` as an array of the current module (copied to the GPU when the device is cuda)."""
    return _xp.asarray(a, dtype=dtype)


def extensions_disabled() -> bool:
    """True when ``MINILLM_NO_EXTENSIONS=1`` (or the older ``MINILLM_DISABLE_EXTENSIONS=1``) is set:
    minillm then runs its NumPy reference everywhere, as on a pure-Python install."""
    return any(os.environ.get(v, "").strip() == "1" for v in ("MINILLM_NO_EXTENSIONS", "MINILLM_DISABLE_EXTENSIONS"))


def load_extension(name: str):
    """Import the compiled module ``minillm.<name>``: returns ``(module, "")``, or ``(None, reason)``
    when it was not built (no compiler, pure-Python install) or ``extensions_disabled()``."""
    if extensions_disabled():
        return None, "disabled by MINILLM_NO_EXTENSIONS=1"
    try:
        return importlib.import_module(f"minillm.{name}"), ""
    except ImportError as e:
        return None, f"{type(e).__name__}: {e}"


if os.environ.get("MINILLM_DEVICE", "cpu") == "cuda":  # pragma: no cover - needs a GPU
    use("cuda")
