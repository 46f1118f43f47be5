"""Chapter 02: the GPT, its KV cache and generation, checkpoints and the pretraining loop.

Tokenizer tests live in test_02_tokenizer.py (same chapter marker).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minillm import functional as F
from minillm.checkpoint import load_checkpoint, load_model, save_checkpoint
from minillm.model import GPT, GPTConfig, default_position_ids, last_token_index, sample_next, shift_labels
from minillm.tokenizer import Tokenizer
from minillm.train.common import read_text
from minillm.train.pretrain import PretrainConfig, pretrain

REAL = Path(__file__).resolve().parents[1] / "datasets" / "real"


def tiny(**kw) -> GPT:
    cfg = dict(vocab_size=40, block_size=96, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg), seed=0)


def test_forward_shapes_dtypes_and_initial_loss():
    m = tiny()
    ids = np.random.default_rng(0).integers(0, 40, (3, 12))
    logits, loss = m(ids, labels=ids)
    assert logits.shape == (3, 12, 40) and logits.dtype == np.float32
    assert loss.dtype == np.float32
    # GPT-2 init gives nearly uniform predictions: loss ≈ ln V
    assert abs(loss.item() - np.log(40)) < 0.05


def test_labels_shift_inside_loss_and_ignore_index():
    """Logits at t predict labels[t+1]; −100 is ignored (labels are unshifted; the loss shifts, as Hugging Face)."""
    m = tiny()
    ids = np.array([[5, 6, 7, 8, 9]])
    labels = np.array([[-100, -100, 7, 8, 9]])
    logits, loss = m(ids, labels=labels)
    lp = F.log_softmax(logits).data[0]
    expected = -(lp[1, 7] + lp[2, 8] + lp[3, 9]) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    np.testing.assert_array_equal(shift_labels(labels), [[-100, 7, 8, 9, -100]])


def test_sequence_logprobs_sums_response_tokens():
    m = tiny()
    ids = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    labels = np.array([[-100, -100, 3, 4], [-100, -100, -100, 4]])
    got = m.sequence_logprobs(ids, labels).data
    lp = F.log_softmax(m(ids)[0]).data
    np.testing.assert_allclose(got, [lp[0, 1, 3] + lp[0, 2, 4], lp[1, 2, 4]], rtol=1e-6)


def test_kv_cache_greedy_equals_recompute_for_64_tokens():
    m = tiny()
    prompt = np.array([[3, 1, 4, 1, 5]])
    a = m.generate(prompt, max_new_tokens=64, temperature=0, use_cache=True)
    b = m.generate(prompt, max_new_tokens=64, temperature=0, use_cache=False)
    assert a.new_tokens.shape == (1, 64)
    np.testing.assert_array_equal(a.new_tokens, b.new_tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_position_ids_from_left_padding():
    """docs/bugs.md B08: attn [0,0,1,1,1,1] -> positions [0,0,0,1,2,3]."""
    np.testing.assert_array_equal(default_position_ids(np.array([[0, 0, 1, 1, 1, 1]])), [[0, 0, 0, 1, 2, 3]])


def test_padded_rows_give_exactly_what_they_give_alone():
    """docs/bugs.md B08: last-token logits of a left-padded and a right-padded row equal the unpadded row's."""
    m = tiny()
    t = [7, 8, 9, 10]
    alone = m(np.array([t]))[0].data[0, -1]
    left = m(np.array([[0, 0] + t]), attention_mask=np.array([[0, 0, 1, 1, 1, 1]]))[0].data[0, -1]
    right = m(np.array([t + [0, 0]]), attention_mask=np.array([[1, 1, 1, 1, 0, 0]]))[0].data[0, 3]
    np.testing.assert_allclose(left, alone, atol=1e-5)
    np.testing.assert_allclose(right, alone, atol=1e-5)
    # in float64 the agreement is at the 1e-6 level or better
    m64 = tiny()
    for p in m64.parameters():
        p.data = p.data.astype(np.float64)
    a64 = m64(np.array([t]))[0].data[0, -1]
    l64 = m64(np.array([[0, 0] + t]), attention_mask=np.array([[0, 0, 1, 1, 1, 1]]))[0].data[0, -1]
    np.testing.assert_allclose(l64, a64, atol=1e-6)


def test_fully_masked_rows_are_finite_and_loss_has_no_nan():
    m = tiny()
    ids = np.array([[0, 0, 5, 6], [5, 6, 7, 8]])
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    labels = np.array([[-100, -100, -100, 6], [-100, 6, 7, 8]])
    logits, loss = m(ids, attention_mask=mask, labels=labels)
    loss.backward()
    assert np.isfinite(logits.data).all() and np.isfinite(loss.item())
    assert all(np.isfinite(p.grad).all() for p in m.parameters())


