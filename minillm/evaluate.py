"""Evaluation: exact match, "answer contained", format compliance and gold reward per task type,
zero-shot and k-shot prompting of a base model, and the KL of a policy to a reference.

Scope
    ``generate_responses`` runs batched, left-padded generation with the KV cache and decodes
    each response up to its ``<|eos|>``. ``evaluate_world`` asks the built-in task world's
    questions (zero-shot in the chat template, or k-shot with ``build_kshot_prompt``) and scores
    every response with the gold judge (judge.GoldJudge):
    exact_match (the answer exactly, after stripping one "Sure!" opener and the final "."),
    contains (the answer appears as words anywhere: a base model often states a fact it knows but
    not in the asked form), format_compliance (the response is one line ending in "." and the
    model stopped with ``<|eos|>``: it answered, then stopped), gold (the judge's total), the opener
    rate, the mean response length in tokens, and exact match per task type.
    ``sequence_kl`` is the summed per-token log-ratio log π(y_t) − log π_ref(y_t) over the
    response tokens of sampled sequences (nats), the KL estimate RLHF reports.
    ``sample_diversity`` samples n responses per prompt at one temperature and reports
    ``diversity_metrics``: distinct-1/distinct-2 across a prompt's samples, the mean per-token
    entropy of the sampling distribution, and the fraction of prompts whose n samples are all
    identical (the "reduced output diversity" RLHF is said to cause).

Sources
    Exact-match/contains metrics as in docs/task-world.md §4; the KL estimator k1 of Schulman,
    "Approximating KL divergence" (2020), as logged by TRL (``objective/kl``). distinct-n: Li et al.
    2016, "A Diversity-Promoting Objective Function for Neural Conversation Models" (NAACL), §4.3
    (unique n-grams / all n-grams); diversity across samples of one prompt as in Kirk et al. 2024,
    "Understanding the Effects of RLHF on LLM Generalisation and Diversity" (ICLR), §3 (per-input
    diversity of a set of outputs).

Deviations
    * distinct-n is computed on token ids (not words), per prompt over its n samples, then averaged
      over the prompts that have at least one n-gram; Li et al. pool all responses of a test set.
    * A k-shot prompt longer than ``block_size − max_new_tokens`` is cut from the left (its first
      token, ``<|bos|>``, is kept), so the earliest demonstration may lose its beginning; use fewer
      shots or a larger block_size to avoid it. ``EvalResult.n_truncated_prompts`` counts it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from minillm import backend
from minillm.data import render_prompt
from minillm.model import GPT, left_pad
from minillm.judge import GoldJudge
from minillm.tensor import no_grad


@dataclass
class Generation:
    """One decoded response: text (without ``<|eos|>``), ended (emitted EOS), ids (new tokens incl. EOS),
    logprob (summed log-probability of the sampled tokens, nats)."""

    text: str
    ended: bool
    ids: list
    logprob: float = 0.0


def generate_responses(model: GPT, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 12,
                       batch_size: int = 64, temperature: float = 0.0, rng: np.random.Generator | None = None,
                       top_k: int | None = None, top_p: float | None = None) -> list[Generation]:
    """Generate after each prompt (lists of ids), batched with left padding; returns Generations in order.

    Prompts are grouped by length to waste little padding; with greedy decoding the result does not
    depend on the grouping (a padded row gives what it gives alone, docs/bugs.md B08); when sampling, the
    shared ``rng`` is drawn in that grouped order (reproducible for the same prompts and seed).
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = left_pad([list(prompts[i]) for i in idx], tokenizer.pad_id)
        g = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, rng=rng)
        for row, i in enumerate(idx):
            n = int(g.response_mask[row].sum())
            toks = [int(t) for t in g.new_tokens[row, :n]]
            ended = bool(g.finished[row])
            text_ids = toks[:-1] if ended else toks
            out[i] = Generation(tokenizer.decode(text_ids), ended, toks, float(g.logprobs[row, :n].sum()))
    return out  # type: ignore[return-value]


def prompt_ids_for(tokenizer, question: str, shots: Sequence[tuple[str, str]] = (), max_len: int | None = None
                   ) -> tuple[list[int], bool]:
    """Ids of a zero-shot chat prompt (no shots) or a k-shot prompt (the shots as earlier chat
    turns: the ids of ``build_kshot_prompt``'s text), cut from the left to ``max_len`` keeping
    ``<|bos|>``. Both are built by ``render_prompt`` (special tokens by id, question and shot text
    encoded as ordinary text), so a question containing ``[/INST]`` or ``<|eos|>`` cannot close
    its turn early. Returns (ids, truncated)."""
    msgs: list[dict] = []
    for q, r in shots:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    ids = render_prompt(msgs + [{"role": "user", "content": question}], tokenizer)
    if max_len is not None and len(ids) > max_len:
        return [ids[0]] + ids[len(ids) - max_len + 1:], True
    return list(ids), False


