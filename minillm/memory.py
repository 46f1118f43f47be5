"""Memory calculator: bytes needed to fine-tune a transformer, by component, for full fine-tuning, LoRA
and QLoRA.

Scope
    ``estimate(model, method, ...)`` returns a dict of bytes per component::

        weights            frozen or trained weights as stored (16-bit, or 4-bit packed for QLoRA)
        quant_constants    QLoRA: the absmax constants (with or without double quantization)
        lora_weights       the LoRA A and B matrices
        gradients          gradients of the trainable parameters
        master_weights     fp32 copies of 16-bit trainable weights (mixed precision; full FT default)
        optimizer_states   e.g. AdamW: two fp32 moments per trainable parameter
        activations        saved for the backward pass (with or without gradient checkpointing)
        total              sum of the above

    plus ``activations_no_checkpointing`` and ``activations_checkpointing`` (both variants, bytes),
    ``n_params`` and ``trainable_params`` (counts, not bytes). ``format_table`` prints it and the CLI
    ``minillm memory`` (``add_arguments`` / ``run``) wraps both. Presets: LLaMA-1 7B/13B/33B/65B and
    Llama-2 70B (``PRESETS``); ``ModelShape.from_gpt_config`` describes minillm's own GPT.

Formulas (P = parameter count; sizes in bytes; GB = 1e9 bytes, GiB = 2^30)
    * Weights: P * bytes(dtype); bf16/fp16 2, fp32 4.
    * QLoRA (Dettmers et al. 2023, §3 and Eq. 5-6): every Linear weight in the blocks is NF4, packed two
      per byte: ceil(n/2) bytes per matrix; embeddings, LM head, norms and biases stay in ``dtype``.
      Constants per matrix of n elements, blocksize 64, nb = ceil(n/64) blocks: without double
      quantization 4*nb (32/64 = 0.5 bit/param); with it nb (uint8) + 4*ceil(nb/256) + 4 (offset)
      (8/64 + 32/(64*256) = 0.127 bit/param). The saving, 0.373 bit/param, is 3.03 GB for 65e9
      parameters and 3.26 GB for 70e9 (not "0.5 GB": 0.5 is the bit overhead per parameter). These are
      the byte counts of ``minillm.quant.quantize_4bit`` (``quant_state_nbytes``, code tables excluded).
    * LoRA (Hu et al. 2021, §4): a target Linear(in, out) gets r*(in + out) parameters (A: r x in, B: out x r);
      r=8 on a 4096x4096 layer = 65,536. ``lora_targets``: "all-linear" (every Linear in the blocks, as
      QLoRA; the spelling of PEFT and of ``lora.parse_target_modules``), "attention" (q, k, v, o) or "qv"
      (the LoRA paper's choice), or a list of names (llama-style, or minillm's GPT names c_fc, c_proj).
    * Gradients: trainable parameters x bytes of their dtype (full: ``dtype``; LoRA: ``lora_dtype``).
      Frozen base weights have no gradient (QLoRA §3: gradients flow through the dequantized weights
      into the adapters only).
    * Master weights: fp32 copy (4 bytes/param) of 16-bit trainable weights when ``master_weights``
      (default: on for full fine-tuning in 16-bit, the usual mixed-precision recipe with 16 bytes per
      parameter for AdamW; off for LoRA/QLoRA, whose adapters are kept in BF16 as in QLoRA Eq. 5).
    * Optimizer states per trainable parameter: adamw / paged_adamw 8 (two fp32 moments); adamw_8bit /
      paged_adamw_8bit 2 + 8/256 (two uint8 states + an fp32 absmax per 256-block, Dettmers et al.
      2022 "8-bit Optimizers"); sgd 0; sgd_momentum 4. Paged optimizers (QLoRA §3) hold the same bytes
      in unified memory; they only move them to the host under pressure, so they are counted here.
    * Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
      Models", §4.1, Eq. 1): per layer, 16-bit, with dropout, GPT MLP 4h:
      s*b*h*(34 + 5*a*s/h) bytes = attention 11sbh + 5as^2b, MLP 19sbh, LayerNorms 4sbh. Generalised
      here: tensors x ``act_bytes`` and dropout masks x 1 byte; attention input 2sbh, Q 2sbh, K and V
      2sb*h_kv each (h_kv = h * n_kv_heads / n_heads, GQA), output-projection input 2sbh, mask sbh; scores:
      softmax output 2as^2b, dropout mask as^2b and dropout output 2as^2b; MLP input 2sbh, plus 4sbf
      (activation input and output) for a GELU MLP of width f or 8sbf for a gated (SwiGLU) MLP (gate,
      up, act(gate), their product), mask sbh; norms 2 x 2sbh. Without dropout the masks and the
      dropout output vanish. ``flash_attention=True`` drops the as^2b terms (scores are recomputed).
      Full recomputation (gradient checkpointing, Korthikanti §4 "2sbhL"): only each layer's input
      (sbh x act_bytes per layer) plus one layer's activations while it is recomputed. Both add the
      float32 logits b*s*V*4 (kept for the cross-entropy backward).

Assumptions for the QLoRA 65B claim (paper §1, Table/Figure: "finetune a 65B model on a single 48GB GPU"):
    NF4 + double quantization of every Linear, BF16 embeddings/LM head/norms, LoRA r=64 on all linear
    layers in BF16 with BF16 gradients, paged AdamW 32-bit states on the LoRA parameters, batch 1,
    sequence 512, gradient checkpointing; the estimate is about 45 GB (< 48e9 bytes).

Deliberate deviations
    * An activation estimate, not an allocator trace: temporary buffers (the dequantized BF16 weight of
      the layer being computed, workspace, fragmentation, CUDA context ~0.5-1 GB) are not counted; LoRA's
      own small activations (s*b*r per target) and the difference that frozen layers need not keep
      their inputs are ignored (the estimate is the full fine-tuning activation count).
    * ``estimate(n_params=int)`` treats all parameters as Linear weights (what the per-parameter figures
      such as "4.127 bits/param" assume) and uses a Llama-like shape (``ModelShape.llama_like``) only for
      the LoRA parameter count and the activations. Pass a ``ModelShape`` or a preset for exact counts.
"""
from __future__ import annotations

