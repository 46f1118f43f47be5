"""GPT: a decoder-only transformer with pre-LN blocks, learned positions and a KV cache.

Scope
    ``GPTConfig`` and ``GPT``: token + position embeddings → ``n_layer`` pre-LN blocks
    (x + attn(ln_1(x)), then x + mlp(ln_2(x))) → ln_f → LM head (tied to the token embedding by
    default), plus an optional scalar head (``score``) for value and reward models.
    ``forward`` takes ``input_ids`` (B, T), an optional ``attention_mask`` (1 = real token) and
    ``position_ids``; with a mask and no position ids, positions are ``cumsum(mask) − mask`` so a
    left-padded row sees exactly the positions it would see alone (docs/bugs.md B08). ``generate``
    samples with temperature / top-k / top-p, stops at EOS, batches left-padded prompts and reuses
    keys and values through a ``KVCache``. ``sequence_logprobs`` sums token log-probabilities
    where labels ≠ −100 (DPO, PPO).

    Module names follow nanoGPT / Hugging Face GPT-2 (``transformer.h.0.attn...``,
    ``mlp.c_fc``, ``mlp.c_proj``, ``ln_1``, ``ln_f``) except that the query, key and value
    projections are separate Linear layers ``q_proj``, ``k_proj``, ``v_proj`` (GPT-2 fuses them
    into ``c_attn``), so LoRA can target the query and value projections by name.

Sources
    Radford et al. 2019 (GPT-2) §2.3: pre-LN, final LayerNorm, residual projections initialised with
    std 0.02/√(2·n_layer); Vaswani et al. 2017 §3.2 (multi-head attention); nanoGPT ``model.py``
    (structure, init); Hugging Face ``GPT2LMHeadModel`` (tied head, position ids from the mask).

Deviations
    * Separate q/k/v projections instead of GPT-2's fused ``c_attn`` (numerically identical: the
      fused weight is the three stacked; interop code splits/joins them).
    * Weight tying is an option (``tie_weights``, default True as in GPT-2).
    * Dropout (``config.dropout``) acts on the embeddings and the residual branches; GPT-2's dropout
      on the attention probabilities (``attn_pdrop``) is not implemented (the fused attention
      backward would need the mask); there is no option to restore it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from minillm import backend, threads
from minillm import functional as F
from minillm.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList
from minillm.functional import IGNORE_INDEX
from minillm.tensor import Tensor, no_grad


@dataclass
class GPTConfig:
    """Hyperparameters of a GPT.

    vocab_size: tokens V; block_size: the longest sequence (context) in tokens; n_layer, n_head,
    n_embd (C, divisible by n_head); dropout probability; bias in Linear/LayerNorm; tie_weights:
    share the LM head with the token embedding; scalar_head: add ``score`` Linear(C, 1) for
    value/reward models.
    """

    vocab_size: int = 1024
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    scalar_head: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {unknown}")
        return cls(**known)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to ``max_len``.

    k[i], v[i]: (B, H, max_len, D) arrays; ``mask`` (B, max_len) marks real (non-pad) tokens;
    ``next_pos`` (B,) the position id the next real token of each row gets; ``length`` the number
    of filled time steps. Used only under ``no_grad`` (generation).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, dtype=np.float32):
        xp = backend.xp()
        H, D = config.n_head, config.n_embd // config.n_head
        self.k = [xp.zeros((batch_size, H, max_len, D), dtype=dtype) for _ in range(config.n_layer)]
        self.v = [xp.zeros((batch_size, H, max_len, D), dtype=dtype) for _ in range(config.n_layer)]
        self.mask = xp.zeros((batch_size, max_len), dtype=bool)
        self.next_pos = xp.zeros(batch_size, dtype=np.int64)
        self.length = 0
        self.max_len = max_len


class CausalSelfAttention(Module):
    """Multi-head causal self-attention: x (B, T, C) -> (B, T, C)."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator, drop_rng: np.random.Generator):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.q_proj = Linear(C, C, bias=config.bias, rng=rng)
        self.k_proj = Linear(C, C, bias=config.bias, rng=rng)
        self.v_proj = Linear(C, C, bias=config.bias, rng=rng)
        self.c_proj = Linear(C, C, bias=config.bias, rng=rng)
        self.resid_dropout = Dropout(config.dropout, drop_rng)

    def forward(self, x: Tensor, key_padding_mask=None, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        H = self.n_head
        q = self.q_proj(x).reshape(B, T, H, C // H).permute(0, 2, 1, 3)  # (B, H, T, D)
        k = self.k_proj(x).reshape(B, T, H, C // H).permute(0, 2, 1, 3)  # (B, H, T, D)
        v = self.v_proj(x).reshape(B, T, H, C // H).permute(0, 2, 1, 3)  # (B, H, T, D)
        if cache is not None:  # append this step's keys/values, attend over everything so far
            L = cache.length
            cache.k[layer][:, :, L:L + T] = k.data
            cache.v[layer][:, :, L:L + T] = v.data
            k = Tensor(cache.k[layer][:, :, :L + T])  # (B, H, L+T, D)
            v = Tensor(cache.v[layer][:, :, :L + T])
        y = F.scaled_dot_product_attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)  # (B, H, T, D)
        y = y.permute(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator, drop_rng: np.random.Generator):
        super().__init__()
        C = config.n_embd
        self.c_fc = Linear(C, 4 * C, bias=config.bias, rng=rng)
        self.c_proj = Linear(4 * C, C, bias=config.bias, rng=rng)
        self.dropout = Dropout(config.dropout, drop_rng)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator, drop_rng: np.random.Generator):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, rng, drop_rng)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = MLP(config, rng, drop_rng)

    def forward(self, x: Tensor, key_padding_mask=None, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), key_padding_mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(Module):
    """The trunk: embeddings, blocks and the final LayerNorm (named as in GPT-2: wte, wpe, h, ln_f)."""

    def __init__(self, config: GPTConfig, rng: np.random.Generator, drop_rng: np.random.Generator):
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.n_embd, rng=rng)
        self.wpe = Embedding(config.block_size, config.n_embd, rng=rng)
        self.drop = Dropout(config.dropout, drop_rng)
        self.h = ModuleList(Block(config, rng, drop_rng) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd)