def test_batched_left_padded_generation_equals_one_by_one():
    """docs/bugs.md B08 for generation: each prompt of a left-padded batch gets the tokens it gets alone."""
    m = tiny()
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    batch = m.generate(prompts, max_new_tokens=24, temperature=0, pad_id=0)
    for i, p in enumerate(prompts):
        alone = m.generate([p], max_new_tokens=24, temperature=0, pad_id=0)
        np.testing.assert_array_equal(batch.new_tokens[i], alone.new_tokens[0])
        np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)


def test_eos_stops_and_pads_after():
    m = tiny()
    first = m.generate([[1, 2]], max_new_tokens=10, temperature=0)
    eos = int(first.new_tokens[0, 2])  # pretend the third greedy token is EOS
    out = m.generate([[1, 2]], max_new_tokens=10, temperature=0, eos_id=eos, pad_id=39)
    assert out.finished[0]
    k = int(np.argmax(out.new_tokens[0] == eos))
    assert out.response_mask[0].sum() == k + 1
    assert (out.new_tokens[0, k + 1:] == 39).all()


def test_sampling_is_seeded_and_temperature_logprobs():
    m = tiny()
    a = m.generate([[1, 2]], max_new_tokens=8, temperature=1.0, rng=np.random.default_rng(3))
    b = m.generate([[1, 2]], max_new_tokens=8, temperature=1.0, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a.new_tokens, b.new_tokens)
    with pytest.raises(ValueError, match="Generator"):
        m.generate([[1, 2]], max_new_tokens=2, temperature=1.0)
    # docs/bugs.md C19: logits [2,1,0], T = 0.7, token 0 -> log-prob −0.2601184 (without T: −0.4076060)
    logits = np.array([[2.0, 1.0, 0.0]], dtype=np.float32)
    for _ in range(20):
        tok, lp = sample_next(logits, 0.7, None, None, np.random.default_rng(_))
        if tok[0] == 0:
            assert lp[0] == pytest.approx(-0.2601184, abs=1e-6)
            break
    else:
        pytest.fail("token 0 (p ≈ 0.77) never sampled in 20 draws")


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    seen_k = {int(sample_next(logits, 1.0, 2, None, rng)[0][0]) for _ in range(200)}
    assert seen_k == {0, 1}
    seen_p = {int(sample_next(logits, 1.0, None, 0.7, rng)[0][0]) for _ in range(200)}
    assert seen_p == {0, 1}  # 0.5 < 0.7 ≤ 0.8: the nucleus is the first two tokens
    tok, lp = sample_next(logits, 1.0, None, 0.7, np.random.default_rng(1))
    assert lp[0] == pytest.approx(np.log([0.5 / 0.8, 0.3 / 0.8][tok[0]]), rel=1e-5)


def test_sequence_longer_than_block_size_is_an_error():
    m = tiny(block_size=8)
    with pytest.raises(ValueError, match="length 9.*block_size=8"):
        m(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match="exceeds block_size=8"):
        m.generate([[1, 2, 3]], max_new_tokens=6, temperature=0)


def test_scalar_head_and_last_token_index():
    """docs/bugs.md B15: the reward is read at the last real token for right and left padding."""
    np.testing.assert_array_equal(last_token_index(np.array([[1, 1, 1, 1, 1, 1, 0, 0]])), [5])
    np.testing.assert_array_equal(last_token_index(np.array([[0, 0, 1, 1, 1, 1]])), [5])
    np.testing.assert_array_equal(last_token_index(np.array([[1, 1, 1, 1]])), [3])
    with pytest.raises(ValueError):
        last_token_index(np.array([[0, 0]]))
    m = tiny(scalar_head=True)
    s = m.scores(np.array([[1, 2, 3]]))
    assert s.shape == (1, 3)
    with pytest.raises(ValueError, match="scalar head"):
        tiny().scores(np.array([[1, 2]]))


