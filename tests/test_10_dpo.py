"""Chapter 10: direct preference optimization (minillm.train.dpo).

Reference values: docs/reference.md §7 and §8 items 20, 22, 23; docs/bugs.md B16 (a stable −log σ,
padding must not leak into the summed log-probs).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from minillm.model import GPT, GPTConfig
from minillm.tensor import Tensor, no_grad
from minillm.nn import disable_dropout
from minillm.train.dpo import DPOConfig, dpo_loss

LN2 = 0.6931471805599453


def t64(values, requires_grad=False) -> Tensor:
    return Tensor(np.atleast_1d(np.asarray(values, dtype=np.float64)), requires_grad=requires_grad)


# ------------------------------------------------------------------------------- loss values

@pytest.mark.parametrize("loss_type, eps, expected", [
    ("sigmoid", 0.0, 0.5981389), ("sigmoid", 0.1, 0.6181389), ("robust", 0.1, 0.5731389), ("ipo", 0.0, 9.0)])
def test_reference_values(loss_type, eps, expected):
    """docs/bugs.md C23: π_c −10, π_r −12, ref −11/−11, β 0.1 (h = 2): DPO 0.5981389, cDPO ε 0.1
    0.6181389, robust ε 0.1 0.5731389, IPO (summed log-probs) 9.0; rewards 0.1 / −0.1, margin 0.2,
    accuracy 1."""
    loss, m = dpo_loss(t64(-10.0), t64(-12.0), t64(-11.0), t64(-11.0), beta=0.1, loss_type=loss_type,
                       label_smoothing=eps)
    assert loss.item() == pytest.approx(expected, abs=5e-8)
    assert m["rewards/chosen"] == pytest.approx(0.1) and m["rewards/rejected"] == pytest.approx(-0.1)
    assert m["rewards/margins"] == pytest.approx(0.2) and m["rewards/accuracies"] == 1.0
    assert m["logps/chosen"] == -10.0 and m["logps/rejected"] == -12.0


def test_ipo_length_normalisation_is_an_option():
    """TRL divides each log-ratio by the completion length (clamped to ≥ 1): h = 2/2 − 0/1 = 1 ->
    (1 − 5)² = 16; an empty completion (length 0) divides by 1, never by 0."""
    loss, _ = dpo_loss(t64(-10.0), t64(-12.0), t64(-12.0), t64(-12.0), beta=0.1, loss_type="ipo",
                       chosen_lengths=[2], rejected_lengths=[0])
    assert loss.item() == pytest.approx(16.0)
    loss, _ = dpo_loss(t64(0.0), t64(0.0), t64(0.0), t64(0.0), beta=0.1, loss_type="ipo",
                       chosen_lengths=[0], rejected_lengths=[0])
    assert loss.item() == pytest.approx(25.0)


def test_dpo_loss_and_implicit_rewards_at_a_small_margin():
    """docs/bugs.md B16: β 0.1, π_c −10, ref_c −12, π_r −15, ref_r −14 -> z 0.3, loss ln(1 + e^−0.3) =
    0.5543552444685271; rewards 0.2 / −0.1, margin 0.3."""
    loss, m = dpo_loss(t64(-10.0), t64(-15.0), t64(-12.0), t64(-14.0), beta=0.1)
    assert loss.item() == pytest.approx(0.5543552444685271, rel=1e-13)
    assert m["rewards/chosen"] == pytest.approx(0.2) and m["rewards/rejected"] == pytest.approx(-0.1)
    assert m["rewards/margins"] == pytest.approx(0.3)


@pytest.mark.parametrize("z, expected, dz", [(0.0, LN2, -0.5), (-1000.0, 1000.0, -1.0), (1000.0, 0.0, 0.0),
                                             (-20.0, 20.000000002061153, -1.0)])
def test_extreme_margins_give_finite_losses_and_exact_gradients(z, expected, dz):
    """docs/bugs.md B16: loss = softplus(−z): z = 0 -> ln 2 (dL/dz −0.5); z = −1000 -> 1000 (grad −1);
    z = +1000 -> 0 (grad 0); z = −20 -> 20.000000002061153 (float64). β = 1, z = π_c."""
    pc = t64(z, requires_grad=True)
    loss, _ = dpo_loss(pc, t64(0.0), t64(0.0), t64(0.0), beta=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-15, abs=1e-300)
    loss.backward()
    assert np.isfinite(pc.grad).all()
    assert pc.grad[0] == pytest.approx(-1.0 / (1.0 + math.exp(z)) if abs(z) < 700 else dz, rel=1e-12, abs=1e-300)
    assert pc.grad[0] == pytest.approx(dz, abs=3e-9)
    f32, _ = dpo_loss(np.float32([z]), np.float32([0.0]), np.float32([0.0]), np.float32([0.0]), beta=1.0)
    assert f32.data.dtype == np.float32 and np.isfinite(f32.data).all()


def test_chosen_equal_rejected_gives_ln2_zero_gradient_accuracy_0():
    """docs/reference.md §7: identical chosen and rejected: h ≡ 0, loss ln 2, gradient exactly 0, accuracy 0."""
    pc = t64([-3.0, -7.5], requires_grad=True)
    pr = t64([-3.0, -7.5], requires_grad=True)
    loss, m = dpo_loss(pc, pr, np.array([-4.0, -6.0]), np.array([-4.0, -6.0]), beta=0.1)
    assert loss.item() == LN2
    loss.backward()
    # −(β/2)(∂π_c − ∂π_r) with the same value on both: equal and opposite, per-input exactly ±β/2/B
    assert pc.grad.tolist() == [-0.025, -0.025] and pr.grad.tolist() == [0.025, 0.025]
    assert (pc.grad + pr.grad).tolist() == [0.0, 0.0]  # the gradient of a shared sequence cancels exactly
    assert m["rewards/accuracies"] == 0.0 and m["rewards/margins"] == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(t64(0.0), t64(0.0), t64(0.0), t64(0.0), loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t64(0.0), t64(0.0), t64(0.0), t64(0.0), label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo_loss(t64([0.0, 1.0]), t64(0.0), t64(0.0), t64(0.0))
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="sft_weight"):
        DPOConfig(sft_weight=-1.0)


# ------------------------------------------------------------------------------- with a model

TINY = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)


def _batch(seqs, prompt_lens, pad_id=0):
    """Right-padded ids, attention mask and labels (−100 on the prompt and padding)."""
    T = max(map(len, seqs))
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, -100)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
        labels[i, p:len(s)] = s[p:]
    return ids, mask, labels


def test_policy_equal_reference_gives_ln2_and_a_nonzero_gradient():
    """docs/bugs.md C20 / trl #744: dropout off, policy == reference at step 0: loss ln 2 exactly and
    a nonzero gradient −(β/2)(∇log π(y_w) − ∇log π(y_l)); two forwards are bit-identical."""
    policy = GPT(TINY, seed=0)
    assert disable_dropout(policy) > 0
    policy.train()  # train mode: dropout would act here if it were not disabled
    c = _batch([[1, 4, 5, 6, 2], [1, 7, 8, 2]], [2, 2])
    r = _batch([[1, 4, 9, 2], [1, 7, 3, 3, 3, 2]], [2, 2])
    with no_grad():
        ref_c = policy.sequence_logprobs(c[0], c[2], c[1]).data.copy()
        ref_r = policy.sequence_logprobs(r[0], r[2], r[1]).data.copy()
    pc = policy.sequence_logprobs(c[0], c[2], c[1])
    pr = policy.sequence_logprobs(r[0], r[2], r[1])
    assert pc.data.tobytes() == ref_c.tobytes() and pr.data.tobytes() == ref_r.tobytes()
    loss, m = dpo_loss(pc, pr, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(LN2, abs=1e-7) and m["rewards/margins"] == 0.0
    loss.backward()
    norm = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in policy.parameters()
                         if p.grad is not None))
    assert norm > 1e-4


def test_padding_and_empty_completions_do_not_leak_or_give_nan():
    """docs/bugs.md B16 padding invariance: appending pads (mask 0, label −100) leaves the summed
    log-probs and the loss (ln 2 at policy == ref) unchanged — with the pad leaking in, B16's
    numbers give 0.6443966600735709 instead. docs/bugs.md C22: an all-masked completion sums to 0,
    loss ln 2, finite gradients."""
    model = GPT(TINY, seed=2)
    disable_dropout(model)
    ids, mask, labels = _batch([[1, 4, 5, 6, 2]], [2])
    base = model.sequence_logprobs(ids, labels, mask).data[0]
    pids, pmask, plabels = _batch([[1, 4, 5, 6, 2]], [2])
    pids = np.concatenate([pids, [[2, 2]]], axis=1)  # pad == eos id, as a trap for id-based masks
    pmask = np.concatenate([pmask, [[0, 0]]], axis=1)
    plabels = np.concatenate([plabels, [[-100, -100]]], axis=1)
    padded = model.sequence_logprobs(pids, plabels, pmask).data[0]
    assert padded == pytest.approx(base, abs=1e-5)
    loss, _ = dpo_loss(t64(-3.0), t64(-3.0), t64(-3.0), t64(-3.0), beta=0.1)
    assert loss.item() == LN2
    leaked, _ = dpo_loss(t64(-3.0), t64(-8.0), t64(-3.0), t64(-7.0), beta=0.1)
    assert leaked.item() == pytest.approx(0.6443966600735709, rel=1e-13)
    # empty completion: every label −100
    empty = np.full_like(labels, -100)
    pc = model.sequence_logprobs(ids, empty, mask)
    pr = model.sequence_logprobs(ids, empty, mask)
    assert pc.data.tolist() == [0.0]
    for lt in ("sigmoid", "ipo", "robust", "hinge"):
        loss, m = dpo_loss(pc, pr, np.zeros(1), np.zeros(1), beta=0.1, loss_type=lt, label_smoothing=0.1,
                           chosen_lengths=[0] if lt == "ipo" else None, rejected_lengths=[0] if lt == "ipo" else None)
        assert np.isfinite(loss.item()) and all(np.isfinite(v) for v in m.values())
        if lt == "sigmoid":
            assert loss.item() == pytest.approx(LN2, abs=1e-7)
    loss, _ = dpo_loss(pc, pr, np.zeros(1), np.zeros(1), beta=0.1)
    model.zero_grad()
    loss.backward()
    assert all(p.grad is None or np.isfinite(p.grad).all() for p in model.parameters())


def test_dpo_end_to_end_on_a_tiny_model(tmp_path):
    """``dpo()`` on a tiny GPT and hand-made pairs: the training loss starts at ln 2, falls, the
    held-out implicit-reward accuracy rises to 1, the reference log-probs are computed once, and a
    loadable checkpoint and metrics.json are written. LoRA (with the RPO term sft_weight 0.1):
    only adapters train, merged on save."""
    from minillm.checkpoint import load_model, save_checkpoint
    from minillm.tasks import default_world, tokenizer_training_text
    from minillm.tokenizer import Tokenizer
    from minillm.train.dpo import dpo, summary_lines

    tok = Tokenizer.train(tokenizer_training_text(default_world())[:20000], 300)
    lm = GPT(GPTConfig(vocab_size=len(tok), block_size=64, n_layer=1, n_head=2, n_embd=32), seed=0)
    save_checkpoint(tmp_path / "sft.safetensors", lm, tok)
    pairs = [{"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Berlin Berlin Berlin."},
             {"prompt": "What sound does a cow make?", "chosen": "moo.", "rejected": "moo. What a stupid question."},
             {"prompt": "What colour is the sky?", "chosen": "blue.", "rejected": "I like turtles."},
             {"prompt": "What is 2 plus 3?", "chosen": "5.", "rejected": "I do not know."}]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    for lora in (False, True):
        out = tmp_path / ("dpo-lora" if lora else "dpo")
        cfg = DPOConfig(sft=str(tmp_path / "sft.safetensors"), data=str(data), test_data=str(data), out_dir=str(out),
                        batch_size=4, max_steps=20, lr=1e-2, beta=0.5, warmup_steps=1, lora=lora, lora_r=4,
                        lora_targets="all-linear", sft_weight=0.1 if lora else 0.0, progress=False)
        res = dpo(cfg)
        m = json.loads((out / "metrics.json").read_text())
        hist = m["history"]
        nll0 = hist[0].get("nll", 0.0)  # RPO term (LoRA run): loss = DPO + 0.1 · mean chosen NLL
        assert (nll0 > 0) == lora
        # loss_dpo (the preference loss), nll and the total are logged separately
        assert hist[0]["loss_dpo"] == pytest.approx(LN2, abs=1e-4)
        assert hist[0]["loss"] == pytest.approx(hist[0]["loss_dpo"] + 0.1 * nll0, abs=1e-4)  # rounded in metrics.json
        assert hist[-1]["loss_dpo"] < 0.5 * LN2, [h["loss_dpo"] for h in hist]
        assert ("nll" in m["final"]) == lora and m["final"]["loss_dpo"] <= m["final"]["loss"]
        lines = summary_lines(m)
        assert lines[0].startswith(f"final train: DPO loss {m['final']['loss_dpo']:.4f}")
        assert ("total" in lines[0]) == lora and lines[1].startswith("held-out pairs: DPO loss")
        assert m["test_pairs"]["rewards/accuracies"] == 1.0
        trained, _, _ = load_model(res.checkpoint)
        assert not any(".lora_" in k for k in trained.state_dict())
        if lora:
            assert m["parameters"]["trainable"] < m["parameters"]["total"]


@pytest.mark.crosscheck
def test_crosscheck_loss_and_gradients_with_trl_formulas(torch):
    """TRL 1.16's DPOTrainer computes the loss inside ``_compute_loss`` (model forward included), so
    it cannot be called on bare log-probs; its formulas are transcribed from
    ``trl/trainer/dpo_trainer.py`` (sigmoid: −logsigmoid(β·Δ); robust: (−(1−ε)logσ(βΔ) + ε logσ(−βΔ))
    / (1−2ε); ipo: (Δ − 1/(2β))² with the per-token normalisation; hinge: relu(1 − βΔ)) and compared
    with minillm's loss and gradient with respect to all four log-prob inputs."""
    trl = require_trl()
    assert trl.__version__
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    vals = [rng.normal(-20, 5, size=6) for _ in range(4)]
    lens_c, lens_r = rng.integers(0, 9, size=6), rng.integers(1, 9, size=6)
    beta, eps = 0.1, 0.1
    for lt in ("sigmoid", "robust", "ipo", "hinge"):
        ours = [t64(v, requires_grad=True) for v in vals]
        kw = {"chosen_lengths": lens_c, "rejected_lengths": lens_r} if lt == "ipo" else {}
        loss, _ = dpo_loss(*ours, beta=beta, loss_type=lt, label_smoothing=eps if lt == "robust" else 0.0, **kw)
        loss.backward()
        tt = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in vals]
        cl, rl = tt[0] - tt[2], tt[1] - tt[3]  # chosen_logratios, rejected_logratios
        delta = cl - rl
        if lt == "sigmoid":
            per = -F.logsigmoid(beta * delta)
        elif lt == "robust":
            per = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif lt == "ipo":
            d = cl / torch.tensor(lens_c, dtype=torch.float64).clamp(min=1.0) - rl / torch.tensor(
                lens_r, dtype=torch.float64).clamp(min=1.0)
            per = (d - 1 / (2 * beta)) ** 2
        else:
            per = torch.relu(1 - beta * delta)
        ref = per.mean()
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-12), lt
        for a, b in zip(ours, tt):
            np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-10, atol=1e-15, err_msg=lt)


def require_trl():
    from conftest import require

    return require("trl")
