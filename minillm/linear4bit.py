"""Linear4bit: the frozen 4-bit base layer of QLoRA, and swapping a model's Linear layers to it.

Scope
    ``Linear4bit``: a Linear layer whose weight is stored as NF4 (or FP4/INT4) codes with
    (double-quantized) absmax constants (the storage format of ``minillm/quant.py``) and never
    trained; ``Matmul4bit`` its autograd op (forward through the fused kernels of
    ``minillm/kernels.py``, backward to the input only); ``quantize_model`` / ``dequantize_model``
    swap a model's Linear layers in and out; ``state_dict_4bit`` / ``load_state_dict_4bit`` the
    layer's stored keys in bitsandbytes' layout (packed weight + ``QuantState.as_dict(packed=True)``).

Sources
    Dettmers et al. 2023, "QLoRA", arXiv:2305.14314, §3; bitsandbytes ``nn.Linear4bit``,
    ``matmul_4bit`` / ``MatMul4Bit`` (``bitsandbytes/autograd/_functions.py``); peft
    ``bnb.Linear4bit.merge``.

Deviations
    * Compute is float32 (QLoRA: bf16): the weight is dequantized to float32 for both passes.
      There is no option for bf16 compute on the CPU; the CUDA kernels take float16/bfloat16.
    * The bias stays a frozen float32 Parameter (bitsandbytes keeps it in the compute dtype).
    * Merging LoRA re-quantizes (as peft) and warns; ``train.sft.merge_for_saving`` instead
      dequantizes first, so a saved merged model loses nothing (docs/bugs.md B13, contract (a)).
"""
from __future__ import annotations

import warnings

import numpy as np

from minillm import backend, kernels
from minillm import functional as F
from minillm.backend import to_numpy
from minillm.lora import HEAD_NAMES
from minillm.nn import Linear, Module, Parameter
from minillm.quant import QuantState, quant_state_nbytes, quantize_4bit
from minillm.tensor import Function


def state_dict_4bit(packed, quant_state: QuantState, prefix: str = "weight") -> dict:
    """The safetensors-ready dict of one 4-bit weight, as bitsandbytes ``Linear4bit._save_to_state_dict``.

    Keys: ``prefix`` (packed uint8 ((n+1)//2, 1)), ``prefix.absmax``, ``prefix.quant_map``, and when
    nested ``prefix.nested_absmax``, ``prefix.nested_quant_map``; plus
    ``prefix.quant_state.bitsandbytes__<quant_type>`` (uint8 JSON). All values numpy arrays.
    """
    out = {prefix: to_numpy(packed)}
    for k, v in quant_state.as_dict(packed=True).items():
        out[f"{prefix}.{k}"] = v
    return out


def load_state_dict_4bit(state_dict: dict, prefix: str = "weight") -> tuple[np.ndarray, QuantState]:
    """Inverse of ``state_dict_4bit``: (packed uint8, QuantState) from the keys under ``prefix``.

    Raises KeyError naming ``prefix`` when the packed weight is absent.
    """
    if prefix not in state_dict:
        raise KeyError(f"no packed 4-bit weight {prefix!r} in the state dict (keys: {sorted(state_dict)[:8]} ...)")
    sub = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    return np.asarray(state_dict[prefix], dtype=np.uint8), QuantState.from_dict(sub)


class Matmul4bit(Function):
    """y = x · dequant(W)ᵀ with W (N, K) stored in 4 bits; backward gives x a gradient, W none.

    QLoRA §3: "we dequantize the storage data type to the computation data type to perform the
    forward and backward pass, but we only compute weight gradients for the LoRA parameters".
    The forward goes through ``minillm.kernels.matmul_4bit`` (C++/CUDA fused kernel, or the NumPy
    reference); backward: ∂L/∂x = ∂L/∂y · W (N, K), with W dequantized for the step.
    """

    def forward(self, x, packed, quant_state):
        self.packed, self.qs = packed, quant_state
        return kernels.matmul_4bit(x, packed, quant_state).astype(x.dtype, copy=False)  # (..., N)

    def backward(self, g):
        if not self.needs_input_grad[0]:
            return None, None, None
        W = kernels.dequantize_4bit(self.packed, self.qs).astype(g.dtype, copy=False)  # (N, K)
        return (g.reshape(-1, g.shape[-1]) @ W).reshape(*g.shape[:-1], W.shape[1]), None, None


