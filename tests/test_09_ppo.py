"""Chapter 09: RLHF with PPO and a per-token KL penalty (minillm.train.ppo).

Reference values: docs/reference.md §6 and §8 items 18, 19, 20, 21, 25; docs/bugs.md B18.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from minillm import functional as F
from minillm.model import GPT, GPTConfig, sample_next
from minillm.tensor import Tensor
from minillm.train.ppo import PPOConfig, PPOTrainer, read_prompts
from minillm.train.ppo_objective import (AdaptiveKLController, FixedKLController, compute_gae, kl_per_token,
                                         masked_mean, masked_var, masked_whiten, per_token_rewards, ppo_policy_loss,
                                         ppo_value_loss)
from minillm.train.rollout import policy_forward, sample_rollout


# ------------------------------------------------------------------------------------------ GAE

def test_gae_reference_values():
    """docs/bugs.md C25: rewards [0,0,1], V 0.5, γ 1, λ 0.95."""
    adv, ret = compute_gae(np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.5, 0.5]), gamma=1.0, lam=0.95)
    np.testing.assert_allclose(adv, [0.45125, 0.475, 0.5], atol=1e-12)
    np.testing.assert_allclose(ret, [0.95125, 0.975, 1.0], atol=1e-12)


def test_gae_ignores_padding_after_eos_and_keeps_float32():
    r = np.array([[0.0, 0.0, 1.0, 7.0, 7.0]], dtype=np.float32)
    v = np.array([[0.5, 0.5, 0.5, 9.0, 9.0]], dtype=np.float32)
    m = np.array([[1, 1, 1, 0, 0]])
    adv, ret = compute_gae(r, v, m, 1.0, 0.95)
    assert adv.dtype == np.float32 and ret.dtype == np.float32
    np.testing.assert_allclose(adv[0], [0.45125, 0.475, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(ret[0], [0.95125, 0.975, 1.0, 0, 0], atol=1e-6)
    # γ < 1 and λ = 1: A_t = Σ γ^k r_{t+k} − V_t (Monte-Carlo return minus the baseline)
    adv2, _ = compute_gae(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.2, 0.3]), gamma=0.9, lam=1.0)
    np.testing.assert_allclose(adv2, [1 + 0.9 * 2 + 0.81 * 3 - 0.1, 2 + 0.9 * 3 - 0.2, 3 - 0.3], atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        compute_gae(np.zeros((2, 3)), np.zeros((2, 4)))


# ---------------------------------------------------------------------------- losses

def test_clipped_policy_loss_reference_values_and_gradients():
    """docs/bugs.md C25: A = 1, Δlogp = 0.5 → ratio 1.6487213, loss −1.2 (clipped, no gradient);
    A = −1 → loss 1.6487213 (unclipped: the pessimistic term keeps the gradient)."""
    old = np.array([[-1.0]], dtype=np.float32)
    m = np.ones((1, 1), dtype=np.float32)
    new = Tensor(np.array([[-0.5]], dtype=np.float32), requires_grad=True)
    loss, clipfrac, approxkl = ppo_policy_loss(new, old, np.ones((1, 1)), m, 0.2)
    assert math.exp(0.5) == pytest.approx(1.6487213, abs=1e-7)
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)
    assert clipfrac == 1.0 and approxkl == pytest.approx(0.125)
    loss.backward()
    assert float(new.grad[0, 0]) == 0.0  # the clipped branch carries no gradient
    new2 = Tensor(np.array([[-0.5]], dtype=np.float32), requires_grad=True)
    loss2, clipfrac2, _ = ppo_policy_loss(new2, old, -np.ones((1, 1)), m, 0.2)
    assert loss2.item() == pytest.approx(1.6487213, abs=1e-6)
    assert clipfrac2 == 0.0
    loss2.backward()
    assert float(new2.grad[0, 0]) == pytest.approx(1.6487213, abs=1e-6)  # d(−A·ratio)/dlogp = ratio
    assert loss.data.dtype == np.float32


def test_policy_loss_is_masked_mean_and_never_above_unclipped():
    rng = np.random.default_rng(0)
    new = rng.normal(-1, 0.3, (4, 5)).astype(np.float32)
    old = rng.normal(-1, 0.3, (4, 5)).astype(np.float32)
    adv = rng.normal(0, 1, (4, 5)).astype(np.float32)
    m = (np.arange(5)[None, :] < np.array([5, 3, 1, 4])[:, None]).astype(np.float32)
    loss, _, _ = ppo_policy_loss(new, old, adv, m, 0.2)
    ratio = np.exp(new - old)
    per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
    assert loss.item() == pytest.approx(float((per * m).sum() / m.sum()), rel=1e-5)
    # the clipped objective is a lower bound of the unclipped one (loss ≥ unclipped loss)
    assert loss.item() >= float((-adv * ratio * m).sum() / m.sum()) - 1e-6
    # padding values do not matter
    new2 = np.where(m > 0, new, 123.0).astype(np.float32)
    assert ppo_policy_loss(new2, old, adv, m, 0.2)[0].item() == loss.item()


def test_clipped_value_loss_reference_value():
    """docs/bugs.md C25: V 1.0, V_old 0.5, R 0.8, ε_v 0.2 → 0.5·max(0.04, 0.01) = 0.02."""
    v = Tensor(np.array([[1.0]], dtype=np.float32), requires_grad=True)
    loss, vf_clipfrac = ppo_value_loss(v, np.array([[0.5]]), np.array([[0.8]]), np.ones((1, 1)), 0.2)
    assert loss.item() == pytest.approx(0.02, abs=1e-7)
    assert vf_clipfrac == 0.0
    loss.backward()
    assert float(v.grad[0, 0]) == pytest.approx(0.2, abs=1e-6)  # the unclipped term (V − R) wins
    # V moved the other way past the clip: the clipped error is larger and carries no gradient
    v2 = Tensor(np.array([[0.0]], dtype=np.float32), requires_grad=True)
    loss2, frac2 = ppo_value_loss(v2, np.array([[0.5]]), np.array([[-0.1]]), np.ones((1, 1)), 0.2)
    assert loss2.item() == pytest.approx(0.5 * 0.4 ** 2, abs=1e-6) and frac2 == 1.0
    loss2.backward()
    assert float(v2.grad[0, 0]) == 0.0


def test_adaptive_kl_controller_reference_values():
    """docs/bugs.md C25 / Ziegler et al. 2019 §2.2."""
    c = AdaptiveKLController(0.2, 6.0, 10000)
    assert c.update(9.0, 256) == pytest.approx(0.201024, abs=1e-9)
    c = AdaptiveKLController(0.2, 6.0, 10000)
    assert c.update(3.0, 256) == pytest.approx(0.198976, abs=1e-9)
    c = AdaptiveKLController(0.2, 6.0, 10000)
    assert c.update(600.0, 256) == pytest.approx(0.201024, abs=1e-9)  # the error is clipped at +0.2
    assert FixedKLController(0.1).update(50.0, 256) == 0.1
    with pytest.raises(ValueError):
        AdaptiveKLController(0.2, 0.0, 10000)


# -------------------------------------------------------------------------- whitening

def test_whiten_reference_and_degenerate_batches():
    """docs/bugs.md C21: whiten([1,2,3,4]); n = 1 or 0 raises, never NaN."""
    w = masked_whiten(np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32))
    np.testing.assert_allclose(w, [-1.161895, -0.387298, 0.387298, 1.161895], atol=1e-6)
    assert w.dtype == np.float32
    assert masked_var(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(5 / 3)
    # masked entries take no part in the statistics
    x = np.array([[1.0, 2.0, 99.0], [3.0, 4.0, -50.0]])
    m = np.array([[1, 1, 0], [1, 1, 0]])
    np.testing.assert_allclose(masked_whiten(x, m)[m > 0], [-1.161895, -0.387298, 0.387298, 1.161895], atol=1e-6)
    assert masked_mean(x, m) == pytest.approx(2.5)
    np.testing.assert_allclose(masked_whiten(np.array([1.0, 2.0, 3.0, 4.0]), shift_mean=False),
                               np.array([-1.161895, -0.387298, 0.387298, 1.161895]) + 2.5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(np.array([5.0]))
    with pytest.raises(ValueError, match="no entries"):
        masked_whiten(np.array([5.0, 6.0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="no entries"):
        masked_mean(np.array([5.0, 6.0]), np.array([0, 0]))
    assert np.isfinite(masked_whiten(np.array([3.0, 3.0, 3.0]))).all()  # zero variance: eps, not NaN


# ---------------------------------------------------------------------------- KL and rewards

def test_k1_and_k3_kl_estimators_respect_the_mask():
    """docs/bugs.md B18: masked k1 sum −0.5 (a single sample can be negative); unmasked (the bug) 4.5;
    k3 = [0.10653066, 0.71828183], sum 0.8248124881716785 (always ≥ 0)."""
    logp = np.array([[-1.0, -2.0, -0.5, -0.5]])
    ref = np.array([[-1.5, -1.0, -3.0, -3.0]])
    mask = np.array([[1, 1, 0, 0]])
    _, k1 = per_token_rewards(logp, ref, mask, np.zeros(1), 0.1, "k1")
    assert k1.sum() == pytest.approx(-0.5, abs=1e-12)
    assert kl_per_token(logp, ref, "k1").sum() == pytest.approx(4.5, abs=1e-12)
    _, k3 = per_token_rewards(logp, ref, mask, np.zeros(1), 0.1, "k3")
    np.testing.assert_allclose(k3[0, :2], [0.10653066, 0.71828183], atol=1e-8)
    assert k3.sum() == pytest.approx(0.8248124881716785, abs=1e-12)
    assert (k3 >= 0).all() and (k3[0, 2:] == 0).all()
    # docs/bugs.md C18: logr = +0.5 ⇒ k3 = e^0.5 − 1 − 0.5
    assert kl_per_token(np.array([-1.5]), np.array([-1.0]), "k3")[0] == pytest.approx(0.1487213, abs=1e-7)
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(logp, ref, "k2")


def test_per_token_kl_penalised_rewards():
    """docs/bugs.md C18: logp −1, ref −1.5, β 0.05: k1 0.5 → r −0.025; k3 0.1065307 → r −0.0053265."""
    lp = np.array([[-1.0, -1.0]], dtype=np.float32)
    ref = np.array([[-1.5, -1.5]], dtype=np.float32)
    m = np.array([[1, 1]])
    r1, kl1 = per_token_rewards(lp, ref, m, np.zeros(1), 0.05, "k1")
    assert r1.dtype == np.float32 and kl1.dtype == np.float32
    assert kl1[0, 0] == pytest.approx(0.5, abs=1e-7) and r1[0, 0] == pytest.approx(-0.025, abs=1e-7)
    r3, kl3 = per_token_rewards(lp, ref, m, np.zeros(1), 0.05, "k3")
    assert kl3[0, 0] == pytest.approx(0.1065307, abs=1e-7) and r3[0, 0] == pytest.approx(-0.0053265, abs=1e-7)


def test_score_lands_on_the_last_real_token_not_on_padding():
    lp = np.array([[-1.0, -2.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]], dtype=np.float32)
    ref = np.array([[-1.5, -1.0, -3.0, -3.0], [-1.0, -1.0, -1.0, -2.0]], dtype=np.float32)
    m = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    r, kl = per_token_rewards(lp, ref, m, np.array([2.0, -3.0]), 0.1)
    np.testing.assert_allclose(r[0], [-0.05, 2.0 + 0.1, 0.0, 0.0], atol=1e-6)  # score at index 1 (the EOS)
    np.testing.assert_allclose(r[1], [0.0, 0.0, 0.0, -3.0 - 0.1], atol=1e-6)
    assert (kl[0, 2:] == 0).all()
    with pytest.raises(ValueError, match="no real token"):
        per_token_rewards(lp, ref, np.array([[1, 1, 0, 0], [0, 0, 0, 0]]), np.zeros(2), 0.1)
    with pytest.raises(ValueError, match="beta"):
        per_token_rewards(lp, ref, m, np.zeros(2), -0.1)
    with pytest.raises(ValueError, match="scores"):
        per_token_rewards(lp, ref, m, np.zeros(3), 0.1)


def test_k1_is_unbiased_only_for_on_policy_samples():
    """KL(softmax([2,1,0]) ‖ uniform) = 0.26621670682817083; the mean k1 of 10,000 tokens sampled from
    exactly π lies within 3 standard errors of it (and so does k3's, always ≥ 0); scoring tokens sampled
    by a top-k sampler against the unmodified π is biased (trl #736)."""
    logits = np.array([2.0, 1.0, 0.0])
    pi = np.exp(logits - logits.max())
    pi /= pi.sum()
    np.testing.assert_allclose(pi, [0.66524096, 0.24472847, 0.09003057], atol=1e-8)
    exact = float((pi * np.log(3 * pi)).sum())
    assert exact == pytest.approx(0.26621670682817083, abs=1e-15)
    rng = np.random.default_rng(0)
    n = 10_000
    tok, lp = sample_next(np.tile(logits.astype(np.float32), (n, 1)), 1.0, None, None, rng)
    ref_lp = np.full(n, -math.log(3.0))
    for est in ("k1", "k3"):
        k = kl_per_token(lp.astype(np.float64), ref_lp, est)
        se = k.std(ddof=1) / math.sqrt(n)
        assert abs(k.mean() - exact) < 3 * se, (est, k.mean(), exact, se)
    # top-k = 1 always picks token 0: its k1 under the unmodified π is log(3·0.665) = 0.69, far from 0.266
    tok1, _ = sample_next(np.tile(logits.astype(np.float32), (100, 1)), 1.0, 1, None, rng)
    k1_biased = np.log(pi[tok1]) - (-math.log(3.0))
    assert abs(k1_biased.mean() - exact) > 0.3


def test_temperature_logprobs_reference_value():
    """docs/bugs.md C19: logits [2,1,0], T 0.7, token 0 → −0.2601184 (−0.4076060 without T)."""
    logits = Tensor(np.array([[[2.0, 1.0, 0.0]]], dtype=np.float32))
    lp_t = -F.cross_entropy(logits / 0.7, np.array([[0]]), reduction="none")
    lp_1 = -F.cross_entropy(logits, np.array([[0]]), reduction="none")
    assert lp_t.item() == pytest.approx(-0.2601184, abs=1e-6)
    assert lp_1.item() == pytest.approx(-0.4076060, abs=1e-6)


# ------------------------------------------------------------------- the trainer on a tiny GPT

TINY = GPTConfig(vocab_size=32, block_size=24, n_layer=1, n_head=2, n_embd=16)
EOS, PAD = 2, 0


def _prompts(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 32, size=int(rng.integers(2, 6)))] for _ in range(n)]


