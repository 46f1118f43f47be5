"""The PPO objective as arrays in, arrays out: the KL-penalised per-token reward, GAE, the clipped
policy and value losses, the KL controllers (chapter 09; the trainer is ``train/ppo.py``).

Scope
    Masked statistics over the real response tokens (``masked_mean``, ``masked_var``,
    ``masked_whiten``); the per-token KL estimate to the reference (k1, Schulman's k3); the reward
    r_t = −β·KL_t plus the normalised score on each row's last real token; generalised advantage
    estimation over the response; PPO's clipped surrogate and clipped value loss (Tensors in, so
    they backpropagate); the fixed and adaptive KL controllers; the per-token entropy of logits.
    Chapter 14's GRPO reuses the KL estimate (``kl_per_token``) and the masked statistics.

Sources
    Schulman et al. 2017 (PPO) Eq. 7 (clipped surrogate), Eq. 9; Schulman et al. 2016 (GAE) Eq. 16;
    Ziegler et al. 2019 §2.2 (KL-penalised reward, adaptive β); Schulman, "Approximating KL
    divergence" (2020) for k1/k3. Reference code: trl ``trl/trainer/utils.py @v0.11.0``
    (``masked_mean``, ``masked_var``, ``masked_whiten``, ``AdaptiveKLController``), trl
    ``trl/experimental/ppo/ppo_trainer.py`` (the losses), openai/lm-human-preferences.

Deviations (each with the option that restores the reference behaviour)
    * The score lands on the response's last real token (legacy trl, lm-human-preferences); trl
      PPOv2 puts it one slot later (docs/reference.md §9). See ``train/ppo.py``.
"""
from __future__ import annotations

import math

import numpy as np

from minillm import backend
from minillm import functional as F
from minillm.tensor import Tensor


def _mask_and_count(x, mask):
    xp = backend.get_array_module(x.data if isinstance(x, Tensor) else x)
    dtype = x.dtype if x.dtype.kind == "f" else np.float32
    if mask is None:
        m = xp.ones(x.shape, dtype=dtype)
    else:
        m = xp.asarray(mask.data if isinstance(mask, Tensor) else mask).astype(dtype, copy=False)
        if m.shape != tuple(x.shape):
            raise ValueError(f"mask shape {m.shape} does not match values {tuple(x.shape)}")
    return m, float(m.sum())


def masked_mean(values, mask=None):
    """Mean of ``values`` over the entries where ``mask`` is 1 (trl ``masked_mean``).

    values: array or Tensor of any shape; mask: same shape, 0/1 (None = all). Returns a float for
    an array input and a one-element Tensor (differentiable) for a Tensor input.
    Raises ValueError when the mask selects nothing (the mean of no tokens is undefined) or the
    shapes differ.
    """
    m, n = _mask_and_count(values, mask)
    if n == 0:
        raise ValueError("masked_mean: the mask selects no entries")
    keep = m > 0  # select, not multiply: a non-finite value on padding must not leak in (inf·0 = NaN)
    if isinstance(values, Tensor):
        return F.where(keep, values, 0.0).sum() / n
    xp = backend.get_array_module(values)
    return float(xp.where(keep, values, 0).sum() / n)


def masked_var(values, mask=None, unbiased: bool = True) -> float:
    """Variance of ``values`` over the masked entries; unbiased (× n/(n−1)) as trl ``masked_var``.

    Raises ValueError when the mask selects no entry, or exactly one with ``unbiased`` (n/(n−1)
    divides by zero: docs/bugs.md C21, DLR-RM/stable-baselines3 #325).
    """
    values = values.data if isinstance(values, Tensor) else values
    xp = backend.get_array_module(values)
    x = xp.asarray(values, dtype=np.float64)
    m, n = _mask_and_count(x, mask)
    if n == 0:
        raise ValueError("masked_var: the mask selects no entries")
    if unbiased and n < 2:
        raise ValueError(f"masked_var: the unbiased variance needs at least 2 entries, the mask selects {n:g}")
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / n
    return float(var * n / (n - 1) if unbiased else var)


def masked_whiten(values, mask=None, shift_mean: bool = True, eps: float = 1e-8):
    """(x − mean)/√(var + eps) over the masked entries (var unbiased), as trl ``masked_whiten``.

    shift_mean=False adds the mean back (reward whitening). Returns an array of values' dtype and
    shape; masked-out entries are whitened too (zero them afterwards if needed).
    Example: whiten([1, 2, 3, 4]) = [−1.161895, −0.387298, 0.387298, 1.161895].
    Raises ValueError (from ``masked_var``) for an empty or one-entry mask — never NaN.
    """
    x = values.data if isinstance(values, Tensor) else values
    xp = backend.get_array_module(x)
    x = xp.asarray(x)
    x64 = x.astype(np.float64)
    var = masked_var(x64, mask)
    m, n = _mask_and_count(x64, mask)
    mean = float((x64 * m).sum() / n)
    out = (x64 - mean) / math.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out.astype(x.dtype if x.dtype.kind == "f" else np.float32)


