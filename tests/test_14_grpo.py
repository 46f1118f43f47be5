"""Chapter 14: GRPO and RL with verifiable rewards (minillm.train.grpo, minillm.verifiable,
minillm.train.dynamic_sampling).

Hand-computed values: group advantages with TRL's std convention (Bessel, + 1e-4 on the std),
the clipped per-token loss for both signs of Â with ε_low/ε_high, k3 = e^{logr} − logr − 1, and
the four loss aggregations on a ragged batch. The cross-check calls TRL 1.16's own
``GRPOTrainer._compute_loss`` on fixed tensors.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from minillm.model import GPT, GPTConfig
from minillm.tensor import Tensor, no_grad
from minillm.train.dynamic_sampling import concat_rollouts, refill_groups
from minillm.train.grpo import GRPOConfig, GRPOTrainer, group_advantages, grpo_loss
from minillm.train.ppo_objective import kl_per_token
from minillm.verifiable import (AdditionConfig, AdditionTask, MixedAdditionConfig, MixedAdditionTask,
                                addition_accuracy_reward, addition_digit_reward, addition_format_reward,
                                addition_operands, pass_at_k)
from minillm.verifiable import sft_start as make_sft_start


# ------------------------------------------------------------------------------------ the task

def test_addition_task_holds_out_unordered_pairs_and_the_reward_checks_the_sum():
    t = AdditionTask()
    train, test = t.problems("train"), t.problems("test")
    assert len(train) == 7285 and len(test) == 815 and len(train) + len(test) == 90 * 90
    train_set = set(train)
    assert not any((b, a) in train_set or (a, b) in train_set for a, b in test)  # b + a never leaks a + b
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in train + test)
    assert AdditionTask().problems("test") == test  # deterministic
    rec = t.sft_records("test")[0]
    a, b = addition_operands(rec["instruction"])
    assert rec["output"] == f"{a + b}." and rec["answer"] == str(a + b)
    q = ["What is 47 + 38?"] * 5
    assert addition_accuracy_reward(q, [" 85.", "85", "Sure! 85.", "86.", "85 apples."]) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert addition_format_reward(q[:4], [" 86.", "85", "85.", "eighty-five."], ended=[True, True, False, True]) \
        == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="not an addition question"):
        addition_accuracy_reward(["What is the capital of France?"], ["Paris."])
    with pytest.raises(ValueError, match="n_digits"):
        AdditionConfig(n_digits=0)
    assert len(AdditionTask(AdditionConfig(n_digits=1)).problems("train")) + \
        len(AdditionTask(AdditionConfig(n_digits=1)).problems("test")) == 100


def test_digit_reward_gives_right_aligned_partial_credit_and_one_only_for_the_exact_sum():
    q = ["What is 47 + 38?"] * 8  # sum 85
    got = addition_digit_reward(q, [" 85.", "86.", "75.", "185.", "5.", "8 5.", "eighty-five.", "Sure! 85."])
    assert got == pytest.approx([1.0, 0.5, 0.5, 2 / 3, 0.5, 0.0, 0.0, 1.0], abs=0)
    q3 = ["What is 99 + 99?"] * 3  # sum 198: the ones and the hundreds right -> 2 of 3
    assert addition_digit_reward(q3, ["108.", "198", "98."]) == pytest.approx([2 / 3, 1.0, 2 / 3], abs=0)
    # exact where the accuracy reward is 1, strictly below 1 elsewhere
    comps = ["85.", "84.", "58.", "850."]
    acc, dig = addition_accuracy_reward(q[:4], comps), addition_digit_reward(q[:4], comps)
    assert [d == 1.0 for d in dig] == [a == 1.0 for a in acc] and dig[2] == 0.0 and dig[3] == 0.0
    with pytest.raises(ValueError, match="not an addition question"):
        addition_digit_reward(["What is the capital of France?"], ["Paris."])
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        addition_digit_reward(q[:2], ["85."])
    with pytest.raises(ValueError, match="reward"):
        GRPOConfig(reward="partial")


def test_mixed_addition_task_has_answers_of_every_length_and_no_leaked_test_pair():
    t = MixedAdditionTask(MixedAdditionConfig(max_digits=5, n_train=4000, n_test=300, seed=3))
    train, test = t.problems("train"), t.problems("test")
    assert len(train) == 4000 and len(test) == 300
    keys = {(min(a, b), max(a, b)) for a, b in train}
    assert not any((min(a, b), max(a, b)) in keys for a, b in test)
    assert len({(min(a, b), max(a, b)) for a, b in test}) == 300
    assert {len(str(a)) for a, b in train} == {1, 2, 3, 4, 5}
    assert {len(str(a + b)) for a, b in train} == {1, 2, 3, 4, 5, 6}  # answers of 1 to 6 digits
    assert MixedAdditionTask(MixedAdditionConfig(max_digits=5, n_train=4000, n_test=300, seed=3)).problems("test") == test
    a, b = addition_operands(t.prompts("test")[0])
    assert t.sft_records("test")[0]["output"] == f"{a + b}."
    with pytest.raises(ValueError, match="max_digits"):
        MixedAdditionConfig(max_digits=7)
    with pytest.raises(ValueError, match="too many distinct problems"):
        MixedAdditionTask(MixedAdditionConfig(max_digits=1, n_test=100))


# ------------------------------------------------------------------------------- advantages

def test_group_advantages_hand_values_for_each_scale_rewards():
    """One group [1, 0, 0, 1]: mean 0.5, std (N − 1) √(1/3) = 0.5773503 → Â = ±0.5/(0.5773503 + 1e-4)."""
    adv, std, zero = group_advantages([1.0, 0.0, 0.0, 1.0], 4, "group")
    assert adv.dtype == np.float32
    np.testing.assert_allclose(adv, [0.8658754, -0.8658754, -0.8658754, 0.8658754], atol=1e-6)
    np.testing.assert_allclose(std, math.sqrt(1 / 3), atol=1e-12)
    assert not zero.any()
    # "batch": the group mean is still subtracted, the std is the batch's: [1,0,0,0 | 1,1,1,0] → √(2/7)
    r = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    adv, std, _ = group_advantages(r, 4, "batch")
    np.testing.assert_allclose(std, math.sqrt(2 / 7), atol=1e-12)
    np.testing.assert_allclose(adv[:4], [1.4028591, -0.4676197, -0.4676197, -0.4676197], atol=1e-6)
    np.testing.assert_allclose(adv[4:], [0.4676197, 0.4676197, 0.4676197, -1.4028591], atol=1e-6)
    # "none" (Dr. GRPO): r − group mean, no division
    adv, _, _ = group_advantages(r, 4, "none")
    np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75], atol=1e-7)


def test_equal_rewards_give_exactly_zero_advantage_and_zero_gradient():
    # 0.1 · 3 / 3 ≠ 0.1 in floating point: the all-equal group is still exactly 0 in every mode
    for mode in ("group", "batch", "none"):
        adv, _, zero = group_advantages([0.1, 0.1, 0.1, 1.0, 0.0, 0.5], 3, mode)
        assert np.all(adv[:3] == 0.0) and zero.tolist() == [True] * 3 + [False] * 3
        assert np.any(adv[3:] != 0.0)
    model = GPT(GPTConfig(vocab_size=16, block_size=12, n_layer=1, n_head=2, n_embd=8), seed=0)
    ids = np.random.default_rng(0).integers(0, 16, (3, 10))
    adv, _, _ = group_advantages([0.7, 0.7, 0.7], 3)
    m = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        model.zero_grad()
        logp = -model.forward(ids)[0].sum(axis=-1)[:, :5] * 0.01  # any differentiable (3, 5) function of θ
        loss, _ = grpo_loss(logp, None, adv, m, loss_type, max_completion_length=5)
        loss.backward()
        assert loss.item() == 0.0
        assert all(float(np.abs(p.grad).max()) == 0.0 for p in model.parameters() if p.grad is not None)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="num_generations must be ≥ 2"):
        group_advantages([1.0, 0.0], 1)
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages([1.0, 0.0, 1.0], 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages([1.0, 0.0], 2, "std")
    with pytest.raises(FloatingPointError, match="completion 3 \\(group 1\\)"):
        group_advantages([1.0, 0.0, 1.0, float("nan")], 2)


# ----------------------------------------------------------------------------------- the loss

def test_first_minibatch_has_ratio_one_and_loss_minus_mean_advantage():
    """ρ = 1 (old = detached new): ℓ_it = −Â_i. Lengths [3, 1], Â [1, −1]: dapo/bnpo
    −(3·1 + 1·(−1))/4 = −0.5; grpo −(1 − 1)/2 = 0; the gradient is −Â_i/(Σ M) per token."""
    lp = Tensor(np.array([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]], dtype=np.float32), requires_grad=True)
    m = np.array([[1, 1, 1], [1, 0, 0]])
    loss, st = grpo_loss(lp, None, np.array([1.0, -1.0]), m, "dapo")
    assert loss.item() == pytest.approx(-0.5, abs=1e-7) and loss.data.dtype == np.float32
    assert st["ratio_min"] == 1.0 and st["ratio_max"] == 1.0 and st["clip_ratio/region_mean"] == 0.0
    loss.backward()
    np.testing.assert_allclose(lp.grad, [[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]], atol=1e-7)
    loss, _ = grpo_loss(lp, None, np.array([1.0, -1.0]), m, "grpo")
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipped_objective_is_at_most_the_unclipped_one_for_both_signs(sign):
    """ρ = e^{0.5} = 1.6487213 and ρ = e^{−0.5} = 0.6065307, ε_low 0.2, ε_high 0.28 (DAPO):
    Â = +1: ℓ = −min(ρ, clip ρ) = −1.28 (clipped high, no gradient) and −0.6065307 (unclipped);
    Â = −1: ℓ = 1.6487213 (unclipped, gradient ρ) and 0.8 (clipped low, no gradient)."""
    old = np.array([[-1.0, -1.0]], dtype=np.float32)
    new = Tensor(np.array([[-0.5, -1.5]], dtype=np.float32), requires_grad=True)
    m = np.ones((1, 2))
    per = []
    for j in range(2):
        mj = np.zeros((1, 2))
        mj[0, j] = 1
        loss, st = grpo_loss(new, old, np.array([sign]), mj, "bnpo", 0.2, 0.28)
        per.append(loss.item())
    rho = np.exp([0.5, -0.5])
    if sign > 0:
        np.testing.assert_allclose(per, [-1.28, -0.6065307], atol=1e-6)
    else:
        np.testing.assert_allclose(per, [1.6487213, 0.8], atol=1e-6)
    unclipped = -sign * rho
    assert all(p >= u - 1e-7 for p, u in zip(per, unclipped))  # −J_clip ≥ −J: J_clip ≤ J
    loss, st = grpo_loss(new, old, np.array([sign]), m, "bnpo", 0.2, 0.28)
    loss.backward()
    if sign > 0:
        np.testing.assert_allclose(new.grad, [[0.0, -0.5 * 0.6065307]], atol=1e-6)
        assert st["clip_ratio/high_mean"] == 0.5 and st["clip_ratio/low_mean"] == 0.0
    else:
        np.testing.assert_allclose(new.grad, [[0.5 * 1.6487213, 0.0]], atol=1e-6)
        assert st["clip_ratio/low_mean"] == 0.5 and st["clip_ratio/high_mean"] == 0.0
    # with ε_high = ε_low = 0.2 the Â > 0 token clips at 1.2
    loss, _ = grpo_loss(new, old, np.array([1.0]), np.array([[1, 0]]), "bnpo", 0.2, None)
    assert loss.item() == pytest.approx(-1.2, abs=1e-6)


def test_k3_is_nonnegative_zero_at_the_reference_and_matches_hand_values():
    """logp −1, ref −1.5: logr −0.5 → k3 = e^{−0.5} − 1 + 0.5 = 0.1065307, dk3/dlogp = 1 − e^{−0.5};
    logr +0.5 → 0.1487213; policy == reference → 0."""
    lp = Tensor(np.array([[-1.0, -1.0]], dtype=np.float32), requires_grad=True)
    ref = np.array([[-1.5, -0.5]], dtype=np.float32)
    loss, st = grpo_loss(lp, None, np.zeros(1), np.ones((1, 2)), "bnpo", beta=1.0, ref_logprobs=ref)
    assert loss.item() == pytest.approx((0.1065307 + 0.1487213) / 2, abs=1e-6)
    assert st["kl"] == pytest.approx((0.1065307 + 0.1487213) / 2, abs=1e-6)
    loss.backward()
    np.testing.assert_allclose(lp.grad, [[0.5 * 0.3934693, 0.5 * (1 - math.exp(0.5))]], atol=1e-6)
    np.testing.assert_allclose(kl_per_token(np.array([-1.0, -1.0]), ref[0], "k3"), [0.1065307, 0.1487213], atol=1e-6)
    rng = np.random.default_rng(0)
    a, b = rng.normal(-2, 1, (50, 7)), rng.normal(-2, 1, (50, 7))
    _, st = grpo_loss(a, None, np.zeros(50), np.ones((50, 7)), beta=0.1, ref_logprobs=b)
    assert st["kl"] > 0 and np.all(kl_per_token(a, b, "k3") >= 0)
    loss, st = grpo_loss(a, None, np.zeros(50), np.ones((50, 7)), beta=0.1, ref_logprobs=a)
    assert st["kl"] == 0.0 and loss.item() == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(a, None, np.zeros(50), np.ones((50, 7)), beta=0.1)


def test_each_aggregation_on_a_ragged_batch():
    """ρ = 1, lengths [3, 1, 2], Â [1, −2, 0.5], max_completion_length 5, ℓ_it = −Â_i:
    grpo −mean(Â) = 0.1666667; bnpo −(3 − 2 + 1)/6 = −0.3333333; dr_grpo −2/(3·5) = −0.1333333;
    dapo with 12 tokens in the generation batch −2/12 = −0.1666667 (default: = bnpo)."""
    m = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    vals = np.full((3, 4), -1.0, dtype=np.float32)
    vals[m == 0] = 1e30  # padding holds garbage: it must not enter the loss or the gradient
    adv = np.array([1.0, -2.0, 0.5])
    expect = {"grpo": (1 / 6, [1 / 3, 1 / 3, 1 / 3]), "bnpo": (-1 / 3, [1 / 6] * 3),
              "dr_grpo": (-2 / 15, [1 / 15] * 3), "dapo": (-1 / 6, [1 / 12] * 3)}
    for loss_type, (value, w) in expect.items():
        lp = Tensor(vals.copy(), requires_grad=True)
        kw = {"num_items_in_batch": 12} if loss_type == "dapo" else {}
        loss, _ = grpo_loss(lp, None, adv, m, loss_type, max_completion_length=5, **kw)
        assert loss.item() == pytest.approx(value, abs=1e-6), loss_type
        loss.backward()
        # d loss / d logp_it = −Â_i · w_i on real tokens (grpo: w_i = 1/(B·|o_i|)), 0 on padding
        wi = np.array(w) / (np.array([3, 1, 2]) if loss_type == "grpo" else 1)
        np.testing.assert_allclose(lp.grad, -adv[:, None] * wi[:, None] * m, atol=1e-6, err_msg=loss_type)
    default, _ = grpo_loss(vals, None, adv, m, "dapo")
    assert default.item() == pytest.approx(-1 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(vals, None, adv, m, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(vals, None, adv, m, "sapo")
    with pytest.raises(ValueError, match="mask shape"):
        grpo_loss(vals, None, adv, m[:, :3], "bnpo")


def test_pass_at_k_hand_values():
    assert pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert pass_at_k(8, 2, 8) == 1.0 and pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


# ------------------------------------------------------------------------------ cross-check

def _trl_loss(torch, loss_type, logp, old, ref, adv, mask, beta, eps_low, eps_high, max_len, num_items, bias_kl):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` on fixed tensors: the trainer object is replaced by
    a namespace holding exactly the attributes the method reads, and the model forward by the fixed
    log-probabilities (a leaf tensor, so the gradient is TRL's)."""
    from collections import defaultdict

    from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPOTrainer

    B, N = mask.shape
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    acc = SimpleNamespace(num_processes=1, reduce=lambda t, reduction="sum": t, gather=lambda t: t,
                          gather_for_metrics=lambda t: t)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros(B, N, dtype=torch.float64), None),
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=acc, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None, steps_per_generation=1))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, N, dtype=torch.long),
              "completion_mask": torch.tensor(mask, dtype=torch.float64),
              "advantages": torch.tensor(adv, dtype=torch.float64),
              "num_items_in_batch": torch.tensor(float(num_items), dtype=torch.float64)}
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old, dtype=torch.float64)
    if beta != 0:
        inputs["ref_per_token_logps"] = torch.tensor(ref, dtype=torch.float64)
    loss = TRLGRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return float(loss.detach()), lp.grad.numpy(), fake._metrics["train"]


