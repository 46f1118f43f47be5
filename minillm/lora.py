"""LoRA: low-rank adapters on frozen Linear layers, merge/unmerge, accounting, adapter files.

Scope
    * ``LoRALinear`` wraps a frozen base layer (any module with ``in_features``, ``out_features``
      and ``forward(x)``: ``nn.Linear`` or a 4-bit layer) and adds the trainable low-rank update
      ``y = base(x) + scaling · B(A(dropout(x)))`` with ``lora_A`` (r, in), ``lora_B`` (out, r).
      ``merge()`` folds ``ΔW = scaling · B·A`` into the base weight (same latency as the base),
      ``unmerge()`` takes it out again.
    * ``inject_lora`` replaces the matching Linear sub-modules of a model (matched by name like
      PEFT's ``target_modules``), ``mark_only_lora_as_trainable``, ``count_parameters`` /
      ``print_trainable_parameters`` (PEFT's "trainable params: … || all params: … ||
      trainable%: …"), ``merge_lora`` / ``unmerge_lora`` / ``merge_and_unload``.
    * Adapter files: ``save_adapter`` / ``load_adapter`` (only the LoRA tensors, safetensors, the
      config in the file's metadata). PEFT's on-disk layout for the Hugging Face GPT-2 module names
      is written by ``hf.export_peft`` (interop lives in ``minillm.hf``).

Sources
    * Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685,
      §4.1 Eq. 3 (h = W₀x + ΔWx = W₀x + BAx, ΔWx scaled by α/r; B = 0 at init so ΔW = 0) and §4.1
      "No Additional Inference Latency" (merging W = W₀ + BA).
    * huggingface/peft ``src/peft/tuners/lora/layer.py`` (``LoraLayer.update_layer``,
      ``reset_lora_parameters``, ``Linear.forward/merge/unmerge/get_delta_weight``),
      ``src/peft/utils/save_and_load.py`` (saved key names), ``src/peft/peft_model.py``
      (``get_nb_trainable_parameters``: a packed 4-bit tensor counts numel·2). See
      docs/reference.md §1.
    * Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (rsLoRA),
      arXiv:2312.03732: scaling α/√r.

Deliberate deviations
    * ``lora_A`` is initialised as PEFT/loralib do (kaiming-uniform with a = √5, i.e.
      U(−1/√in, 1/√in)), not with the paper's "random Gaussian" (§4.1); ``init_lora_weights=
      "gaussian"`` restores a Gaussian (PEFT's N(0, 1/r) variant). Either way B = 0 and ΔW = 0 at
      step 0, so the LoRA model equals the base model exactly.
    * ``lora_A`` and ``lora_B`` are Parameters of the wrapper (names ``….lora_A``, ``….lora_B``),
      not sub-modules with an adapter name (PEFT: ``….lora_A.default.weight``); only one adapter
      per layer. The PEFT file ``hf.export_peft`` writes uses PEFT's names (``….lora_A.weight``).
    * Bias LoRA (PEFT ``lora_bias``), DoRA and multiple adapters are not offered.
    * ``lora_alpha`` defaults to 16 (``DEFAULT_LORA_ALPHA``, what the trainers were measured with),
      not PEFT's 8; ``lora_alpha=8`` restores PEFT's default.
    * A rank larger than the layer is refused: r > min(in_features, out_features) of any targeted
      layer raises ValueError naming the layer's module path, its shape and r
      (``check_lora_rank``; on every path: ``LoRALinear``, ``inject_lora``, the trainers'
      ``--lora-r``, QLoRA, ``memory.estimate``). PEFT accepts it silently, but the update
      ΔW = B·A has rank ≤ min(in, out) whatever r is, so the extra r·(in + out) parameters are
      wasted and α/r scales the update down for nothing.
    * An adapter file records which base it was trained on as a fingerprint
      (``base_model_fingerprint``: SHA-256 over the model's architecture config and the frozen
      base tensors of the adapted layers), where PEFT keeps only ``base_model_name_or_path`` in
      ``adapter_config.json``; ``load_adapter`` refuses an adapter whose fingerprint differs from
      the model's (``check_base=False`` skips the check) and warns for a file without one.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings

import numpy as np

from minillm import backend
from minillm import functional as F
from minillm.nn import Dropout, Module, Parameter
from minillm.tensor import Tensor, no_grad

#: The default target modules: the query and value projections (Hu et al. 2021 §7.1; PEFT's default
#: for llama-style names). ``"all-linear"`` selects every Linear in the blocks (QLoRA's choice).
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")

#: Names of output heads that ``"all-linear"`` leaves out (PEFT excludes the output embedding layer).
HEAD_NAMES = ("lm_head", "score")

#: The one default of α in the project (layers, ``inject_lora`` and every trainer's config). PEFT's
#: ``LoraConfig`` default is 8; the trainers here were measured with 16 (QLoRA's α), so 16 it is;
#: pass ``lora_alpha=8`` for PEFT's.
DEFAULT_LORA_ALPHA = 16.0


def parse_target_modules(spec, qlora: bool = False):
    """The one reading of a LoRA target specification, as the CLI and configs write it.

    ``""`` → the default: ``DEFAULT_TARGET_MODULES`` (q_proj, v_proj), or ``"all-linear"`` for QLoRA
    (QLoRA adapts every linear layer); ``"all-linear"`` → ``"all-linear"``; ``"q_proj, v_proj"`` (comma-
    separated) → ``["q_proj", "v_proj"]``; a list or tuple → a list. Returns what ``inject_lora`` takes.
    Raises ValueError for a specification that names no module (e.g. ``","``).
    """
    if isinstance(spec, (list, tuple)):
        names = [str(t).strip() for t in spec if str(t).strip()]
    elif spec in ("", None):
        return "all-linear" if qlora else list(DEFAULT_TARGET_MODULES)
    elif spec == "all-linear":
        return "all-linear"
    else:
        names = [t.strip() for t in str(spec).split(",") if t.strip()]
    if not names:
        raise ValueError(f"LoRA target modules {spec!r} name no module (use 'all-linear' or names like q_proj,v_proj)")
    return names


def check_lora_rank(r: int, in_features: int, out_features: int, name: str = "layer") -> None:
    """Raise ValueError when the LoRA rank ``r`` exceeds min(``in_features``, ``out_features``) of the
    layer ``name`` (its module path): ΔW = B·A (out, in) has rank ≤ min(in, out), so a larger r only
    adds wasted parameters (a deviation from PEFT, which accepts it; module docstring)."""
    if int(r) > min(int(in_features), int(out_features)):
        raise ValueError(f"LoRA rank r={int(r)} is larger than layer {name} (in_features={int(in_features)}, "
                         f"out_features={int(out_features)}): B·A has rank ≤ min(in, out) = "
                         f"{min(int(in_features), int(out_features))}; use r ≤ that (e.g. --lora-r)")


def is_linear_like(m) -> bool:
    """A layer LoRA can wrap: a Module (not already a LoRALinear) with in/out_features and forward."""
    return (isinstance(m, Module) and not isinstance(m, LoRALinear)
            and hasattr(m, "in_features") and hasattr(m, "out_features") and callable(getattr(m, "forward", None)))


class LoRALinear(Module):
    """A frozen base layer plus a trainable low-rank update (Hu et al. 2021 Eq. 3; PEFT ``lora.Linear``).

    Args:
        base: the layer to adapt: a Module with ``in_features``, ``out_features`` and
            ``forward(x)`` mapping (..., in) -> (..., out). Its parameters are frozen
            (``requires_grad=False``). Merging writes into ``base.weight.data`` (layout (out, in),
            or (in, out) with ``fan_in_fan_out``) unless the base offers the hooks
            ``base.merge_delta(delta)`` / ``base.unmerge_delta(delta)`` (delta: float32 (out, in);
            a 4-bit layer implements them by dequantize → add → re-quantize, with a warning).
        r: rank (int ≥ 1). lora_alpha: α (> 0); ``scaling = α / r`` (``α / √r`` with use_rslora).
        lora_dropout: probability p ∈ [0, 1) of the inverted dropout on the LoRA branch input only
            (the base sees x unchanged); identity in eval mode.
        use_rslora: rsLoRA scaling α/√r (arXiv 2312.03732).
        init_lora_weights: True (A ~ U(−1/√in, 1/√in) = kaiming-uniform a=√5, B = 0; PEFT's default),
            "gaussian" (A ~ N(0, (1/r)²), B = 0) or False (A and B both U(−1/√fan_in, 1/√fan_in),
            the nn.Linear default: B ≠ 0, for merge tests).
        rng: numpy Generator for the initialisation (default: seeded with 0).
        dropout_rng: numpy Generator for the dropout masks (default: one drawn from ``rng``).
        name: the layer's module path, used in error messages (``inject_lora`` passes it).
        fan_in_fan_out: the base stores its weight as (in, out) (GPT-2 ``Conv1D``); only ΔW is
            transposed when merging, A and B keep their shapes.

    Shapes: lora_A (r, in), lora_B (out, r), float32; forward x (..., in) -> (..., out).
    Raises ValueError for r < 1, r > min(in, out) (``check_lora_rank``), α ≤ 0, p outside [0, 1),
    an unknown init_lora_weights, or a base without in_features/out_features.
    """

    def __init__(self, base: Module, r: int = 8, lora_alpha: float = DEFAULT_LORA_ALPHA,
                 lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights=True, rng: np.random.Generator | None = None,
                 dropout_rng: np.random.Generator | None = None, fan_in_fan_out: bool = False,
                 name: str | None = None):
        super().__init__()
        if not is_linear_like(base):
            raise ValueError(f"LoRALinear needs a base Module with in_features, out_features and forward; "
                             f"got {type(base).__name__}")
        if int(r) != r or r < 1:
            raise ValueError(f"LoRA rank r must be an integer ≥ 1, got {r!r}")
        check_lora_rank(r, base.in_features, base.out_features, name or type(base).__name__)
        if not lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {lora_alpha!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        rng = rng if rng is not None else np.random.default_rng(0)
        if dropout_rng is None:
            dropout_rng = np.random.default_rng(int(rng.integers(2 ** 63)))
        base.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.init_lora_weights = init_lora_weights
        # scaling = α/r (Hu et al. §4.1), or α/√r (rsLoRA). Kept as a Python float.
        self.scaling = float(lora_alpha) / (math.sqrt(self.r) if self.use_rslora else self.r)
        self.lora_dropout = Dropout(lora_dropout, dropout_rng)
        self.merged = False
        self.disable_adapters = False
        n_in, n_out = self.in_features, self.out_features
        if init_lora_weights is True:  # kaiming_uniform_(a=√5) on (r, in): bound = √(2/6)·√(3/in) = 1/√in
            a = rng.uniform(-1.0 / math.sqrt(n_in), 1.0 / math.sqrt(n_in), (self.r, n_in))
            b = np.zeros((n_out, self.r))
        elif init_lora_weights == "gaussian":  # PEFT: nn.init.normal_(A, std=1/r)
            a = rng.normal(0.0, 1.0 / self.r, (self.r, n_in))
            b = np.zeros((n_out, self.r))
        else:  # nn.Linear's default init on both (B ≠ 0)
            a = rng.uniform(-1.0 / math.sqrt(n_in), 1.0 / math.sqrt(n_in), (self.r, n_in))
            b = rng.uniform(-1.0 / math.sqrt(self.r), 1.0 / math.sqrt(self.r), (n_out, self.r))
        self.lora_A = Parameter(backend.asarray(a, dtype=backend.DEFAULT_DTYPE))  # (r, in)
        self.lora_B = Parameter(backend.asarray(b, dtype=backend.DEFAULT_DTYPE))  # (out, r)

    @property
    def base(self) -> Module:
        """The wrapped (frozen) layer; PEFT calls it ``base_layer``."""
        return self.base_layer

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> base(x) + scaling · (dropout(x) Aᵀ) Bᵀ, (..., out). Merged: base(x) only."""
        y = self.base_layer(x)  # (..., out)
        if self.merged or self.disable_adapters:
            return y
        h = self.lora_dropout(x)  # (..., in), inverted dropout on the LoRA branch only
        h = F.linear(h, self.lora_A)  # (..., r)
        h = F.linear(h, self.lora_B)  # (..., out)
        return y + h * self.scaling  # Eq. 3 with α/r

    def delta_weight(self):
        """ΔW = scaling · B·A as an array of the base weight's layout: (out, in), or (in, out) with
        fan_in_fan_out; float32 (PEFT ``get_delta_weight``). Deterministic: dropout plays no part."""
        dt = self.lora_A.dtype.type
        delta = (self.lora_B.data @ self.lora_A.data) * dt(self.scaling)  # (out, r) @ (r, in) -> (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merge(self) -> None:
        """Fold ΔW into the base weight (W ← W + scaling·B·A); afterwards forward = base only.

        In eval mode the merged output equals the unmerged one up to float rounding (inverted
        dropout needs no (1−p) factor; docs/bugs.md C2). Calling it in train mode folds no
        dropout mask in (ΔW does not depend on it), but the merged layer then applies no dropout.
        Merging an already merged layer warns and does nothing (as PEFT).
        """
        if self.merged:
            warnings.warn("LoRALinear.merge: already merged; nothing done", stacklevel=2)
            return
        delta = self.delta_weight()
        with no_grad():
            hook = getattr(self.base_layer, "merge_delta", None)
            if callable(hook):
                hook(delta)
            else:
                w = self.base_layer.weight
                if tuple(w.shape) != tuple(delta.shape):
                    raise ValueError(f"LoRALinear.merge: ΔW {tuple(delta.shape)} does not match the base weight "
                                     f"{tuple(w.shape)} (fan_in_fan_out={self.fan_in_fan_out})")
                w.data += delta.astype(w.dtype, copy=False)
        self.merged = True

    def unmerge(self) -> None:
        """Take ΔW out of the base weight again (W ← W − scaling·B·A). Not merged: warns, does nothing.

        Raises NotImplementedError if the base has ``merge_delta`` but no ``unmerge_delta``.
        """
        if not self.merged:
            warnings.warn("LoRALinear.unmerge: not merged; nothing done", stacklevel=2)
            return
        delta = self.delta_weight()
        with no_grad():
            if callable(getattr(self.base_layer, "merge_delta", None)):
                hook = getattr(self.base_layer, "unmerge_delta", None)
                if not callable(hook):
                    raise NotImplementedError(f"{type(self.base_layer).__name__} has merge_delta but no unmerge_delta")
                hook(delta)
            else:
                w = self.base_layer.weight
                w.data -= delta.astype(w.dtype, copy=False)
        self.merged = False

    def __repr__(self) -> str:
        return (f"LoRALinear(r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, "
                f"lora_dropout={self.lora_dropout.p}, use_rslora={self.use_rslora}, merged={self.merged},\n"
                f"  (base_layer): {self.base_layer!r})")


# ------------------------------------------------------------------------------ model surgery


def target_matches(name: str, target_modules) -> bool:
    """Whether module ``name`` is a LoRA target. PEFT's rule: a string is a regex matched against the full name (``re.fullmatch``); a list
    matches a module whose name equals an entry or ends with ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def lora_layers(model: Module) -> list[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its dotted name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_target_layers(model: Module, target_modules=DEFAULT_TARGET_MODULES, r: int | None = None
                       ) -> list[tuple[str, Module]]:
    """The (module path, layer) pairs ``inject_lora`` would wrap, in module order, without changing
    the model; with ``r``, also checks that r fits every one of them (``check_lora_rank``), so a
    trainer can refuse a bad ``--lora-r`` before any work. ``target_modules`` as ``inject_lora``.
    Raises ValueError for an empty target list, targets that match no linear layer (naming the
    model's linear layers), or r > min(in_features, out_features) of a chosen layer."""
    if isinstance(target_modules, (list, tuple, set, frozenset)):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("inject_lora: target_modules is empty")
    linear = [(n, m) for n, m in model.named_modules() if is_linear_like(m)
              and not n.endswith(".base_layer") and n != "base_layer"]
    if target_modules == "all-linear":
        chosen = [(n, m) for n, m in linear if n.split(".")[-1] not in HEAD_NAMES]
    else:
        chosen = [(n, m) for n, m in linear if target_matches(n, target_modules)]
    if not chosen:
        raise ValueError(f"inject_lora: target_modules {target_modules!r} matched no linear layer; "
                         f"the model's linear layers are {[n for n, _ in linear]}")
    if r is not None:
        for name, m in chosen:
            check_lora_rank(r, m.in_features, m.out_features, name)
    return chosen


def inject_lora(model: Module, target_modules=DEFAULT_TARGET_MODULES, r: int = 8,
                lora_alpha: float = DEFAULT_LORA_ALPHA, lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights=True, seed: int = 0,
                freeze_base: bool = True) -> list[str]:
    """Replace the matching Linear sub-modules of ``model`` by ``LoRALinear`` wrappers, in place.

    Args:
        target_modules: a list of names matched by the last name components (PEFT: a module
            matches when its dotted name equals an entry or ends with "." + entry, so "q_proj" and
            "attn.c_proj" both work), a regex string matched against the whole dotted name, or
            ``"all-linear"``: every linear layer except the output heads (``lm_head``, ``score``).
        r, lora_alpha, lora_dropout, use_rslora, init_lora_weights: see ``LoRALinear``.
        seed: seeds the initialisation of every A (in module order) and the dropout masks.
        freeze_base: also freeze every non-LoRA parameter (``mark_only_lora_as_trainable``), as
            PEFT's ``get_peft_model`` does.

    Returns the dotted names of the replaced modules (e.g. ``transformer.h.0.attn.q_proj``).
    Raises ValueError naming the targets (and the available linear layers) when nothing matched,
    or naming the layer, its shape and r when r > min(in_features, out_features) of a targeted
    layer (``lora_target_layers``; the model is left unchanged).
    """
    chosen = lora_target_layers(model, target_modules, r)  # every check before the model changes
    rng = np.random.default_rng(seed)
    dropout_rng = np.random.default_rng([seed, 1])
    replaced = []
    for name, m in chosen:
        layer = LoRALinear(m, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                           init_lora_weights=init_lora_weights, rng=rng, dropout_rng=dropout_rng, name=name)
        layer.train(getattr(m, "training", True))
        model.set_submodule(name, layer)
        replaced.append(name)
    if freeze_base:
        mark_only_lora_as_trainable(model)
    return replaced


def mark_only_lora_as_trainable(model: Module) -> int:
    """Freeze every parameter except ``lora_A``/``lora_B``; returns the number of trainable scalars."""
    n = 0
    for name, p in model.named_parameters():
        is_lora = name.endswith(".lora_A") or name.endswith(".lora_B") or name in ("lora_A", "lora_B")
        p.requires_grad = is_lora
        n += p.size if is_lora else 0
    return int(n)


def count_parameters(model: Module) -> dict:
    """Trainable and total parameter counts as PEFT's ``get_nb_trainable_parameters``.

    Returns ``{"trainable": int, "total": int, "percent": float}`` (percent = 100·trainable/total).
    A 4-bit packed weight counts as the number of weights it stores: a ``uint8`` Parameter counts
    numel·2 (two 4-bit codes per byte, as PEFT for ``Params4bit``), and a module that keeps its
    packed weight in a buffer reports it through the hook ``num_quantized_parameters`` (an int
    attribute or method: the number of logical weights, e.g. out·in).
    """
    trainable = total = 0
    for _, p in model.named_parameters():
        n = int(p.size) * (2 if p.dtype == np.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    for _, m in model.named_modules():
        q = getattr(m, "num_quantized_parameters", None)
        if q is not None:
            total += int(q() if callable(q) else q)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / total if total else 0.0}


def format_parameter_count(counts: dict) -> str:
    """PEFT's summary line: ``trainable params: 65,536 || all params: 16,842,752 || trainable%: 0.3891``."""
    return (f"trainable params: {counts['trainable']:,d} || all params: {counts['total']:,d} || "
            f"trainable%: {counts['percent']:.4f}")


def print_trainable_parameters(model: Module) -> str:
    """Print (and return) the PEFT-style summary line of ``count_parameters(model)``."""
    line = format_parameter_count(count_parameters(model))
    print(line)
    return line


def merge_lora(model: Module) -> list[str]:
    """Merge every (unmerged) LoRALinear of the model; returns their names."""
    names = []
    for name, layer in lora_layers(model):
        if not layer.merged:
            layer.merge()
            names.append(name)
    return names


def unmerge_lora(model: Module) -> list[str]:
    """Unmerge every merged LoRALinear of the model; returns their names."""
    names = []
    for name, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()
            names.append(name)
    return names


def merge_and_unload(model: Module) -> Module:
    """Merge every adapter into its base and put the base layers back in place of the wrappers
    (PEFT ``merge_and_unload``). The model is modified in place and returned; base parameters
    stay frozen. A plain model then has exactly the base model's structure and state_dict keys."""
    for name, layer in lora_layers(model):
        if not layer.merged:
            layer.merge()
        model.set_submodule(name, layer.base_layer)
    return model


# ------------------------------------------------------------------------------ adapter files


def lora_state_dict(model: Module) -> dict:
    """Name -> host float32 array of every LoRA parameter (``<module path>.lora_A`` (r, in),
    ``<module path>.lora_B`` (out, r))."""
    out = {}
    for name, layer in lora_layers(model):
        out[f"{name}.lora_A"] = backend.to_numpy(layer.lora_A.data).astype(np.float32)
        out[f"{name}.lora_B"] = backend.to_numpy(layer.lora_B.data).astype(np.float32)
    return out


def lora_config(model: Module) -> dict:
    """The LoRA hyperparameters of a model with adapters: r, lora_alpha, lora_dropout, use_rslora,
    target_modules (sorted last name components), fan_in_fan_out, init_lora_weights.
    Raises ValueError if the model has no LoRA layer or its layers disagree on r/α/rsLoRA/dropout."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layer (call inject_lora first)")
    kinds = {(m.r, m.lora_alpha, m.use_rslora, m.lora_dropout.p) for _, m in layers}
    if len(kinds) > 1:
        raise ValueError(f"the model's LoRA layers differ in (r, lora_alpha, use_rslora, lora_dropout): {sorted(kinds)}")
    r, alpha, rs, p = kinds.pop()
    first = layers[0][1]
    return {"r": r, "lora_alpha": alpha, "lora_dropout": p, "use_rslora": rs,
            "target_modules": sorted({n.split(".")[-1] for n, _ in layers}),
            "fan_in_fan_out": first.fan_in_fan_out, "init_lora_weights": first.init_lora_weights}


#: The model-config fields that make up a base model's architecture (``base_model_fingerprint``);
#: ``dropout`` is left out: it does not change the weights an adapter was trained against.
_ARCH_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_weights", "scalar_head")


def _base_layers(model: Module, layer_names=None) -> list[tuple[str, Module]] | None:
    """(module path, frozen base layer) for each of ``layer_names`` (default: the model's LoRA layers),
    sorted by path: a LoRA layer's ``base_layer``, or the layer itself before injection. None when
    a name is not a linear layer of ``model`` (the adapter's keys do not fit; reported elsewhere)."""
    if layer_names is None:
        layer_names = [n for n, _ in lora_layers(model)]
    modules = dict(model.named_modules())
    out = []
    for name in sorted(set(layer_names)):
        m = modules.get(name)
        if isinstance(m, LoRALinear):
            m = m.base_layer
        if m is None or not is_linear_like(m):
            return None
        out.append((name, m))
    return out


def _quant_settings(base: Module) -> dict | None:
    """The 4-bit settings of a quantized base layer (None for a float layer)."""
    if not hasattr(base, "quant_type") or not hasattr(base, "blocksize"):
        return None
    return {"quant_type": base.quant_type, "blocksize": int(base.blocksize),
            "compress_statistics": bool(base.compress_statistics)}


def base_model_fingerprint(model: Module, layer_names=None, quant: dict | None = None) -> str:
    """SHA-256 (64 hex digits) identifying the base model an adapter belongs to.

    Hashed, in order: the architecture fields of ``model.config`` (``_ARCH_FIELDS``, JSON with
    sorted keys; none for a model without a ``config``), then for each adapted layer (``layer_names``,
    module paths; default: the model's LoRA layers), sorted by path, the path and every tensor of
    its frozen base layer (name, dtype, shape, bytes; a 4-bit layer's packed codes and constants).
    The LoRA tensors themselves are not part of it. ``quant`` ({quant_type, blocksize,
    compress_statistics}, the settings of a QLoRA adapter's base): float base layers are quantized
    with them (``linear4bit.Linear4bit``, deterministic) before hashing, so a QLoRA adapter can be
    checked against the float checkpoint it was quantized from.
    Raises ValueError when a LoRA layer is merged (its base weight then holds B·A: unmerge first),
    or when a name of ``layer_names`` is not a linear layer of the model.
    Source: the role of PEFT's ``base_model_name_or_path`` (``PeftConfig``, adapter_config.json),
    made to depend on the weights rather than on a name.
    """
    import hashlib

    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    arch = {k: v for k, v in cfg.to_dict().items() if k in _ARCH_FIELDS} if hasattr(cfg, "to_dict") else {}
    h.update(json.dumps(arch, sort_keys=True).encode())
    merged = [n for n, m in lora_layers(model) if m.merged]
    if merged:
        raise ValueError(f"base_model_fingerprint: LoRA layers {merged} are merged (their base weight holds B·A); "
                         f"unmerge them first")
    bases = _base_layers(model, layer_names)
    if bases is None:
        raise ValueError(f"base_model_fingerprint: {sorted(layer_names)} are not all linear layers of the model")
    for name, base in bases:
        if quant is not None and _quant_settings(base) is None:
            from minillm.linear4bit import Linear4bit

            bias = getattr(base, "bias", None)
            base = Linear4bit(base.weight.data, None if bias is None else bias.data, **quant)
        h.update(name.encode() + b"\0")
        for k, v in base.state_dict().items():
            a = np.ascontiguousarray(backend.to_numpy(v))
            h.update(f"{k}|{a.dtype.str}|{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    from minillm.checkpoint import save_safetensors_atomic  # atomic, fsynced, refuses NaN/inf

    save_safetensors_atomic(path, tensors, metadata)


def save_adapter(model: Module, path: str, config: dict | None = None,
                 base_model_name_or_path: str | None = None) -> None:
    """Write only the adapter (the LoRA tensors) to a safetensors file, atomically.

    Keys are the model's parameter names (``transformer.h.0.attn.q_proj.lora_A`` (r, in) float32,
    ``….lora_B`` (out, r)); ``config`` (default: ``lora_config(model)``) is stored as JSON in the
    file's metadata under ``"lora_config"``, the base model's identity under ``"base_fingerprint"``
    (``base_model_fingerprint``, hex), ``"base_quant"`` (the 4-bit settings of a QLoRA base, JSON, or
    "null") and ``"base_model_name_or_path"`` (``base_model_name_or_path``, else the model's
    ``name_or_path`` as ``checkpoint.load_model`` sets it, else ""). A model with merged LoRA layers
    is saved without a fingerprint, with a warning. Use ``export_peft`` for PEFT's directory layout.
    """
    tensors = lora_state_dict(model)
    if not tensors:
        raise ValueError("save_adapter: the model has no LoRA layer (call inject_lora first)")
    cfg = dict(lora_config(model) if config is None else config)
    meta = {"format": "minillm-lora", "lora_config": json.dumps(cfg),
            "base_model_name_or_path": str(base_model_name_or_path or getattr(model, "name_or_path", "") or "")}
    if any(m.merged for _, m in lora_layers(model)):
        warnings.warn(f"save_adapter({path}): LoRA layers are merged, so the base model's fingerprint cannot be "
                      f"recorded (unmerge first); load_adapter will not be able to check the base", stacklevel=2)
    else:
        quant = _quant_settings(lora_layers(model)[0][1].base_layer)
        meta["base_quant"] = json.dumps(quant)
        meta["base_fingerprint"] = base_model_fingerprint(model, quant=quant)
    _save_safetensors(tensors, path, metadata=meta)


def read_adapter(path: str, metadata: dict | None = None) -> tuple[dict, dict]:
    """(tensors, config) of a file written by ``save_adapter``; a dict passed as ``metadata``
    receives the file's whole metadata (base fingerprint etc.). Raises FileNotFoundError, or
    ValueError when the file is not a minillm adapter (no "lora_config" metadata)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter file {path} does not exist")
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "lora_config" not in meta:
        raise ValueError(f"{path}: not a minillm adapter file (no 'lora_config' in the safetensors metadata)")
    if metadata is not None:
        metadata.update(meta)
    from minillm.checkpoint import check_weights

    check_weights(tensors, str(path))  # no NaN/inf, no diverged weight
    return tensors, json.loads(meta["lora_config"])


def check_adapter_base(model: Module, path: str, meta: dict, layer_names) -> None:
    """Compare the base fingerprint stored in an adapter file's metadata ``meta`` with ``model``'s
    over the adapter's layers ``layer_names`` (``base_model_fingerprint``; a QLoRA adapter's float
    base is quantized with the recorded settings first); layers the model lacks are left to
    ``load_adapter``'s key check. Warns (UserWarning, printed) when the file has no fingerprint (written before minillm
    recorded one) or when the file's base was float and the model's is 4-bit (not comparable).
    Raises ValueError naming both fingerprints (12 hex digits) and both files when they differ."""
    path = str(path)
    stored = meta.get("base_fingerprint")
    if not stored:
        warnings.warn(f"{path}: the adapter records no base-model fingerprint (an older file); it cannot be checked "
                      f"against this model's base", UserWarning, stacklevel=3)
        return
    quant = json.loads(meta.get("base_quant") or "null")
    bases = _base_layers(model, layer_names)
    if bases is None:
        return
    if quant is None and any(_quant_settings(b) is not None for _, b in bases):
        warnings.warn(f"{path}: the adapter was trained on a float base and this model's base is 4-bit; its base "
                      f"fingerprint cannot be compared", UserWarning, stacklevel=3)
        return
    ours = base_model_fingerprint(model, layer_names, quant=quant)
    if ours != stored:
        theirs = meta.get("base_model_name_or_path") or "unnamed"
        mine = getattr(model, "name_or_path", "") or "unnamed"
        raise ValueError(f"{path}: the adapter was trained on base model {stored[:12]} ({theirs}) but this model "
                         f"({mine}) is {ours[:12]}; load it onto its own base (check_base=False skips this check)")


def load_adapter(model: Module, path: str, check_base: bool = True) -> list[str]:
    """Load an adapter written by ``save_adapter`` into ``model``.

    First the model's base is checked against the fingerprint stored in the file
    (``check_adapter_base``, unless ``check_base=False``; a file without one loads with a warning).
    If the model has no LoRA layer yet, adapters are injected from the file's config
    (``target_modules``, r, α, dropout, rsLoRA), then the tensors are copied in. Returns the names
    of the LoRA layers loaded.

    Raises:
        ValueError: naming both fingerprints and files when the adapter belongs to another base
            (the model is left unchanged).
        KeyError: listing every LoRA key of the model missing from the file and every key of the
            file the model lacks (with the file name).
        ValueError: listing every shape mismatch ``name: file (a, b) vs model (c, d)``, or when
            the file's r/α/rsLoRA differ from the model's adapters (the outputs would differ).
    """
    meta: dict = {}
    tensors, cfg = read_adapter(path, metadata=meta)
    if check_base:
        check_adapter_base(model, path, meta, [k.rsplit(".", 1)[0] for k in tensors])
    if not lora_layers(model):
        inject_lora(model, target_modules=cfg["target_modules"], r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                    lora_dropout=cfg.get("lora_dropout", 0.0), use_rslora=cfg.get("use_rslora", False))
    layers = lora_layers(model)
    for name, m in layers:
        if (m.r, float(m.lora_alpha), m.use_rslora) != (cfg["r"], float(cfg["lora_alpha"]),
                                                        bool(cfg.get("use_rslora", False))):
            raise ValueError(f"{path}: adapter config r={cfg['r']}, lora_alpha={cfg['lora_alpha']}, "
                             f"use_rslora={cfg.get('use_rslora', False)} differs from layer {name}: r={m.r}, "
                             f"lora_alpha={m.lora_alpha}, use_rslora={m.use_rslora}")
    own = {f"{n}.{k}": getattr(m, k) for n, m in layers for k in ("lora_A", "lora_B")}
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise KeyError(f"{path}: missing keys {missing}; unexpected keys {unexpected}")
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(p.shape)}" for k, p in own.items()
           if tuple(tensors[k].shape) != tuple(p.shape)]
    if bad:
        raise ValueError(f"{path}: shape mismatch for " + "; ".join(bad))
    for k, p in own.items():
        p.data = backend.asarray(tensors[k], dtype=p.dtype).copy()
    return [n for n, _ in layers]


def trainable_lora_parameters(model: Module) -> list[Parameter]:
    """The LoRA parameters (lora_A, lora_B of every layer), in module order, for an optimizer."""
    return [p for _, m in lora_layers(model) for p in (m.lora_A, m.lora_B)]


__all__ = [
    "DEFAULT_TARGET_MODULES", "LoRALinear", "inject_lora", "lora_layers", "mark_only_lora_as_trainable",
    "count_parameters", "format_parameter_count", "print_trainable_parameters", "merge_lora", "unmerge_lora",
    "merge_and_unload", "lora_state_dict", "lora_config", "save_adapter", "read_adapter", "load_adapter",
    "trainable_lora_parameters", "target_matches", "is_linear_like",
]
