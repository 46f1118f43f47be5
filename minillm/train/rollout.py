"""Sampling a batch of responses and scoring them with the training forward (chapters 09 and 14).

Scope
    ``Rollout`` holds one batch: left-padded prompts, the sampled responses, their masks.
    ``sample_rollout`` samples with ``GPT.generate`` (KV cache, temperature T, no top-k/top-p);
    ``policy_forward`` recomputes the response log-probabilities (and, for PPO, values) with the
    very forward used in training, under softmax(logits / T), so the first minibatch of an
    iteration has ratio exactly 1; ``reference_logprobs`` scores the frozen reference the same
    way. PPO (``train/ppo.py``) and GRPO (``train/grpo.py``) both use them.

Sources
    vwxyzjn/lm-human-preference-details (recomputed rollout log-probs); trl
    ``trl/experimental/ppo/ppo_trainer.py`` (masks, padding after ``<|eos|>``).

Deviations
    * Log-probabilities are recomputed with the training forward, not taken from the sampler
      (trl uses generate's scores); PPO logs the difference between the two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from minillm import backend
from minillm.model import GPT
from minillm.nn import Linear
from minillm.tensor import no_grad


@dataclass
class Rollout:
    """One batch of sampled responses.

    input_ids: (B, P + N) int64, left-padded prompt (length P) then the response (``pad_id`` after
    ``<|eos|>``); attention_mask: (B, P + N) 1 on real tokens; response_mask: (B, N) 1 on response
    tokens up to and including ``<|eos|>``; finished: (B,) emitted ``<|eos|>``; sample_logprobs:
    (B, N) the sampler's log-probabilities; prompts: the prompt texts (or None); texts: decoded
    responses without ``<|eos|>`` (or None without a tokenizer).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    prompt_length: int
    response_mask: np.ndarray
    finished: np.ndarray
    sample_logprobs: np.ndarray
    prompts: list | None = None
    texts: list | None = None

    @property
    def responses(self) -> np.ndarray:
        """(B, N) response token ids."""
        return self.input_ids[:, self.prompt_length:]

    def subset(self, idx) -> "Rollout":
        """The rows ``idx`` (a minibatch), with the same prompt length P and response length N."""
        idx = np.asarray(idx)
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.prompt_length, self.response_mask[idx],
                       self.finished[idx], self.sample_logprobs[idx],
                       None if self.prompts is None else [self.prompts[i] for i in idx],
                       None if self.texts is None else [self.texts[i] for i in idx])


def sample_rollout(policy: GPT, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                   rng: np.random.Generator, eos_id: int | None, pad_id: int, tokenizer=None,
                   prompts: list | None = None) -> Rollout:
    """Sample one response per prompt (``GPT.generate``: left-padded prompts, KV cache, plain
    sampling at ``temperature``) and assemble a ``Rollout``."""
    g = policy.generate([list(p) for p in prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature,
                        eos_id=eos_id, pad_id=pad_id, rng=rng)
    P = g.prompt_mask.shape[1]
    attn = np.concatenate([g.prompt_mask.astype(np.int64), g.response_mask.astype(np.int64)], axis=1)
    texts = None
    if tokenizer is not None:
        texts = []
        for row in range(g.new_tokens.shape[0]):
            n = int(g.response_mask[row].sum())
            toks = [int(t) for t in g.new_tokens[row, :n]]
            texts.append(tokenizer.decode(toks[:-1] if g.finished[row] else toks))
    return Rollout(g.sequences.astype(np.int64), attn, P, g.response_mask.astype(np.int64), g.finished.copy(),
                   g.logprobs.astype(np.float32), prompts, texts)


def policy_forward(policy: GPT, input_ids, attention_mask, prompt_length: int, response_mask, temperature: float,
                   value_head: Linear | None = None, value_model: GPT | None = None):
    """The one forward used both to score rollouts and to train (docs/bugs.md C19).

    input_ids, attention_mask: (B, P + N); response_mask (B, N). The hidden state before response
    token t is h[:, P − 1 + t] (B, N, C); logits / T give log π(y_t) (B, N) (0 on padding);
    the value V(s_t) comes from ``value_head`` on that same hidden state, or from
    ``value_model.scores`` at the same positions. Returns (logprobs Tensor (B, N),
    values Tensor (B, N) or None, scaled logits array (B, N, V)).
    """
    ids = backend.asarray(np.asarray(input_ids))
    mask = backend.asarray(np.asarray(attention_mask))
    B, L = ids.shape
    P = prompt_length
    N = L - P
    h = policy.hidden_states(ids, mask)                                              # (B, P+N, C)
    logits = policy.response_logits(ids, mask, P, temperature, hidden=h)             # (B, N, V), logits / T
    logp = policy.response_logprobs(ids, mask, P, response_mask, logits=logits)      # (B, N), 0 where masked
    values = None
    if value_head is not None:
        values = value_head(h[:, P - 1:L - 1, :]).reshape(B, N)   # (B, N, C) -> (B, N): state before each token
    elif value_model is not None:
        values = value_model.scores(ids, mask)[:, P - 1:L - 1]    # (B, N)
    return logp, values, logits.data


def reference_logprobs(ref: GPT, rollout: Rollout, temperature: float) -> np.ndarray:
    """log π_ref(y_t) under softmax(logits / T): (B, N) float32, 0 on padding. Under no_grad."""
    with no_grad():
        lp, _, _ = policy_forward(ref, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                                  rollout.response_mask, temperature)
    return backend.to_numpy(lp.data).astype(np.float32)
