"""Reward-model over-optimization: gold and proxy reward against d = √KL, and the fitted forms of
Gao et al. 2022 (chapter 09).

Scope
    * ``best_of_n_kl(n)``: the analytic KL of best-of-n sampling to the sampling policy,
      log n − (n − 1)/n nats.
    * ``fit_overoptimization(d, reward, form)``: least-squares fit (NumPy ``lstsq``) of the
      paper's functional forms to rewards measured *relative to the initial policy* (R(0) = 0):
      best-of-n ``R(d) = d·(α − β·d)``, RL ``R(d) = d·(α − β·log d)``. Both are linear in (α, β),
      so the fit is exact least squares on the design matrix [d, −d²] or [d, −d·log d]. Returns
      α, β, the RMSE, the peak (d*, R(d*)) and the d at which the curve falls back to 0.
    * ``curve_from_history(history, start_gold)``: (d, gold − start, proxy − start) from a PPO
      run's per-iteration log (rollout KL, gold, RM score).
    The plot lives in ``report.plot_overoptimization``.

Sources
    L. Gao, J. Schulman, J. Hilton, "Scaling Laws for Reward Model Overoptimization" (ICML 2023,
    arXiv 2210.10760), §2 (d := √KL(π‖π_init); best-of-n KL = log n − (n−1)/n, after Stiennon et
    al. 2020 App. G), §3 Eq. 1-2 (R_bon(d) = d(α_bon − β_bon d), R_RL(d) = d(α_RL − β_RL log d)).

Deviations
    * Gao et al. fit α, β against RM size on many runs; here one fit per curve (one RM, one run).
    * The RL points come from PPO's own rollouts (64 samples per iteration, the KL their summed
      k1 estimate), so single points are noisy (about ±0.1 gold); a rollout KL below 0 (possible
      for k1 on a batch) is clipped to 0 before the square root.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

FORMS = ("bon", "rl")


def best_of_n_kl(n) -> np.ndarray | float:
    """KL(best-of-n ‖ base) = log n − (n − 1)/n nats (Gao et al. 2022 §2; Stiennon et al. 2020).

    n: an int ≥ 1 or an array of them. Returns a float (or float64 array): 0 for n = 1,
    0.1931472 for n = 2, 1.2044415 for n = 8. Raises ValueError for n < 1.
    """
    a = np.asarray(n, dtype=np.float64)
    if (a < 1).any():
        raise ValueError(f"best_of_n_kl: n must be ≥ 1, got {n}")
    kl = np.log(a) - (a - 1) / a
    return float(kl) if kl.ndim == 0 else kl


def _basis(d: np.ndarray, form: str) -> np.ndarray:
    if form == "bon":
        g = d * d
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)  # d log d → 0 as d → 0
    return np.stack([d, -g], axis=1)


def predict(d, alpha: float, beta: float, form: str):
    """R(d) of a form ("bon": d(α − βd); "rl": d(α − β log d), 0 at d = 0): a float64 array shaped
    like d (a float for a scalar d). Raises ValueError for an unknown form."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    d = np.asarray(d, dtype=np.float64)
    y = (_basis(d.reshape(-1), form) @ np.array([alpha, beta], dtype=np.float64)).reshape(d.shape)
    return float(y) if y.ndim == 0 else y


def fit_overoptimization(d: Sequence[float], reward: Sequence[float], form: str) -> dict:
    """Least-squares fit of Gao et al.'s form to (d, R) points (R relative to the initial policy).

    Args:
        d: (N,) √KL values, nats^½, ≥ 0; reward: (N,) gold (or proxy) reward minus the initial
            policy's; form: "bon" (R = d(α − βd)) or "rl" (R = d(α − β log d)).
    Returns:
        dict: ``alpha``, ``beta`` (floats), ``rmse``, ``n``, ``form``; ``d_peak`` and ``r_peak``
        (bon: α/(2β), α²/(4β); rl: e^{α/β − 1}, β·d_peak) when β > 0, else nan (no peak: the
        curve keeps rising); ``d_zero``, the d > 0 where R falls back to 0 (bon: α/β; rl: e^{α/β})
        when β > 0 and α > 0, else nan.
    Raises:
        ValueError: unknown form, lengths differ, fewer than 2 points, a negative or non-finite d,
        or a non-finite reward.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    r = np.asarray(reward, dtype=np.float64).reshape(-1)
    if d.shape != r.shape:
        raise ValueError(f"fit_overoptimization: {d.size} d values for {r.size} rewards")
    if d.size < 2:
        raise ValueError(f"fit_overoptimization: needs at least 2 points, got {d.size}")
    if not (np.isfinite(d).all() and np.isfinite(r).all()):
        raise ValueError("fit_overoptimization: d and reward must be finite")
    if (d < 0).any():
        raise ValueError(f"fit_overoptimization: d = √KL must be ≥ 0, got min {d.min()}")
    X = _basis(d, form)
    coef, *_ = np.linalg.lstsq(X, r, rcond=None)
    alpha, beta = float(coef[0]), float(coef[1])
    resid = r - X @ coef
    out = {"form": form, "alpha": alpha, "beta": beta, "rmse": float(np.sqrt(np.mean(resid ** 2))), "n": int(d.size),
           "d_peak": float("nan"), "r_peak": float("nan"), "d_zero": float("nan")}
    if beta > 0:
        if form == "bon":
            out["d_peak"], out["r_peak"] = alpha / (2 * beta), alpha * alpha / (4 * beta)
            if alpha > 0:
                out["d_zero"] = alpha / beta
        else:
            ratio = alpha / beta
            if ratio < 700:  # e^{ratio} would overflow: the peak lies beyond any measurable KL
                out["d_peak"] = math.exp(ratio - 1)
                out["r_peak"] = beta * out["d_peak"]
                if alpha > 0:
                    out["d_zero"] = math.exp(ratio)
    return out


def curve_from_history(history: Sequence[dict], start_gold: float | None = None,
                       start_proxy: float | None = None) -> dict:
    """(d, gold, proxy) arrays from PPO's per-iteration log, relative to the start.

    history: dicts with ``kl`` (nats), ``gold`` and ``rm_score``; start_gold / start_proxy: the
    initial policy's values (default: the first iteration's, whose policy is the start model).
    Returns {"d": √max(KL, 0), "gold": gold − start, "proxy": proxy − start, "kl": KL} (float64).
    Raises ValueError for an empty history.
    """
    if not history:
        raise ValueError("curve_from_history: empty history")
    kl = np.array([h["kl"] for h in history], dtype=np.float64)
    gold = np.array([h.get("gold", np.nan) for h in history], dtype=np.float64)
    proxy = np.array([h.get("rm_score", np.nan) for h in history], dtype=np.float64)
    g0 = gold[0] if start_gold is None else start_gold
    p0 = proxy[0] if start_proxy is None else start_proxy
    return {"d": np.sqrt(np.clip(kl, 0, None)), "gold": gold - g0, "proxy": proxy - p0, "kl": kl}