class Linear4bit(Module):
    """A Linear layer whose weight (out, in) is stored in 4 bits and frozen (bitsandbytes ``nn.Linear4bit``).

    Args:
        weight: float array (out_features, in_features) to quantize; bias: float array (out,) or None.
        blocksize, quant_type ("nf4" | "fp4" | "int4"), compress_statistics (double quantization;
        default True as QLoRA): passed to ``quantize_4bit``.

    The packed weight and its quantization constants are buffers, saved under bitsandbytes' keys
    (``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ...); the bias is a
    frozen Parameter. ``nbytes`` reports the bytes the 4-bit weight occupies (packed codes +
    constants). ``merge_delta``/``unmerge_delta`` (used by ``LoRALinear.merge``) dequantize, add ΔW
    and re-quantize, with a warning: that is lossy (docs/bugs.md B13, peft #2321).
    Forward: x (..., in) -> (..., out).
    """

    strict_buffer_shapes = False  # the JSON quant-state blob changes length with its values

    def __init__(self, weight, bias=None, blocksize: int = 64, quant_type: str = "nf4",
                 compress_statistics: bool = True):
        super().__init__()
        weight = np.asarray(to_numpy(weight), dtype=np.float32)
        if weight.ndim != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight (out, in), got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.quant_type, self.compress_statistics = blocksize, quant_type, compress_statistics
        self._quantize(weight)
        self.bias = None if bias is None else Parameter(backend.asarray(to_numpy(bias), dtype=np.float32),
                                                        requires_grad=False)

    def _quantize(self, weight) -> None:
        packed, qs = quantize_4bit(weight, blocksize=self.blocksize, quant_type=self.quant_type,
                                   compress_statistics=self.compress_statistics)
        self._buffers = {}
        for k, v in state_dict_4bit(packed, qs, prefix="weight").items():
            self.register_buffer(k, backend.asarray(v) if k == "weight" else v)
        self._quant_state = qs
        self._packed = self._buffers["weight"]
        self._compute_qs = None
        self._stale = False

    def set_buffer(self, name: str, value) -> None:
        """Load one saved buffer (``load_state_dict``); the QuantState is rebuilt from all of them
        on first use, and checked against (out_features, in_features) then."""
        self._buffers[name] = np.asarray(value) if name != "weight" else backend.asarray(value)
        self._stale = True

    def _sync(self) -> None:
        if not self._stale:
            return
        packed, qs = load_state_dict_4bit({k: to_numpy(v) for k, v in self._buffers.items()}, prefix="weight")
        if tuple(qs.shape) != (self.out_features, self.in_features):
            raise ValueError(f"Linear4bit: loaded a 4-bit weight of shape {tuple(qs.shape)} into a layer of "
                             f"shape {(self.out_features, self.in_features)} (out, in)")
        self._packed, self._quant_state = backend.asarray(packed), qs
        self._compute_qs = None
        self.blocksize, self.quant_type, self.compress_statistics = qs.blocksize, qs.quant_type, qs.nested
        object.__setattr__(self, "weight", self._packed)
        self._stale = False

    @property
    def packed(self):
        """The packed 4-bit codes: uint8 ((out·in + 1) // 2, 1), two codes per byte, high nibble first."""
        self._sync()
        return self._packed

    @property
    def quant_state(self) -> QuantState:
        """The ``QuantState`` (absmax, possibly double-quantized; code; shape; blocksize)."""
        self._sync()
        return self._quant_state

    def compute_quant_state(self) -> QuantState:
        """The state the kernels use: ``quant_state`` itself on the CPU; on the GPU (cupy packed
        weight) a copy whose absmax arrays were moved to the device ONCE (``kernels.state_on_device``),
        so a forward does not re-upload absmax/absmax2/code2 every call. Rebuilt after a load or a
        merge."""
        self._sync()
        if getattr(self, "_compute_qs", None) is None:
            if backend.is_cupy(self._packed):
                self._compute_qs = kernels.state_on_device(self._quant_state)
            else:
                self._compute_qs = self._quant_state.validate()
        return self._compute_qs

    def num_quantized_parameters(self) -> int:
        """Logical weights stored in 4 bits (out · in), for parameter accounting (PEFT counts packed ×2)."""
        return int(self.out_features * self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes of the 4-bit weight: packed codes + quantization constants (not the bias)."""
        return int(self.packed.nbytes) + quant_state_nbytes(self.quant_state)

    def dequantized_weight(self):
        """The float32 weight (out, in) the layer computes with."""
        return kernels.dequantize_4bit(self.packed, self.compute_quant_state()).astype(np.float32, copy=False)

    def forward(self, x):
        """x (..., in) float32 -> (..., out)."""
        y = Matmul4bit.apply(x, self.packed, self.compute_quant_state())  # (..., out)
        return y if self.bias is None else F.add(y, self.bias)

    def merge_delta(self, delta) -> None:
        """W ← quantize(dequantize(W) + ΔW): re-quantizes, so ΔW entries below half a code gap are lost."""
        warnings.warn("Merging LoRA into a 4-bit layer re-quantizes the weight: the merged model may give "
                      "different outputs than the adapter (docs/bugs.md B13; peft #2321)", stacklevel=3)
        self._quantize(self.dequantized_weight() + np.asarray(to_numpy(delta), dtype=np.float32))

    def unmerge_delta(self, delta) -> None:
        """W ← quantize(dequantize(W) − ΔW) (also lossy)."""
        self._quantize(self.dequantized_weight() - np.asarray(to_numpy(delta), dtype=np.float32))

    def __repr__(self) -> str:
        return (f"Linear4bit(in_features={self.in_features}, out_features={self.out_features}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.compress_statistics})")


def quantize_model(model, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = True,
                   skip: tuple = HEAD_NAMES) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (except the output heads) by a frozen ``Linear4bit``, in place.

    As QLoRA: all linear layers of the blocks go to 4 bits; embeddings, LayerNorms and heads stay
    float32. Returns the replaced module names. Every remaining parameter is frozen.
    """
    names = []
    for name, m in list(model.named_modules()):
        if type(m) is Linear and name.split(".")[-1] not in skip:
            q = Linear4bit(m.weight.data, None if m.bias is None else m.bias.data, blocksize=blocksize,
                           quant_type=quant_type, compress_statistics=compress_statistics)
            model.set_submodule(name, q)
            names.append(name)
    model.requires_grad_(False)
    return names


def dequantize_model(model) -> list[str]:
    """Replace every ``Linear4bit`` by an ``nn.Linear`` with the dequantized float32 weight, in place."""
    names = []
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear4bit):
            lin = Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = backend.asarray(m.dequantized_weight())
            if m.bias is not None:
                lin.bias.data = m.bias.data.copy()
            model.set_submodule(name, lin)
            names.append(name)
    return names