def compute_gae(rewards, values, mask=None, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over response tokens (Schulman et al. 2016, Eq. 16).

    rewards, values: (B, N) or (N,) per-token rewards and values V(s_t) (the value of the state
    before token t); mask: same shape, 1 on real response tokens (contiguous from 0; None = all).
    For t = N−1..0: δ_t = r_t + γ·V_{t+1} − V_t (V_N = 0 and V = 0 after the last real token),
    A_t = δ_t + γλ·A_{t+1}. Returns (advantages, returns = A + V), both zero outside the mask, in
    the floating dtype of ``rewards``/``values``.
    Example: r [0, 0, 1], V [0.5, 0.5, 0.5], γ 1, λ 0.95 → A [0.45125, 0.475, 0.5],
    returns [0.95125, 0.975, 1.0] (docs/bugs.md C25).
    Raises ValueError on a shape mismatch.
    """
    xp = backend.get_array_module(rewards)
    r = xp.asarray(rewards)
    v = xp.asarray(values)
    if r.shape != v.shape:
        raise ValueError(f"compute_gae: rewards {r.shape} and values {v.shape} differ in shape")
    dtype = np.result_type(r.dtype, v.dtype) if (r.dtype.kind == "f" or v.dtype.kind == "f") else np.float64
    squeeze = r.ndim == 1
    r2 = r.reshape(1, -1) if squeeze else r
    v2 = v.reshape(1, -1) if squeeze else v
    m = xp.ones(r2.shape, dtype=np.float64) if mask is None else xp.asarray(mask, dtype=np.float64).reshape(r2.shape)
    r2 = r2.astype(np.float64) * m
    v2 = v2.astype(np.float64) * m
    B, N = r2.shape
    adv = xp.zeros((B, N), dtype=np.float64)
    last = xp.zeros(B, dtype=np.float64)
    for t in reversed(range(N)):
        next_v = v2[:, t + 1] if t + 1 < N else 0.0
        delta = r2[:, t] + gamma * next_v - v2[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    ret = (adv + v2) * m
    adv = adv * m
    if squeeze:
        adv, ret = adv[0], ret[0]
    return adv.astype(dtype), ret.astype(dtype)


def kl_per_token(logprobs, ref_logprobs, kl_estimator: str = "k1"):
    """Per-token KL estimates for tokens sampled from π (Schulman 2020, "Approximating KL").

    k1 = log π − log π_ref (unbiased, can be < 0 for one sample); k3 = (e^{logr} − 1) − logr with
    logr = log π_ref − log π (unbiased, always ≥ 0). Shapes and dtype of ``logprobs``.
    Raises ValueError for an unknown estimator.
    """
    xp = backend.get_array_module(logprobs)
    lp = xp.asarray(logprobs)
    logr = xp.asarray(ref_logprobs, dtype=lp.dtype) - lp
    if kl_estimator == "k1":
        return -logr
    if kl_estimator == "k3":
        return xp.expm1(logr) - logr
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {kl_estimator!r}")


def last_real_index(mask) -> np.ndarray:
    """Index of the last 1 in each row of a (B, N) response mask. Raises ValueError for an empty row."""
    xp = backend.get_array_module(mask)
    m = xp.asarray(mask).astype(bool)
    if not bool(m.any(axis=1).all()):
        raise ValueError("a response has no real token (its mask row is all 0)")
    return (m.shape[1] - 1 - xp.argmax(m[:, ::-1], axis=1)).astype(np.int64)


def per_token_rewards(logprobs, ref_logprobs, mask, scores, beta: float, kl_estimator: str = "k1"):
    """KL-penalised per-token rewards (Ziegler et al. 2019 §2.2; trl PPOv2).

    logprobs, ref_logprobs: (B, N) log π(y_t) and log π_ref(y_t) of the sampled response tokens
    (same temperature); mask: (B, N) 1 on real response tokens (up to and including ``<|eos|>``);
    scores: (B,) the sequence score; beta: the KL coefficient (≥ 0).
    Returns (rewards (B, N), kl (B, N)) in the dtype of ``logprobs``: kl_t from ``kl_per_token``,
    zero outside the mask; rewards_t = −β·kl_t, plus the score at each row's last real token (not
    at a padding slot after ``<|eos|>``: docs/bugs.md B18).
    Example: logp −1, ref −1.5, β 0.05: k1 0.5, r −0.025; k3 0.1065307, r −0.0053265.
    Raises ValueError for shape mismatches, an empty mask row, or β < 0.
    """
    xp = backend.get_array_module(logprobs)
    lp = xp.asarray(logprobs)
    if lp.dtype.kind != "f":
        lp = lp.astype(np.float32)
    ref = xp.asarray(ref_logprobs, dtype=lp.dtype)
    m = xp.asarray(mask)
    if lp.shape != ref.shape or lp.shape != m.shape or lp.ndim != 2:
        raise ValueError(f"per_token_rewards: logprobs {lp.shape}, ref_logprobs {ref.shape} and mask {m.shape} "
                         "must be the same (B, N) shape")
    s = xp.asarray(scores, dtype=lp.dtype).reshape(-1)
    if s.shape[0] != lp.shape[0]:
        raise ValueError(f"per_token_rewards: {s.shape[0]} scores for {lp.shape[0]} responses")
    if beta < 0:
        raise ValueError(f"beta must be ≥ 0, got {beta}")
    kl = kl_per_token(lp, ref, kl_estimator) * m.astype(lp.dtype)
    rewards = (kl * lp.dtype.type(-beta)).astype(lp.dtype)
    last = last_real_index(m)
    rewards[xp.arange(lp.shape[0]), last] += s
    return rewards, kl


def _as_float_tensor(x) -> Tensor:
    if isinstance(x, Tensor):
        return x
    arr = np.asarray(x)
    return Tensor(backend.asarray(arr, dtype=arr.dtype if arr.dtype.kind == "f" else np.float32))


def ppo_policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float = 0.2):
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), as a loss to minimise.

    ratio = exp(logp_new − logp_old); loss = masked_mean(max(−A·ratio, −A·clip(ratio, 1−ε, 1+ε))).
    new_logprobs: Tensor (or array) (B, N); old_logprobs, advantages, mask: arrays (B, N).
    Returns (loss Tensor (one element), clipfrac float = fraction of tokens where the clipped term
    is the larger, approxkl float = 0.5·mean((Δlogp)²)). Example: A = 1, Δlogp = 0.5: ratio
    1.6487213, loss −1.2; A = −1: loss 1.6487213.
    Raises ValueError when the mask selects nothing.
    """
    new = _as_float_tensor(new_logprobs)
    xp = backend.get_array_module(new.data)
    old = xp.asarray(old_logprobs, dtype=new.dtype)
    adv = xp.asarray(advantages, dtype=new.dtype)
    m = xp.asarray(mask, dtype=new.dtype)
    logratio = F.where(m > 0, new - old, 0.0)  # padding: ratio 1 and no gradient, whatever it holds
    ratio = F.exp(logratio)  # (B, N)
    pg1 = ratio * (-adv)
    pg2 = F.clip(ratio, 1.0 - cliprange, 1.0 + cliprange) * (-adv)
    loss = masked_mean(F.maximum(pg1, pg2), m)
    clipfrac = masked_mean((pg2.data > pg1.data).astype(new.dtype), m)
    approxkl = 0.5 * masked_mean(logratio.data ** 2, m)
    return loss, clipfrac, approxkl


