"""Chapter 07: the memory calculator (minillm/memory.py).

Reference figures: QLoRA §1 and §3 (docs/reference.md §2 "Memory"), Korthikanti et al. 2022 Eq. 1,
LoRA parameter counts (Hu et al. 2021).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from minillm import memory as M
from minillm import quant as Q


def test_preset_parameter_counts():
    # LLaMA-1 (Touvron et al. 2023) and Llama-2-70B parameter counts as published with the checkpoints.
    assert M.PRESETS["7b"].n_params() == 6_738_415_616
    assert M.PRESETS["13b"].n_params() == 13_015_864_320
    assert M.PRESETS["33b"].n_params() == 32_528_943_616
    assert M.PRESETS["65b"].n_params() == 65_285_660_672
    assert M.PRESETS["70b"].n_params() == 68_976_648_192
    assert M.PRESETS["70b"].kv_dim == 1024  # GQA: 8 KV heads of 128


def test_lora_r8_on_4096x4096_layer():
    shape = M.ModelShape(n_layers=1, d_model=4096, d_ff=11008, n_heads=32, vocab_size=32000)
    assert shape.lora_params(8, ["q_proj"]) == 65_536  # r*(in+out) = 8*(4096+4096)
    assert shape.lora_params(8, "qv") == 2 * 65_536
    # 7B, r=64 on all seven Linear layers of 32 blocks
    assert M.PRESETS["7b"].lora_params(64, "all-linear") == 32 * 64 * (4 * 8192 + 3 * (4096 + 11008)) == 159_907_840
    with pytest.raises(ValueError, match="unknown LoRA target"):
        shape.lora_params(8, ["c_attn"])


def test_double_quant_saving_70b_is_3_26_gb_not_0_5():
    with_dq = M.estimate(70e9, "qlora", double_quant=True)
    without = M.estimate(70e9, "qlora", double_quant=False)
    assert without["quant_constants"] == pytest.approx(70e9 * 0.5 / 8, rel=1e-9)  # 4.375 GB
    assert with_dq["quant_constants"] == pytest.approx(70e9 * (8 / 64 + 32 / (64 * 256)) / 8, rel=1e-9)  # 1.111 GB
    saved = without["total"] - with_dq["total"]
    assert saved == pytest.approx(70e9 * 0.373046875 / 8, rel=1e-9)
    assert saved / 1e9 == pytest.approx(3.26, abs=0.005)
    assert saved / 2**30 == pytest.approx(3.04, abs=0.005)
    assert saved > 6 * 0.5e9  # the "0.5 GB per 70B model" reading is off by ~6.5x
    # QLoRA §1: "about 3 GB for a 65B model"
    s65 = M.estimate(65e9, "qlora", double_quant=False)["total"] - M.estimate(65e9, "qlora")["total"]
    assert s65 / 1e9 == pytest.approx(3.03, abs=0.005)
    # bits per parameter of the NF4 weights: 4.5 vs 4.127
    assert (without["weights"] + without["quant_constants"]) * 8 / 70e9 == pytest.approx(4.5)
    assert (with_dq["weights"] + with_dq["quant_constants"]) * 8 / 70e9 == pytest.approx(4.127, abs=5e-4)


def test_qlora_65b_fits_48gb_with_paper_settings():
    """QLoRA §1: a 65B model fine-tunes on one 48 GB GPU. Assumptions: NF4 + double quantization of all
    Linear weights, BF16 embeddings/LM head/norms, LoRA r=64 on all Linear layers in BF16 with BF16 grads,
    paged AdamW 32-bit states on the LoRA parameters, batch 1, sequence 512, gradient checkpointing,
    no dropout masks. Estimate: ~44.98 GB."""
    est = M.estimate(
        "65b", "qlora", dtype="bf16", optimizer="paged_adamw", lora_r=64, lora_targets="all-linear",
        batch=1, seq_len=512, gradient_checkpointing=True, double_quant=True,
    )
    assert est["total"] < 48e9
    assert est["total"] == pytest.approx(44.98e9, rel=0.01)
    assert est["trainable_params"] == 799_539_200
    assert est["optimizer_states"] == 8 * 799_539_200
    assert est["lora_weights"] == est["gradients"] == 2 * 799_539_200
    # without gradient checkpointing the activations alone add ~15 GB and it no longer fits
    no_ckpt = M.estimate("65b", "qlora", lora_r=64, batch=1, seq_len=512, gradient_checkpointing=False)
    assert no_ckpt["total"] > 48e9
    # 16-bit full fine-tuning needs far more (QLoRA §1: "more than 780 GB")
    full = M.estimate("65b", "full", dtype="bf16", batch=1, seq_len=512, gradient_checkpointing=True)
    assert full["total"] > 780e9
    assert full["weights"] + full["gradients"] + full["master_weights"] + full["optimizer_states"] == 16 * full["n_params"]


def test_korthikanti_activation_formula():
    shape = M.ModelShape(n_layers=24, d_model=1024, d_ff=4096, n_heads=16, vocab_size=50304, gated_mlp=False)
    s, b, h, a = 2048, 4, 1024, 16
    per_layer = M.activation_bytes_per_layer(shape, b, s, act_bytes=2, dropout=True)
    assert per_layer == s * b * h * (34 + 5 * a * s / h)
    # without dropout: no masks (1 byte each, sbh twice and as^2b) and no dropout output (2as^2b)
    assert M.activation_bytes_per_layer(shape, b, s, 2, dropout=False) == s * b * h * 32 + 2 * a * s * s * b
    assert M.activation_bytes_per_layer(shape, b, s, 2, dropout=False, flash_attention=True) == s * b * h * 32
    total = M.activation_bytes(shape, b, s, gradient_checkpointing=False, act_bytes=2, dropout=True)
    assert total == 24 * per_layer + b * s * 50304 * 4
    ckpt = M.activation_bytes(shape, b, s, gradient_checkpointing=True, act_bytes=2, dropout=True)
    assert ckpt == 2 * s * b * h * 24 + per_layer + b * s * 50304 * 4  # Korthikanti §4: 2sbhL + one layer


def test_quant_constants_match_quantize_4bit_bytes():
    """memory.py's QLoRA weight bytes equal what quant.quantize_4bit actually allocates."""
    shape = M.ModelShape(n_layers=2, d_model=64, d_ff=176, n_heads=4, n_kv_heads=2, vocab_size=100)
    rng = np.random.default_rng(0)
    for dq in (False, True):
        packed_bytes = const_bytes = 0
        for _ in range(shape.n_layers):
            for _, fin, fout in shape.linear_shapes():
                w = rng.standard_normal((fout, fin)).astype(np.float32)
                packed, qs = Q.quantize_4bit(w, 64, "nf4", compress_statistics=dq)
                packed_bytes += packed.nbytes
                const_bytes += Q.quant_state_nbytes(qs)
        est = M.estimate(shape, "qlora", dtype="fp32", double_quant=dq, lora_r=4)
        assert est["quant_constants"] == const_bytes
        assert est["weights"] == packed_bytes + 4 * shape.other_params()


