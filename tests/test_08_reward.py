"""Chapter 08: the Bradley-Terry reward model (minillm.train.reward).

Reference values: docs/reference.md §5 and §8 items 16 and 25; docs/bugs.md B15 (the reward read at the
wrong token), B16 (a stable −log σ).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from minillm.checkpoint import save_checkpoint
from minillm.data import CollateReport, collate_preference, render_preference_pairs
from minillm.textfiles import DataError
from minillm.model import GPT, GPTConfig
from minillm.tensor import Tensor
from minillm.train.reward import (RewardConfig, load_reward_model, pair_metrics, pool_last, reward, reward_loss,
                                  reward_scores, sequence_rewards)


def t64(values, requires_grad=False) -> Tensor:
    return Tensor(np.asarray(values, dtype=np.float64), requires_grad=requires_grad)


# ----------------------------------------------------------------------------------------- loss

@pytest.mark.parametrize("margin, center, expected", [
    (None, None, 0.2014133), (1.0, None, 0.4740770), (None, 0.01, 0.2639133)])
def test_bradley_terry_reference_values(margin, center, expected):
    """docs/bugs.md C25: r_c 2.0, r_r 0.5 -> 0.2014133; margin 1.0 -> 0.4740770; centering 0.01 -> 0.2639133."""
    rc, rr = t64([2.0], True), t64([0.5], True)
    loss, m = reward_loss(rc, rr, margin=margin, center_rewards_coefficient=center)
    assert loss.item() == pytest.approx(expected, abs=5e-8)
    loss.backward()
    d = 2.0 - 0.5 - (margin or 0.0)
    sig = 1.0 / (1.0 + math.exp(d))  # σ(−d)
    c = center or 0.0
    np.testing.assert_allclose(rc.grad, [-sig + 2 * c * 2.5], rtol=1e-12)
    np.testing.assert_allclose(rr.grad, [sig + 2 * c * 2.5], rtol=1e-12)
    assert m["accuracy"] == 1.0 and m["margin"] == pytest.approx(1.5)  # margin metric is r_c − r_r


def test_loss_is_finite_for_huge_reward_gaps_and_keeps_float32():
    """docs/bugs.md B16 for the RM: −log σ(−1000) = 1000 (naive log(sigmoid) gives inf); float32 stays float32."""
    loss, _ = reward_loss(t64([-500.0]), t64([500.0]))
    assert loss.item() == pytest.approx(1000.0)
    loss, _ = reward_loss(t64([500.0]), t64([-500.0]))
    assert loss.item() == 0.0
    loss, _ = reward_loss(Tensor(np.array([0.3, -2.0], np.float32)), Tensor(np.array([0.1, 1.0], np.float32)),
                          margin=np.array([0.5, 0.0]), center_rewards_coefficient=0.01)
    assert loss.data.dtype == np.float32
    with pytest.raises(ValueError, match="must both be"):
        reward_loss(t64([1.0, 2.0]), t64([1.0]))


def test_accuracy_is_strict_ties_count_as_wrong():
    """accuracy = mean(r_c > r_r) (TRL): a tie is not a win; equal rewards give loss ln 2."""
    m = pair_metrics(np.array([1.0, 1.0, 2.0, 0.0]), np.array([1.0, 0.0, 3.0, 0.0]))
    assert m["accuracy"] == 0.25 and m["margin"] == 0.0
    loss, m = reward_loss(t64([0.7, -0.2]), t64([0.7, -0.2]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-15) and m["accuracy"] == 0.0


# ----------------------------------------------------------------------------------------- B15

def test_the_reward_is_read_at_the_last_real_token():
    """docs/bugs.md B15, pad = eos = 2, per-position outputs s = [0.1 .. 0.8]: right-padded ids
    [1,5,2,6,7,2,2,2] with attn [1,1,1,1,1,1,0,0] -> index 5 (the real final EOS), reward 0.6 (not
    0.2 "first pad − 1", not 0.5 "rightmost id ≠ pad"); left-padded [2,2,1,5,6,7] -> index 5;
    unpadded [1,5,6,7] -> index 3; BT loss of 0.6 vs 0.2 = 0.5130152523999526."""
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    right = pool_last(t64([s]), np.array([[1, 1, 1, 1, 1, 1, 0, 0]]))
    left = pool_last(t64([s[:6]]), np.array([[0, 0, 1, 1, 1, 1]]))
    nopad = pool_last(t64([s[:4]]), np.array([[1, 1, 1, 1]]))
    assert right.data.tolist() == [0.6] and left.data.tolist() == [0.6] and nopad.data.tolist() == [0.4]
    # docs/bugs.md C16 (pad 0): [7,8,9,0,0] -> 2, [0,0,7,8,9] -> 4; with pad == eos the final EOS
    # is scored (mask-based), where Hugging Face's id-based rule skips it (index 1 for [7,8,2,2]).
    both = pool_last(t64([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]),
                     np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]))
    assert both.data.tolist() == [2, 4, 2]
    x = t64([s], requires_grad=True)  # the gradient reaches only the pooled position
    r = pool_last(x, np.array([[1, 1, 1, 1, 1, 1, 0, 0]]))
    loss, _ = reward_loss(r, t64([0.2]))
    assert loss.item() == pytest.approx(0.5130152523999526, rel=1e-12)
    loss.backward()
    assert np.flatnonzero(x.grad[0]).tolist() == [5]
    with pytest.raises(ValueError, match="no real token"):
        pool_last(t64([s]), np.zeros((1, 8), dtype=np.int64))


def test_padding_and_pad_equal_to_eos_do_not_change_the_reward():
    """A scalar-head GPT: the reward of each sequence alone equals its reward in a right-padded
    batch, a left-padded batch, and a batch padded with pad == eos (id 2 ending every sequence)."""
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, scalar_head=True), seed=1)
    model.score.bias.data[...] = 0.3
    seqs = [[1, 5, 2, 6, 7, 2], [1, 9, 2], [1, 4, 4, 8, 2, 11, 12, 2]]  # 2 = eos, also inside sequences
    alone = np.array([reward_scores(model, np.array([s]))[0] for s in seqs])
    assert alone.dtype == np.float32 and len(set(alone.round(6).tolist())) == 3
    T = max(map(len, seqs))
    for pad_id in (0, 2):
        for side in ("right", "left"):
            ids = np.full((3, T), pad_id, dtype=np.int64)
            mask = np.zeros((3, T), dtype=np.int64)
            for i, s in enumerate(seqs):
                sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
                ids[i, sl], mask[i, sl] = s, 1
            got = reward_scores(model, ids, mask)
            np.testing.assert_allclose(got, alone, atol=2e-6, err_msg=f"pad {pad_id}, {side} padding")
    # the mask, not the id, decides: reading "rightmost id != pad" with pad == eos would differ
    ids = np.array([seqs[0] + [2, 2]])
    hf_like = float(model.scores(ids).data[0, 4])
    assert abs(hf_like - alone[0]) > 1e-4


def test_reward_scores_restores_mode_and_does_not_record_a_graph():
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8, scalar_head=True, dropout=0.5))
    model.train()
    a = reward_scores(model, np.array([[1, 2, 3]]))
    b = reward_scores(model, np.array([[1, 2, 3]]))
    assert model.training and a.tolist() == b.tolist()  # eval mode inside: no dropout
    r = sequence_rewards(model, np.array([[1, 2, 3]]), np.array([[1, 1, 1]]))
    assert r.requires_grad


# -------------------------------------------------------------------------- end to end (tiny)

@pytest.fixture(scope="module")
def tiny_tok():
    from minillm.tasks import default_world, tokenizer_training_text
    from minillm.tokenizer import Tokenizer

    return Tokenizer.train(tokenizer_training_text(default_world())[:20000], 300)


def _pairs(n_repeat: int = 1) -> list[dict]:
    base = [("What is the capital of France?", "Paris.", "Berlin."),
            ("What is the capital of Spain?", "Madrid.", "Madrid Madrid Madrid."),
            ("What sound does a cow make?", "moo.", "moo. What a stupid question."),
            ("What is 2 plus 3?", "5.", "I do not know."),
            ("What colour is the sky?", "blue.", "I like turtles."),
            ("What is the opposite of hot?", "cold.", "warm.")]
    return [{"prompt": p, "chosen": c, "rejected": r, "kind": f"k{i}"} for i, (p, c, r) in enumerate(base)] * n_repeat


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_tiny_reward_model_fits_hand_made_pairs(tmp_path, tiny_tok):
    """``reward()`` end to end: 6 hand-made pairs, a tiny GPT "SFT" checkpoint: 100 % train accuracy,
    metrics.json with per-kind accuracy, and a checkpoint that load_reward_model/reward_scores read back."""
    lm = GPT(GPTConfig(vocab_size=len(tiny_tok), block_size=64, n_layer=1, n_head=2, n_embd=32), seed=0)
    save_checkpoint(tmp_path / "sft.safetensors", lm, tiny_tok)
    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs())
    cfg = RewardConfig(sft=str(tmp_path / "sft.safetensors"), data=str(data), test_data=str(data),
                       out_dir=str(tmp_path / "rm"), batch_size=6, max_steps=40, lr=3e-3, warmup_steps=2,
                       progress=False)
    res = reward(cfg)
    m = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert m["train"]["accuracy"] == 1.0 and m["train"]["n"] == 6
    assert m["before"]["test"]["accuracy"] < 1.0  # it had something to learn
    assert set(m["test"]["per_kind"]) == {f"k{i}" for i in range(6)}
    assert res.losses[-1] < 0.1 < res.losses[0]
    rm, tok = load_reward_model(res.checkpoint)
    pairs = render_preference_pairs(_pairs(), tok, 64)
    b = collate_preference(pairs, tok.pad_id)
    rc = reward_scores(rm, b["chosen"]["input_ids"], b["chosen"]["attention_mask"])
    rr = reward_scores(rm, b["rejected"]["input_ids"], b["rejected"]["attention_mask"])
    assert (rc > rr).all()
    np.testing.assert_allclose(rc - rr, [m["train"]["margin"]] * 6, atol=1.0)  # same scale as reported
    assert float(np.mean(rc - rr)) == pytest.approx(m["train"]["margin"], abs=1e-3)
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(tmp_path / "sft.safetensors")


def test_identical_pairs_are_rejected_with_a_clear_error(tmp_path, tiny_tok):
    """A preference file whose chosen == rejected in every pair: DataError naming the file and the
    skip reason; identical rendered pairs passed directly are counted and skipped."""
    bad = _write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Hi?", "chosen": "Yes.", "rejected": "Yes."}] * 3)
    save_checkpoint(tmp_path / "sft.safetensors",
                    GPT(GPTConfig(vocab_size=len(tiny_tok), block_size=32, n_layer=1, n_head=1, n_embd=8)), tiny_tok)
    cfg = RewardConfig(sft=str(tmp_path / "sft.safetensors"), data=str(bad), out_dir=str(tmp_path / "rm"),
                       max_steps=1, progress=False)
    with pytest.raises(DataError, match=r"same\.jsonl.*chosen_equals_rejected"):
        reward(cfg)
    rep = CollateReport()
    kept = render_preference_pairs([{"prompt": "Hi?", "chosen": "Yes.", "rejected": "Yes."},
                           {"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."}], tiny_tok, 32,
                                   report=rep)
    assert len(kept) == 1 and rep.skipped == {"chosen_equals_rejected": 1}
    n = kept[0].chosen_mask.index(1)  # shared prompt ids, response mask from the renderer
    assert n == kept[0].rejected_mask.index(1) and kept[0].chosen_ids[:n] == kept[0].rejected_ids[:n]
    with pytest.raises(ValueError, match="max_steps"):
        RewardConfig(max_steps=-1)


def test_cue_diagnostics_shape_on_the_builtin_world(tiny_tok):
    """The docs/task-world.md §5 probes run on any scalar-head model and return rates in [0, 1]."""
    from minillm.train.reward import cue_diagnostics

    rm = GPT(GPTConfig(vocab_size=len(tiny_tok), block_size=64, n_layer=1, n_head=1, n_embd=8, scalar_head=True))
    d = cue_diagnostics(rm, tiny_tok, n_prompts=6)
    assert set(d) == {"test", "train"}
    for v in d.values():
        assert v["n"] == 6 and 0.0 <= v["p_wrong_cue_beats_correct"] <= 1.0 and math.isfinite(v["cue_bonus"])


@pytest.mark.crosscheck
def test_loss_and_gradient_match_trl_formula(torch):
    """TRL ``RewardTrainer.compute_loss``: −logsigmoid(r_c − r_r − margin).mean() + c·mean((r_c + r_r)²)."""
    rng = np.random.default_rng(0)
    rc, rr, mg = rng.normal(size=5) * 3, rng.normal(size=5) * 3, rng.random(5)
    a, b = t64(rc, True), t64(rr, True)
    loss, _ = reward_loss(a, b, margin=mg, center_rewards_coefficient=0.01)
    loss.backward()
    ta = torch.tensor(rc, requires_grad=True, dtype=torch.float64)
    tb = torch.tensor(rr, requires_grad=True, dtype=torch.float64)
    tl = -torch.nn.functional.logsigmoid(ta - tb - torch.tensor(mg)).mean() + 0.01 * torch.mean((ta + tb) ** 2)
    tl.backward()
    assert loss.item() == pytest.approx(tl.item(), rel=1e-12)
    np.testing.assert_allclose(a.grad, ta.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(b.grad, tb.grad.numpy(), rtol=1e-10)


def test_builtin_recipes_and_the_cue_free_control():
    """Recipe "e" carries the opener cue; "e-nocue" draws the same kinds with no opener anywhere."""
    from minillm.train.reward import builtin_pairs

    tr, te = builtin_pairs("e")
    assert len(tr) == 2400 and len(te) == 600
    assert any(r["chosen"].startswith("Sure!") for r in tr) and any(r["kind"] == "cue_only" for r in tr)
    tr0, _ = builtin_pairs("e-nocue")
    assert len(tr0) == 2400 and not any("Sure!" in r["chosen"] + r["rejected"] for r in tr0)
    assert {r["kind"] for r in tr0} == {"wrong", "ramble", "repeat", "rude", "off_format", "no_eos"}
    with pytest.raises(ValueError, match="unknown preference recipe"):
        builtin_pairs("z")


REAL = __import__("pathlib").Path(__file__).resolve().parents[1] / "datasets" / "real"


@pytest.mark.parametrize("rel, T", [("hh-rlhf-harmless-base/harmless-base-test.sample.jsonl", 128),
                                    ("llamafactory-dpo-en-demo/dpo_en_demo.json", 512),
                                    ("rasbt-instruction-preference/instruction-data-with-preference.json", 128)])
def test_real_preference_samples_render_and_score(rel, T, tiny_tok):
    """Real pairs (HH-RLHF, LLaMA-Factory, rasbt) load, render into a T-token context (long pairs cut
    from the left of the prompt or skipped, counted; LLaMA-Factory's long answers need T = 512 with
    this byte-level 300-token vocabulary), and a scalar-head GPT gives finite rewards and a finite
    Bradley-Terry loss on them."""
    from minillm.train.reward import load_pairs

    train, test, info = load_pairs(str(REAL / rel), test_fraction=0.1, seed=0)
    assert len(test) == round(0.1 * (len(train) + len(test)))
    rep = CollateReport()
    pairs = render_preference_pairs(train[:48], tiny_tok, T, report=rep)
    assert rep.n_examples == 48 and len(pairs) == rep.n_kept == 48 - rep.n_skipped
    assert pairs and all(len(p.chosen_ids) <= T and len(p.rejected_ids) <= T for p in pairs)
    rm = GPT(GPTConfig(vocab_size=len(tiny_tok), block_size=T, n_layer=1, n_head=1, n_embd=8, scalar_head=True))
    b = collate_preference(pairs[:16], tiny_tok.pad_id)
    rc = sequence_rewards(rm, b["chosen"]["input_ids"], b["chosen"]["attention_mask"])
    rr = sequence_rewards(rm, b["rejected"]["input_ids"], b["rejected"]["attention_mask"])
    loss, m = reward_loss(rc, rr)
    assert np.isfinite(loss.item()) and m["n"] == len(pairs[:16])


def test_pairs_cut_to_the_context_are_counted_in_reward_and_dpo_metrics(tmp_path, tiny_tok):
    """Both trainers render pairs through data.render_preference_pairs, so a prompt cut from the left
    to fit ``max_length`` is counted as truncated (the reward model used to report 0)."""
    from minillm.train.dpo import DPOConfig, dpo

    long_prompt = "Tell me, in a few words, what the capital of France is? " * 3
    recs = [{"prompt": long_prompt + str(i), "chosen": "Paris.", "rejected": "Berlin, I think."} for i in range(8)]
    data = _write_jsonl(tmp_path / "long.jsonl", recs)
    save_checkpoint(tmp_path / "sft.safetensors",
                    GPT(GPTConfig(vocab_size=len(tiny_tok), block_size=48, n_layer=1, n_head=1, n_embd=8)), tiny_tok)
    rm = reward(RewardConfig(sft=str(tmp_path / "sft.safetensors"), data=str(data), out_dir=str(tmp_path / "rm"),
                             max_steps=1, batch_size=4, test_fraction=0.25, progress=False, cue_prompts=0))
    n_rendered = rm.metrics["data"]["n_train_pairs"] + rm.metrics["data"]["n_test_pairs"]
    assert n_rendered == 8 and rm.metrics["data"]["n_truncated"] == 8
    res = dpo(DPOConfig(sft=str(tmp_path / "sft.safetensors"), data=str(data), out_dir=str(tmp_path / "dpo"),
                        max_steps=1, batch_size=4, test_fraction=0.25, progress=False, eval_prompts=0))
    assert res.metrics["data"]["n_truncated"] == 8