def _trl_advantages(torch, rewards, G, scale_rewards):
    """TRL 1.16 ``_generate_and_score_completions`` (sum_then_normalize branch), replicated line by line
    from its source with TRL's own ``nanstd`` (the method itself needs generation)."""
    from trl.trainer.utils import nanstd

    r = torch.tensor(rewards, dtype=torch.float32)
    mean = torch.nanmean(r.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G, dim=0) if scale_rewards != "batch" \
        else nanstd(r).expand_as(r)
    adv = r - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return adv.numpy()


@pytest.mark.crosscheck
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,bias_kl", [(0.0, False), (0.04, False), (0.04, True)])
def test_loss_and_gradient_match_trl_grpo_trainer(torch, loss_type, beta, bias_kl):
    """Same completions (ragged mask), log-probs (ρ ≠ 1 so both clips act), rewards (2 groups of 4):
    minillm's advantages equal TRL's for every scale_rewards, and the loss and d loss/d logp equal
    TRL's ``_compute_loss`` for each loss_type, β ∈ {0, 0.04}, with/without the KL bias correction.
    Pinned: ε_low 0.2, ε_high 0.28, std with N − 1, max_completion_length 6, one process, no
    accumulation, num_items_in_batch = the batch's tokens (dapo)."""
    rng = np.random.default_rng(7)
    B, N, G = 8, 5, 4
    lengths = np.array([5, 3, 1, 4, 2, 5, 5, 1])
    mask = (np.arange(N)[None, :] < lengths[:, None]).astype(np.float64)
    old = rng.normal(-1.5, 0.5, (B, N))
    logp = old + rng.normal(0, 0.4, (B, N))  # ratios from ≈ 0.4 to ≈ 2.5: both clip sides are hit
    ref = old + rng.normal(0, 0.3, (B, N))
    rewards = [1.0, 0.0, 0.0, 1.0, 0.2, 1.0, 0.0, 0.0]
    for mode in ("group", "batch", "none"):
        np.testing.assert_allclose(group_advantages(rewards, G, mode)[0], _trl_advantages(torch, rewards, G, mode),
                                   atol=1e-6, err_msg=mode)
    adv = group_advantages(rewards, G, "group")[0].astype(np.float64)
    n_items = mask.sum()
    t_loss, t_grad, t_metrics = _trl_loss(torch, loss_type, logp, old, ref, adv, mask, beta, 0.2, 0.28, 6, n_items,
                                          bias_kl)
    lp = Tensor(logp.copy(), requires_grad=True)
    loss, st = grpo_loss(lp, old, adv, mask, loss_type, 0.2, 0.28, beta, ref, 6, n_items, bias_kl)
    loss.backward()
    assert loss.item() == pytest.approx(t_loss, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(lp.grad, t_grad, rtol=1e-9, atol=1e-12)
    assert st["clip_ratio/low_mean"] == pytest.approx(t_metrics["clip_ratio/low_mean"][0], abs=1e-12)
    assert st["clip_ratio/high_mean"] == pytest.approx(t_metrics["clip_ratio/high_mean"][0], abs=1e-12)
    assert st["clip_ratio/low_mean"] > 0 and st["clip_ratio/high_mean"] > 0
    if beta:
        assert st["kl"] == pytest.approx(t_metrics["kl"][0], rel=1e-9)


# --------------------------------------------------------------------- trainer and bad input

@pytest.fixture(scope="module")
def sft_start(tmp_path_factory):
    """A tiny GPT instruction-tuned on the addition task for 1,000 steps (≈ 15 s): partly right."""
    path = tmp_path_factory.mktemp("grpo") / "sft.safetensors"
    return make_sft_start(str(path), steps=1000, seed=0)


def _trainer(path, **kw):
    from minillm.checkpoint import load_model

    cfg = GRPOConfig(sft=path, progress=False, **kw)
    policy, tok, _ = load_model(path, config_overrides={"dropout": 0.0})
    ref = load_model(path, config_overrides={"dropout": 0.0})[0] if cfg.beta else None
    return GRPOTrainer(policy, ref, [addition_accuracy_reward], cfg, tok)


def test_config_refuses_a_group_of_one_and_unknown_names():
    with pytest.raises(ValueError, match="num_generations must be ≥ 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        GRPOConfig(scale_rewards="mean")
    with pytest.raises(ValueError, match="num_mini_batches"):
        GRPOConfig(prompts_per_iteration=3, num_generations=3, num_mini_batches=2)


def test_a_reward_that_raises_or_returns_nan_is_a_clear_error_and_no_update(sft_start):
    tr = _trainer(sft_start, prompts_per_iteration=2, num_generations=4)
    before = [p.data.copy() for p in tr.policy.parameters()]

    def broken(prompts, completions, **kw):
        raise KeyError("answer")

    def nan_reward(prompts, completions, **kw):
        out = addition_accuracy_reward(prompts, completions)
        out[5] = float("nan")
        return out

    tr.reward_funcs = [broken]
    with pytest.raises(RuntimeError, match="reward function 'broken' raised KeyError"):
        tr.step(["What is 12 + 34?", "What is 50 + 51?"])
    tr.reward_funcs = [nan_reward]
    with pytest.raises(FloatingPointError, match="'nan_reward' returned nan for completion 5 .*What is 50 \\+ 51"):
        tr.step(["What is 12 + 34?", "What is 50 + 51?"])
    tr.reward_funcs = [lambda prompts, completions, **kw: [1.0]]
    with pytest.raises(ValueError, match="returned 1 values for 8 completions"):
        tr.step(["What is 12 + 34?", "What is 50 + 51?"])
    assert all(np.array_equal(a, p.data) for a, p in zip(before, tr.policy.parameters()))


def test_a_prompt_longer_than_the_context_is_a_clear_error(sft_start):
    tr = _trainer(sft_start, prompts_per_iteration=1, num_generations=2)
    with pytest.raises(ValueError, match=r"prompt 1 .* exceeds the context block_size 40"):
        tr.step(["What is 12 + 34?", "What is " + " + ".join(["12"] * 10) + "?"])


def test_iterations_reuse_old_logprobs_and_beta_zero_holds_no_reference(sft_start):
    """num_iterations 2, 2 minibatches: the first minibatch has ρ = 1 exactly, later ones move;
    β = 0 holds no reference and logs no kl; β > 0 logs a kl that starts at 0 (policy = reference)."""
    tr = _trainer(sft_start, prompts_per_iteration=4, num_generations=4, num_iterations=2, num_mini_batches=2,
                  lr=1e-3)
    assert tr.ref is None
    st = tr.step(["What is 12 + 34?", "What is 50 + 51?", "What is 77 + 88?", "What is 19 + 90?"])
    first = st["minibatches"][0]
    assert first["ratio_min"] == 1.0 and first["ratio_max"] == 1.0 and first["pass"] == 0
    assert len(st["minibatches"]) == 4 and max(abs(mb["ratio_max"] - 1) for mb in st["minibatches"][1:]) > 0
    assert "kl" not in st and 0 <= st["frac_reward_zero_std"] <= 1
    for key in ("reward", "reward_std", "rewards/addition_accuracy_reward/mean", "clip_ratio/low_mean",
                "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "completions/mean_length",
                "completions/clipped_ratio", "loss"):
        assert np.isfinite(st[key]), key
    trb = _trainer(sft_start, prompts_per_iteration=4, num_generations=4, beta=0.1)
    st = trb.step(["What is 12 + 34?", "What is 50 + 51?", "What is 77 + 88?", "What is 19 + 90?"])
    assert st["kl"] == 0.0


def test_dynamic_sampling_drops_groups_with_equal_rewards(sft_start):
    tr = _trainer(sft_start, prompts_per_iteration=4, num_generations=4, dynamic_sampling=True)
    calls = []

    def first_group_varies(prompts, completions, **kw):  # group 0 mixed, groups 1-3 all 0
        calls.append(len(completions))
        return [1.0, 0.0, 0.0, 0.0] + [0.0] * 12

    tr.reward_funcs = [first_group_varies]
    tr.correct_func = first_group_varies
    st = tr.step(["What is 12 + 34?", "What is 50 + 51?", "What is 77 + 88?", "What is 19 + 90?"])
    assert st["groups_kept"] == 1 and st["frac_reward_zero_std"] == 0.75 and not st["skipped"]
    tr.reward_funcs = [lambda prompts, completions, **kw: [0.0] * 16]
    before = [p.data.copy() for p in tr.policy.parameters()]
    st = tr.step(["What is 12 + 34?", "What is 50 + 51?", "What is 77 + 88?", "What is 19 + 90?"])
    assert st["skipped"] and st["groups_kept"] == 0
    assert all(np.array_equal(a, p.data) for a, p in zip(before, tr.policy.parameters()))


def test_refill_groups_keeps_drawing_until_the_batch_is_full_of_varied_groups():
    """DAPO §3.2 by hand: batch of 2 groups, G = 2. Round 0 [1,1 | 0,1]: group 1 varies; round 1
    [0,0 | 1,0 | 0,1]: groups 1 and 2 vary, but only one is needed, so the batch is (0,1), (1,1)."""
    script = {0: [1, 1, 0, 1], 1: [0, 0, 1, 0, 0, 1], 2: [1, 0, 1, 0]}
    drawn = []

    def draw(k):
        drawn.append(k)
        return script[k]

    kept, st = refill_groups(draw, 2, 2, max_rounds=4)
    assert kept == [(0, 1), (1, 1)] and drawn == [0, 1]
    assert st == {"sampling_rounds": 2, "groups_drawn": 5, "groups_kept": 2}
    kept, st = refill_groups(lambda k: [0.0, 0.0, 1.0, 1.0], 2, 2, max_rounds=3)  # never a varied group
    assert kept == [] and st == {"sampling_rounds": 3, "groups_drawn": 6, "groups_kept": 0}
    kept, st = refill_groups(lambda k: [1.0, 0.0, 0.5, 0.5], 1, 2, max_rounds=3)  # full after one round
    assert kept == [(0, 0)] and st["sampling_rounds"] == 1
    with pytest.raises(ValueError, match="whole groups"):
        refill_groups(lambda k: [1.0, 0.0, 1.0], 1, 2, max_rounds=2)
    with pytest.raises(ValueError, match="max_rounds"):
        refill_groups(lambda k: [1.0, 0.0], 1, 2, max_rounds=0)


def test_concat_rollouts_pads_to_common_widths_without_changing_log_probs(sft_start):
    tr = _trainer(sft_start, prompts_per_iteration=2, num_generations=2)
    rng = np.random.default_rng(0)
    a = tr.sample_groups(["What is 12 + 34?"], 2, rng)
    b = tr.sample_groups(["What is 5 + 6?", "What is 99 + 1?"], 2, rng)  # a shorter prompt
    c = concat_rollouts([a, b], tr.pad_id)
    assert c.input_ids.shape[0] == 6 and c.prompt_length == max(a.prompt_length, b.prompt_length)
    assert c.texts == a.texts + b.texts and c.prompts == a.prompts + b.prompts
    with no_grad():
        lp_c = tr.forward(c)[0].data
        for rows, r in ((slice(0, 2), a), (slice(2, 6), b)):
            lp = tr.forward(r)[0].data
            n = r.response_mask.shape[1]
            np.testing.assert_allclose(lp_c[rows, :n], lp, atol=1e-5)
            assert np.array_equal(c.response_mask[rows, :n], r.response_mask)
            assert not c.response_mask[rows, n:].any()


def test_dynamic_sampling_refills_the_batch_with_new_prompts(sft_start):
    """Round 0: only group 0 of 4 varies; round 1 (4 new prompts): every group varies, so 3 of them
    complete the batch: 4 groups trained, 2 rounds, 8 groups drawn, one call for 4 more prompts."""
    tr = _trainer(sft_start, prompts_per_iteration=4, num_generations=4, dynamic_sampling=True, max_num_gen_batches=3)
    calls, asked = [], []

    def scripted(prompts, completions, **kw):
        calls.append(list(prompts))
        return ([1.0, 0.0, 0.0, 0.0] + [0.0] * 12) if len(calls) == 1 else [1.0, 0.0, 0.0, 0.0] * 4

    def more(n):
        asked.append(n)
        return ["What is 1 + 2?", "What is 3 + 4?", "What is 5 + 6?", "What is 7 + 8?"]

    tr.reward_funcs = [scripted]
    tr.correct_func = scripted
    st = tr.step(["What is 12 + 34?", "What is 50 + 51?", "What is 77 + 88?", "What is 19 + 90?"], more)
    assert asked == [4] and st["sampling_rounds"] == 2 and st["groups_drawn"] == 8 and st["groups_kept"] == 4
    assert st["frac_reward_zero_std"] == 0.75 and not st["skipped"]  # logged for the batch as first drawn
    assert calls[1][::4] == ["What is 1 + 2?", "What is 3 + 4?", "What is 5 + 6?", "What is 7 + 8?"]
    with pytest.raises(ValueError, match="max_num_gen_batches"):
        GRPOConfig(max_num_gen_batches=0)


def test_grpo_raises_the_reward_from_an_sft_start(sft_start):
    """From the 1,000-step SFT start, 60 iterations on 16 fixed train problems × G = 8: the reward
    (fraction of correct samples) rises clearly."""
    tr = _trainer(sft_start, prompts_per_iteration=16, num_generations=8, lr=3e-4)
    prompts = AdditionTask().prompts("train")[:16]
    hist = [tr.step(prompts) for _ in range(60)]
    start = np.mean([h["reward"] for h in hist[:5]])
    end = np.mean([h["reward"] for h in hist[-5:]])
    assert end > start + 0.15, (start, end)


def test_eval_on_start_false_skips_only_the_evaluation_before_training(sft_start, tmp_path):
    from minillm.train.grpo import grpo

    cfg = GRPOConfig(sft=sft_start, out_dir=str(tmp_path / "g"), iterations=2, prompts_per_iteration=2,
                     num_generations=2, eval_prompts=4, eval_num_generations=2, eval_on_start=False, progress=False)
    m = grpo(cfg).metrics
    assert "eval_start" not in m and [e["iteration"] for e in m["evals"]] == [2]
    assert m["eval_end"]["n"] == 4 and len(m["eval_end"]["correct_counts"]) == 4


def test_cli_runs_end_to_end_and_writes_metrics(tmp_path):
    from minillm.checkpoint import load_model
    from minillm.cli import main

    sft = tmp_path / "sft.safetensors"
    rc = main(["grpo", "--sft", str(sft), "--sft-steps", "30", "--out-dir", str(tmp_path / "grpo"),
               "--iterations", "2", "--prompts-per-iteration", "4", "--num-generations", "4", "--eval-prompts", "8",
               "--eval-num-generations", "4", "--format-reward-weight", "0.5", "--reward", "digit",
               "--progress", "false"])
    assert rc == 0 and sft.is_file()
    m = json.loads((tmp_path / "grpo" / "metrics.json").read_text())
    assert len(m["history"]) == 2 and m["reference_model_held"] is False
    assert set(m["eval_start"]) >= {"pass@1", "pass@1_se", "pass@G", "greedy", "G", "n"} and m["eval_end"]["n"] == 8
    assert 0 <= m["eval_end"]["pass@1"] <= m["eval_end"]["pass@G"] <= 1
    for e in (m["eval_start"], m["eval_end"]):  # pass@1 and its standard error from the per-prompt counts
        c = np.asarray(e["correct_counts"]) / e["G"]
        assert len(c) == 8 and e["pass@1"] == pytest.approx(c.mean(), abs=1e-5)
        assert e["pass@1_se"] == pytest.approx(c.std(ddof=1) / math.sqrt(8), abs=1e-5)
    assert {"rewards/addition_format_reward/mean", "rewards/addition_digit_reward/mean"} <= set(m["history"][0])
    model, tok, _ = load_model(str(tmp_path / "grpo" / "checkpoint.safetensors"))
    assert tok is not None and model.config.block_size == 40