def _count_token(tok: int):
    def reward(rollout):
        return (rollout.responses == tok).sum(axis=1).astype(np.float64) * (rollout.response_mask.sum(axis=1) > 0)
    return reward


def test_rollout_logprobs_match_the_training_forward_at_temperature():
    """The sampler's log-probabilities equal the training forward's under softmax(logits / T)
    (docs/bugs.md B18: the sampler and the scorer use the same distribution), and differ from T = 1."""
    policy = GPT(TINY, seed=3)
    r = sample_rollout(policy, _prompts(), 6, 0.7, np.random.default_rng(1), EOS, PAD)
    lp, _, _ = policy_forward(policy, r.input_ids, r.attention_mask, r.prompt_length, r.response_mask, 0.7)
    np.testing.assert_allclose(lp.data * r.response_mask, r.sample_logprobs, atol=2e-5)
    lp1, _, _ = policy_forward(policy, r.input_ids, r.attention_mask, r.prompt_length, r.response_mask, 1.0)
    assert np.abs((lp1.data - lp.data) * r.response_mask).max() > 1e-3
    assert (lp.data[r.response_mask == 0] == 0).all()


def test_two_forwards_are_bit_identical_and_dropout_is_refused():
    """docs/bugs.md C20: dropout off ⇒ two forwards of policy and reference are bit-identical."""
    policy, ref = GPT(TINY, seed=3), GPT(TINY, seed=4)
    r = sample_rollout(policy, _prompts(), 6, 0.7, np.random.default_rng(1), EOS, PAD)
    for model in (policy, ref):
        a, _, la = policy_forward(model, r.input_ids, r.attention_mask, r.prompt_length, r.response_mask, 0.7)
        b, _, lb = policy_forward(model, r.input_ids, r.attention_mask, r.prompt_length, r.response_mask, 0.7)
        assert np.array_equal(a.data, b.data) and np.array_equal(la, lb)
    drop = GPT(GPTConfig(vocab_size=32, block_size=24, n_layer=1, n_head=2, n_embd=16, dropout=0.1))
    with pytest.raises(ValueError, match="dropout"):
        PPOTrainer(drop, ref, _count_token(5), PPOConfig(batch_size=8, score_norm_samples=0), eos_id=EOS, pad_id=PAD)