@dataclass
class EvalResult:
    """Metrics of one evaluation (fractions in [0, 1], gold in judge units, lengths in tokens).

    metrics: exact_match, contains, format_compliance, gold, opener_rate, mean_length, n.
    per_task: task -> {exact_match, contains, gold, n}. samples: a few (prompt, response) pairs.
    """

    metrics: dict
    per_task: dict
    samples: list = field(default_factory=list)
    n_truncated_prompts: int = 0


def evaluate_world(model: GPT, tokenizer, records: Sequence[dict], judge: GoldJudge | None = None, k_shot: int = 0,
                   max_new_tokens: int = 16, batch_size: int = 64, max_prompts: int | None = None,
                   temperature: float = 0.0, seed: int = 0, n_samples: int = 5) -> EvalResult:
    """Ask the task world's questions and score the answers with the gold judge.

    records: dicts with ``instruction`` and ``task`` (tasks.TaskWorld.sft_test_records() etc.);
    ``max_prompts`` takes an evenly spaced subset (deterministic). k_shot > 0 builds k-shot prompts
    from the world's train facts of the same relation (``TaskWorld.kshot_shots``).
    """
    judge = judge or GoldJudge()
    recs = list(records)
    if max_prompts is not None and max_prompts < len(recs):
        recs = [recs[int(i)] for i in np.linspace(0, len(recs) - 1, max_prompts).round().astype(int)]
    limit = model.config.block_size - max_new_tokens
    prompts, n_trunc = [], 0
    for r in recs:
        shots = judge.world.kshot_shots(judge.fact_for(r["instruction"]), k=k_shot) if k_shot else ()
        ids, cut = prompt_ids_for(tokenizer, r["instruction"], shots, limit)
        prompts.append(ids)
        n_trunc += cut
    rng = np.random.default_rng(seed) if temperature > 0 else None
    gens = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, rng)
    return score_generations(recs, gens, judge, n_samples, n_trunc)


def score_generations(records: Sequence[dict], gens: Sequence[Generation], judge: GoldJudge,
                      n_samples: int = 5, n_truncated: int = 0) -> EvalResult:
    """Aggregate the judge's scores of ``gens`` (one per record) into an EvalResult."""
    per_task: dict = defaultdict(lambda: defaultdict(float))
    tot: dict = defaultdict(float)
    samples = []
    for r, g in zip(records, gens):
        j = judge.score(r["instruction"], g.text, ended=g.ended)
        fmt = float(j.well_formed)
        vals = {"exact_match": j.correct, "contains": float(j.contains), "format_compliance": fmt,
                "gold": j.total, "opener_rate": float(j.opener), "mean_length": float(len(g.ids))}
        for k, v in vals.items():
            tot[k] += v
        t = per_task[r.get("task", "all")]
        t["exact_match"] += j.correct
        t["contains"] += float(j.contains)
        t["gold"] += j.total
        t["n"] += 1
        if len(samples) < n_samples:
            samples.append((r["instruction"], g.text))
    n = max(len(records), 1)
    metrics = {k: v / n for k, v in tot.items()}
    metrics["n"] = len(records)
    tasks = {}
    for k in sorted(per_task):
        d = per_task[k]
        tasks[k] = {m: d[m] / d["n"] for m in ("exact_match", "contains", "gold")} | {"n": int(d["n"])}
    return EvalResult(metrics, tasks, samples, n_truncated)


def response_logprobs(model: GPT, sequences: np.ndarray, attention_mask: np.ndarray, response_mask: np.ndarray,
                      temperature: float = 1.0) -> np.ndarray:
    """Per-token log π(y_t | y_<t) under softmax(logits / T) for the response part of sampled sequences
    (``GPT.response_logprobs``, the same function PPO trains with), as host float32.

    sequences (B, P + N) = left-padded prompt (length P) + N generated tokens; attention_mask
    (B, P + N); response_mask (B, N). Returns (B, N) float32, 0 where response_mask is 0. Under no_grad.
    """
    L, N = sequences.shape[1], response_mask.shape[1]
    with no_grad():
        lp = model.response_logprobs(sequences, attention_mask, L - N, response_mask, temperature)  # (B, N)
    return backend.to_numpy(lp.data).astype(np.float32)


