"""The optimizer, the learning-rate schedule and gradient clipping.

Scope
    ``AdamW`` (decoupled weight decay, bias correction — the same update, operation for operation,
    as ``torch.optim.AdamW``), parameter groups (``weight_decay_groups``: biases and LayerNorm
    weights skip weight decay), ``cosine_lr`` with linear warmup, ``clip_grad_norm_``. Optimizer
    state saves to and loads from plain host arrays (``state_dict``). Gradient accumulation lives
    with the training loop (``train/loop.py``); ``PagedAdamW`` (chapter 07) in ``paged_optim.py``.

Sources
    * Adam: Kingma & Ba 2015, Algorithm 1. AdamW: Loshchilov & Hutter 2019, Algorithm 2
      (decoupled weight decay). Operation order follows ``torch/optim/adamw.py`` (single-tensor
      path): p ← p·(1 − lr·λ); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
      p ← p − (lr/(1−β₁ᵗ)) · m / (√v/√(1−β₂ᵗ) + ε).
    * Cosine schedule with warmup: Loshchilov & Hutter 2017 (SGDR) without restarts; the warmup +
      cosine-to-min form of nanoGPT ``get_lr``.
    * ``clip_grad_norm_``: ``torch.nn.utils.clip_grad_norm_`` (total L2 norm, coefficient
      max_norm/(norm + 1e-6) clamped to 1).
    * Gradient accumulation normalised by the total token count: transformers PR #34191.

Deviations
    * The paper's schedule multiplier η_t scales weight decay too; as in PyTorch, the decay here
      is lr·λ with the scheduled lr (set ``group["lr"]``), which is the same thing.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from minillm import backend, fused
from minillm.tensor import Tensor, no_grad


def _groups(params, defaults: dict) -> list[dict]:
    params = list(params)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out = []
    for g in groups:
        group = dict(defaults)
        group.update(g)
        group["params"] = list(g["params"])
        out.append(group)
    return out


class Optimizer:
    """Base class: parameter groups (each a dict with "params" and hyperparameters) and per-parameter state."""

    def __init__(self, params, defaults: dict):
        self.param_groups = _groups(params, defaults)
        self.state: dict[int, dict] = {}  # index of the parameter (in group order) -> state

    def _indexed(self):
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield i, group, p
                i += 1

    def zero_grad(self) -> None:
        """Drop every parameter's gradient (set to None, as ``zero_grad(set_to_none=True)``)."""
        for _, _, p in self._indexed():
            p.grad = None

    def state_dict(self) -> dict:
        """{"state": {index: {name: host array or number}}, "param_groups": [hyperparameters]}."""
        state = {i: {k: (backend.to_numpy(v).copy() if hasattr(v, "shape") else v) for k, v in s.items()}
                 for i, s in self.state.items()}
        groups = [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        """Restore state saved by ``state_dict``; raises ValueError if the groups do not match."""
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                g["n_params"] != len(own["params"]) for g, own in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict does not match the parameter groups: "
                             f"{[g['n_params'] for g in groups]} vs {[len(g['params']) for g in self.param_groups]}")
        for g, own in zip(groups, self.param_groups):
            own.update({k: v for k, v in g.items() if k != "n_params"})
        params = {i: p for i, _, p in self._indexed()}
        self.state = {}
        for i, s in sd["state"].items():
            i = int(i)
            if i not in params:
                raise ValueError(f"optimizer state for parameter {i}, but the optimizer has {len(params)} parameters")
            p = params[i]
            for k, v in s.items():
                if hasattr(v, "shape") and tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {k!r} of parameter {i} has shape {tuple(v.shape)}, "
                                     f"the parameter {tuple(p.shape)}")
            xp = backend.get_array_module(p.data)
            self.state[i] = {k: (xp.asarray(v, dtype=p.dtype).copy() if hasattr(v, "shape") else v)
                             for k, v in s.items()}