def test_first_minibatch_ratio_is_exactly_one_and_kl_starts_at_zero():
    """docs/bugs.md C19: rollout log-probs from the training forward ⇒ the first minibatch of the first
    epoch has ratio == 1 and approx KL == 0 exactly; with policy == reference the first KL is exactly 0."""
    policy, ref = GPT(TINY, seed=3), GPT(TINY, seed=3)
    cfg = PPOConfig(batch_size=8, num_mini_batches=2, ppo_epochs=2, max_new_tokens=6, lr=1e-2, score_norm_samples=0)
    tr = PPOTrainer(policy, ref, _count_token(5), cfg, eos_id=EOS, pad_id=PAD)
    for it in range(2):
        st = tr.step(_prompts(8, seed=it))
        first = st["minibatches"][0]
        assert first["epoch"] == 0
        assert first["ratio_min"] == 1.0 and first["ratio_max"] == 1.0 and first["approxkl"] == 0.0
        assert first["clipfrac"] == 0.0
        assert len(st["minibatches"]) == 4
        assert max(abs(mb["ratio_mean"] - 1) for mb in st["minibatches"][1:]) > 0  # later ones moved
        if it == 0:
            assert st["kl"] == 0.0
        assert st["logprob_mismatch"] < 1e-4
        assert all(np.isfinite(v) for k, v in st.items() if isinstance(v, float))


