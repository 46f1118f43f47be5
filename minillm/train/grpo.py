"""GRPO: group-relative policy optimization with verifiable rewards (chapter 14).

Scope
    ``grpo(GRPOConfig)`` fine-tunes an SFT policy on a task whose answers a program checks (the
    addition tasks of ``minillm.verifiable``: ``addition_accuracy_reward`` or the per-digit
    ``addition_digit_reward``, optional ``addition_format_reward``). No reward model and no value
    model. One iteration (TRL: one generation step):

    1. **Groups.** ``prompts_per_iteration`` train prompts are drawn (without replacement within
       the iteration); each is repeated ``num_generations`` = G times and the policy samples G
       completions of up to ``max_completion_length`` tokens at ``temperature``
       (``ppo.sample_rollout``: the same sampler and the same training forward as chapter 09).
    2. **Rewards.** r_i = Σ_k w_k · reward_k(prompt, completion_i) (TRL ``reward_funcs``,
       ``reward_weights``). A reward function that raises, returns the wrong number of values or a
       non-finite value stops the run with an error naming it.
    3. **Advantages** (``group_advantages``): Â_i = (r_i − mean_group(r)) / (std + 1e-4), the same
       for every token of completion i. ``scale_rewards``: "group" (std of the group), "batch"
       (std of the whole batch; the mean is still the group's), "none" (no division: Dr. GRPO).
       **Std convention: Bessel-corrected (N − 1), as TRL's ``nanstd``; 1e-4 is added to the
       std, not inside the square root.** A group whose rewards are all equal gets Â = 0 exactly.
    4. **Optional dynamic sampling** (DAPO, ``train.dynamic_sampling``): groups with all-equal
       rewards are dropped and new prompt groups drawn until the batch is full again (at most
       ``max_num_gen_batches`` sampling rounds); advantages are computed on the kept groups.
    5. **Update.** ``num_iterations`` passes (μ in DeepSeekMath) of ``num_mini_batches`` shuffled
       minibatches, one AdamW step each. Per token:
       ℓ = −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â) + β·KL_k3, with ρ = exp(log π_θ − log π_old)
       and KL_k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 (DeepSeekMath Eq. 4), then
       aggregated by ``loss_type`` (``grpo_loss``). log π_old are the sampling policy's
       log-probabilities, kept from before the first update of the iteration; with
       num_iterations = 1 and one minibatch they are the detached current ones (TRL), so ρ = 1
       exactly and the loss *value* is −Σ Â-weighted: ≈ 0, while its gradient is not.
       β = 0 (TRL's default) holds no reference model at all.

    Logged every iteration (``GRPOResult.history``; TRL's metric names): ``reward``,
    ``reward_std``, ``rewards/<func>/mean``, ``frac_reward_zero_std``, ``clip_ratio/low_mean``,
    ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``entropy``, ``kl`` (when β ≠ 0),
    ``completions/mean_length``, ``completions/clipped_ratio`` (no ``<|eos|>`` within the limit),
    the mean length of correct and of wrong completions, ``loss``, ``grad_norm``, the groups kept
    (and, with dynamic sampling, ``sampling_rounds`` and ``groups_drawn``); and every ``eval_every`` iterations (and before and after)
    pass@1 and pass@G on ``eval_prompts`` held-out problems (G samples each at ``temperature``;
    unbiased pass@k of Chen et al. 2021 Eq. 1) and greedy accuracy.

Sources
    Shao et al. 2024, DeepSeekMath (arXiv 2402.03300) §4.1, Eq. 3-4 (the objective, outcome
    supervision, k3 KL in the loss); DeepSeek-R1 (arXiv 2501.12948) §2.2 (rule-based accuracy and
    format rewards); Liu et al. 2025, Dr. GRPO (arXiv 2503.20783) §3 (no std scaling, a constant
    normaliser); Yu et al. 2025, DAPO (arXiv 2503.14476) §3 (clip-higher ε_high, dynamic sampling,
    token-level loss); Schulman 2020 "Approximating KL divergence" (k3); Chen et al. 2021 (Codex,
    arXiv 2107.03374) Eq. 1 (pass@k). Reference implementation: TRL 1.16.0
    ``trl/trainer/grpo_trainer.py`` (``_generate_and_score_completions`` for the advantages,
    ``_compute_loss`` for the loss and the clip-ratio metrics), ``trl/trainer/utils.py``
    (``nanstd``), ``trl/trainer/grpo_config.py`` (names and defaults).

Deviations (each with the option that restores the reference behaviour)
    * ``use_bias_correction_kl`` defaults to False (DeepSeekMath's k3 term); TRL 1.16 defaults to
      True (the k3 term multiplied by ρ, DeepSeek-V3.2). ``use_bias_correction_kl=True`` restores it.
    * Defaults are chosen for the tiny addition model, not TRL's: ``num_generations`` 8 (TRL 8),
      ``max_completion_length`` 6 (TRL 512), ``lr`` 5e-5 (TRL ``learning_rate`` 1e-6), ``temperature``
      1.0 (TRL 1.0), ``loss_type`` "dapo", ``scale_rewards`` "group", β 0, ε 0.2 (TRL's).
    * ``dapo`` divides each minibatch's token sum by (completion tokens of the whole generation
      batch / ``num_mini_batches``), as TRL with one process and no gradient accumulation
      (``num_items_in_batch`` · accumulation steps / steps per generation).
    * Dynamic sampling trains on fewer groups when the round cap is reached before the batch is
      full (verl's DAPO recipe raises); TRL has no dynamic sampling.
    * A group with all-equal rewards gets Â = 0 exactly in every mode (TRL: ≈ 0 up to rounding of
      the group mean when ``scale_rewards="none"``).
    * A fresh minibatch permutation per pass of ``num_iterations`` (as chapter 09's PPO); TRL
      shuffles once per generation batch.
    * A prompt that does not fit ``block_size − max_completion_length`` is an error, not skipped
      or truncated (TRL truncates to ``max_prompt_length``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from minillm import backend
from minillm import functional as F
from minillm.model import GPT
from minillm.optim import AdamW
from minillm.tensor import Tensor, no_grad
from minillm.train.common import TrainResult, check_finite, trainer_command, trend_line, write_metrics
from minillm.train.dynamic_sampling import concat_rollouts, refill_groups
from minillm.train.loop import optimizer_step
from minillm.train.ppo import _evenly
from minillm.train.ppo_objective import _as_float_tensor, token_entropy
from minillm.train.rollout import Rollout, policy_forward, reference_logprobs, sample_rollout
from minillm.verifiable import TASKS, func_name, pass_at_k, weighted_rewards

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
#: the main reward: exact answer (DeepSeek-R1's accuracy reward) or per-digit partial credit
REWARDS = ("accuracy", "digit")
#: added to the std before dividing (TRL ``_generate_and_score_completions``)
STD_EPS = 1e-4


# ================================================================================================
# Pure functions

def group_advantages(rewards, num_generations: int, scale_rewards: str = "group", eps: float = STD_EPS):
    """Group-relative advantages of outcome supervision (DeepSeekMath §4.1.2; TRL).

    rewards: (B,) float, B = n_groups · G, the G completions of a prompt contiguous (TRL's
    ``repeat_interleave`` order). Â_i = r_i − mean of its group, divided by (std + eps) where std is
    the group's ("group"), the batch's ("batch") or not at all ("none"); std is Bessel-corrected
    (ddof = 1, TRL ``nanstd``). A group whose rewards are all equal gets Â = 0 exactly.
    Returns (advantages (B,) float32, std (B,) float64 — the std each row was divided by, or the
    group std for "none" —, is_std_zero (B,) bool: the row's group has all-equal rewards).
    Example: rewards [1, 0, 0, 1] in one group, "group": mean 0.5, std 0.5773503 →
    Â = ±0.8658753. Raises ValueError for G < 2 (a group of one has no baseline), B not divisible
    by G, an unknown ``scale_rewards`` or a non-finite reward (naming its index).
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    G = int(num_generations)
    if G < 2:
        raise ValueError(f"num_generations must be ≥ 2 for group-relative advantages, got {G} "
                         "(a group of one completion has no baseline)")
    if r.size == 0 or r.size % G:
        raise ValueError(f"{r.size} rewards do not make whole groups of num_generations = {G}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise FloatingPointError(f"reward {r[bad[0]]} at completion {int(bad[0])} (group {int(bad[0]) // G}) "
                                 "is not finite")
    grouped = r.reshape(-1, G)
    mean = grouped.mean(axis=1, keepdims=True)
    equal = (grouped.max(axis=1) == grouped.min(axis=1))[:, None]
    group_std = np.broadcast_to(grouped.std(axis=1, ddof=1, keepdims=True), grouped.shape)
    adv = np.where(equal, 0.0, grouped - mean)
    if scale_rewards == "group":
        std = group_std
        adv = adv / (std + eps)
    elif scale_rewards == "batch":
        std = np.full(grouped.shape, r.std(ddof=1) if r.size > 1 else 0.0)
        adv = adv / (std + eps)
    else:
        std = group_std
    is_std_zero = np.broadcast_to(equal, grouped.shape).reshape(-1).copy()
    return adv.reshape(-1).astype(np.float32), np.asarray(std, dtype=np.float64).reshape(-1), is_std_zero


def grpo_loss(logprobs, old_logprobs, advantages, mask, loss_type: str = "dapo", epsilon_low: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, ref_logprobs=None,
              max_completion_length: int | None = None, num_items_in_batch: float | None = None,
              use_bias_correction_kl: bool = False):
    """The GRPO loss of one minibatch (TRL ``GRPOTrainer._compute_loss``, token-level ratio).

    logprobs: Tensor (B, N) log π_θ(o_t) of the completion tokens (differentiable; an array is
    wrapped). old_logprobs: (B, N) array log π_old (None: the detached ``logprobs``, ρ = 1).
    advantages: (B,) or (B, N). mask: (B, N) 1 on completion tokens (up to and including
    ``<|eos|>``). ref_logprobs: (B, N) log π_ref, needed when beta ≠ 0.
    Per token: ρ = exp(log π_θ − log π_old); ℓ = −min(ρÂ, clip(ρ, 1 − ε_low, 1 + ε_high)Â)
    + β·k3, k3 = e^{ref − logp} − (ref − logp) − 1 (× ρ with ``use_bias_correction_kl``).
    Aggregation over the masked ℓ (M = mask, B rows):
      grpo    mean_i (Σ_t ℓ M / max(Σ_t M, 1))          (DeepSeekMath: 1/G Σ_i 1/|o_i| Σ_t)
      bnpo    Σ ℓ M / max(Σ M, 1)                       (token mean over the minibatch)
      dr_grpo Σ ℓ M / (B · max_completion_length)       (Dr. GRPO: a constant normaliser)
      dapo    Σ ℓ M / max(num_items_in_batch, 1)        (token mean over the generation batch;
                                                         default: Σ M, i.e. bnpo)
    Returns (loss Tensor (), stats dict of floats: clip_ratio/low_mean (ρ < 1 − ε_low with Â < 0),
    clip_ratio/high_mean (ρ > 1 + ε_high with Â > 0), clip_ratio/region_mean, kl (masked token
    mean of k3; NaN when β = 0), ratio_min, ratio_max).
    Raises ValueError for an unknown loss_type, shape mismatches, β > 0 without ref_logprobs,
    dr_grpo without max_completion_length, or ε out of range.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    if not (0 <= epsilon_low < 1) or eps_high < 0:
        raise ValueError(f"need 0 ≤ epsilon_low < 1 and epsilon_high ≥ 0, got {epsilon_low}, {eps_high}")
    new = _as_float_tensor(logprobs)
    if new.data.ndim != 2:
        raise ValueError(f"logprobs must be (B, N), got shape {tuple(new.shape)}")
    B, N = new.shape
    xp = backend.get_array_module(new.data)
    dt = new.dtype
    m = xp.asarray(mask.data if isinstance(mask, Tensor) else mask).astype(dt)
    if m.shape != (B, N):
        raise ValueError(f"mask shape {m.shape} does not match logprobs {(B, N)}")
    adv = xp.asarray(advantages, dtype=dt)
    if adv.ndim == 1:
        adv = adv[:, None]
    if adv.shape not in ((B, 1), (B, N)):
        raise ValueError(f"advantages shape {tuple(xp.asarray(advantages).shape)} does not fit logprobs {(B, N)}")
    old = new.data if old_logprobs is None else xp.asarray(old_logprobs, dtype=dt)
    if old.shape != (B, N):
        raise ValueError(f"old_logprobs shape {old.shape} does not match logprobs {(B, N)}")
    keep = m > 0
    log_ratio = F.where(keep, new - old, 0.0)  # padding: ρ = 1, no gradient, whatever it holds
    coef_1 = F.exp(log_ratio)
    coef_2 = F.clip(coef_1, 1.0 - epsilon_low, 1.0 + eps_high)
    per_token = F.maximum(coef_1 * (-adv), coef_2 * (-adv))  # −min(ρÂ, clip(ρ)Â)
    kl_mean = float("nan")
    if beta != 0.0:
        if ref_logprobs is None:
            raise ValueError("beta ≠ 0 needs ref_logprobs (the reference model's log-probabilities)")
        ref = xp.asarray(ref_logprobs, dtype=dt)
        if ref.shape != (B, N):
            raise ValueError(f"ref_logprobs shape {ref.shape} does not match logprobs {(B, N)}")
        d = F.where(keep, ref - new, 0.0)  # log π_ref − log π_θ
        kl = F.exp(d) - d - 1.0
        if use_bias_correction_kl:
            kl = kl * coef_1
        per_token = per_token + beta * kl
        kl_mean = float((kl.data * m).sum() / max(float(m.sum()), 1.0))
    masked = F.where(keep, per_token, 0.0)  # select, not multiply: inf·0 on padding would be NaN
    n_tok = float(m.sum())
    if loss_type == "grpo":
        per_seq = masked.sum(axis=1) / xp.maximum(m.sum(axis=1), 1.0)
        loss = per_seq.sum() / float(B)
    elif loss_type == "bnpo":
        loss = masked.sum() / max(n_tok, 1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length or max_completion_length < 1:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length ≥ 1 (the constant normaliser)")
        loss = masked.sum() / float(B * max_completion_length)
    else:  # dapo
        norm = n_tok if num_items_in_batch is None else float(num_items_in_batch)
        loss = masked.sum() / max(norm, 1.0)
    r = coef_1.data
    low = (r < 1.0 - epsilon_low) & (adv < 0)
    high = (r > 1.0 + eps_high) & (adv > 0)
    denom = max(n_tok, 1.0)
    rk = r[keep]
    stats = {"clip_ratio/low_mean": float((low * m).sum() / denom),
             "clip_ratio/high_mean": float((high * m).sum() / denom),
             "clip_ratio/region_mean": float(((low | high) * m).sum() / denom),
             "kl": kl_mean,
             "ratio_min": float(rk.min()) if rk.size else 1.0,
             "ratio_max": float(rk.max()) if rk.size else 1.0}
    return loss, stats


# ================================================================================================
# Configuration

@dataclass
class GRPOConfig:
    """Settings of a GRPO run (CLI: ``minillm grpo --loss-type dr_grpo --beta 0.04``); TRL's names.

    sft: the policy's initial weights (and the reference when β ≠ 0). sft_steps: 0 loads ``sft``;
    > 0 first trains a fresh tiny GPT (``verifiable.sft_start``) for that many SFT steps on the
    task's train problems and saves it at ``sft`` (the chapter's start, reproducible from a seed).
    task: "addition" (``verifiable.AdditionTask``, operands of ``n_digits`` digits) or
    "mixed_addition" (``verifiable.MixedAdditionTask``, operands of 1..``n_digits`` digits). reward: "accuracy"
    (``addition_accuracy_reward``, 1 for the exact sum) or "digit" (``addition_digit_reward``, the share of
    right digits; pass@k still counts exact sums only). format_reward_weight: weight of
    ``addition_format_reward`` added to that reward (0: none).
    prompts_per_iteration × num_generations completions per iteration; num_mini_batches optimizer
    steps per pass, num_iterations passes (μ). epsilon (= ε_low), epsilon_high (None: = epsilon).
    beta: k3 KL coefficient (0: no reference model). dynamic_sampling: drop zero-std groups and
    refill the batch with new prompts, at most ``max_num_gen_batches`` sampling rounds (DAPO; verl's name).
    eval_prompts: held-out problems for pass@1 / pass@G (G = eval_num_generations) before, every
    ``eval_every`` iterations (0: only before and after), and after training. eval_on_start: False
    skips the evaluation before training (``eval_start``; Hugging Face ``TrainingArguments`` name,
    whose default is False: here True), e.g. when another run from the same start measured it.
    Raises ValueError (naming the field) for G < 2, unknown loss_type / scale_rewards, a batch
    that does not split into ``num_mini_batches``, and other out-of-range values.
    """

    sft: str = "runs/grpo-sft/checkpoint.safetensors"
    sft_steps: int = 0
    task: str = "addition"
    n_digits: int = 2
    out_dir: str = "runs/grpo"
    iterations: int = 150
    prompts_per_iteration: int = 16
    num_generations: int = 8
    max_completion_length: int = 6
    temperature: float = 1.0
    lr: float = 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    num_mini_batches: int = 1
    dynamic_sampling: bool = False
    max_num_gen_batches: int = 4
    reward: str = "accuracy"
    format_reward_weight: float = 0.0
    eval_prompts: int = 200
    eval_num_generations: int = 8
    eval_every: int = 0
    eval_on_start: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if int(self.num_generations) < 2:
            raise ValueError(f"GRPOConfig.num_generations must be ≥ 2, got {self.num_generations} "
                             "(GRPO's baseline is the mean of the other completions of the same prompt)")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"GRPOConfig.scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.reward not in REWARDS:
            raise ValueError(f"GRPOConfig.reward must be one of {REWARDS}, got {self.reward!r}")
        if self.task not in TASKS:
            raise ValueError(f"GRPOConfig.task must be one of {TASKS}, got {self.task!r}")
        if self.temperature <= 0:
            raise ValueError(f"GRPOConfig.temperature must be > 0 for sampling, got {self.temperature}")
        if self.beta < 0:
            raise ValueError(f"GRPOConfig.beta must be ≥ 0, got {self.beta}")
        if not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise ValueError(f"GRPOConfig: need 0 ≤ epsilon < 1 and epsilon_high ≥ 0, got {self.epsilon}, "
                             f"{self.epsilon_high}")
        for name in ("iterations", "prompts_per_iteration", "max_completion_length", "num_iterations",
                     "num_mini_batches", "max_num_gen_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GRPOConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if (self.prompts_per_iteration * self.num_generations) % self.num_mini_batches:
            raise ValueError(f"GRPOConfig: {self.prompts_per_iteration} × {self.num_generations} completions do not "
                             f"split into num_mini_batches = {self.num_mini_batches}")
        if self.eval_prompts > 0 and self.eval_num_generations < 1:
            raise ValueError(f"GRPOConfig.eval_num_generations must be ≥ 1, got {self.eval_num_generations}")

    @property
    def epsilon_low(self) -> float:
        """ε_low (TRL: ``epsilon``)."""
        return self.epsilon


# ================================================================================================
# The trainer

RewardFunc = Callable[..., Sequence[float]]


GRPOResult = TrainResult  # history: one dict per iteration; metrics, checkpoint path, seconds


class GRPOTrainer:
    """GRPO on a GPT policy with programmatic reward functions.

    Args:
        policy: the GPT being trained (dropout must be 0). ref: the frozen reference GPT, required
            when ``cfg.beta`` ≠ 0 and not held (None) when β = 0.
        reward_funcs: callables ``f(prompts=list[str], completions=list[str], ended=list[bool])``
            returning one float per completion (TRL's reward-function signature);
            reward_weights: one weight each (default 1.0).
        cfg: GRPOConfig (the algorithm fields). tokenizer: renders prompts and decodes completions.
        correct_func: the reward function whose value > 0 marks a completion correct (for pass@k
            and the correct/wrong lengths); default the first reward function.
    Raises ValueError for dropout > 0, β ≠ 0 without a reference, or weights that do not match.
    """

    def __init__(self, policy: GPT, ref: GPT | None, reward_funcs: Sequence[RewardFunc], cfg: GRPOConfig, tokenizer,
                 reward_weights: Sequence[float] | None = None, correct_func: RewardFunc | None = None):
        for name, m in (("policy", policy), ("reference", ref)):
            if m is not None and m.config.dropout != 0:
                raise ValueError(f"the {name} has dropout {m.config.dropout}; GRPO needs dropout off "
                                 "(load it with config_overrides={'dropout': 0.0})")
        if cfg.beta != 0 and ref is None:
            raise ValueError("beta ≠ 0 needs a reference model")
        if not reward_funcs:
            raise ValueError("GRPO needs at least one reward function")
        weights = [1.0] * len(reward_funcs) if reward_weights is None else [float(w) for w in reward_weights]
        if len(weights) != len(reward_funcs):
            raise ValueError(f"{len(weights)} reward_weights for {len(reward_funcs)} reward functions")
        self.policy, self.cfg, self.tokenizer = policy, cfg, tokenizer
        self.ref = ref if cfg.beta != 0 else None  # β = 0: no reference model held (TRL)
        self.reward_funcs, self.reward_weights = list(reward_funcs), weights
        self.correct_func = correct_func or reward_funcs[0]
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
        self.rng = np.random.default_rng([cfg.seed, 14])
        if self.ref is not None:
            self.ref.eval()
            self.ref.requires_grad_(False)
        policy.eval()  # dropout is 0: every forward is deterministic
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    # ------------------------------------------------------------------ pieces
    def render(self, prompts: Sequence[str]) -> list[list[int]]:
        """Chat-template ids of each prompt (``data.render_prompt``).

        Raises ValueError naming the prompt when prompt + ``max_completion_length`` exceeds the
        model's context (``block_size``)."""
        from minillm.data import render_prompt

        limit = self.policy.config.block_size - self.cfg.max_completion_length
        out = []
        for i, q in enumerate(prompts):
            ids = render_prompt([{"role": "user", "content": q}], self.tokenizer)
            if len(ids) > limit:
                raise ValueError(f"prompt {i} ({q[:60]!r}) is {len(ids)} tokens; with max_completion_length "
                                 f"{self.cfg.max_completion_length} it exceeds the context block_size "
                                 f"{self.policy.config.block_size} (at most {limit} prompt tokens)")
            out.append(ids)
        return out

    def rewards(self, prompts: Sequence[str], completions: Sequence[str], ended: Sequence[bool]):
        """``verifiable.weighted_rewards`` of this trainer's reward functions and weights."""
        return weighted_rewards(self.reward_funcs, self.reward_weights, prompts, completions, ended)

    def sample_groups(self, prompts: Sequence[str], G: int, rng: np.random.Generator) -> Rollout:
        """G completions of each prompt (rows i·G .. i·G + G − 1), one batched ``sample_rollout``."""
        ids = self.render(prompts)
        rep_ids = [ids[i] for i in range(len(ids)) for _ in range(G)]
        rep_txt = [prompts[i] for i in range(len(prompts)) for _ in range(G)]
        return sample_rollout(self.policy, rep_ids, self.cfg.max_completion_length, self.cfg.temperature, rng,
                              self.eos_id, self.pad_id, self.tokenizer, rep_txt)

    def forward(self, rollout: Rollout):
        """``ppo.policy_forward`` of the policy: (logprobs Tensor (B, N), scaled logits array (B, N, V))."""
        lp, _, logits = policy_forward(self.policy, rollout.input_ids, rollout.attention_mask,
                                       rollout.prompt_length, rollout.response_mask, self.cfg.temperature)
        return lp, logits

    # ------------------------------------------------------------------ one iteration
    def step(self, prompts: Sequence[str], more_prompts: Callable[[int], list[str]] | None = None) -> dict:
        """One GRPO iteration on these prompts: G samples each, rewards, advantages, updates.

        more_prompts(n) -> n further train prompts, for dynamic sampling's refill rounds (without
        it, or with ``dynamic_sampling`` off, only ``prompts`` are sampled). Returns the logged
        values (see the module docstring; reward, lengths and ``frac_reward_zero_std`` are those of
        the first round, the batch as drawn) plus ``minibatches``: per-minibatch dicts (pass, loss,
        ratio_min, ratio_max, clip ratios, kl). No update is applied when dynamic sampling keeps no
        group (``skipped`` = True).
        """
        cfg = self.cfg
        G = cfg.num_generations
        t0 = time.perf_counter()
        rounds = []

        def draw(k: int) -> np.ndarray:
            r = self.sample_groups(prompts if k == 0 else more_prompts(len(prompts)), G, self.rng)
            rounds.append((r, *self.rewards(r.prompts, r.texts, [bool(e) for e in r.finished])))
            return rounds[-1][1]

        kept, ds = None, {}
        if cfg.dynamic_sampling:
            kept, ds = refill_groups(draw, len(prompts), G, cfg.max_num_gen_batches if more_prompts else 1)
        else:
            draw(0)
        rollout, total, per = rounds[0]
        zero = group_advantages(total, G, cfg.scale_rewards)[2]
        name = func_name(self.correct_func)
        correct = (np.asarray(per[name]) > 0) if name in per else \
            np.asarray(self._correct(rollout.prompts, rollout.texts, rollout.finished))
        lengths = rollout.response_mask.sum(axis=1)
        stats = {
            "reward": float(total.mean()),
            "reward_std": float(total.std(ddof=1)),
            **{f"rewards/{k}/mean": float(v.mean()) for k, v in per.items()},
            "frac_reward_zero_std": float(zero.mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_ratio": float(1.0 - rollout.finished.mean()),
            "completions/mean_length_correct": float(lengths[correct].mean()) if correct.any() else None,
            "completions/mean_length_wrong": float(lengths[~correct].mean()) if (~correct).any() else None,
            "correct": float(correct.mean()),
            "groups_kept": len(prompts) if kept is None else len(kept), **ds,
        }
        if kept is not None:
            if not kept:
                stats.update({"skipped": True, "seconds": time.perf_counter() - t0, "minibatches": []})
                return stats
            rows = [(k, np.arange(g * G, g * G + G)) for k, g in kept]
            rollout = concat_rollouts([rounds[k][0].subset(i) for k, i in rows], self.pad_id)
            total = np.concatenate([rounds[k][1][i] for k, i in rows])
        adv = group_advantages(total, G, cfg.scale_rewards)[0]
        B = rollout.input_ids.shape[0]
        mask = rollout.response_mask.astype(np.float32)
        n_mb = min(cfg.num_mini_batches, B)
        bounds = np.linspace(0, B, n_mb + 1).round().astype(int)
        perms = [self.rng.permutation(B) for _ in range(cfg.num_iterations)]
        # log π_old: needed whenever a minibatch is trained after an update (TRL computes them only then).
        # The first minibatch of the first pass is trained before any update: its log π_old are that
        # training forward's own values (the same forward, so ρ = 1 exactly), kept rather than computed twice.
        need_old = cfg.num_iterations > 1 or n_mb > 1
        old_logp = ref_logp = None
        with no_grad():
            if need_old:
                old_logp = np.zeros(mask.shape, dtype=np.float32)
            if self.ref is not None:
                ref_logp = np.zeros(mask.shape, dtype=np.float32)
            if need_old or self.ref is not None:
                for a, b in zip(bounds[:-1], bounds[1:]):
                    idx = perms[0][a:b]
                    sub = rollout.subset(idx)
                    if need_old and a > 0:
                        lp, _ = self.forward(sub)
                        old_logp[idx] = backend.to_numpy(lp.data)
                    if self.ref is not None:
                        ref_logp[idx] = reference_logprobs(self.ref, sub, cfg.temperature)
        num_items = float(mask.sum()) / n_mb  # TRL dapo: generation-batch tokens / steps per generation
        mstats, entropies = [], []
        for it in range(cfg.num_iterations):
            for a, b in zip(bounds[:-1], bounds[1:]):
                idx = perms[it][a:b]
                sub = rollout.subset(idx)
                m = mask[idx]
                lp, logits = self.forward(sub)
                first = it == 0 and a == 0  # no update yet: π_old is the current policy
                if first and old_logp is not None:
                    old_logp[idx] = backend.to_numpy(lp.data)
                old = None if old_logp is None or first else old_logp[idx]
                loss, ls = grpo_loss(lp, old, adv[idx], m, cfg.loss_type,
                                     cfg.epsilon, cfg.epsilon_high, cfg.beta,
                                     None if ref_logp is None else ref_logp[idx], cfg.max_completion_length,
                                     num_items, cfg.use_bias_correction_kl)
                check_finite(loss, it, "grpo")
                if it == 0:
                    ent = backend.to_numpy(token_entropy(logits))
                    entropies.append(((ent * m).sum(), m.sum()))
                self.opt.zero_grad()
                loss.backward()
                gnorm = optimizer_step(self.opt, self.params, cfg.grad_clip)  # the shared loop's step
                mstats.append({"pass": it, "loss": float(loss.item()), "grad_norm": float(gnorm), **ls})
        stats.update({
            "loss": float(np.mean([d["loss"] for d in mstats])),
            "grad_norm": float(np.mean([d["grad_norm"] for d in mstats])),
            **{k: float(np.mean([d[k] for d in mstats])) for k in
               ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")},
            "entropy": float(sum(s for s, _ in entropies) / max(sum(n for _, n in entropies), 1.0)),
            "skipped": False,
            "seconds": time.perf_counter() - t0,
            "minibatches": mstats,
        })
        if self.ref is not None:
            stats["kl"] = float(np.mean([d["kl"] for d in mstats]))
        return stats

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, prompts: Sequence[str], num_generations: int, seed: int = 1234, batch_prompts: int = 32) -> dict:
        """pass@1 and pass@G (G = ``num_generations`` samples per prompt at the training temperature,
        unbiased estimator) and greedy accuracy on ``prompts``; fixed seed, the training rng untouched.
        Returns {"pass@1", "pass@1_se", "pass@G", "greedy", "G", "n", "correct_counts", "mean_length",
        "mean_length_correct", "mean_length_wrong"}: pass@1_se is the standard error of pass@1 over the
        prompts (sample std of the per-prompt pass@1 / √n); correct_counts: the number of correct samples
        of each prompt (ints, in ``prompts`` order: two evaluations of the same prompts pair up); lengths
        in tokens incl. ``<|eos|>``, of the sampled completions (None without any)."""
        rng = np.random.default_rng(seed)
        G = int(num_generations)
        p1, pg, greedy, lengths, oks, counts = [], [], [], [], [], []
        for s in range(0, len(prompts), batch_prompts):
            chunk = list(prompts[s:s + batch_prompts])
            r = self.sample_groups(chunk, G, rng)
            ok = np.asarray(self._correct(r.prompts, r.texts, r.finished)).reshape(len(chunk), G)
            lengths.append(r.response_mask.sum(axis=1))
            oks.append(ok.reshape(-1))
            for row in ok:
                c = int(row.sum())
                counts.append(c)
                p1.append(pass_at_k(G, c, 1))
                pg.append(pass_at_k(G, c, G))
            g = self.policy.generate(self.render(chunk), max_new_tokens=self.cfg.max_completion_length,
                                     temperature=0.0, eos_id=self.eos_id, pad_id=self.pad_id)
            texts = []
            for row in range(len(chunk)):
                n = int(g.response_mask[row].sum())
                toks = [int(t) for t in g.new_tokens[row, :n]]
                texts.append(self.tokenizer.decode(toks[:-1] if g.finished[row] else toks))
            greedy.extend(self._correct(chunk, texts, g.finished))
        n_tok, ok = np.concatenate(lengths), np.concatenate(oks)
        se = float(np.std(p1, ddof=1) / np.sqrt(len(p1))) if len(p1) > 1 else float("nan")
        return {"pass@1": float(np.mean(p1)), "pass@1_se": se, "pass@G": float(np.mean(pg)),
                "greedy": float(np.mean(greedy)), "G": G, "n": len(prompts), "correct_counts": counts, "mean_length": float(n_tok.mean()),
                "mean_length_correct": float(n_tok[ok].mean()) if ok.any() else None,
                "mean_length_wrong": float(n_tok[~ok].mean()) if (~ok).any() else None}

    def _correct(self, prompts, texts, ended) -> list[bool]:
        v = self.correct_func(prompts=list(prompts), completions=list(texts), ended=[bool(e) for e in ended])
        return [float(x) > 0 for x in v]


# ================================================================================================
# The SFT start, the run, the CLI

def build_trainer(cfg: GRPOConfig) -> GRPOTrainer:
    """Load the SFT policy (and, when β ≠ 0, the reference) and the task's reward functions.

    Raises FileNotFoundError for a missing checkpoint, ValueError when it has no tokenizer."""
    from minillm.checkpoint import load_model
    from minillm.verifiable import addition_accuracy_reward, addition_digit_reward, addition_format_reward, sft_start

    if cfg.sft_steps > 0 and not Path(cfg.sft).is_file():
        sft_start(cfg.sft, cfg.task, cfg.n_digits, cfg.sft_steps, cfg.seed)
    if not Path(cfg.sft).is_file():
        raise FileNotFoundError(f"SFT checkpoint not found: {cfg.sft} (make one with --sft-steps 1200)")
    nodrop = {"dropout": 0.0}
    policy, tok, _ = load_model(cfg.sft, config_overrides=nodrop)
    if tok is None:
        raise ValueError(f"{cfg.sft}: the checkpoint has no tokenizer")
    ref = load_model(cfg.sft, config_overrides=nodrop)[0].eval() if cfg.beta != 0 else None  # dropout 0 as loaded
    funcs = [addition_accuracy_reward if cfg.reward == "accuracy" else addition_digit_reward]
    weights = [1.0]
    if cfg.format_reward_weight:
        funcs.append(addition_format_reward)
        weights.append(cfg.format_reward_weight)
    return GRPOTrainer(policy, ref, funcs, cfg, tok, reward_weights=weights, correct_func=addition_accuracy_reward)


def grpo(cfg: GRPOConfig, on_iteration: Callable | None = None) -> GRPOResult:
    """Run GRPO as configured; writes ``<out_dir>/metrics.json`` and ``<out_dir>/checkpoint.safetensors``.

    Raises the loaders' errors for a missing/bad checkpoint, and the trainer's for bad prompts or
    rewards."""
    from minillm.checkpoint import save_checkpoint
    from minillm.verifiable import make_task

    t0 = time.perf_counter()
    trainer = build_trainer(cfg)
    task = make_task(cfg.task, cfg.n_digits)
    train_prompts = task.prompts("train")
    eval_prompts = _evenly(task.prompts("test"), cfg.eval_prompts) if cfg.eval_prompts > 0 else []
    trainer.render(train_prompts[:1] + eval_prompts[:1])  # a prompt that does not fit fails before any work

    def run_eval() -> dict:
        return trainer.evaluate(eval_prompts, cfg.eval_num_generations, seed=cfg.seed + 1234)

    from minillm.lora import count_parameters

    metrics: dict = {"config": asdict(cfg), "n_train_prompts": len(train_prompts), "n_eval_prompts": len(eval_prompts),
                     "reference_model_held": trainer.ref is not None, "parameters": count_parameters(trainer.policy)}
    evals = []
    if eval_prompts and cfg.eval_on_start:
        evals.append({"iteration": 0, **run_eval()})
        metrics["eval_start"] = evals[0]
    rng = np.random.default_rng([cfg.seed, 15])
    history = []
    t_train = time.perf_counter()
    bar = tqdm(range(cfg.iterations), desc="grpo", disable=not cfg.progress)
    def draw_prompts(n: int) -> list[str]:
        return [train_prompts[i] for i in rng.choice(len(train_prompts), size=min(n, len(train_prompts)), replace=False)]

    for it in bar:
        st = trainer.step(draw_prompts(cfg.prompts_per_iteration), draw_prompts)
        st = {"iteration": it, **{k: v for k, v in st.items() if k != "minibatches"},
              "first_minibatch": st["minibatches"][0] if st["minibatches"] else None}
        if eval_prompts and cfg.eval_every > 0 and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.iterations:
            e = run_eval()
            evals.append({"iteration": it + 1, **e})
            st["eval"] = e
        history.append(st)
        bar.set_postfix(reward=f"{st['reward']:.2f}", zero_std=f"{st['frac_reward_zero_std']:.2f}")
        if on_iteration is not None:
            on_iteration(it, st)
    metrics["train_seconds"] = round(time.perf_counter() - t_train, 1)
    if eval_prompts:
        metrics["eval_end"] = run_eval()
        evals.append({"iteration": cfg.iterations, **metrics["eval_end"]})
    metrics["evals"] = evals
    metrics["history"] = history
    out = Path(cfg.out_dir)
    ckpt = save_checkpoint(out / "checkpoint.safetensors", trainer.policy, trainer.tokenizer,
                           train_state={"grpo_config": asdict(cfg)})
    metrics = write_metrics(out, metrics, t0, digits=5)
    return GRPOResult(history=metrics["history"], metrics=metrics, checkpoint=str(ckpt), seconds=metrics["seconds"])


def summary_lines(m: dict) -> list[str]:
    """Human-readable lines of a GRPO metrics dict: held-out pass@1 / pass@G / greedy before → after,
    and the reward curve."""
    lines = []
    a, b = m.get("eval_start"), m.get("eval_end")
    if a and b:
        lines.append(f"held-out ({a['n']} problems, G={a['G']}): pass@1 {a['pass@1']:.3f} → {b['pass@1']:.3f}  "
                     f"pass@G {a['pass@G']:.3f} → {b['pass@G']:.3f}  greedy {a['greedy']:.3f} → {b['greedy']:.3f}")
    h = m.get("history", [])
    if h:
        lines.append(trend_line(h, ("reward", "frac_reward_zero_std", "entropy", "completions/mean_length"),
                                "iterations 0-4 → last 5", last=5))
    lines.append(f"train_seconds: {m.get('train_seconds')}  iterations: {len(h)}")
    return lines


#: ``minillm grpo``: one option per GRPOConfig field; runs, prints the summary, returns 0.
add_arguments, run = trainer_command(GRPOConfig, grpo, summary_lines)