def test_component_arithmetic_full_lora_qlora():
    shape = M.PRESETS["7b"]
    P = shape.n_params()
    full = M.estimate(shape, "full", dtype="fp32", optimizer="adamw")
    assert full["weights"] == full["gradients"] == 4 * P and full["master_weights"] == 0
    assert full["optimizer_states"] == 8 * P
    lora = M.estimate(shape, "lora", dtype="bf16", lora_r=8, lora_targets="qv", optimizer="adamw_8bit")
    L = shape.lora_params(8, "qv")
    assert lora["trainable_params"] == L == 32 * 2 * 8 * 8192
    assert lora["weights"] == 2 * P and lora["gradients"] == 2 * L
    assert lora["optimizer_states"] == int(np.ceil(L * (2 + 8 / 256)))
    for est in (full, lora):
        assert est["total"] == sum(est[k] for k in M.COMPONENTS)
    qlora = M.estimate(shape, "qlora", lora_r=8, lora_targets="qv")
    assert qlora["total"] < lora["total"] < full["total"]
    # QLoRA §3 / Figure 6: the 4-bit base of LLaMA-7B is ~3.9 GB (+ 16-bit embeddings and LM head)
    assert (qlora["weights"] + qlora["quant_constants"]) / 1e9 == pytest.approx(
        (shape.linear_params() * 4.127 / 8 + 2 * shape.other_params()) / 1e9, rel=1e-3
    )


def test_from_gpt_config_counts_minillm_parameters():
    model_mod = pytest.importorskip("minillm.model")
    cfg = model_mod.GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=True)
    gpt = model_mod.GPT(cfg, seed=0)
    actual = sum(int(np.prod(p.shape)) for p in gpt.parameters())
    assert M.ModelShape.from_gpt_config(cfg).n_params() == actual


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        M.estimate(7e9, "dora")
    with pytest.raises(ValueError, match="preset"):
        M.estimate("8b")
    with pytest.raises(ValueError, match="dtype"):
        M.estimate(7e9, dtype="int3")
    with pytest.raises(ValueError, match="optimizer"):
        M.estimate(7e9, optimizer="adam9")
    with pytest.raises(ValueError, match="batch"):
        M.estimate(7e9, batch=0)


def _cli(argv):
    p = argparse.ArgumentParser()
    M.add_arguments(p)
    return p.parse_args(argv)


def test_cli_table_and_json(capsys):
    assert M.run(_cli(["--preset", "65b", "--method", "qlora", "--gradient-checkpointing"])) == 0
    out = capsys.readouterr().out
    assert "LLaMA-65B" in out and "total" in out and "44.98" in out
    assert M.run(_cli(["--params", "7e9", "--method", "full", "--json"])) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["n_params"] == 7_000_000_000 and est["weights"] == 14_000_000_000
    assert M.run(_cli(["--preset", "7b", "--lora-targets", "c_attn"])) == 2
    assert "unknown LoRA target" in capsys.readouterr().err  # errors go to stderr