def _run_tiny(beta: float, iterations: int = 25):
    policy, ref = GPT(TINY, seed=3), GPT(TINY, seed=3)
    cfg = PPOConfig(batch_size=16, num_mini_batches=2, ppo_epochs=4, max_new_tokens=6, lr=3e-3, beta=beta,
                    score_norm_samples=16, missing_eos_penalty=0.0)
    tr = PPOTrainer(policy, ref, _count_token(5), cfg, eos_id=EOS, pad_id=PAD)
    prompts = _prompts(16, seed=5)
    tr.fit_score_norm(prompts)
    return [tr.step(prompts) for _ in range(iterations)]


def test_ppo_raises_the_reward_it_is_given_and_beta_bounds_the_kl():
    """On a tiny GPT, rewarding the count of one token (at most 6) makes PPO emit it (0.1 → 6 per
    response with β = 0, KL ≈ 19 nats); a large β keeps the policy much closer to the reference."""
    free = _run_tiny(0.0)
    start = np.mean([h["rm_score"] for h in free[:3]])
    end = np.mean([h["rm_score"] for h in free[-3:]])
    assert end > start + 3.0, (start, end)
    assert free[-1]["kl"] > 5.0
    tied = _run_tiny(2.0)
    assert np.mean([h["kl"] for h in tied[-3:]]) < 0.5 * np.mean([h["kl"] for h in free[-3:]])


