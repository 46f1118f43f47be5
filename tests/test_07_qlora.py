"""Chapter 07: QLoRA — a frozen 4-bit (NF4, double-quantized) base with LoRA adapters.

The memory calculator and the paged optimizer have their own files (test_07_memory.py,
test_07_paged.py) under the same chapter marker.
"""
from __future__ import annotations


import numpy as np
import pytest

from minillm import memory as M
from minillm.lora import LoRALinear, count_parameters, inject_lora
from minillm.model import GPT, GPTConfig
from minillm.optim import AdamW
from minillm.linear4bit import Linear4bit, dequantize_model, quantize_model
from minillm.quant import NF4_CODE, bits_per_parameter, dequantize_4bit, quantize_4bit
from minillm.tensor import Tensor

TINY = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=64)


def test_linear4bit_forward_backward_and_bytes():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((48, 128)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    q = Linear4bit(W, b)
    Wq = dequantize_4bit(*quantize_4bit(W, compress_statistics=True))
    x = Tensor(rng.standard_normal((2, 3, 128)).astype(np.float32), requires_grad=True)
    y = q(x)
    assert y.shape == (2, 3, 48) and y.dtype == np.float32
    np.testing.assert_allclose(y.data, x.data @ Wq.T + b, rtol=1e-5, atol=1e-5)
    g = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(g)
    np.testing.assert_allclose(x.grad, g @ Wq, rtol=1e-5, atol=1e-5)  # input gradients flow
    assert q.bias.grad is None and not q.bias.requires_grad  # nothing in the 4-bit layer trains
    assert not any(p.requires_grad for p in q.parameters())
    # bytes: packed codes (n/2) + uint8 absmax per 64 + float32 absmax2 per 256 blocks + offset
    n = W.size
    assert q.nbytes == n // 2 + n // 64 + 4 * int(np.ceil(n / 64 / 256)) + 4
    assert q.nbytes * 8 / n == pytest.approx(bits_per_parameter(q.packed, q.quant_state))
    assert q.num_quantized_parameters() == n


def test_merging_lora_into_4bit_requantizes_and_warns():
    """docs/bugs.md B13 / docs/bugs.md C3: the merged weight equals quantize(dequantize(W_q) + ΔW), not
    dequantize(W_q) + ΔW; small updates are rounded away."""
    W = np.zeros((1, 64), dtype=np.float32)
    W[0, 0] = 1.0  # exact in NF4 (code 15); absmax of the block = 1
    for dw, expected in ((0.01, 0.0), (0.05, float(NF4_CODE[8]))):
        base = Linear4bit(W, compress_statistics=False)
        layer = LoRALinear(base, r=1, lora_alpha=1, init_lora_weights=False)
        layer.lora_A.data[...] = 0
        layer.lora_A.data[0, 1] = 1.0
        layer.lora_B.data[...] = dw
        x = np.zeros((1, 64), dtype=np.float32)
        x[0, 1] = 1.0
        layer.eval()
        unmerged = layer(Tensor(x)).data[0, 0]
        assert unmerged == pytest.approx(dw, abs=1e-7)
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.merge()
        merged = layer(Tensor(x)).data[0, 0]
        assert merged == pytest.approx(expected, abs=1e-7)
        assert abs(merged - dw) <= 0.0398 + 1e-7  # at most half the local code gap × absmax
        target = W.copy()
        target[0, 1] += dw
        np.testing.assert_array_equal(base.dequantized_weight(),
                                      dequantize_4bit(*quantize_4bit(target, compress_statistics=False)))


def test_quantize_model_state_dict_round_trip_and_dequantize():
    m = GPT(TINY, seed=1)
    names = quantize_model(m)
    assert len(names) == 6 * TINY.n_layer  # q, k, v, c_proj, c_fc, mlp.c_proj per block
    assert all(not p.requires_grad for p in m.parameters())
    m2 = GPT(TINY, seed=7)
    quantize_model(m2)
    m2.load_state_dict(m.state_dict())
    ids = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(m(ids)[0].data, m2(ids)[0].data)
    ref = m(ids)[0].data
    dequantize_model(m)
    assert not any(isinstance(x, Linear4bit) for x in m.modules())
    np.testing.assert_allclose(m(ids)[0].data, ref, atol=1e-5)


def test_linear4bit_load_half_nested_state_non_strict_raises():
    """Issue 12 defect 8: load_state_dict(strict=False) of a double-quantized state into a plain
    layer (nested arrays dropped as unexpected keys) or of a nested state missing its nested arrays
    raises on first use instead of computing with garbage weights."""
    rng = np.random.default_rng(3)
    W = rng.standard_normal((24, 64)).astype(np.float32)
    x = Tensor(rng.standard_normal((2, 64)).astype(np.float32))
    nested_sd = Linear4bit(W, compress_statistics=True).state_dict()
    plain = Linear4bit(W, compress_statistics=False)
    plain.load_state_dict(nested_sd, strict=False)  # uint8 absmax + nested metadata, no nested arrays
    with pytest.raises(ValueError, match="double-quantized"):
        plain(x)
    nested = Linear4bit(W, compress_statistics=True)
    nested.load_state_dict({k: v for k, v in nested_sd.items() if not k.startswith("weight.nested")}, strict=False)
    y = nested(x)  # its own nested arrays are still there: a consistent state, same weights
    np.testing.assert_array_equal(y.data, Linear4bit(W, compress_statistics=True)(x).data)
    nested._buffers.pop("weight.nested_absmax")
    nested._stale = True
    with pytest.raises(ValueError, match="lacks nested_absmax"):
        nested(x)


def test_linear4bit_compute_state_is_cached_and_rebuilt_after_load():
    rng = np.random.default_rng(4)
    q = Linear4bit(rng.standard_normal((8, 64)).astype(np.float32))
    qs = q.compute_quant_state()
    assert qs is q.quant_state and q.compute_quant_state() is qs  # on the CPU: the state itself
    q.load_state_dict(Linear4bit(rng.standard_normal((8, 64)).astype(np.float32)).state_dict())
    assert q.compute_quant_state() is not qs and q.compute_quant_state() is q.quant_state


def test_qlora_parameter_accounting():
    m = GPT(TINY, seed=0)
    quantize_model(m)
    inject_lora(m, "all-linear", r=4, lora_alpha=8)
    counts = count_parameters(m)
    C = TINY.n_embd
    lora = TINY.n_layer * (4 * 4 * (C + C) + 4 * (C + 4 * C) + 4 * (4 * C + C))
    assert counts["trainable"] == lora
    assert counts["total"] == GPT(TINY).num_parameters() + lora


def _world_batch(tok, n=16):
    from minillm.data import collate, tokenize_sft
    from minillm.tasks import TaskWorld
    from minillm.train.sft import records_to_messages

    recs = TaskWorld().sft_records()[:n]
    return collate(tokenize_sft(records_to_messages(recs), tok, max_length=64), tok.pad_id)


def test_qlora_lowers_the_sft_loss_on_the_task_world():
    """4-bit base + LoRA adapters learns: the SFT loss on task-world rows falls, the base stays bit-identical."""
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer()  # bytes + specials: enough for a loss that must fall
    b = _world_batch(tok)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=64), seed=0)
    quantize_model(m)
    inject_lora(m, "all-linear", r=8, lora_alpha=16)
    packed_before = [x.packed.copy() for x in m.modules() if isinstance(x, Linear4bit)]
    params = [p for p in m.parameters() if p.requires_grad]
    opt = AdamW(params, lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(25):
        _, loss = m(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # nats/token, from ≈ ln(261) at init
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    for before, layer in zip(packed_before, [x for x in m.modules() if isinstance(x, Linear4bit)]):
        np.testing.assert_array_equal(before, layer.packed)


def test_memory_prediction_matches_the_arrays_of_a_minillm_model():
    """memory.py's weight and quantization-constant bytes equal what minillm's arrays hold."""
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=128)
    shape = M.ModelShape.from_gpt_config(cfg)
    m = GPT(cfg)
    held = sum(p.data.nbytes for p in m.parameters())
    est = M.estimate(shape, method="full", dtype="fp32", optimizer="adamw", batch=1, seq_len=32)
    assert est["weights"] == held
    assert est["optimizer_states"] == 2 * held  # AdamW m and v in float32
    quantize_model(m)
    held4 = sum(x.nbytes for x in m.modules() if isinstance(x, Linear4bit))
    est4 = M.estimate(shape, method="qlora", dtype="fp32", batch=1, seq_len=32, double_quant=True)
    assert est4["quant_constants"] + shape.linear_params() // 2 == held4