def sequence_kl(policy: GPT, reference: GPT, sequences: np.ndarray, attention_mask: np.ndarray,
                response_mask: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per-sequence KL estimate Σ_t (log π(y_t) − log π_ref(y_t)) over response tokens (k1), nats: (B,).

    Unbiased for KL(π‖π_ref) when y was sampled from π at this temperature (docs/bugs.md B18).
    """
    lp = response_logprobs(policy, sequences, attention_mask, response_mask, temperature)
    lr = response_logprobs(reference, sequences, attention_mask, response_mask, temperature)
    return ((lp - lr) * response_mask).sum(axis=1)


def _ngrams(seq: Sequence[int], k: int) -> list[tuple]:
    return [tuple(seq[i:i + k]) for i in range(len(seq) - k + 1)]


def diversity_metrics(samples: Sequence[Sequence[Sequence[int]]], token_entropies: Sequence[float] | None = None
                      ) -> dict:
    """Diversity of n sampled responses per prompt (pure; token ids in, floats out).

    Args:
        samples: ``samples[p][j]`` is the j-th response to prompt p as a sequence of token ids
            (without ``<|eos|>``); every prompt needs at least 2 samples.
        token_entropies: optional flat sequence of per-token entropies (nats) of the sampling
            distribution at every sampled response token, all prompts together.
    Returns:
        dict of floats: ``distinct_1``, ``distinct_2`` -- for each prompt, unique k-grams / all
        k-grams over its samples, averaged over the prompts with at least one k-gram (nan if none);
        ``all_identical`` -- fraction of prompts whose samples are all equal; ``entropy`` -- mean of
        ``token_entropies`` (nan without them); ``n_prompts``, ``n_samples`` (per prompt, the
        smallest).
        Example: samples [[[1, 2, 3], [1, 2, 4]], [[5], [5]]] -> distinct_1 (4/6 + 1/2)/2 =
        0.583333, distinct_2 3/4 = 0.75 (the second prompt has no bigram), all_identical 0.5.
    Raises:
        ValueError: no prompts, or a prompt with fewer than 2 samples.
    Source: Li et al. 2016 §4.3 (distinct-n); Kirk et al. 2024 §3 (per-input diversity).
    """
    if len(samples) == 0:
        raise ValueError("diversity_metrics: no prompts")
    for p, group in enumerate(samples):
        if len(group) < 2:
            raise ValueError(f"diversity_metrics: prompt {p} has {len(group)} sample(s); diversity needs at least 2")
    out: dict = {}
    for k in (1, 2):
        ratios = []
        for group in samples:
            grams = [g for seq in group for g in _ngrams([int(t) for t in seq], k)]
            if grams:
                ratios.append(len(set(grams)) / len(grams))
        out[f"distinct_{k}"] = float(np.mean(ratios)) if ratios else float("nan")
    same = [all(list(map(int, s)) == list(map(int, group[0])) for s in group[1:]) for group in samples]
    out["all_identical"] = float(np.mean(same))
    ent = np.asarray(token_entropies if token_entropies is not None else [], dtype=np.float64)
    out["entropy"] = float(ent.mean()) if ent.size else float("nan")
    out["n_prompts"] = len(samples)
    out["n_samples"] = int(min(len(g) for g in samples))
    return out


def sample_diversity(model: GPT, tokenizer, questions: Sequence[str], n: int = 8, temperature: float = 0.7,
                     max_new_tokens: int = 16, seed: int = 0, batch_size: int = 64) -> dict:
    """Sample ``n`` responses per question at ``temperature`` and measure ``diversity_metrics``.

    Args:
        model: the policy (GPT); tokenizer: its tokenizer; questions: user instructions (rendered
            zero-shot in the chat template); n ≥ 2 samples per question; temperature > 0.
    Returns:
        ``diversity_metrics`` plus ``temperature``; the entropy is that of softmax(logits / T) at
        each sampled response token (``<|eos|>`` included), nats, averaged over all of them.
    Raises:
        ValueError: n < 2 or temperature ≤ 0.
    """
    from minillm.train.ppo_objective import token_entropy

    if n < 2:
        raise ValueError(f"sample_diversity: n must be ≥ 2, got {n}")
    if not temperature > 0:
        raise ValueError(f"sample_diversity: temperature must be > 0, got {temperature}")
    limit = model.config.block_size - max_new_tokens
    prompts = [prompt_ids_for(tokenizer, q, (), limit)[0] for q in questions]
    rng = np.random.default_rng([seed, 14])
    groups: list[list[list[int]]] = [[] for _ in prompts]
    ents: list[np.ndarray] = []
    flat = [i for i in range(len(prompts)) for _ in range(n)]
    xp = backend.xp()
    for s in range(0, len(flat), batch_size):
        idx = flat[s:s + batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], tokenizer.pad_id)
        g = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, rng=rng)
        P = g.prompt_mask.shape[1]
        L = g.sequences.shape[1]
        attn = np.concatenate([g.prompt_mask, g.response_mask], axis=1)
        with no_grad():
            logits, _ = model(xp.asarray(g.sequences), attention_mask=xp.asarray(attn))
        z = backend.to_numpy(logits.data[:, P - 1:L - 1, :]) / temperature  # (B, N, V)
        ent = token_entropy(z)  # (B, N)
        ents.append(ent[g.response_mask.astype(bool)])
        for row, i in enumerate(idx):
            m = int(g.response_mask[row].sum())
            toks = [int(t) for t in g.new_tokens[row, :m]]
            groups[i].append(toks[:-1] if g.finished[row] else toks)
    out = diversity_metrics(groups, np.concatenate(ents))
    out["temperature"] = float(temperature)
    return out