def test_config_and_prompt_file_errors(tmp_path):
    with pytest.raises(ValueError, match="value_model"):
        PPOConfig(value_model="separate")
    with pytest.raises(ValueError, match="reward-model checkpoint"):
        PPOConfig(reward="gold", value_model="reward_model")
    with pytest.raises(ValueError, match="divisible"):
        PPOConfig(batch_size=10, num_mini_batches=4)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="abs")
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "What is the capital of France?"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        read_prompts(str(p))
    q = tmp_path / "p.txt"
    q.write_text("one\n\ntwo\n")
    assert read_prompts(str(q)) == ["one", "two"]
    with pytest.raises(FileNotFoundError):
        read_prompts(str(tmp_path / "missing.txt"))


def test_end_to_end_ppo_run_with_the_gold_judge(tmp_path):
    """``ppo()`` on a tiny GPT with a tiny tokenizer and the world's prompts: writes metrics.json and
    a loadable checkpoint; iteration 0 has KL exactly 0 (policy == reference)."""
    from minillm.checkpoint import load_checkpoint, load_model, save_checkpoint
    from minillm.tasks import default_world, tokenizer_training_text
    from minillm.tokenizer import Tokenizer
    from minillm.train.ppo import ppo

    text = tokenizer_training_text(default_world())[:20000]
    tok = Tokenizer.train(text, 300)
    model = GPT(GPTConfig(vocab_size=len(tok), block_size=128, n_layer=1, n_head=2, n_embd=16), seed=0)
    save_checkpoint(tmp_path / "sft.safetensors", model, tok)
    cfg = PPOConfig(sft=str(tmp_path / "sft.safetensors"), reward="gold", out_dir=str(tmp_path / "ppo"),
                    iterations=2, batch_size=8, max_new_tokens=4, score_norm_samples=8, eval_prompts=4,
                    progress=False)
    res = ppo(cfg)
    m = json.loads((tmp_path / "ppo" / "metrics.json").read_text())
    assert len(m["history"]) == 2 and m["history"][0]["kl"] == 0.0
    for key in ("rm_score", "gold", "kl", "entropy", "clipfrac", "approxkl", "value_loss", "response_length",
                "opener_rate"):
        assert key in m["history"][1]
    assert m["history"][0]["rm_score"] == m["history"][0]["gold"]  # the gold judge is the reward
    assert set(m["eval_start"]) == {"test", "train"} and m["eval_end"]["test"]["n"] == 4
    assert m["eval_start"]["test"]["kl"] == 0.0
    loaded, _, _ = load_model(res.checkpoint)
    assert loaded.config.block_size == 128
    assert "extra.value_head.weight" not in load_checkpoint(res.checkpoint).model_state