def adamw_update(p, g, m, v, step: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    """One AdamW update of arrays ``p``, ``m``, ``v`` in place (torch.optim.AdamW's order of operations).

    Shapes: all arrays the parameter's shape, float32. ``step`` is 1 on the first update.
    Shared by ``AdamW`` and ``PagedAdamW`` so both give bit-identical parameters. On C-contiguous
    float32 NumPy arrays the C++ twin (``fused.adamw_update``) runs these lines in one pass,
    bit-identically.
    """
    if fused.accepts(p, g, m, v) and p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous:
        fused.adamw_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay)
        return
    dt = p.dtype.type
    if weight_decay:
        p *= dt(1 - lr * weight_decay)
    m *= dt(beta1)
    m += dt(1 - beta1) * g
    v *= dt(beta2)
    v += dt(1 - beta2) * (g * g)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    step_size = lr / bias_correction1
    xp = backend.get_array_module(p)
    denom = xp.sqrt(v)
    denom /= dt(bias_correction2_sqrt)
    denom += dt(eps)
    p -= dt(step_size) * (m / denom)


def _check_hyperparameters(who: str, lr, betas, eps, weight_decay) -> None:
    """Raise ValueError naming the value when lr, eps or weight_decay is negative or not finite
    (NaN passes ``lr < 0``, so finiteness is tested explicitly) or a beta is outside [0, 1)."""
    for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (math.isfinite(float(v)) and float(v) >= 0):
            raise ValueError(f"{who}: invalid {name}={v}: must be a finite number ≥ 0")
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise ValueError(f"{who}: betas={tuple(betas)} must each be in [0, 1)")


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, Alg. 2), = ``torch.optim.AdamW``.

    Args:
        params: parameters, or a list of groups ``{"params": [...], "weight_decay": 0.0, ...}``.
        lr, betas, eps, weight_decay: as in PyTorch (defaults 1e-3, (0.9, 0.999), 1e-8, 0.01).
    State per parameter: step (int), exp_avg and exp_avg_sq (arrays of the parameter's shape).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        _check_hyperparameters("AdamW", lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def step(self) -> None:
        """Apply one update to every parameter that has a gradient."""
        with no_grad():
            for i, group, p in self._indexed():
                if p.grad is None:
                    continue
                st = self.state.get(i)
                if st is None:
                    xp = backend.get_array_module(p.data)
                    st = self.state[i] = {"step": 0, "exp_avg": xp.zeros_like(p.data),
                                          "exp_avg_sq": xp.zeros_like(p.data)}
                st["step"] += 1
                b1, b2 = group["betas"]
                adamw_update(p.data, p.grad, st["exp_avg"], st["exp_avg_sq"], st["step"], group["lr"],
                             b1, b2, group["eps"], group["weight_decay"])


def weight_decay_groups(named_params: Iterable, weight_decay: float) -> list[dict]:
    """Two parameter groups: 2-D (and higher) weights with ``weight_decay``, the rest (biases,
    LayerNorm weights) with 0 — the GPT-2/nanoGPT convention. Frozen parameters are left out.

    The one parameter-group rule of the project: every trainer (pretrain, SFT, LoRA, reward, DPO,
    PPO's policy and value head) builds its optimizer from it. ``named_params``: ``(name, Tensor)``
    pairs (``model.named_parameters()``) or bare Tensors; LoRA's A/B matrices are 2-D, so they decay.
    Source: nanoGPT ``configure_optimizers`` (decay iff ``p.dim() >= 2``)."""
    decay, no_decay = [], []
    for item in named_params:
        p = item[1] if isinstance(item, tuple) else item
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def cosine_lr(step: int, max_steps: int, peak_lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``peak_lr`` over ``warmup_steps``
    (step 0 gets peak/warmup), then half a cosine down to ``min_lr_ratio·peak_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    min_lr = peak_lr * min_lr_ratio
    return min_lr + 0.5 * (peak_lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = lr


def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale gradients in place so their total L2 norm is at most ``max_norm``.

    Returns the total norm before clipping (a float), as ``torch.nn.utils.clip_grad_norm_``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) if not backend.is_cupy(g)
                          else float((g ** 2).sum()) for g in grads))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= g.dtype.type(coef)
    return total