def ppo_value_loss(new_values, old_values, returns, mask, cliprange_value: float = 0.2):
    """Clipped value loss (trl PPOv2; PPO2 baselines): 0.5·masked_mean(max((V−R)², (V_clip−R)²)),
    V_clip = clip(V, V_old − ε_v, V_old + ε_v).

    new_values: Tensor (or array) (B, N); old_values, returns, mask: arrays (B, N).
    Returns (loss Tensor, vf_clipfrac float). Example: V 1.0, V_old 0.5, R 0.8, ε_v 0.2 → 0.02.
    """
    v = _as_float_tensor(new_values)
    xp = backend.get_array_module(v.data)
    old = xp.asarray(old_values, dtype=v.dtype)
    ret = xp.asarray(returns, dtype=v.dtype)
    m = xp.asarray(mask, dtype=v.dtype)
    v = F.where(m > 0, v, old)  # padding holds no value to fit
    v_clip = F.clip(v, old - cliprange_value, old + cliprange_value)
    e1 = (v - ret) * (v - ret)
    e2 = (v_clip - ret) * (v_clip - ret)
    loss = 0.5 * masked_mean(F.maximum(e1, e2), m)
    vf_clipfrac = masked_mean((e2.data > e1.data).astype(v.dtype), m)
    return loss, vf_clipfrac


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019 §2.2; lm-human-preferences ``train_policy.py``,
    trl ``utils.py@v0.11.0``).

    ``update(current_kl, n_steps)``: e = clip(KL/target − 1, −0.2, 0.2);
    β ← β·(1 + e·n_steps/horizon); KL in nats (batch mean of the per-sequence summed KL), n_steps
    = episodes in the batch. Example: β 0.2, KL 9, target 6, 256 steps, horizon 10000 → 0.201024
    (KL 3 → 0.198976). Raises ValueError for target ≤ 0 or horizon ≤ 0.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target ({target}) and horizon ({horizon}) must be > 0")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant KL coefficient with the controller's interface (trl ``FixedKLController``)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


def token_entropy(logits) -> np.ndarray:
    """Entropy (nats) of softmax(logits) over the last axis: logsumexp(l) − Σ p·l. (..., V) -> (...)."""
    xp = backend.get_array_module(logits)
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = xp.exp(z)
    s = e.sum(axis=-1)
    return xp.log(s) - (e * z).sum(axis=-1) / s