def test_value_model_initialised_from_a_reward_model_and_lora_policy():
    """value_model="reward_model": a separate scalar-head GPT is trained by its own optimizer; a LoRA
    policy trains only its adapters (and the value model), the base weights stay bit-identical."""
    from minillm.lora import inject_lora

    policy, ref = GPT(TINY, seed=3), GPT(TINY, seed=3)
    inject_lora(policy, ["q_proj", "v_proj"], r=2, lora_alpha=4, seed=0)
    vm = GPT(GPTConfig(vocab_size=32, block_size=24, n_layer=1, n_head=2, n_embd=16, scalar_head=True), seed=9)
    cfg = PPOConfig(reward="rm.safetensors", value_model="reward_model", batch_size=8, max_new_tokens=6, lr=1e-2,
                    score_norm_samples=0)
    tr = PPOTrainer(policy, ref, _count_token(5), cfg, eos_id=EOS, pad_id=PAD, value_model=vm)
    assert tr.value_head is None
    before = {n: p.data.copy() for n, p in policy.named_parameters()}
    vm_before = {n: p.data.copy() for n, p in vm.named_parameters()}
    st = tr.step(_prompts(8))
    assert st["minibatches"][0]["ratio_max"] == 1.0 and st["minibatches"][0]["approxkl"] == 0.0
    changed = {n for n, p in policy.named_parameters() if not np.array_equal(p.data, before[n])}
    assert changed and all(n.endswith(("lora_A", "lora_B")) for n in changed), changed
    assert any(not np.array_equal(p.data, vm_before[n]) for n, p in vm.named_parameters())


def test_a_reward_that_becomes_nan_is_a_clear_error():
    """Bad input: a NaN score would poison every advantage of the batch; PPO stops and says so."""
    policy, ref = GPT(TINY, seed=3), GPT(TINY, seed=3)
    cfg = PPOConfig(batch_size=8, max_new_tokens=6, score_norm_samples=0)

    def nan_reward(rollout):
        out = _count_token(5)(rollout)
        out[2] = np.nan
        return out

    tr = PPOTrainer(policy, ref, nan_reward, cfg, eos_id=EOS, pad_id=PAD)
    before = [p.data.copy() for p in policy.parameters()]
    with pytest.raises(FloatingPointError, match=r"not finite for 1 of 8 responses"):
        tr.step(_prompts(8))
    assert all(np.array_equal(a, p.data) for a, p in zip(before, policy.parameters()))  # no update applied


def test_evaluation_kl_and_ppo_training_use_the_same_logprobs():
    """Chapter 09's PPO (policy_forward) and chapter 10's reported KL (evaluate.response_logprobs /
    sequence_kl) read one function, GPT.response_logprobs: the numbers are identical, at T = 0.7 too."""
    from minillm.evaluate import response_logprobs, sequence_kl
    from minillm.train.rollout import policy_forward

    rng = np.random.default_rng(0)
    pol = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=1)
    ref = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=2)
    seqs = rng.integers(1, 40, (3, 10))
    attn = np.ones((3, 10), np.int64)
    attn[0, :2] = 0  # a left-padded prompt
    resp = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    for T in (1.0, 0.7):
        lp_eval = response_logprobs(pol, seqs, attn, resp, T)
        lp_ppo, _, _ = policy_forward(pol, seqs, attn, 6, resp, T)
        assert lp_eval.dtype == np.float32
        np.testing.assert_array_equal(lp_eval, np.asarray(lp_ppo.data))
        assert (lp_eval[resp == 0] == 0).all() and (lp_eval[resp == 1] < 0).all()
    kl = sequence_kl(pol, ref, seqs, attn, resp, 0.7)
    lp_ref, _, _ = policy_forward(ref, seqs, attn, 6, resp, 0.7)
    np.testing.assert_allclose(kl, ((response_logprobs(pol, seqs, attn, resp, 0.7) - np.asarray(lp_ref.data))
                                    * resp).sum(1), rtol=1e-6)