@dataclass
class GenerateOutput:
    """Result of ``GPT.generate``.

    sequences: (B, T_prompt + N) int64, prompt (as given, left-padded) then new tokens, ``pad_id``
    after a row's EOS. new_tokens: (B, N). logprobs: (B, N) float32, log-probability of each sampled
    token under softmax(logits / temperature) (0 after EOS). response_mask: (B, N) 1 for generated
    tokens up to and including EOS. finished: (B,) True where EOS was emitted. prompt_mask: (B,
    T_prompt) 1 on real prompt tokens (0 on left padding).
    """

    sequences: np.ndarray
    new_tokens: np.ndarray
    logprobs: np.ndarray
    response_mask: np.ndarray
    finished: np.ndarray
    prompt_mask: np.ndarray = field(repr=False, default=None)


def _as_ids(ids) -> np.ndarray:
    if isinstance(ids, Tensor):
        ids = ids.data
    xp = backend.get_array_module(ids) if hasattr(ids, "dtype") else backend.xp()
    ids = xp.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.dtype.kind not in "iu":
        raise TypeError(f"input_ids must be integers, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def default_position_ids(attention_mask) -> np.ndarray:
    """Position ids from a (B, T) 0/1 mask: cumsum(mask) − mask, so pads before a row take 0
    and its first real token takes 0 too (docs/bugs.md B08: [0,0,1,1,1,1] -> [0,0,0,1,2,3])."""
    m = attention_mask.astype(np.int64)
    return m.cumsum(axis=1) - m


def last_token_index(attention_mask) -> np.ndarray:
    """Index of the last real token per row of a (B, T) 0/1 mask (left or right padding).

    A sequence's reward or value is read there (docs/bugs.md B15): right-padded [1,1,1,1,1,1,0,0] -> 5,
    left-padded [0,0,1,1,1,1] -> 5. Raises ValueError for a row with no real token.
    """
    xp = backend.get_array_module(attention_mask)
    m = xp.asarray(attention_mask).astype(bool)
    if not bool(m.any(axis=1).all()):
        raise ValueError("last_token_index: a row of the attention mask has no real token")
    T = m.shape[1]
    return (T - 1 - xp.argmax(m[:, ::-1], axis=1)).astype(np.int64)


class GPT(Module):
    """A GPT language model (optionally with a scalar head). See the module docstring.

    Args:
        config: GPTConfig. seed: initialisation seed (int) — the same seed gives the same weights.
    """

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        self.config = config
        rng = np.random.default_rng(seed)
        self.drop_rng = np.random.default_rng([seed, 1])
        self.transformer = Transformer(config, rng, self.drop_rng)
        self.lm_head = None if config.tie_weights else Linear(config.n_embd, config.vocab_size, bias=False, rng=rng)
        self.score = Linear(config.n_embd, 1, bias=True, rng=rng) if config.scalar_head else None
        self._init_weights(rng)

    def _init_weights(self, rng: np.random.Generator) -> None:
        """GPT-2 init: N(0, 0.02) weights and embeddings, zero biases, residual projections
        (attn.c_proj, mlp.c_proj) N(0, 0.02/√(2·n_layer)) (Radford et al. 2019 §2.3)."""
        std_resid = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.data[...] = 0
            elif "ln_" in name:
                continue
            else:
                std = std_resid if name.endswith("c_proj.weight") else 0.02
                p.data = backend.asarray(rng.normal(0.0, std, p.shape), dtype=p.dtype)

    # ------------------------------------------------------------------- forward
    def hidden_states(self, input_ids, attention_mask=None, position_ids=None,
                      kv_cache: KVCache | None = None) -> Tensor:
        """The trunk's output after ln_f: (B, T, C).

        Raises ValueError when a sequence (plus the cache) is longer than block_size, or the
        mask/position shapes do not match input_ids.
        """
        ids = _as_ids(input_ids)
        B, T = ids.shape
        xp = backend.get_array_module(ids)
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of length {past + T} (cache {past} + new {T}) is longer than "
                             f"block_size={self.config.block_size}")
        if attention_mask is not None:
            attention_mask = attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask
            attention_mask = xp.asarray(attention_mask)
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask {attention_mask.shape} does not match input_ids {(B, T)}")
        if position_ids is None:
            if kv_cache is not None:
                m = attention_mask if attention_mask is not None else xp.ones((B, T), dtype=np.int64)
                position_ids = kv_cache.next_pos[:, None] + default_position_ids(m)
            elif attention_mask is not None:
                position_ids = default_position_ids(attention_mask)
            else:
                position_ids = xp.broadcast_to(xp.arange(T, dtype=np.int64), (B, T))
        else:
            position_ids = _as_ids(position_ids)
            if position_ids.shape != (B, T):
                raise ValueError(f"position_ids {position_ids.shape} does not match input_ids {(B, T)}")
            if T and (int(position_ids.min()) < 0 or int(position_ids.max()) >= self.config.block_size):
                raise ValueError(f"position_ids must be in [0, block_size={self.config.block_size}), got "
                                 f"{int(position_ids.min())}..{int(position_ids.max())}")
        key_padding_mask = None
        if kv_cache is not None:
            m = attention_mask if attention_mask is not None else xp.ones((B, T), dtype=bool)
            kv_cache.mask[:, past:past + T] = m.astype(bool)
            kv_cache.next_pos = position_ids[:, -1] + 1
            key_padding_mask = kv_cache.mask[:, :past + T]
            if bool(key_padding_mask.all()):
                key_padding_mask = None
        elif attention_mask is not None and not bool(attention_mask.all()):
            key_padding_mask = attention_mask

        tr = self.transformer
        x = tr.drop(tr.wte(ids) + tr.wpe(position_ids))  # (B, T, C)
        for i, block in enumerate(tr.h):
            x = block(x, key_padding_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.length += T
        return tr.ln_f(x)  # (B, T, C)

    def lm_logits(self, h: Tensor) -> Tensor:
        """LM head: hidden (B, T, C) -> logits (B, T, V)."""
        if self.lm_head is None:
            return F.linear(h, self.transformer.wte.weight)
        return self.lm_head(h)

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None,
                kv_cache: KVCache | None = None):
        """Logits (B, T, V) and, when ``labels`` (B, T) are given, the mean next-token loss.

        Labels are aligned with input_ids and shifted inside the loss: logits at t predict
        labels[t+1]; −100 is ignored; the mean is over non-ignored targets (nats/token).
        Returns ``(logits, loss)`` with loss None when no labels are given.
        """
        h = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache)
        logits = self.lm_logits(h)
        loss = None
        if labels is not None:
            labels = _as_ids(labels)
            if labels.shape != logits.shape[:2]:
                raise ValueError(f"labels {labels.shape} do not match input_ids {logits.shape[:2]}")
            loss = F.cross_entropy(logits, shift_labels(labels))
        return logits, loss

    def scores(self, input_ids, attention_mask=None, position_ids=None) -> Tensor:
        """Scalar head at every position: (B, T). Needs ``GPTConfig(scalar_head=True)``."""
        if self.score is None:
            raise ValueError("this GPT has no scalar head; build it with GPTConfig(scalar_head=True)")
        h = self.hidden_states(input_ids, attention_mask, position_ids)
        B, T, _ = h.shape
        return self.score(h).reshape(B, T)

    def sequence_logprobs(self, input_ids, labels, attention_mask=None) -> Tensor:
        """Σ_t log p(labels[t+1] | ids[≤t]) over positions where labels ≠ −100: (B,) nats.

        Summed (not averaged) as in the DPO paper and ``direct-preference-optimization``
        ``_get_batch_logps(average_log_prob=False)``. Differentiable.
        """
        logits, _ = self.forward(input_ids, attention_mask)
        nll = F.cross_entropy(logits, shift_labels(labels), reduction="none")  # (B, T)
        return -(nll.sum(axis=1))

    def response_logits(self, input_ids, attention_mask, prompt_length: int, temperature: float = 1.0,
                        hidden: Tensor | None = None) -> Tensor:
        """Logits / T at the N response slots of (B, P + N) sequences: (B, N, V), the state before each
        response token (position P − 1 + t predicts token P + t). ``hidden``: the trunk's output
        (B, P + N, C) when the caller already has it. Differentiable."""
        ids = backend.asarray(np.asarray(backend.to_numpy(input_ids)))
        L = ids.shape[1]
        h = self.hidden_states(ids, backend.asarray(np.asarray(backend.to_numpy(attention_mask)))) \
            if hidden is None else hidden                                 # (B, P+N, C)
        return self.lm_logits(h[:, prompt_length - 1:L - 1, :]) / temperature  # (B, N, V)

    def response_logprobs(self, input_ids, attention_mask, prompt_length: int, response_mask,
                          temperature: float = 1.0, logits: Tensor | None = None) -> Tensor:
        """Per-token log π(y_t | y_<t) of the response, under softmax(logits / T): (B, N) float32, 0 on padding.

        The one log-prob of a sampled response in the project: PPO's and GRPO's training forward,
        the reference log-probs and the KL that evaluation reports (chapters 09, 10, 14) all come
        from here, at the temperature the response was sampled with (docs/bugs.md C19).
        input_ids, attention_mask: (B, P + N), the prompt left-padded to ``prompt_length`` P, then
        the N response slots; response_mask (B, N): 1 on generated tokens. ``logits``: the
        ``response_logits`` when the caller already has them. Differentiable.
        """
        if logits is None:
            logits = self.response_logits(input_ids, attention_mask, prompt_length, temperature)
        ids = backend.asarray(np.asarray(backend.to_numpy(input_ids)))
        rm = backend.asarray(np.asarray(backend.to_numpy(response_mask))).astype(bool)
        targets = backend.xp().where(rm, ids[:, prompt_length:], IGNORE_INDEX)  # (B, N)
        return -F.cross_entropy(logits, targets, reduction="none")              # (B, N), 0 where masked

    # ---------------------------------------------------------------- generation
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                 pad_id: int = 0, rng: np.random.Generator | None = None, use_cache: bool = True) -> GenerateOutput:
        """Sample up to ``max_new_tokens`` after each prompt.

        input_ids: (B, T) left-padded prompts (or a list of id lists of any lengths, left-padded
        here with ``pad_id``); attention_mask: (B, T) 1 = real token. temperature 0 = greedy.
        top_k / top_p filter the distribution before sampling (note: log-probs are still those of
        the filtered distribution actually sampled from). EOS stops a row; later slots hold pad_id.
        ``use_cache=False`` recomputes the whole sequence each step (the reference the cache is
        tested against). Runs in eval mode under no_grad, with ``threads.phase("generate")``'s thread
        count (1 unless ``MINILLM_THREADS`` is set); restores the previous mode and threads.

        Raises ValueError if prompt + max_new_tokens exceeds block_size, temperature < 0, or
        temperature > 0 without an ``rng``.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be ≥ 0, got {temperature}")
        if temperature > 0 and rng is None:
            raise ValueError("sampling (temperature > 0) needs a numpy Generator rng for reproducibility")
        if isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], (list, tuple)):
            input_ids, attention_mask = left_pad(input_ids, pad_id)
        ids = backend.to_numpy(_as_ids(input_ids))
        B, T = ids.shape
        mask = np.ones((B, T), dtype=np.int64) if attention_mask is None else backend.to_numpy(
            attention_mask.data if isinstance(attention_mask, Tensor) else attention_mask).astype(np.int64)
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                             f"block_size={self.config.block_size}")
        was_training = self.training
        self.eval()
        seq, seq_mask = ids.copy(), mask.copy()
        new = np.full((B, max_new_tokens), pad_id, dtype=np.int64)
        logps = np.zeros((B, max_new_tokens), dtype=np.float32)
        resp_mask = np.zeros((B, max_new_tokens), dtype=np.int64)
        finished = np.zeros(B, dtype=bool)
        try:
            with no_grad(), threads.phase("generate"):  # decoding: 1 thread unless MINILLM_THREADS says
                cache = (KVCache(self.config, B, T + max_new_tokens, dtype=self.transformer.wte.weight.dtype)
                         if use_cache else None)
                step_ids, step_mask = seq, seq_mask
                for t in range(max_new_tokens):
                    if use_cache:
                        h = self.hidden_states(backend.asarray(step_ids), backend.asarray(step_mask), kv_cache=cache)
                    else:
                        h = self.hidden_states(backend.asarray(seq), backend.asarray(seq_mask))
                    logits = backend.to_numpy(self.lm_logits(h[:, -1, :]).data).astype(np.float32)  # (B, V)
                    tok, lp = sample_next(logits, temperature, top_k, top_p, rng)
                    tok = np.where(finished, pad_id, tok)
                    new[:, t] = tok
                    logps[:, t] = np.where(finished, 0.0, lp)
                    resp_mask[:, t] = ~finished
                    if eos_id is not None:
                        finished |= tok == eos_id
                    # finished rows keep feeding pads (masked out) so shapes stay rectangular
                    step_ids = tok[:, None]
                    step_mask = resp_mask[:, t:t + 1]
                    seq = np.concatenate([seq, step_ids], axis=1)
                    seq_mask = np.concatenate([seq_mask, step_mask], axis=1)
                    if finished.all():
                        new, logps, resp_mask = new[:, :t + 1], logps[:, :t + 1], resp_mask[:, :t + 1]
                        break
        finally:
            self.train(was_training)
        return GenerateOutput(sequences=np.concatenate([ids, new], axis=1), new_tokens=new, logprobs=logps,
                              response_mask=resp_mask, finished=finished, prompt_mask=mask)


def shift_labels(labels):
    """targets[t] = labels[t+1], with −100 in the last slot: (B, T) -> (B, T), int64."""
    labels = labels.data if isinstance(labels, Tensor) else labels
    xp = backend.get_array_module(labels) if hasattr(labels, "dtype") else np
    labels = xp.asarray(labels, dtype=np.int64)
    out = xp.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def left_pad(sequences: list, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad id lists to one (B, T) array; returns (input_ids, attention_mask)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad: every prompt needs at least one token")
    T = max(len(s) for s in sequences)
    ids = np.full((len(sequences), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), T), dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    return ids, mask


def sample_next(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
                rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Pick one token per row of ``logits`` (B, V): greedy when temperature == 0, else sample from
    softmax(logits / temperature) after optional top-k / top-p (nucleus, Holtzman et al. 2020)
    filtering. Returns (tokens (B,) int64, their log-probabilities (B,) float32 under the
    distribution sampled from)."""
    B, V = logits.shape
    if temperature == 0:
        tok = logits.argmax(axis=1)
        z = logits - logits.max(axis=1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return tok.astype(np.int64), lp[np.arange(B), tok].astype(np.float32)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < V:
        kth = np.sort(z, axis=1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=1)
        keep_sorted = (np.cumsum(sorted_p, axis=1) - sorted_p) < top_p  # always keeps the first
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=1, keepdims=True)
    u = rng.random(B)
    cdf = np.cumsum(p, axis=1)
    tok = np.minimum((cdf < u[:, None]).sum(axis=1), V - 1)
    # never pick a zero-probability token through rounding at the end of the cdf
    tok = np.where(p[np.arange(B), tok] > 0, tok, p.argmax(axis=1))
    return tok.astype(np.int64), np.log(p[np.arange(B), tok]).astype(np.float32)
