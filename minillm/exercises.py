"""The checkers of the notebooks' exercises (course plumbing; ``notebook.check_exercise`` is the entry).

Scope
    One checker per exercise id ("05.1"): it runs a learner's function against the library and
    returns a one-line description when the answer agrees, or raises ``ExerciseFailed`` naming the
    first disagreement (element, value, expected). ``check_exercise`` reports a function that still
    raises ``NotImplementedError`` as "not attempted". ``tests/test_notebooks.py`` runs every checker
    on a reference solution (must pass) and on a wrong one (must fail), so no checker can accept
    everything.

Sources
    Each checker compares with the library function the chapter teaches (named in its docstring).

Deviations
    None: this module teaches nothing itself.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


class ExerciseFailed(AssertionError):
    """A learner's answer disagrees with the library; the message says where."""


def _close(name: str, got, want, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise ExerciseFailed(f"{name}: shape {got.shape}, expected {want.shape}")
    if not np.allclose(got, want, atol=atol, rtol=rtol):
        i = int(np.argmax(np.abs(got - want)))
        raise ExerciseFailed(f"{name}: element {np.unravel_index(i, got.shape)} is {got.reshape(-1)[i]:.6g}, "
                             f"expected {want.reshape(-1)[i]:.6g}")


def _ex_01_1(fn: Callable) -> str:
    """fn(x: float64 array) -> d/dx sum(tanh(x)^2), analytically."""
    from minillm import functional as F
    from minillm.tensor import Tensor

    x = np.random.default_rng(1).standard_normal((3, 4))
    t = Tensor(x, requires_grad=True)
    F.sum(F.mul(F.tanh(t), F.tanh(t))).backward()
    _close("gradient of sum(tanh(x)^2)", fn(x.copy()), t.grad, atol=1e-9)
    return "matches minillm's backward of sum(tanh(x)**2)"


def _ex_01_2(fn: Callable) -> str:
    """fn(logits (N, V) float64, targets (N,) int with -100 = ignore) -> d mean-CE / d logits."""
    from minillm import functional as F
    from minillm.tensor import Tensor

    rng = np.random.default_rng(2)
    z = rng.standard_normal((5, 7))
    y = rng.integers(0, 7, 5)
    y[1] = -100
    t = Tensor(z, requires_grad=True)
    F.cross_entropy(t, y).backward()
    _close("d cross_entropy / d logits", fn(z.copy(), y.copy()), t.grad, atol=1e-9)
    return "matches functional.cross_entropy's backward (with ignore_index=-100)"


def _ex_02_1(fn: Callable) -> str:
    """fn(ids: list[int], pair: tuple[int, int], new_id: int) -> ids with every occurrence of pair merged."""
    from minillm.tokenizer import merge_pair

    cases = [([1, 2, 3, 1, 2], (1, 2), 9), ([5, 5, 5, 5], (5, 5), 7), ([5, 5, 5], (5, 5), 7), ([], (1, 2), 3),
             ([1, 3, 2], (1, 2), 4)]
    for ids, pair, new in cases:
        got, want = list(fn(list(ids), pair, new)), merge_pair(ids, pair, new)
        if got != want:
            raise ExerciseFailed(f"merge {pair}->{new} in {ids}: got {got}, expected {want}")
    return "matches tokenizer.merge_pair on 5 cases (overlapping pairs included)"


def _ex_02_2(fn: Callable) -> str:
    """fn(T: int) -> (T, T) boolean causal mask, True where query t may attend to key s (s <= t)."""
    from minillm import functional as F
    from minillm.tensor import Tensor

    rng = np.random.default_rng(3)
    T = 5
    q, k, v = (Tensor(rng.standard_normal((1, 1, T, 4))) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, causal=True).data
    mask = np.asarray(fn(T), dtype=bool)
    if mask.shape != (T, T):
        raise ExerciseFailed(f"mask shape {mask.shape}, expected {(T, T)}")
    s = (q.data @ k.data.swapaxes(-1, -2)) / math.sqrt(4)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    _close("attention with your mask", p @ v.data, ref, atol=1e-6)
    return "attention with this mask equals functional.scaled_dot_product_attention(causal=True)"


def _ex_03_1(fn: Callable) -> str:
    """fn(question, shots) -> the 'plain' k-shot prompt text."""
    from minillm.tasks import build_kshot_prompt

    shots = [("What is the capital of Peru?", "Lima."), ("What is the opposite of hot?", "Cold.")]
    for k in (0, 1, 2):
        got, want = fn("What sound does a cow make?", shots[:k]), build_kshot_prompt(
            "What sound does a cow make?", shots[:k], template="plain")
        if got != want:
            raise ExerciseFailed(f"{k}-shot prompt:\n{got!r}\nexpected\n{want!r}")
    return "matches tasks.build_kshot_prompt(template='plain') for k = 0, 1, 2"


def _ex_03_2(fn: Callable) -> str:
    """fn(response: str, answer: str) -> bool: the answer appears as words in the response (case-insensitive)."""
    cases = [("The capital of Peru is Lima.", "Lima", True), ("Limassol is in Cyprus.", "Lima", False),
             ("lima, of course", "Lima", True), ("Sure! Red.", "red", True), ("", "red", False),
             ("It is dark red.", "dark red", True), ("It is darker red.", "dark red", False)]
    for resp, ans, want in cases:
        got = bool(fn(resp, ans))
        if got != want:
            raise ExerciseFailed(f"contains({resp!r}, {ans!r}) = {got}, expected {want}")
    return "answers 7 cases as the 'contains' metric does (whole words, case-insensitive)"


def _ex_04_1(fn: Callable) -> str:
    """fn(input_ids (T,), loss_mask (T,)) -> labels (T,) with -100 where no loss (unshifted, as HF)."""
    from minillm.data import render_chat
    from minillm.tokenizer import Tokenizer
    from minillm.tasks import tokenizer_training_text

    tok = Tokenizer.train(tokenizer_training_text()[:20000], vocab_size=300)
    msgs = [{"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    ids, mask = render_chat(msgs, tok)
    want = np.where(np.asarray(mask) == 1, np.asarray(ids), -100)
    got = np.asarray(fn(np.asarray(ids), np.asarray(mask)))
    if got.shape != want.shape or not np.array_equal(got, want):
        raise ExerciseFailed(f"labels {got.tolist()}\nexpected {want.tolist()}")
    return "labels equal the collated labels: ids on response tokens, -100 elsewhere"


def _ex_04_2(fn: Callable) -> str:
    """fn(logits (B, T, V), labels (B, T)) -> mean next-token CE over labels != -100 (shift inside)."""
    from minillm import functional as F
    from minillm.model import shift_labels
    from minillm.tensor import Tensor

    rng = np.random.default_rng(4)
    z = rng.standard_normal((2, 6, 11)).astype(np.float32)
    y = rng.integers(0, 11, (2, 6))
    y[:, :3] = -100
    want = F.cross_entropy(Tensor(z.reshape(-1, 11)), shift_labels(y).reshape(-1)).item()
    _close("response-only loss", fn(z.copy(), y.copy()), want, atol=1e-5)
    return "equals the model's shifted cross-entropy with ignore_index=-100"


def _ex_05_1(fn: Callable) -> str:
    """fn(in_features, out_features, r) -> number of LoRA parameters."""
    for (i, o, r) in ((4096, 4096, 8), (4096, 11008, 16), (128, 384, 1), (7, 3, 2)):
        want = r * (i + o)
        if int(fn(i, o, r)) != want:
            raise ExerciseFailed(f"LoRA on Linear({i}, {o}) with r={r}: got {fn(i, o, r)}, expected {want}")
    return "r * (in + out) for 4 shapes, e.g. 65,536 for r=8 on 4096x4096"


def _ex_05_2(fn: Callable) -> str:
    """fn(W (out, in), A (r, in), B (out, r), alpha, r) -> merged weight."""
    from minillm.lora import LoRALinear
    from minillm.nn import Linear

    base = Linear(6, 5, rng=np.random.default_rng(5))
    layer = LoRALinear(base, r=3, lora_alpha=6, init_lora_weights=False, rng=np.random.default_rng(6))
    W = base.weight.data.copy()
    A, B = layer.lora_A.data.copy(), layer.lora_B.data.copy()
    layer.merge()
    _close("merged weight", fn(W, A, B, 6.0, 3), base.weight.data, atol=1e-6)
    return "equals LoRALinear.merge(): W + (alpha / r) * B @ A"


def _ex_06_1(fn: Callable) -> str:
    """fn(blocksize, double_quant) -> bits per parameter of NF4 storage (no code tables)."""
    from minillm.quant import bits_per_parameter, quantize_4bit

    W = np.random.default_rng(7).standard_normal((256, 1024)).astype(np.float32)
    for bs in (64, 128):
        for dq in (False, True):
            packed, qs = quantize_4bit(W, blocksize=bs, compress_statistics=dq)
            want = bits_per_parameter(packed, qs)
            _close(f"bits/param (blocksize {bs}, double quant {dq})", fn(bs, dq), want, atol=2e-3, rtol=0)
    return "matches bits measured from quantize_4bit's arrays for blocksize 64/128, with and without DQ"


def _ex_06_2(fn: Callable) -> str:
    """fn(x (n,) float32, code (16,), blocksize) -> dequantized x (absmax scaling, nearest code)."""
    from minillm.quant import NF4_CODE, dequantize_4bit, quantize_4bit

    x = np.random.default_rng(8).standard_normal(1024).astype(np.float32)
    want = dequantize_4bit(*quantize_4bit(x, blocksize=64))
    got = np.asarray(fn(x.copy(), NF4_CODE.copy(), 64), dtype=np.float32)
    _close("NF4 round trip", got, want, atol=1e-6, rtol=0)
    return "equals dequantize_4bit(quantize_4bit(x)) on 1024 normal values"


def _ex_07_1(fn: Callable) -> str:
    """fn(n_params) -> bytes saved by double quantization (blocksize 64, second blocksize 256)."""
    from minillm.memory import quant_constants_bytes

    for n in (64 * 256 * 1000, 70_000_000_000):
        want = quant_constants_bytes(n, double_quant=False) - quant_constants_bytes(n, double_quant=True)
        _close(f"DQ saving for {n:,} parameters", fn(n), want, rtol=1e-3, atol=8)
    return "matches memory.quant_constants_bytes (about 3.26 GB at 70e9 parameters)"


def _ex_07_2(fn: Callable) -> str:
    """fn(n_elements, page_size, device_budget) -> (pages needed, pages resident at most)."""
    for n, ps, budget in ((100_000, 65536, 2 * 65536), (8192, 65536, None), (1, 64, 640), (10**6, 4096, 4096 * 7)):
        pages = max(1, -(-n * 8 // ps))
        want = (pages, pages if budget is None else min(pages, budget // ps))
        got = tuple(int(v) for v in fn(n, ps, budget))
        if got != want:
            raise ExerciseFailed(f"n={n}, page_size={ps}, budget={budget}: got {got}, expected {want}")
    return "matches PagedAdamW's page accounting (8 bytes of state per element)"


def _ex_11_1(fn: Callable) -> str:
    """fn(x (M, K) float32, packed, quant_state) -> x @ W.T without materialising all of W at once."""
    from minillm.kernels import matmul_4bit
    from minillm.quant import quantize_4bit

    rng = np.random.default_rng(9)
    W = rng.standard_normal((48, 256)).astype(np.float32)
    packed, qs = quantize_4bit(W, blocksize=64, compress_statistics=True)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    _close("x @ W.T", fn(x, packed, qs), matmul_4bit(x, packed, qs, kernel="numpy"), atol=1e-4, rtol=1e-4)
    return "equals kernels.matmul_4bit(kernel='numpy') on a 48x256 NF4 weight with DQ"


def _ex_11_2(fn: Callable) -> str:
    """fn(M, K, N) -> bytes a fused NF4 GEMV moves (packed W + fp32 absmax per 64, x and y in fp16)."""
    for M, K, N in ((1, 4096, 4096), (1, 8192, 8192), (4, 4096, 11008)):
        want = K * N // 2 + 4 * (K * N // 64) + 2 * M * K + 2 * M * N
        if int(fn(M, K, N)) != want:
            raise ExerciseFailed(f"M={M}, K={K}, N={N}: got {fn(M, K, N)}, expected {want}")
    return "byte counts match for 3 shapes (4-bit codes + fp32 absmax + fp16 x and y)"


def _ex_08_1(fn: Callable) -> str:
    """fn(r_chosen (N,), r_rejected (N,)) -> mean Bradley-Terry loss (float, finite for any difference)."""
    from minillm.tensor import Tensor
    from minillm.train.reward import reward_loss

    rng = np.random.default_rng(8)
    rc, rr = rng.standard_normal(6) * 3, rng.standard_normal(6) * 3
    rc[0], rr[0] = -1000.0, 0.0
    want = float(reward_loss(Tensor(rc), Tensor(rr))[0].item())
    got = float(fn(rc.copy(), rr.copy()))
    if not math.isfinite(got):
        raise ExerciseFailed(f"loss is {got} (a pair with r_c - r_r = -1000 must cost 1000 nats, not overflow)")
    _close("Bradley-Terry loss", got, want, atol=1e-6)
    return "matches train.reward.reward_loss, including a pair with r_c - r_r = -1000"


def _ex_08_2(fn: Callable) -> str:
    """fn(attention_mask (B, T) 0/1) -> (B,) index of each row's last real token."""
    from minillm.model import last_token_index

    masks = [np.array([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1],
                       [0, 1, 0, 0, 0, 0, 0, 0]]),
             (np.arange(9)[None, :] < np.array([[3], [9], [1]])).astype(np.int64)]
    for m in masks:
        got, want = np.asarray(fn(m.copy())), last_token_index(m)
        if got.shape != want.shape or not np.array_equal(got, want):
            raise ExerciseFailed(f"mask\n{m}\ngave {got.tolist()}, expected {want.tolist()}")
    return "matches model.last_token_index for right, left and no padding"


def _ex_09_1(fn: Callable) -> str:
    """fn(logprobs (B, N), ref_logprobs (B, N), mask (B, N), scores (B,), beta) -> per-token rewards (B, N)."""
    from minillm.train.ppo_objective import per_token_rewards

    rng = np.random.default_rng(9)
    lp, ref = -rng.random((3, 5)).astype(np.float32) * 3, -rng.random((3, 5)).astype(np.float32) * 3
    mask = (np.arange(5)[None, :] < np.array([[5], [2], [4]])).astype(np.int64)
    scores = rng.standard_normal(3).astype(np.float32)
    for beta in (0.0, 0.1):
        want, _ = per_token_rewards(lp, ref, mask, scores, beta)
        _close(f"rewards (beta={beta})", fn(lp.copy(), ref.copy(), mask.copy(), scores.copy(), beta), want, atol=1e-5)
    return "matches train.ppo_objective.per_token_rewards (k1) for beta 0 and 0.1, the score on each row's last real token"


def _ex_09_2(fn: Callable) -> str:
    """fn(rewards (N,), values (N,), gamma, lam) -> GAE advantages (N,)."""
    from minillm.train.ppo_objective import compute_gae

    rng = np.random.default_rng(10)
    cases = [(np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.5, 0.5]), 1.0, 0.95),
             (rng.standard_normal(7), rng.standard_normal(7), 0.9, 0.8)]
    for r, v, g, lam in cases:
        _close(f"advantages (gamma={g}, lam={lam})", fn(r.copy(), v.copy(), g, lam), compute_gae(r, v, None, g, lam)[0],
               atol=1e-9)
    return "matches train.ppo_objective.compute_gae (the worked example of docs/reference.md §6: A = [0.45125, 0.475, 0.5])"


def _ex_09_3(fn: Callable) -> str:
    """fn(new_logprobs, old_logprobs, advantages, mask (B, N), cliprange) -> clipped surrogate loss (float)."""
    from minillm.train.ppo_objective import ppo_policy_loss

    rng = np.random.default_rng(11)
    old = -rng.random((4, 6)) * 2
    new = old + rng.standard_normal((4, 6)) * 0.4
    adv = rng.standard_normal((4, 6))
    mask = (np.arange(6)[None, :] < np.array([[6], [3], [1], [5]])).astype(np.float64)
    want = float(ppo_policy_loss(new, old, adv, mask, 0.2)[0].item())
    _close("clipped surrogate loss", float(fn(new.copy(), old.copy(), adv.copy(), mask.copy(), 0.2)), want, atol=1e-6)
    return "matches train.ppo_objective.ppo_policy_loss (masked mean of max(-A*ratio, -A*clip(ratio)))"


def _ex_10_1(fn: Callable) -> str:
    """fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected (B,), beta) -> mean DPO loss (float)."""
    from minillm.train.dpo import dpo_loss

    rng = np.random.default_rng(12)
    a = [-rng.random(5) * 20 for _ in range(4)]
    a[0][0], a[2][0] = -5000.0, -10.0  # beta*h = -499: the loss must stay finite
    for beta in (0.1, 0.5):
        want = float(dpo_loss(*a, beta=beta)[0].item())
        _close(f"DPO loss (beta={beta})", float(fn(*(x.copy() for x in a), beta)), want, atol=1e-5)
    return "matches train.dpo.dpo_loss (Eq. 7), finite for a badly wrong pair"


def _ex_10_2(fn: Callable) -> str:
    """fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected (B,), beta) -> implicit-reward margins (B,)."""
    from minillm.train.dpo import dpo_loss

    rng = np.random.default_rng(13)
    a = [-rng.random(6) * 20 for _ in range(4)]
    want = np.array([dpo_loss(*(x[i:i + 1] for x in a), beta=0.1)[1]["rewards/margins"] for i in range(6)])
    _close("implicit-reward margins", fn(*(x.copy() for x in a), 0.1), want, atol=1e-5)
    return "matches the rewards/margins of train.dpo.dpo_loss pair by pair"


def _ex_12_1(fn: Callable) -> str:
    """fn(scores (n_max, P), n) -> (P,) index of the sample best-of-n keeps (the first n samples only)."""
    rng = np.random.default_rng(14)
    scores = rng.standard_normal((8, 10))
    for n in (1, 2, 4, 8):
        got, want = np.asarray(fn(scores.copy(), n)), scores[:n].argmax(axis=0)  # as pipeline_stages.stage_best_of_n
        if got.shape != want.shape or not np.array_equal(got, want):
            raise ExerciseFailed(f"n={n}: got {got.tolist()}, expected {want.tolist()}")
    return "picks the samples pipeline_stages.stage_best_of_n keeps for n = 1, 2, 4, 8"


def _ex_12_2(fn: Callable) -> str:
    """fn(costs (M,), qualities (M,)) -> sorted list of the methods no other method dominates
    (another with cost <= and quality >=, one of them strictly)."""
    cases = [([1, 2, 3, 4], [0.1, 0.5, 0.4, 0.9], [0, 1, 3]), ([5, 5, 1], [0.2, 0.3, 0.3], [2]),
             ([1, 1], [0.5, 0.5], [0, 1]), ([3, 1, 2], [0.9, 0.1, 0.5], [0, 1, 2])]
    for c, q, want in cases:
        got = sorted(int(i) for i in fn(np.array(c, float), np.array(q, float)))
        if got != want:
            raise ExerciseFailed(f"costs {c}, qualities {q}: got {got}, expected {want}")
    return "finds the cost/quality Pareto front in 4 cases (ties kept)"


def _ex_13_1(fn: Callable) -> str:
    """fn(query (list of str terms), docs (list of list of str terms), k1, b) -> (N,) BM25 scores, Lucene IDF."""
    from minillm.retrieval import BM25Index

    docs = [["cat", "sat", "on", "the", "mat"], ["cat", "cat", "dog"], ["bird"], ["dog", "and", "bird", "and", "cat"]]
    for query, k1, b in ((["cat"], 1.5, 0.75), (["cat", "dog", "dog"], 1.5, 0.75), (["bird", "mat", "fish"], 1.2, 0.0),
                         (["cat", "and"], 0.0, 1.0), (["fish"], 1.5, 0.75)):
        want = BM25Index([" ".join(d) for d in docs], k1=k1, b=b, analyzer=str.split).scores(" ".join(query))
        got = fn(list(query), [list(d) for d in docs], k1, b)
        _close(f"BM25 scores of {query} (k1={k1}, b={b})", got, want, atol=1e-9)
    return "matches retrieval.BM25Index (Lucene IDF) in 5 cases: repeated and unknown terms, k1 = 0, b = 0 and 1"


def _ex_13_2(fn: Callable) -> str:
    """fn(scores (Q, N) float64, relevant (Q,) int, k) -> recall@k (float); ties rank the lower index first."""
    from minillm.retrieval import recall_at_k

    rng = np.random.default_rng(16)
    scores = rng.integers(0, 4, size=(12, 6)).astype(np.float64)  # many ties
    relevant = rng.integers(0, 6, size=12)
    for k in (1, 2, 3, 6):
        ranks = [np.lexsort((np.arange(6), -s)).tolist() for s in scores]  # as retrieval.BM25Index.search
        _close(f"recall@{k}", float(fn(scores.copy(), relevant.copy(), k)), recall_at_k(ranks, relevant.tolist(), k),
               atol=1e-12)
    return "matches retrieval.recall_at_k on ties-heavy scores for k = 1, 2, 3, 6"


def _ex_14_1(fn: Callable) -> str:
    """fn(rewards (B,) float64, G) -> (B,) group-relative advantages (scale_rewards="group")."""
    from minillm.train.grpo import group_advantages

    rng = np.random.default_rng(15)
    cases = [(np.array([1.0, 0, 0, 1, 0, 0, 0, 0]), 8), (rng.integers(0, 2, 12).astype(np.float64), 4),
             (rng.standard_normal(9), 3), (np.array([1.0, 1, 1, 0, 0, 0]), 3)]
    for r, G in cases:
        _close(f"advantages of {r.size} rewards in groups of {G}", fn(r.copy(), G), group_advantages(r, G, "group")[0],
               atol=1e-5)
    return "matches train.grpo.group_advantages (Bessel std + 1e-4; 0 for an all-equal group) in 4 cases"


def _ex_14_2(fn: Callable) -> str:
    """fn(n, c, k) -> unbiased pass@k (float)."""
    from minillm.verifiable import pass_at_k

    for n, c, k in ((8, 2, 1), (8, 2, 4), (8, 2, 8), (8, 0, 3), (10, 7, 4), (16, 1, 5)):
        _close(f"pass@{k} with n={n}, c={c}", float(fn(n, c, k)), pass_at_k(n, c, k), atol=1e-9)
    return "matches verifiable.pass_at_k in 6 cases (e.g. pass@4 = 0.7857 for n = 8, c = 2)"


EXERCISES: dict[str, Callable] = {
    "01.1": _ex_01_1, "01.2": _ex_01_2, "02.1": _ex_02_1, "02.2": _ex_02_2, "03.1": _ex_03_1, "03.2": _ex_03_2,
    "04.1": _ex_04_1, "04.2": _ex_04_2, "05.1": _ex_05_1, "05.2": _ex_05_2, "06.1": _ex_06_1, "06.2": _ex_06_2,
    "07.1": _ex_07_1, "07.2": _ex_07_2, "11.1": _ex_11_1, "11.2": _ex_11_2,
    "08.1": _ex_08_1, "08.2": _ex_08_2, "09.1": _ex_09_1, "09.2": _ex_09_2, "09.3": _ex_09_3,
    "10.1": _ex_10_1, "10.2": _ex_10_2, "12.1": _ex_12_1, "12.2": _ex_12_2, "13.1": _ex_13_1, "13.2": _ex_13_2,
    "14.1": _ex_14_1, "14.2": _ex_14_2,
}


def check_exercise(exercise_id: str, fn: Callable, quiet: bool = False) -> bool | None:
    """Check a learner's answer to exercise ``exercise_id`` (e.g. "05.1").

    Returns True (correct), None (``fn`` still raises NotImplementedError: not attempted yet) and
    raises ``ExerciseFailed`` naming the first disagreement otherwise. KeyError for an unknown id.
    The project's tests run the same checkers against reference solutions and wrong answers.
    """
    checker = EXERCISES[exercise_id]
    try:
        msg = checker(fn)
    except NotImplementedError:
        if not quiet:
            print(f"exercise {exercise_id}: not attempted yet (replace the NotImplementedError and re-run this cell)")
        return None
    if not quiet:
        print(f"exercise {exercise_id}: correct - {msg}")
    return True