def test_tiny_model_overfits_tiny_corpus():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 40, 32)
    m = tiny(n_embd=32)
    from minillm.optim import AdamW

    opt = AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    ids = np.stack([seq, seq])
    for _ in range(150):
        _, loss = m(ids, labels=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def _pt_cfg(tmp: Path, **kw) -> PretrainConfig:
    base = dict(corpus="", out_dir=str(tmp), vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16,
                batch_size=4, max_steps=12, eval_interval=4, checkpoint_interval=4, progress=False, warmup_steps=2)
    base.update(kw)
    return PretrainConfig(**base)


CORPUS = ("The cat sat on the mat. The dog barked at the cat. " * 40
          + "A bird sang in the tree while the sun rose over the hill. " * 30)


def test_resumed_run_reproduces_uninterrupted_losses(tmp_path):
    full = pretrain(_pt_cfg(tmp_path / "full"), text=CORPUS)
    part = pretrain(_pt_cfg(tmp_path / "part", max_steps=12, checkpoint_interval=4), text=CORPUS)
    assert part.train_losses == full.train_losses  # same seed, same run
    # interrupt: run 8 steps of a 12-step schedule, then resume to 12
    cfg8 = _pt_cfg(tmp_path / "resume")
    cfg8.max_steps = 12
    res_a = pretrain_steps(cfg8, stop_after=8)
    assert len(res_a.train_losses) == 8
    res_b = pretrain(_pt_cfg(tmp_path / "resume", resume=True), text=CORPUS)
    assert res_b.train_losses == full.train_losses
    assert [v for _, v in res_b.val_losses] == pytest.approx([v for _, v in full.val_losses], abs=0)


def pretrain_steps(cfg: PretrainConfig, stop_after: int):
    """Run pretraining and 'crash' after ``stop_after`` steps (the checkpoint at that step stays)."""
    import minillm.train.pretrain as P

    class Crash(Exception):
        pass

    orig = P.save_checkpoint

    def save_then_maybe_crash(path, model, tok, opt, train_state):
        orig(path, model, tok, opt, train_state=train_state)
        if train_state["step"] >= stop_after:
            raise Crash

    P.save_checkpoint = save_then_maybe_crash
    try:
        P.pretrain(cfg, text=CORPUS)
    except Crash:
        pass
    finally:
        P.save_checkpoint = orig
    ck = load_checkpoint(Path(cfg.out_dir) / P.CHECKPOINT_NAME)
    return P.PretrainResult(losses=ck.train_state["train_losses"])


def test_checkpoint_round_trip_and_shape_mismatch(tmp_path):
    m = tiny()
    tok = Tokenizer()
    path = save_checkpoint(tmp_path / "c.safetensors", m, tok)
    m2, tok2, ck = load_model(path)
    ids = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(m(ids)[0].data, m2(ids)[0].data)
    assert tok2.encode("hi") == tok.encode("hi")
    # a checkpoint whose weights do not fit its stored config names the shapes
    bad = tiny(n_embd=32)
    save_checkpoint(tmp_path / "bad.safetensors", bad)
    raw, meta = __import__("minillm.checkpoint", fromlist=["x"]).read_safetensors(tmp_path / "bad.safetensors")
    cfg = json.loads(meta["config"])
    cfg["n_embd"] = 16
    meta["config"] = json.dumps(cfg)
    from minillm.checkpoint import save_safetensors_atomic

    save_safetensors_atomic(tmp_path / "bad.safetensors", raw, meta)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*shape mismatch.*\(40, 32\) vs model \(40, 16\)"):
        load_model(tmp_path / "bad.safetensors")


def test_checkpoint_refuses_pickle(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(p)
    q = tmp_path / "model.pt"
    q.write_bytes(b"\x80\x04\x95 pickle protocol 4")
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(q)


def test_bad_corpus_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        read_text(empty)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello\nwor\xe9ld\n")
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at byte 9 \(line 2\)"):
        read_text(bad)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="261"):
        pretrain(_pt_cfg(tmp_path / "v", vocab_size=200), text=CORPUS)


def test_pretraining_on_tinyshakespeare_lowers_validation_loss(tmp_path):
    text = (REAL / "tinyshakespeare" / "input.txt").read_text()[:120_000]
    res = pretrain(_pt_cfg(tmp_path, vocab_size=384, block_size=48, n_layer=2, n_embd=48, batch_size=8,
                           max_steps=90, eval_interval=30, checkpoint_interval=90, lr=3e-3), text=text)
    vals = [v for _, v in res.val_losses]
    assert len(vals) == 3
    assert vals[0] > vals[1] > vals[2]
    assert vals[2] < np.log(384) - 1.0  # well below the uniform baseline (nats/token)
    assert Path(res.checkpoint).exists() and not Path(res.checkpoint + ".tmp").exists()


def test_continued_pretraining_resumes_on_a_new_corpus_only_when_asked(tmp_path):
    """Resuming with another corpus and schedule is refused (naming the fields) unless continue_training
    is set: then the run goes on from the checkpoint's step with the new text (continued pretraining)."""
    first = pretrain(_pt_cfg(tmp_path, max_steps=4, checkpoint_interval=4, eval_interval=4), text=CORPUS)
    more = CORPUS.replace("cat", "dog")
    with pytest.raises(ValueError, match="max_steps"):
        pretrain(_pt_cfg(tmp_path, max_steps=6, checkpoint_interval=6, eval_interval=6, resume=True), text=more)
    res = pretrain(_pt_cfg(tmp_path, max_steps=6, checkpoint_interval=6, eval_interval=6, resume=True,
                           continue_training=True), text=more)
    assert len(first.train_losses) == 4 and len(res.train_losses) == 6
    assert res.train_losses[:4] == first.train_losses
