"""RLHF with PPO and a per-token KL penalty to the SFT model (chapter 09).

Scope
    ``ppo(PPOConfig)`` fine-tunes an SFT policy against a reward: a learned reward model (a
    checkpoint path; chapter 08) or the task world's gold judge (``reward="gold"``, the control run
    that shows PPO itself works). This file is the trainer; the objective's pure functions (GAE,
    the KL-penalised reward, the clipped losses, the KL controllers) are in
    ``train/ppo_objective.py``, sampling and scoring a batch in ``train/rollout.py``. One iteration:

    1. **Rollout.** ``batch_size`` prompts are drawn (with replacement) from the world's 1,610 fact
       prompts (train and test facts x 5 question templates) or from a prompt file; the policy
       samples up to ``max_new_tokens`` at ``temperature`` T (no top-k / top-p: docs/bugs.md B18), and
       a row stops at ``<|eos|>`` (``GPT.generate``; the response mask covers the tokens up to and
       including ``<|eos|>``; the slots after it are padding).
    2. **Scoring.** The policy's log-probabilities and values are *recomputed* with the very
       forward used in training, under softmax(logits / T) (docs/bugs.md C19), in the minibatches
       of the first epoch, so the first minibatch of the first epoch has ratio exactly 1 and
       approx KL exactly 0. The frozen reference (the SFT model) is scored at the same T. The
       reward is read at the last real token of prompt + response, normalised by the mean and
       standard deviation of the scores of the SFT policy's own samples (docs/rlhf-notes.md §3;
       lm-human-preferences ``set_reward_norm``), and a response that never emitted
       ``<|eos|>`` loses ``missing_eos_penalty`` (trl ``missing_eos_penalty``).
    3. **Per-token reward.** r_t = −β·KL_t on the real response tokens (k1 = log π − log π_ref,
       or Schulman's k3 = (e^{logr} − 1) − logr with logr = log π_ref − log π), plus the normalised
       score at the response's last real token; nothing on the padding after ``<|eos|>``
       (docs/bugs.md B18).
    4. **GAE** (γ = 1, λ = 0.95) over the response tokens, returns = A + V, advantages whitened
       over the batch's real tokens (masked, unbiased variance).
    5. **Update.** ``ppo_epochs`` passes of ``num_mini_batches`` shuffled minibatches (a fresh
       permutation per epoch); loss = clipped surrogate + ``vf_coef`` · clipped value loss; AdamW,
       gradient clipping. β is fixed or follows the adaptive controller of Ziegler et al. 2019.

    Value function (``value_model``):
      * ``"shared_head"`` (default): a zero-initialised ``Linear(C, 1)`` on the policy's own trunk
        (the policy's hidden state before each response token), trained through the trunk with
        ``vf_coef`` 0.1. This is what docs/rlhf-notes.md §3/§6.5 measured on this world (zero init =
        lm-human-preferences' value head, ``init_scale=0``): one forward serves policy and value,
        half the compute of a second model.
      * ``"reward_model"``: a separate GPT initialised from the reward model with its scalar head
        (InstructGPT §3.5; TRL ``examples/scripts/ppo/ppo.py``), trained by its own AdamW with the
        same learning rate. Needs a reward-model checkpoint.

    Logged every iteration (``PPOResult.history``, ``metrics.json``): the raw RM score, the gold
    reward and correctness of the same samples, the KL (mean over sequences of the summed k1, nats),
    the mean per-token entropy, clipfrac, approx KL, the policy and value losses, the mean response
    length (tokens, incl. ``<|eos|>``), the opener ("Sure!") and EOS rates, β, and the largest
    difference between the sampler's and the trainer's log-probabilities (a sampler/scorer
    mismatch, the cause of negative KL in trl #736, shows there). Before and after training the
    policy is evaluated on ``eval_prompts`` held-out-fact and train-fact prompts (one sample each at
    T, a fixed seed): gold, correctness, RM score, KL to the reference, opener rate.

Sources
    Schulman et al. 2017 (PPO) Eq. 7 (clipped surrogate), Eq. 9; Schulman et al. 2016 (GAE) Eq. 16;
    Ziegler et al. 2019 "Fine-Tuning LMs from Human Preferences" §2.2 (KL-penalised reward,
    adaptive β); Stiennon et al. 2020 Eq. 1; Ouyang et al. 2022 (InstructGPT) §3.5; Schulman,
    "Approximating KL divergence" (2020) for k1/k3. Reference code: trl ``trl/experimental/ppo/
    ppo_trainer.py`` (PPOv2: masks, INVALID_LOGPROB, whitening, loss), trl ``trl/trainer/utils.py
    @v0.11.0`` (``AdaptiveKLController``, ``masked_whiten``), openai/lm-human-preferences
    ``train_policy.py``, vwxyzjn/lm-human-preference-details (recomputed rollout log-probs).
    Defaults: docs/rlhf-notes.md §3 (T 0.7, B 64, 4 epochs x 2 minibatches, lr 3e-5, vf_coef 0.1).

Deviations (each with the option that restores the reference behaviour)
    * The score lands on the response's **last real token** (the ``<|eos|>`` when emitted), as in
      legacy trl and lm-human-preferences; trl PPOv2 puts it one slot later when there is one
      (docs/reference.md §9). No option: with γ = 1 the advantages of real tokens are the same once the
      value there is learned, and the slot after ``<|eos|>`` is not an action of the policy.
    * Rollout log-probabilities come from a recomputed forward (lm-human-preference-details), not
      from the sampler (trl uses generate's scores); both are logged and compared.
    * Values are masked on exactly the response tokens (trl masks one token later,
      ``padding_mask_p1``).
    * The score is normalised by SFT-sample statistics (``score_norm_samples``; 0 disables it, as
      trl, which does not normalise).
    * ``value_model="shared_head"`` by default instead of TRL's separate value model initialised
      from the reward model (``value_model="reward_model"`` restores it); see above.
    * Constant learning rate (trl anneals linearly to 0 by default).
    * One optimizer step per minibatch, no gradient accumulation and no entropy bonus (as trl).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from minillm import backend
from minillm.model import GPT
from minillm.nn import Linear, disable_dropout
from minillm.optim import AdamW, weight_decay_groups
from minillm.tensor import no_grad
from minillm.facts import OPENER
from minillm.train.common import LoRAConfig, TrainResult, trainer_command, trend_line, write_metrics
from minillm.train.loop import optimizer_step
from minillm.train.rollout import Rollout, policy_forward, reference_logprobs, sample_rollout
from minillm.train.ppo_objective import (AdaptiveKLController, FixedKLController, compute_gae, masked_whiten,
                                         per_token_rewards, ppo_policy_loss, ppo_value_loss, token_entropy)


# ================================================================================================
# Configuration

@dataclass
class PPOConfig(LoRAConfig):
    """Settings of a PPO run (CLI: ``minillm ppo --beta 0 --iterations 60``). Defaults: docs/rlhf-notes.md §3.

    sft: the policy's initial weights and the frozen reference. reward: a reward-model checkpoint
    (chapter 08) or "gold" (the world's gold judge as the reward: the control run). value_model:
    "shared_head" or "reward_model" (see the module docstring). prompts: "world" (the 1,610 fact
    prompts) or a file (one prompt per line, or JSONL with "prompt"/"instruction").
    beta: the initial KL coefficient (fixed unless ``adaptive_kl``); kl_estimator "k1" or "k3".
    missing_eos_penalty: subtracted from the (normalised) score of a response without <|eos|>.
    score_norm_samples: SFT samples for the score's mean/sd (0: no normalisation).
    eval_prompts: per split (held-out facts, train facts), before and after training (0: skip).
    """

    sft: str = "runs/sft/checkpoint.safetensors"  # the pipeline starts from its "Sure!"-demo SFT
    reward: str = "runs/reward/checkpoint.safetensors"
    value_model: str = "shared_head"
    prompts: str = "world"
    out_dir: str = "runs/ppo"
    iterations: int = 60
    batch_size: int = 64
    max_new_tokens: int = 16
    temperature: float = 0.7
    beta: float = 0.1
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    num_mini_batches: int = 2
    lr: float = 3e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    missing_eos_penalty: float = 1.0
    score_norm_samples: int = 256
    eval_prompts: int = 200
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.value_model not in ("shared_head", "reward_model"):
            raise ValueError(f"value_model must be 'shared_head' or 'reward_model', got {self.value_model!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {self.kl_estimator!r}")
        if self.value_model == "reward_model" and self.reward == "gold":
            raise ValueError("value_model='reward_model' needs a reward-model checkpoint, not reward='gold'")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for PPO sampling, got {self.temperature}")
        if self.beta < 0:
            raise ValueError(f"beta must be ≥ 0, got {self.beta}")
        for name in ("iterations", "batch_size", "max_new_tokens", "ppo_epochs", "num_mini_batches"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PPOConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.batch_size % self.num_mini_batches:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by num_mini_batches {self.num_mini_batches}")
        if self.batch_size // self.num_mini_batches < 1:
            raise ValueError("a minibatch needs at least one row")


# ================================================================================================
# Rewards

class GoldReward:
    """The world's gold judge as the reward (the control run): ``judge.score(prompt, text, ended).total``."""

    name = "gold"

    def __init__(self, judge):
        self.judge = judge

    def __call__(self, rollout: Rollout) -> np.ndarray:
        if rollout.prompts is None or rollout.texts is None:
            raise ValueError("the gold reward needs prompt texts and a tokenizer to decode the responses")
        return np.array([self.judge.score(p, t, ended=bool(e)).total
                         for p, t, e in zip(rollout.prompts, rollout.texts, rollout.finished)], dtype=np.float64)


class ModelReward:
    """A reward model's scalar at the last real token of prompt + response (chapter 08)."""

    name = "reward_model"

    def __init__(self, model: GPT, batch_size: int = 64):
        self.model = model
        self.batch_size = batch_size

    def __call__(self, rollout: Rollout) -> np.ndarray:
        scores = _reward_scores_fn()
        out = []
        for s in range(0, rollout.input_ids.shape[0], self.batch_size):
            out.append(np.asarray(scores(self.model, rollout.input_ids[s:s + self.batch_size],
                                         rollout.attention_mask[s:s + self.batch_size]), dtype=np.float64))
        return np.concatenate(out)


def _reward_scores_fn():
    """``minillm.train.reward.reward_scores`` (the chapter-08 module)."""
    from minillm.train.reward import reward_scores

    return reward_scores


def load_reward(path: str):
    """(model, tokenizer) of a reward-model checkpoint via ``minillm.train.reward.load_reward_model``."""
    from minillm.train.reward import load_reward_model

    return load_reward_model(path)


# ================================================================================================
# The trainer

PPOResult = TrainResult  # history: one dict per iteration; metrics (config, evaluations, history), checkpoint, seconds


class PPOTrainer:
    """PPO on a GPT policy against a frozen reference and a reward function.

    Args:
        policy: the GPT being trained (dropout must be 0). ref: the frozen reference GPT.
        reward_fn: ``Rollout -> (B,) raw scores`` (``GoldReward``, ``ModelReward`` or any callable).
        cfg: PPOConfig (only the algorithm fields are read here).
        tokenizer: decodes responses (needed by the gold reward and the text metrics); may be None.
        judge: a ``judge.GoldJudge`` for the gold/correct/opener metrics (None: not logged).
        value_model: a GPT with a scalar head (``cfg.value_model == "reward_model"``); otherwise a
            zero-initialised value head on the policy trunk is created.
        eos_id, pad_id: default to the tokenizer's.
    Raises ValueError when a model has dropout > 0 (docs/bugs.md C20).
    """

    def __init__(self, policy: GPT, ref: GPT, reward_fn: Callable, cfg: PPOConfig, tokenizer=None, judge=None,
                 value_model: GPT | None = None, eos_id: int | None = None, pad_id: int | None = None):
        for name, m in (("policy", policy), ("reference", ref), ("value model", value_model)):
            if m is not None and m.config.dropout != 0:
                raise ValueError(f"the {name} has dropout {m.config.dropout}; PPO needs dropout off "
                                 "(load it with config_overrides={'dropout': 0.0})")
        self.policy, self.ref, self.reward_fn, self.cfg = policy, ref, reward_fn, cfg
        self.tokenizer, self.judge = tokenizer, judge
        self.eos_id = eos_id if eos_id is not None else (tokenizer.eos_id if tokenizer is not None else None)
        self.pad_id = pad_id if pad_id is not None else (tokenizer.pad_id if tokenizer is not None else 0)
        self.rng = np.random.default_rng([cfg.seed, 9])
        ref.eval()
        ref.requires_grad_(False)
        policy.eval()  # dropout is 0; eval mode keeps every forward deterministic
        self.value_model = value_model
        self.value_head = None
        if value_model is None:
            self.value_head = Linear(policy.config.n_embd, 1, bias=True)
            for p in self.value_head.parameters():  # zero init: lm-human-preferences value head, init_scale 0
                p.data[...] = 0
            self.value_params = self.value_head.parameters()
        else:
            value_model.eval()
            self.value_params = [p for p in value_model.parameters() if p.requires_grad]
        self.policy_params = [p for p in policy.parameters() if p.requires_grad]
        # the project's one parameter-group rule: no weight decay on 1-D parameters (biases, LayerNorm)
        if value_model is None:
            self.opt = AdamW(weight_decay_groups(self.policy_params + self.value_params, cfg.weight_decay), lr=cfg.lr)
            self.value_opt = None
        else:
            self.opt = AdamW(weight_decay_groups(self.policy_params, cfg.weight_decay), lr=cfg.lr)
            self.value_opt = AdamW(weight_decay_groups(self.value_params, cfg.weight_decay), lr=cfg.lr)
        self.kl_ctl = (AdaptiveKLController(cfg.beta, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.beta))
        self.score_mean, self.score_std = 0.0, 1.0
        self.whiten_skipped = 0

    # ------------------------------------------------------------------ pieces
    def sample(self, prompt_ids, prompts=None, rng=None) -> Rollout:
        """One response per prompt (lists of ids) at the configured temperature (``sample_rollout``)."""
        return sample_rollout(self.policy, prompt_ids, self.cfg.max_new_tokens, self.cfg.temperature,
                              rng or self.rng, self.eos_id, self.pad_id, self.tokenizer, prompts)

    def forward(self, rollout: Rollout):
        """``policy_forward`` of the policy (and its value function) on a rollout:
        (logprobs Tensor (B, N), values Tensor (B, N), scaled logits array (B, N, V))."""
        return policy_forward(self.policy, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                              rollout.response_mask, self.cfg.temperature, self.value_head, self.value_model)

    def fit_score_norm(self, prompt_pool: Sequence[Sequence[int]], prompt_texts=None, n: int | None = None) -> dict:
        """Mean and sd of the raw scores of ``n`` samples of the current (SFT) policy (docs/rlhf-notes.md §3)."""
        n = self.cfg.score_norm_samples if n is None else n
        if n <= 0:
            return {"mean": 0.0, "std": 1.0, "n": 0}
        rng = np.random.default_rng([self.cfg.seed, 7])
        scores = []
        B = self.cfg.batch_size
        for s in range(0, n, B):
            idx = rng.integers(0, len(prompt_pool), size=min(B, n - s))
            r = self.sample([prompt_pool[i] for i in idx], None if prompt_texts is None else
                            [prompt_texts[i] for i in idx], rng)
            scores.append(self.reward_fn(r))
        s = np.concatenate(scores)
        self.score_mean = float(s.mean())
        self.score_std = float(s.std()) if float(s.std()) > 1e-6 else 1.0
        return {"mean": self.score_mean, "std": self.score_std, "n": int(s.size)}

    def normalised_scores(self, rollout: Rollout, raw: np.ndarray) -> np.ndarray:
        """(raw − mean)/sd of the SFT samples, minus ``missing_eos_penalty`` where no ``<|eos|>``: (B,) float64."""
        s = (np.asarray(raw, dtype=np.float64) - self.score_mean) / self.score_std
        return s - self.cfg.missing_eos_penalty * (~rollout.finished.astype(bool))

    def text_metrics(self, rollout: Rollout) -> dict:
        """Gold, correctness, opener and EOS rates of a rollout (gold/correct None without a judge)."""
        out = {"eos_rate": float(rollout.finished.mean()),
               "response_length": float(rollout.response_mask.sum(axis=1).mean())}
        if rollout.texts is None:
            return out
        out["opener_rate"] = float(np.mean([t.strip().startswith(OPENER) for t in rollout.texts]))
        if self.judge is not None and rollout.prompts is not None:
            try:
                js = [self.judge.score(p, t, ended=bool(e)) for p, t, e in
                      zip(rollout.prompts, rollout.texts, rollout.finished)]
                out["gold"] = float(np.mean([j.total for j in js]))
                out["correct"] = float(np.mean([j.correct for j in js]))
            except KeyError:  # prompts that are not world questions: no gold
                pass
        return out

    # ------------------------------------------------------------------ one iteration
    def step(self, prompt_ids: Sequence[Sequence[int]], prompts: list | None = None) -> dict:
        """One PPO iteration on these prompts: rollout, scoring, GAE, epochs of minibatch updates.

        Returns the iteration's logged values (see the module docstring) plus ``minibatches``: a
        list of per-minibatch dicts (epoch, ratio_min, ratio_max, approxkl, clipfrac, ...).
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        rollout = self.sample(prompt_ids, prompts)
        B, N = rollout.response_mask.shape
        mb = B // cfg.num_mini_batches
        if mb < 1:
            raise ValueError(f"{B} prompts cannot make {cfg.num_mini_batches} minibatches")
        perms = [self.rng.permutation(B) for _ in range(cfg.ppo_epochs)]
        # old log-probs and values: the training forward, in epoch 0's minibatches (docs/bugs.md C19)
        old_logp = np.zeros((B, N), dtype=np.float32)
        old_values = np.zeros((B, N), dtype=np.float32)
        ref_logp = np.zeros((B, N), dtype=np.float32)
        entropy = np.zeros((B, N), dtype=np.float64)
        with no_grad():
            for s in range(0, B, mb):
                idx = perms[0][s:s + mb]
                sub = rollout.subset(idx)
                lp, v, logits = self.forward(sub)
                old_logp[idx] = backend.to_numpy(lp.data)
                old_values[idx] = backend.to_numpy(v.data)
                entropy[idx] = backend.to_numpy(token_entropy(logits))
                # the reference in the same minibatches: at init (policy == ref) the KL is exactly 0
                ref_logp[idx] = reference_logprobs(self.ref, sub, cfg.temperature)
        mask = rollout.response_mask.astype(np.float32)
        raw = np.asarray(self.reward_fn(rollout), dtype=np.float64)
        if not np.isfinite(raw).all():  # a NaN score would silently poison every advantage of the batch
            bad = int((~np.isfinite(raw)).sum())
            raise FloatingPointError(f"PPO: the reward is not finite for {bad} of {len(raw)} responses "
                                     f"(values {raw[~np.isfinite(raw)][:3].tolist()}); check the reward model")
        scores = self.normalised_scores(rollout, raw)
        beta = self.kl_ctl.value
        rewards, kl = per_token_rewards(old_logp, ref_logp, mask, scores, beta, cfg.kl_estimator)
        k1 = (old_logp - ref_logp) * mask
        old_values = old_values * mask
        advantages, returns = compute_gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            if mask.sum() >= 2:
                advantages = masked_whiten(advantages, mask) * mask
            else:  # one real token in the whole batch: whitening is undefined (docs/bugs.md C21)
                self.whiten_skipped += 1
        advantages = advantages.astype(np.float32)
        returns = returns.astype(np.float32)

        t_update = time.perf_counter()
        mstats = []
        for epoch in range(cfg.ppo_epochs):
            for s in range(0, B, mb):
                idx = perms[epoch][s:s + mb]
                sub = rollout.subset(idx)
                m = mask[idx]
                if m.sum() == 0:
                    continue
                lp, v, _ = self.forward(sub)
                pg_loss, clipfrac, approxkl = ppo_policy_loss(lp, old_logp[idx], advantages[idx], m, cfg.cliprange)
                vf_loss, vf_clipfrac = ppo_value_loss(v, old_values[idx], returns[idx], m, cfg.cliprange_value)
                ratio = np.exp(backend.to_numpy(lp.data) - old_logp[idx])[m > 0]
                self.opt.zero_grad()
                if self.value_opt is None:
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    loss.backward()
                    gnorm = optimizer_step(self.opt, self.policy_params + self.value_params, cfg.grad_clip)
                else:
                    self.value_opt.zero_grad()
                    (pg_loss + cfg.vf_coef * vf_loss).backward()
                    gnorm = optimizer_step(self.opt, self.policy_params, cfg.grad_clip)
                    optimizer_step(self.value_opt, self.value_params, cfg.grad_clip)
                mstats.append({"epoch": epoch, "pg_loss": float(pg_loss.item()), "value_loss": float(vf_loss.item()),
                               "clipfrac": clipfrac, "vf_clipfrac": vf_clipfrac, "approxkl": approxkl,
                               "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
                               "ratio_mean": float(ratio.mean()), "grad_norm": float(gnorm)})
        seq_kl = k1.sum(axis=1)
        self.kl_ctl.update(float(seq_kl.mean()), B)
        stats = {
            "rm_score": float(raw.mean()),
            "score": float(scores.mean()),
            "kl": float(seq_kl.mean()),
            "kl_penalty_estimate": float(kl.sum(axis=1).mean()),
            "non_score_reward": float((-beta * kl).sum(axis=1).mean()),
            "entropy": float((entropy * mask).sum() / max(mask.sum(), 1)),
            "beta": beta,
            "logprob_mismatch": float(np.abs((rollout.sample_logprobs - old_logp) * mask).max()),
            **self.text_metrics(rollout),
            **{k: float(np.mean([d[k] for d in mstats])) for k in
               ("pg_loss", "value_loss", "clipfrac", "vf_clipfrac", "approxkl", "grad_norm")},
            "update_seconds": time.perf_counter() - t_update,
            "seconds": time.perf_counter() - t0,
            "minibatches": mstats,
        }
        return stats

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, prompt_ids, prompts=None, seed: int = 1234, batch_size: int = 64) -> dict:
        """One sample per prompt at T (fixed seed): raw score, KL (mean summed k1), gold, correct,
        opener/EOS rates, response length. Under no_grad; does not touch the training rng."""
        rng = np.random.default_rng(seed)
        raws, kls, rows = [], [], []
        for s in range(0, len(prompt_ids), batch_size):
            r = self.sample(prompt_ids[s:s + batch_size], None if prompts is None else prompts[s:s + batch_size], rng)
            with no_grad():
                lp, _, _ = self.forward(r)
            ref = reference_logprobs(self.ref, r, self.cfg.temperature)
            kls.append(((backend.to_numpy(lp.data) - ref) * r.response_mask).sum(axis=1))
            raws.append(np.asarray(self.reward_fn(r), dtype=np.float64))
            rows.append((r, self.text_metrics(r)))
        n = len(prompt_ids)
        out = {"rm_score": float(np.concatenate(raws).mean()), "kl": float(np.concatenate(kls).mean()), "n": n}
        for key in rows[0][1]:
            out[key] = float(sum(m[key] * r.input_ids.shape[0] for r, m in rows) / n)
        first = rows[0][0]
        if first.texts is not None:
            out["samples"] = [(p, t) for p, t in zip(first.prompts or [""] * 4, first.texts)][:4]
        return out


# ================================================================================================
# Prompts, the run, the CLI

def world_prompts() -> tuple[list[str], dict]:
    """The 1,610 fact prompts of the built-in world (train facts, then held-out facts; 5 templates
    each) and evaluation subsets {"test": 485 held-out-fact prompts, "train": 1,125 train-fact prompts}."""
    from minillm.tasks import default_world

    w = default_world()
    train = [r["instruction"] for r in w.sft_records("plain")]
    test = [r["instruction"] for r in w.sft_test_records()]
    return train + test, {"test": test, "train": train}


def read_prompts(path: str) -> list[str]:
    """Prompts from a file, through the project's loaders (``loaders.load_dataset(kind="prompt")``): any
    JSON/JSONL format they read — TRL's prompt-only ``{"prompt"}``, Alpaca ``{"instruction"}``, chat
    and preference files (HH-RLHF transcripts, ShareGPT, OpenAI messages) — gives the last user turn
    of each prompt (PPO here renders single-turn prompts); any other file is plain UTF-8 text, one
    prompt per line.

    Raises FileNotFoundError naming the file, the loaders' DataError naming the file, line and field
    of a bad record, and ValueError for a file without prompts.
    """
    from minillm.loaders import load_dataset
    from minillm.textfiles import read_text_file

    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        out = [next(m["content"] for m in reversed(msgs) if m["role"] == "user")
               for msgs in load_dataset(p, kind="prompt").records]
    else:
        out = [line.strip() for line in read_text_file(p).splitlines() if line.strip()]
    if not out:
        raise ValueError(f"{p}: no prompts")
    return out


def _evenly(items: list, n: int) -> list:
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def build_trainer(cfg: PPOConfig):
    """Load policy, reference, reward and value models as configured; returns (trainer, tokenizer).

    Raises FileNotFoundError for a missing checkpoint and ValueError when the SFT checkpoint has no
    tokenizer or the reward model's tokenizer differs from the policy's.
    """
    from minillm.checkpoint import load_model
    from minillm.judge import GoldJudge
    from minillm.tasks import default_world

    nodrop = {"dropout": 0.0}
    policy, tok, _ = load_model(cfg.sft, config_overrides=nodrop)
    if tok is None:
        raise ValueError(f"{cfg.sft}: the checkpoint has no tokenizer")
    ref, _, _ = load_model(cfg.sft, config_overrides=nodrop)
    judge = GoldJudge(default_world())
    value_model = None
    if cfg.reward == "gold":
        reward_fn = GoldReward(judge)
    else:
        rm, rm_tok = load_reward(cfg.reward)
        if rm_tok is not None and rm_tok.to_dict() != tok.to_dict():
            raise ValueError(f"{cfg.reward}: the reward model's tokenizer differs from the policy's ({cfg.sft})")
        rm.requires_grad_(False)
        disable_dropout(rm)
        reward_fn = ModelReward(rm.eval(), cfg.batch_size)
        if cfg.value_model == "reward_model":
            value_model, _ = load_reward(cfg.reward)
            disable_dropout(value_model)
            value_model.eval().requires_grad_(True)
    if cfg.lora:
        from minillm.lora import inject_lora, parse_target_modules

        inject_lora(policy, parse_target_modules(cfg.lora_targets), r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                    lora_dropout=cfg.lora_dropout, seed=cfg.seed)
    trainer = PPOTrainer(policy, ref, reward_fn, cfg, tokenizer=tok, judge=judge, value_model=value_model)
    return trainer, tok


def ppo(cfg: PPOConfig, on_iteration: Callable | None = None) -> PPOResult:
    """Run PPO as configured; returns a PPOResult and writes ``<out_dir>/metrics.json`` and
    ``<out_dir>/checkpoint.safetensors`` (LoRA merged; the value head in ``extra.value_head.*``).

    Raises the loaders' errors for missing/bad checkpoints and prompt files.
    """
    from minillm.checkpoint import save_checkpoint
    from minillm.data import render_prompt

    t0 = time.perf_counter()
    trainer, tok = build_trainer(cfg)

    def render(q: str) -> list[int]:
        return render_prompt([{"role": "user", "content": q}], tok)

    if cfg.prompts == "world":
        pool_texts, eval_sets = world_prompts()
    else:
        pool_texts, eval_sets = read_prompts(cfg.prompts), {}
    limit = trainer.policy.config.block_size - cfg.max_new_tokens
    pool_ids = [render(q) for q in pool_texts]
    keep = [i for i, ids in enumerate(pool_ids) if len(ids) <= limit]
    if not keep:
        raise ValueError(f"no prompt fits block_size − max_new_tokens = {limit} tokens")
    n_too_long = len(pool_ids) - len(keep)
    pool_texts = [pool_texts[i] for i in keep]
    pool_ids = [pool_ids[i] for i in keep]
    metrics: dict = {"config": asdict(cfg), "n_prompts": len(pool_ids), "n_prompts_too_long": n_too_long}
    metrics["score_norm"] = trainer.fit_score_norm(pool_ids, pool_texts)

    evals = {k: _evenly(v, cfg.eval_prompts) for k, v in eval_sets.items()} if cfg.eval_prompts > 0 else {}

    def run_eval() -> dict:
        return {k: trainer.evaluate([render(q) for q in v], v, seed=cfg.seed + 1234) for k, v in evals.items()}

    if evals:
        metrics["eval_start"] = run_eval()
    rng = np.random.default_rng([cfg.seed, 11])
    history = []
    t_train = time.perf_counter()
    bar = tqdm(range(cfg.iterations), desc="ppo", disable=not cfg.progress)
    for it in bar:
        idx = rng.integers(0, len(pool_ids), size=cfg.batch_size)
        st = trainer.step([pool_ids[i] for i in idx], [pool_texts[i] for i in idx])
        st = {"iteration": it, **{k: v for k, v in st.items() if k != "minibatches"},
              "first_minibatch": st["minibatches"][0] if st["minibatches"] else None}
        history.append(st)
        bar.set_postfix(rm=f"{st['rm_score']:.2f}", gold=f"{st.get('gold', float('nan')):.2f}", kl=f"{st['kl']:.2f}")
        if on_iteration is not None:
            on_iteration(it, st)
    metrics["train_seconds"] = round(time.perf_counter() - t_train, 1)
    if evals:
        metrics["eval_end"] = run_eval()
    metrics["history"] = history
    metrics["whiten_skipped"] = trainer.whiten_skipped
    policy = trainer.policy
    if cfg.lora:
        from minillm.lora import merge_and_unload

        policy = merge_and_unload(policy)
    extra = {}
    if trainer.value_head is not None:
        extra = {"value_head.weight": trainer.value_head.weight.data, "value_head.bias": trainer.value_head.bias.data}
    out = Path(cfg.out_dir)
    ckpt = save_checkpoint(out / "checkpoint.safetensors", policy, tok, train_state={"ppo_config": asdict(cfg)},
                           extra_tensors=extra)
    metrics = write_metrics(out, metrics, t0, digits=5)
    return PPOResult(history=metrics["history"], metrics=metrics, checkpoint=str(ckpt), seconds=metrics["seconds"])


def summary_lines(m: dict) -> list[str]:
    """Human-readable lines of a PPO metrics dict: start → end per split, and the rollout curves."""
    lines = []
    for split in ("test", "train"):
        a, b = m.get("eval_start", {}).get(split), m.get("eval_end", {}).get(split)
        if a and b:
            lines.append(f"{split:5s} gold {a.get('gold', float('nan')):+.3f} → {b.get('gold', float('nan')):+.3f}  "
                         f"correct {a.get('correct', float('nan')):.3f} → {b.get('correct', float('nan')):.3f}  "
                         f"RM {a['rm_score']:+.2f} → {b['rm_score']:+.2f}  KL {a['kl']:.2f} → {b['kl']:.2f}  "
                         f"opener {a.get('opener_rate', float('nan')):.2f} → {b.get('opener_rate', float('nan')):.2f}")
    h = m.get("history", [])
    if h:
        lines.append(trend_line(h, ("rm_score", "gold", "kl", "opener_rate", "response_length"),
                                "rollouts (iters 0-4 → last 10)", last=10))
    lines.append(f"train_seconds: {m.get('train_seconds')}  iterations: {len(h)}")
    return lines


#: ``minillm ppo``: one option per PPOConfig field; runs, prints the summary, returns 0.
add_arguments, run = trainer_command(PPOConfig, ppo, summary_lines)