import argparse
import sys
import json
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

DTYPE_BYTES = {"fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0}

#: Optimizer state bytes per trainable parameter.
OPTIMIZER_BYTES = {
    "adamw": 8.0,
    "paged_adamw": 8.0,
    "adamw_8bit": 2.0 + 8.0 / 256,
    "paged_adamw_8bit": 2.0 + 8.0 / 256,
    "sgd": 0.0,
    "sgd_momentum": 4.0,
}

METHODS = ("full", "lora", "qlora")
COMPONENTS = (
    "weights",
    "quant_constants",
    "lora_weights",
    "gradients",
    "master_weights",
    "optimizer_states",
    "activations",
)
LORA_TARGET_SETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qv": ("q_proj", "v_proj"),
}
#: minillm's GPT module names -> the calculator's (llama-style) names of the same Linear layers.
MINILLM_NAMES = {"c_fc": "fc_in", "mlp.c_fc": "fc_in", "attn.c_proj": "o_proj", "mlp.c_proj": "fc_out"}
QLORA_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


@dataclass(frozen=True)
class ModelShape:
    """The sizes a decoder-only transformer's memory depends on.

    n_layers L, d_model h, d_ff f, n_heads a, n_kv_heads (GQA; None = a), vocab_size V,
    n_positions (learned position embeddings, 0 for RoPE), gated_mlp (SwiGLU: gate/up/down, else
    fc_in/fc_out with GELU), bias (Linear biases), norm ("rmsnorm": weight only; "layernorm": weight and
    bias), tie_embeddings (LM head shares the token embedding), extra_params (anything else, e.g. a
    reward head; kept in ``dtype``), name.
    """

    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    vocab_size: int
    n_kv_heads: Optional[int] = None
    n_positions: int = 0
    gated_mlp: bool = True
    bias: bool = False
    norm: str = "rmsnorm"
    tie_embeddings: bool = False
    extra_params: int = 0
    name: str = ""

    def __post_init__(self):
        for k in ("n_layers", "d_model", "d_ff", "n_heads", "vocab_size"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"ModelShape.{k} must be >= 1, got {getattr(self, k)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelShape: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ValueError(f"ModelShape: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"ModelShape.norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else int(self.n_kv_heads)

    @property
    def kv_dim(self) -> int:
        """Width of the K and V projections: d_model * n_kv_heads / n_heads."""
        return self.d_model // self.n_heads * self.kv_heads

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """The Linear layers of ONE block as (name, in_features, out_features)."""
        h, f = self.d_model, self.d_ff
        attn = [("q_proj", h, h), ("k_proj", h, self.kv_dim), ("v_proj", h, self.kv_dim), ("o_proj", h, h)]
        mlp = [("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)] if self.gated_mlp else [
            ("fc_in", h, f),
            ("fc_out", f, h),
        ]
        return attn + mlp

    def linear_params(self) -> int:
        """Parameters in the blocks' Linear weights (what QLoRA quantizes), all layers."""
        return self.n_layers * sum(i * o for _, i, o in self.linear_shapes())

    def other_params(self) -> int:
        """Everything else: embeddings, positions, LM head (if untied), norms, biases, extra."""
        h = self.d_model
        norm_p = (2 if self.norm == "layernorm" else 1) * h
        n = self.vocab_size * h + self.n_positions * h
        n += 0 if self.tie_embeddings else self.vocab_size * h
        n += (2 * self.n_layers + 1) * norm_p
        if self.bias:
            n += self.n_layers * sum(o for _, _, o in self.linear_shapes())
        return n + int(self.extra_params)

    def n_params(self) -> int:
        """Total parameter count."""
        return self.linear_params() + self.other_params()

    def lora_params(self, r: int, targets: Union[str, Sequence[str]] = "all-linear") -> int:
        """LoRA parameters: sum over targeted Linear(in, out) of r*(in + out), all layers (Hu et al. 2021)."""
        names = _target_names(self, targets)
        return self.n_layers * sum(r * (i + o) for n, i, o in self.linear_shapes() if n in names)

    @classmethod
    def llama_like(cls, n_params: float) -> "ModelShape":
        """A LLaMA-proportioned shape with about ``n_params`` parameters: head size 128, n_layers = h/128,
        d_ff = 11008/4096 * h rounded to 256, SwiGLU, RMSNorm, vocab 32000. An approximation used only
        when no shape is given."""
        if n_params <= 0:
            raise ValueError(f"n_params must be > 0, got {n_params}")
        best = None
        for heads in range(1, 1024):
            h = 128 * heads
            f = max(256, int(round(h * 11008 / 4096 / 256)) * 256)
            s = cls(n_layers=heads, d_model=h, d_ff=f, n_heads=heads, vocab_size=32000, name=f"~{n_params:.3g}")
            err = abs(s.n_params() - n_params)
            if best is None or err < best[0]:
                best = (err, s)
            if s.n_params() > n_params:
                break
        return best[1]

    @classmethod
    def from_gpt_config(cls, cfg) -> "ModelShape":
        """Shape of minillm's GPT (``minillm.model.GPTConfig``: n_layer, n_embd, n_head, vocab_size,
        block_size, bias, tie_weights, scalar_head): learned positions, LayerNorm, GELU MLP 4C,
        separate q/k/v/c_proj (named q_proj/k_proj/v_proj/o_proj here)."""
        c = int(cfg.n_embd)
        extra = (c + 1) if getattr(cfg, "scalar_head", False) else 0
        return cls(
            n_layers=int(cfg.n_layer),
            d_model=c,
            d_ff=4 * c,
            n_heads=int(cfg.n_head),
            vocab_size=int(cfg.vocab_size),
            n_positions=int(cfg.block_size),
            gated_mlp=False,
            bias=bool(cfg.bias),
            norm="layernorm",
            tie_embeddings=bool(cfg.tie_weights),
            extra_params=extra,
            name="minillm-gpt",
        )


#: LLaMA-1 (Touvron et al. 2023, Table 2) and Llama-2 70B (GQA, 8 KV heads) shapes.
PRESETS = {
    "7b": ModelShape(n_layers=32, d_model=4096, d_ff=11008, n_heads=32, vocab_size=32000, name="LLaMA-7B"),
    "13b": ModelShape(n_layers=40, d_model=5120, d_ff=13824, n_heads=40, vocab_size=32000, name="LLaMA-13B"),
    "33b": ModelShape(n_layers=60, d_model=6656, d_ff=17920, n_heads=52, vocab_size=32000, name="LLaMA-33B"),
    "65b": ModelShape(n_layers=80, d_model=8192, d_ff=22016, n_heads=64, vocab_size=32000, name="LLaMA-65B"),
    "70b": ModelShape(
        n_layers=80, d_model=8192, d_ff=28672, n_heads=64, n_kv_heads=8, vocab_size=32000, name="Llama-2-70B"
    ),
}


def _target_names(shape: ModelShape, targets: Union[str, Sequence[str]]) -> set:
    all_names = [n for n, _, _ in shape.linear_shapes()]
    if isinstance(targets, str):
        if targets == "all-linear":
            return set(all_names)
        if targets in LORA_TARGET_SETS:
            return set(LORA_TARGET_SETS[targets])
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = [MINILLM_NAMES.get(t, t) for t in targets]
    unknown = [t for t in targets if t not in all_names]
    if unknown:
        raise ValueError(
            f"unknown LoRA target(s) {unknown}; expected 'all-linear', 'attention', 'qv' or names from {all_names}"
        )
    return set(targets)


def _dtype_bytes(dtype: str, what: str) -> float:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"{what} must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}") from None


def quant_constants_bytes(n: int, double_quant: bool = True, blocksize: int = QLORA_BLOCKSIZE) -> int:
    """Bytes of the absmax constants of one quantized matrix of n elements (as ``quant_state_nbytes``):
    nb = ceil(n / blocksize); without double quantization 4*nb; with it nb + 4*ceil(nb/256) + 4."""
    nb = -(-int(n) // blocksize)
    if not double_quant:
        return 4 * nb
    return nb + 4 * (-(-nb // NESTED_BLOCKSIZE)) + 4


def activation_bytes_per_layer(
    shape: ModelShape,
    batch: int,
    seq_len: int,
    act_bytes: float = 2.0,
    dropout: bool = True,
    flash_attention: bool = False,
) -> float:
    """Activations one transformer layer keeps for backward, in bytes (Korthikanti et al. 2022, Eq. 1,
    generalised: see the module docstring). With act_bytes=2, dropout, a GELU MLP with f = 4h, MHA and
    no flash attention this is exactly s*b*h*(34 + 5*a*s/h)."""
    s, b, h, a, f = seq_len, batch, shape.d_model, shape.n_heads, shape.d_ff
    kv = shape.kv_dim
    mask = 1.0 if dropout else 0.0
    sbh = s * b * h
    attn = act_bytes * (sbh + sbh + 2 * s * b * kv + sbh) + mask * sbh  # input, Q, K+V, out-proj input; mask
    if not flash_attention:
        attn += a * s * s * b * (act_bytes + mask * (1.0 + act_bytes))  # softmax out; dropout mask + output
    mlp_hidden = (4 if shape.gated_mlp else 2) * s * b * f
    mlp = act_bytes * (sbh + mlp_hidden) + mask * sbh
    norms = 2 * act_bytes * sbh
    return attn + mlp + norms


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    act_bytes: float = 2.0,
    dropout: bool = True,
    flash_attention: bool = False,
) -> int:
    """Activation bytes of the whole model: L layers (or, with gradient checkpointing, L layer inputs
    of s*b*h*act_bytes plus one layer being recomputed) plus the float32 logits b*s*V*4."""
    per_layer = activation_bytes_per_layer(shape, batch, seq_len, act_bytes, dropout, flash_attention)
    if gradient_checkpointing:
        layers = shape.n_layers * seq_len * batch * shape.d_model * act_bytes + per_layer
    else:
        layers = shape.n_layers * per_layer
    logits = batch * seq_len * shape.vocab_size * 4
    return int(math.ceil(layers + logits))


def estimate(
    model: Union[int, float, ModelShape, str],
    method: str = "qlora",
    dtype: str = "bf16",
    optimizer: str = "adamw",
    lora_r: int = 64,
    lora_targets: Union[str, Sequence[str]] = "all-linear",
    lora_dtype: Optional[str] = None,
    batch: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    double_quant: bool = True,
    master_weights: Optional[bool] = None,
    dropout: bool = False,
    flash_attention: bool = False,
) -> dict:
    """Estimate training memory in bytes by component (see the module docstring for every formula).

    model: a parameter count (int/float, e.g. 7e9), a ``ModelShape`` or a preset name ("7b", "13b",
    "33b", "65b", "70b"). method: "full", "lora" or "qlora". dtype: storage/compute dtype of the
    (base) weights and activations ("bf16", "fp16", "fp32"). optimizer: a key of ``OPTIMIZER_BYTES``.
    lora_r, lora_targets, lora_dtype (default = dtype): the adapters. batch, seq_len: tokens per
    step. gradient_checkpointing: store only layer inputs. double_quant: QLoRA double quantization.
    master_weights: fp32 copies of 16-bit trainable weights (None: on for full fine-tuning with a
    16-bit dtype). dropout: count dropout masks (LLaMA uses none). flash_attention: no s^2 scores.

    Returns a dict: the byte counts ``COMPONENTS`` and ``total`` (ints), ``activations_no_checkpointing``
    and ``activations_checkpointing`` (ints, bytes), ``n_params`` and ``trainable_params`` (counts).
    Raises ValueError for an unknown method/dtype/optimizer/preset/target, a non-positive size, or
    lora_r > min(in_features, out_features) of a targeted layer (as ``lora.check_lora_rank``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_BYTES)}, got {optimizer!r}")
    wbytes = _dtype_bytes(dtype, "dtype")
    lbytes = _dtype_bytes(lora_dtype or dtype, "lora_dtype")
    for k, v in (("batch", batch), ("seq_len", seq_len), ("lora_r", lora_r)):
        if int(v) < 1:
            raise ValueError(f"{k} must be >= 1, got {v}")

    if isinstance(model, str):
        key = model.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {model!r}; expected one of {sorted(PRESETS)}")
        model = PRESETS[key]
    if isinstance(model, ModelShape):
        shape = model
        n_params = shape.n_params()
        linear = [(i * o, shape.n_layers) for _, i, o in shape.linear_shapes()]  # (elements, count)
        n_linear = shape.linear_params()
    else:
        n_params = int(model)
        if n_params < 1:
            raise ValueError(f"n_params must be >= 1, got {model}")
        shape = ModelShape.llama_like(n_params)
        linear = None  # continuous per-parameter figures
        n_linear = n_params
    n_other = n_params - n_linear

    out = {k: 0 for k in COMPONENTS}
    if method != "full":  # the rule of lora.check_lora_rank: r ≤ min(in, out) of every targeted layer
        names = _target_names(shape, lora_targets)
        for n, i, o in shape.linear_shapes():
            if n in names and int(lora_r) > min(i, o):
                raise ValueError(f"lora_r={int(lora_r)} is larger than layer {n} of {shape.name} (in_features={i}, "
                                 f"out_features={o}): B·A has rank ≤ min(in, out) = {min(i, o)}")
    lora_p = shape.lora_params(lora_r, lora_targets) if method != "full" else 0
    if method == "full":
        trainable = n_params
        out["weights"] = n_params * wbytes
        out["gradients"] = n_params * wbytes
        use_master = (wbytes < 4) if master_weights is None else bool(master_weights)
        out["master_weights"] = n_params * 4 if use_master and wbytes < 4 else 0
    else:
        trainable = lora_p
        out["lora_weights"] = lora_p * lbytes
        out["gradients"] = lora_p * lbytes
        use_master = False if master_weights is None else bool(master_weights)
        out["master_weights"] = lora_p * 4 if use_master and lbytes < 4 else 0
        if method == "lora":
            out["weights"] = n_params * wbytes
        else:  # qlora: NF4 Linear weights, the rest in dtype
            if linear is None:
                out["weights"] = n_linear / 2 + n_other * wbytes
                bits = (8 / 64 + 32 / (64 * 256)) if double_quant else 32 / 64
                out["quant_constants"] = n_linear * bits / 8
            else:
                out["weights"] = sum(count * -(-n // 2) for n, count in linear) + n_other * wbytes
                out["quant_constants"] = sum(count * quant_constants_bytes(n, double_quant) for n, count in linear)
    out["optimizer_states"] = trainable * OPTIMIZER_BYTES[optimizer]

    act_kw = dict(act_bytes=wbytes, dropout=dropout, flash_attention=flash_attention)
    act_full = activation_bytes(shape, batch, seq_len, False, **act_kw)
    act_ckpt = activation_bytes(shape, batch, seq_len, True, **act_kw)
    out["activations"] = act_ckpt if gradient_checkpointing else act_full

    out = {k: int(math.ceil(v)) for k, v in out.items()}
    out["total"] = sum(out[k] for k in COMPONENTS)
    out["activations_no_checkpointing"] = act_full
    out["activations_checkpointing"] = act_ckpt
    out["n_params"] = int(n_params)
    out["trainable_params"] = int(trainable)
    return out


def format_table(est: dict, title: str = "") -> str:
    """A plain-text table of an ``estimate`` result: one row per component in GB (1e9 bytes) and GiB,
    the total, and the alternative activation figure."""
    rows = [(k, est[k]) for k in COMPONENTS] + [("total", est["total"])]
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'component':<20}{'bytes':>18}{'GB':>10}{'GiB':>10}")
    lines.append("-" * 58)
    for name, b in rows:
        if name == "total":
            lines.append("-" * 58)
        lines.append(f"{name:<20}{b:>18,d}{b / 1e9:>10.3f}{b / 2**30:>10.3f}")
    lines.append(
        f"params {est['n_params']:,d}, trainable {est['trainable_params']:,d}; activations "
        f"{est['activations_no_checkpointing'] / 1e9:.3f} GB without / "
        f"{est['activations_checkpointing'] / 1e9:.3f} GB with gradient checkpointing"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# CLI: minillm memory
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``minillm memory``."""
    g = parser.add_mutually_exclusive_group()
    from minillm.train.common import number_in_range

    g.add_argument("--params", type=number_in_range(float, "params", (0.0, float("inf"), False, False)), default=None,
                   help="parameter count, e.g. 7e9 (> 0)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="model shape preset (default 7b)")
    parser.add_argument("--method", choices=METHODS, default="qlora")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZER_BYTES), default="adamw")
    parser.add_argument("--lora-r", type=number_in_range(int, "lora_r", (1, float("inf"), True, False)), default=64,
                        help="LoRA rank (int ≥ 1; default 64)")
    parser.add_argument("--lora-targets", default="all-linear", help="all-linear | attention | qv | comma-separated names")
    parser.add_argument("--batch", type=number_in_range(int, "batch", (1, float("inf"), True, False)), default=1,
                        help="sequences per step (int ≥ 1; default 1)")
    parser.add_argument("--seq-len", type=number_in_range(int, "seq_len", (1, float("inf"), True, False)), default=512,
                        help="tokens per sequence (int ≥ 1; default 512)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantization")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the memory table (or JSON) for the parsed arguments. Returns 0, or 2 on a bad argument."""
    model = args.params if args.params is not None else (args.preset or "7b")
    try:
        est = estimate(
            model,
            method=args.method,
            dtype=args.dtype,
            optimizer=args.optimizer,
            lora_r=args.lora_r,
            lora_targets=args.lora_targets,
            batch=args.batch,
            seq_len=args.seq_len,
            gradient_checkpointing=args.gradient_checkpointing,
            double_quant=not args.no_double_quant,
        )
    except ValueError as e:
        print(f"minillm memory: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        name = PRESETS[model].name if isinstance(model, str) else f"{model:.3g} params"
        ck = ", gradient checkpointing" if args.gradient_checkpointing else ""
        title = (
            f"{name}: {args.method}, {args.dtype}, {args.optimizer}, r={args.lora_r} ({args.lora_targets}), "
            f"batch {args.batch} x seq {args.seq_len}{ck}"
        )
        print(format_table(est, title))
    return 0


def main(argv: Optional[Iterable[str]] = None) -> int:  # pragma: no cover - thin wrapper
    p = argparse.ArgumentParser(prog="minillm memory", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
