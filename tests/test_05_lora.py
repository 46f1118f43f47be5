"""Chapter 05: LoRA (minillm/lora.py).

Numbers from docs/reference.md §1, docs/bugs.md C1, C2, C4, C5, C24 and docs/bugs.md B12.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re

import numpy as np
import pytest

from conftest import require
from minillm.hf import export_peft
from minillm.lora import (LoRALinear, count_parameters, format_parameter_count, inject_lora, load_adapter,
                          lora_layers, merge_and_unload, merge_lora, print_trainable_parameters, save_adapter,
                          trainable_lora_parameters, unmerge_lora)
from minillm.model import GPT, GPTConfig
from minillm.nn import Linear, Module, Parameter
from minillm.optim import AdamW
from minillm.tensor import Tensor, no_grad

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    return GPT(GPTConfig(**(TINY | kw)), seed=seed)


def batch(seed: int = 0, B: int = 3, T: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], (B, T))


def logits_of(model, ids) -> np.ndarray:
    with no_grad():
        return model(ids)[0].data.copy()


def linear_with(W, b=None) -> Linear:
    """A minillm Linear with the given weight (out, in) and bias."""
    W = np.asarray(W, dtype=np.float32)
    lin = Linear(W.shape[1], W.shape[0], bias=b is not None)
    lin.weight.data = W.copy()
    if b is not None:
        lin.bias.data = np.asarray(b, dtype=np.float32).copy()
    return lin


def lora_on(W, A, B, r, alpha, use_rslora=False, dropout=0.0) -> LoRALinear:
    layer = LoRALinear(linear_with(W), r=r, lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=dropout)
    layer.lora_A.data = np.asarray(A, dtype=np.float32).copy()
    layer.lora_B.data = np.asarray(B, dtype=np.float32).copy()
    return layer


def train_adapter(model, ids, steps: int = 3, lr: float = 1e-2) -> list[float]:
    opt = AdamW(trainable_lora_parameters(model), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        _, loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------- parameter counts


def test_rank8_on_4096x4096_adds_65536_parameters():
    layer = LoRALinear(Linear(4096, 4096, bias=False), r=8, lora_alpha=16)
    c = count_parameters(layer)
    assert c["trainable"] == 8 * (4096 + 4096) == 65_536
    assert c["total"] == 4096 * 4096 + 65_536 == 16_842_752
    assert c["percent"] == pytest.approx(0.389105, abs=1e-6)
    assert format_parameter_count(c) == "trainable params: 65,536 || all params: 16,842,752 || trainable%: 0.3891"
    assert layer.lora_A.shape == (8, 4096) and layer.lora_B.shape == (4096, 8)
    assert layer.lora_A.dtype == np.float32 and layer.lora_B.dtype == np.float32
    # kaiming-uniform(a=√5) bound 1/√in = 1/64; B = 0
    assert np.abs(layer.lora_A.data).max() <= 1 / 64 and np.abs(layer.lora_A.data).max() > 0.99 / 64
    assert not layer.lora_B.data.any()


def test_count_parameters_gpt_and_print(capsys):
    model = tiny_gpt()
    n_base = model.num_parameters()
    names = inject_lora(model, ("q_proj", "v_proj"), r=4, lora_alpha=8)
    assert names == [f"transformer.h.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    c = count_parameters(model)
    assert c["trainable"] == 4 * 4 * (32 + 32) == 1024
    assert c["total"] == n_base + 1024
    line = print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() == line
    assert line == f"trainable params: 1,024 || all params: {n_base + 1024:,d} || trainable%: {100 * 1024 / (n_base + 1024):.4f}"


def test_count_parameters_4bit_packed_counts_twice():
    class Packed(Module):  # a 4-bit weight stored as a uint8 Parameter (as peft sees Params4bit)
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 8, 4
            self.weight = Parameter(np.zeros((16, 1), dtype=np.uint8), requires_grad=False)  # 32 codes

        def forward(self, x):
            return x

    class Buffered(Module):  # a 4-bit weight in a buffer, counted through the hook
        def __init__(self):
            super().__init__()
            self.register_buffer("weight_packed", np.zeros((16, 1), dtype=np.uint8))
            self.num_quantized_parameters = 32

    assert count_parameters(Packed()) == {"trainable": 0, "total": 32, "percent": 0.0}
    assert count_parameters(Buffered())["total"] == 32


def test_init_options():
    g = LoRALinear(Linear(2048, 4, bias=False), r=4, init_lora_weights="gaussian", rng=np.random.default_rng(0))
    assert abs(float(g.lora_A.data.std()) - 0.25) < 0.01 and not g.lora_B.data.any()  # N(0, (1/r)²), B = 0
    f = LoRALinear(Linear(8, 4), r=4, init_lora_weights=False)
    assert np.abs(f.lora_B.data).min() > 0  # nn.Linear default on B: ΔW ≠ 0 (for merge tests)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoRALinear(Linear(8, 8), init_lora_weights="pissa")


def test_merge_hook_on_base_is_used():
    class HookedBase(Module):  # stands in for a 4-bit layer: merging goes through merge_delta/unmerge_delta
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 3, 2
            self.W = np.zeros((2, 3), dtype=np.float32)
            self.calls = []

        def forward(self, x):
            return x @ Tensor(self.W.T.copy())

        def merge_delta(self, delta):
            self.calls.append("merge")
            self.W = self.W + delta

        def unmerge_delta(self, delta):
            self.calls.append("unmerge")
            self.W = self.W - delta

    base = HookedBase()
    layer = LoRALinear(base, r=1, lora_alpha=3, init_lora_weights=False)
    x = Tensor(np.ones((1, 3), dtype=np.float32))
    y = layer(x).data.copy()
    layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    np.testing.assert_allclose(base.W, layer.delta_weight(), rtol=1e-6)
    np.testing.assert_allclose(layer(x).data, y, atol=1e-6)
    layer.unmerge()
    assert base.calls == ["merge", "unmerge"]


# --------------------------------------------------------------------------- scaling (docs/bugs.md C1, B12)


def test_scaling_is_alpha_over_r_or_over_sqrt_r():
    layer = lora_on(np.eye(2), A=[[1, 1]], B=[[1], [0]], r=1, alpha=2)
    y = layer(Tensor(np.array([[1.0, 2.0]], dtype=np.float32)))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y.data, [[7.0, 2.0]])
    assert LoRALinear(Linear(4, 4), r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    assert LoRALinear(Linear(4, 4), r=4, lora_alpha=8).scaling == 2.0


@pytest.mark.parametrize("r, use_rslora, expected", [(8, False, 128.0), (4, False, 128.0), (8, True, 362.038672)])
def test_lora_contribution_is_scaled_by_alpha_over_r(r, use_rslora, expected):
    # B12 uses x@A@B with A (in, r), B (r, out); ours are lora_A (r, in), lora_B (out, r): all ones either way.
    # B12's 4-wide layer is 8 wide here (r=8 > 4 is refused): y = α/r · r · 8 = 128 (α/√r: 16·√8·8 = 362.04)
    layer = lora_on(np.zeros((8, 8)), A=np.ones((r, 8)), B=np.ones((8, r)), r=r, alpha=16, use_rslora=use_rslora)
    y = layer(Tensor(np.ones((1, 8), dtype=np.float32))).data
    np.testing.assert_allclose(y, np.full((1, 8), expected), rtol=1e-6)
    assert not np.allclose(y, 16.0 * r * 8)  # the "alpha instead of alpha/r" bug


def test_merge_and_unmerge_round_trip_the_weight():
    layer = lora_on(np.zeros((4, 4)), A=np.ones((4, 4)), B=np.ones((4, 4)), r=4, alpha=16)  # ΔW = 16/4·4 = 16
    x = Tensor(np.ones((1, 4), dtype=np.float32))
    unmerged = layer(x).data.copy()
    layer.merge()
    assert layer.merged
    np.testing.assert_array_equal(layer.base.weight.data, np.full((4, 4), 16.0))
    np.testing.assert_array_equal(layer(x).data, unmerged)
    np.testing.assert_array_equal(layer(x).data, np.full((1, 4), 64.0))
    layer.unmerge()
    np.testing.assert_allclose(layer.base.weight.data, 0.0, atol=1e-6)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


# --------------------------------------------------------------------------- invariants on a GPT


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_lora_model_equals_base_at_init(targets):
    ids = batch()
    base = tiny_gpt()
    model = tiny_gpt()
    inject_lora(model, targets, r=4, lora_alpha=16, lora_dropout=0.1)
    model.eval()
    np.testing.assert_array_equal(logits_of(model, ids), logits_of(base, ids))
    model.train()  # dropout acts on the LoRA branch only; with B = 0 the output is still the base's
    np.testing.assert_array_equal(logits_of(model, ids), logits_of(base, ids))


def test_all_linear_excludes_heads():
    model = tiny_gpt(tie_weights=False, scalar_head=True)
    names = inject_lora(model, "all-linear")
    assert len(names) == 2 * 6
    assert not any(n.split(".")[-1] in ("lm_head", "score") for n in names)
    assert {n.split(".")[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "c_proj", "c_fc"}
    assert not model.lm_head.weight.requires_grad and not model.score.weight.requires_grad


def test_inject_errors_name_targets():
    model = tiny_gpt()
    with pytest.raises(ValueError, match=r"query_key_value.*matched no linear layer.*q_proj"):
        inject_lora(model, ["query_key_value"])
    with pytest.raises(ValueError, match="rank r"):
        LoRALinear(Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(Linear(8, 8), lora_dropout=1.0)
    # a regex string is matched against the full name (PEFT); "attn.c_proj" as a suffix
    assert inject_lora(tiny_gpt(), r"transformer\.h\.1\.attn\.(q|v)_proj") == [
        "transformer.h.1.attn.q_proj", "transformer.h.1.attn.v_proj"]
    assert inject_lora(tiny_gpt(), ["attn.c_proj"]) == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def test_rank_larger_than_the_layer_is_refused_on_every_path():
    """r > min(in, out) is refused (a deviation from PEFT: B·A has rank ≤ min(in, out), so the extra
    parameters are wasted), naming the layer's module path, its shape and r; r = min(in, out) is fine."""
    with pytest.raises(ValueError, match=r"r=4 is larger than layer Linear \(in_features=8, out_features=3\)"):
        LoRALinear(Linear(8, 3), r=4)
    assert LoRALinear(Linear(8, 3), r=3).lora_A.shape == (3, 8)
    model = tiny_gpt(scalar_head=True)  # score: Linear(32, 1)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"r=2 is larger than layer score \(in_features=32, out_features=1\)"):
        inject_lora(model, ["q_proj", "score"], r=2)
    assert not lora_layers(model) and model.state_dict().keys() == before.keys()  # left unchanged
    with pytest.raises(ValueError, match=r"r=33 .*transformer\.h\.0\.attn\.q_proj \(in_features=32, out_features=32\)"):
        inject_lora(tiny_gpt(), ("q_proj", "v_proj"), r=33)
    assert len(inject_lora(tiny_gpt(), ("q_proj", "v_proj"), r=32)) == 4
    from minillm.linear4bit import quantize_model  # the QLoRA path: 4-bit layers keep in/out_features

    q = tiny_gpt()
    quantize_model(q, blocksize=32)
    with pytest.raises(ValueError, match=r"r=64 .*transformer\.h\.0\.attn\.q_proj"):
        inject_lora(q, "all-linear", r=64)
    from minillm import memory

    shape = memory.ModelShape.from_gpt_config(tiny_gpt().config)
    with pytest.raises(ValueError, match=r"lora_r=33 is larger than layer q_proj .*in_features=32, out_features=32"):
        memory.estimate(shape, "lora", dtype="fp32", lora_r=33, lora_targets="qv")
    assert memory.estimate(shape, "lora", dtype="fp32", lora_r=32, lora_targets="qv")["trainable_params"] == 2 * 2 * 32 * 64


def test_dropout_on_lora_branch_only():
    rng = np.random.default_rng(3)
    W, A, B = rng.normal(size=(5, 6)), rng.normal(size=(2, 6)), rng.normal(size=(5, 2))
    layer = lora_on(W, A, B, r=2, alpha=6, dropout=0.5)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    mask_rng = copy.deepcopy(layer.lora_dropout.rng)
    y = layer(Tensor(x)).data
    keep = (mask_rng.random(x.shape) >= 0.5).astype(np.float32) * np.float32(2.0)  # inverted dropout
    expected = x @ W.T.astype(np.float32) + 3.0 * ((x * keep) @ A.T.astype(np.float32)) @ B.T.astype(np.float32)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    layer.eval()
    y_eval = layer(Tensor(x)).data
    np.testing.assert_allclose(y_eval, x @ W.T + 3.0 * (x @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, y_eval)  # dropout was really active in train mode


def test_merged_equals_unmerged_in_eval_and_unmerge_restores():
    ids = batch(1)
    model = tiny_gpt()
    inject_lora(model, "all-linear", r=4, lora_alpha=12, lora_dropout=0.5, init_lora_weights=False)
    W0 = {n: p.data.copy() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    model.eval()
    unmerged = logits_of(model, ids)
    assert np.abs(unmerged - logits_of(tiny_gpt(), ids)).max() > 1e-3  # B ≠ 0: the adapter matters
    model.train()  # merging in train mode folds in no dropout mask: ΔW is deterministic
    assert len(merge_lora(model)) == 12
    model.eval()
    merged = logits_of(model, ids)
    np.testing.assert_allclose(merged, unmerged, atol=1e-6, rtol=0)
    assert merged.dtype == np.float32
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if n in W0:  # W + Δ − Δ: within an ulp of max(|W|, |Δ|)
            layer = dict(lora_layers(model))[n[:-len(".base_layer.weight")]]
            scale = np.maximum(np.abs(W0[n]), np.abs(layer.delta_weight()))
            assert np.all(np.abs(p.data - W0[n]) <= np.spacing(scale.astype(np.float32)))
    np.testing.assert_allclose(logits_of(model, ids), unmerged, atol=1e-6, rtol=0)


def test_merge_and_unload_restores_plain_structure():
    ids = batch(2)
    model = tiny_gpt()
    inject_lora(model, ("q_proj", "v_proj", "c_fc"), r=4, lora_alpha=8, init_lora_weights=False)
    model.eval()
    with_adapter = logits_of(model, ids)
    merge_and_unload(model)
    assert not lora_layers(model)
    assert list(model.state_dict()) == list(tiny_gpt().state_dict())
    np.testing.assert_allclose(logits_of(model, ids), with_adapter, atol=1e-6, rtol=0)


def test_fan_in_fan_out_conv1d_delta_is_transposed():
    class Conv1D(Module):  # GPT-2's layout: weight (in, out), y = x @ W + b
        def __init__(self, W, b):
            super().__init__()
            self.in_features, self.out_features = W.shape
            self.weight, self.bias = Parameter(W), Parameter(b)

        def forward(self, x):
            return x @ self.weight + self.bias

    rng = np.random.default_rng(4)
    base = Conv1D(rng.normal(size=(6, 9)).astype(np.float32), rng.normal(size=9).astype(np.float32))
    layer = LoRALinear(base, r=3, lora_alpha=5, init_lora_weights=False, fan_in_fan_out=True,
                       rng=np.random.default_rng(1))
    assert layer.lora_A.shape == (3, 6) and layer.lora_B.shape == (9, 3)
    delta = layer.delta_weight()
    assert delta.shape == (6, 9)
    np.testing.assert_allclose(delta, (layer.lora_B.data @ layer.lora_A.data).T * (5 / 3), rtol=1e-6)
    x = Tensor(rng.normal(size=(4, 6)).astype(np.float32))
    unmerged = layer(x).data.copy()
    layer.merge()
    np.testing.assert_allclose(layer(x).data, unmerged, atol=1e-5)


# --------------------------------------------------------------------------- training


def test_only_adapter_parameters_change():
    ids = batch(3)
    model = tiny_gpt()
    inject_lora(model, ("q_proj", "v_proj"), r=4, lora_alpha=8)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.{m}.{ab}" for i in range(2) for m in ("q_proj", "v_proj")
                         for ab in ("lora_A", "lora_B")}
    losses = train_adapter(model, ids, steps=5)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in trainable:
            assert not np.array_equal(p.data, before[n]), n
        else:
            assert np.array_equal(p.data, before[n]), n  # base weights bit-identical
            assert p.grad is None, n


def test_first_backward_gives_lora_B_a_gradient_and_lora_A_none():
    model = tiny_gpt()
    inject_lora(model, ("q_proj", "v_proj"), r=4, lora_alpha=8)
    ids = batch(4)
    _, loss = model(ids, labels=ids)
    loss.backward()
    for _, layer in lora_layers(model):
        assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
        assert np.all(layer.lora_A.grad == 0.0)  # dL/dA = scaling·Bᵀ(...) = 0 exactly while B = 0
        assert np.abs(layer.lora_B.grad).max() > 0
        assert layer.lora_B.grad.dtype == np.float32
        assert layer.base.weight.grad is None


# --------------------------------------------------------------------------- adapter files


def test_adapter_save_load_round_trip(tmp_path):
    ids = batch(5)
    model = tiny_gpt()
    inject_lora(model, ("q_proj", "v_proj"), r=4, lora_alpha=8, seed=1)
    train_adapter(model, ids, steps=3)
    model.eval()
    expected = logits_of(model, ids)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, str(path))
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors"]  # atomic write leaves no temp file

    fresh = tiny_gpt()
    assert load_adapter(fresh, str(path)) == [n for n, _ in lora_layers(model)]  # injects from the file's config
    fresh.eval()
    np.testing.assert_array_equal(logits_of(fresh, ids), expected)

    other = tiny_gpt()
    inject_lora(other, ("q_proj", "v_proj"), r=4, lora_alpha=8, seed=7)  # already injected: tensors copied in
    load_adapter(other, str(path))
    other.eval()
    np.testing.assert_array_equal(logits_of(other, ids), expected)


def test_adapter_load_errors(tmp_path):
    model = tiny_gpt()
    inject_lora(model, ("q_proj", "v_proj"), r=4, lora_alpha=8)
    path = str(tmp_path / "a.safetensors")
    save_adapter(model, path)
    wider = tiny_gpt()
    inject_lora(wider, ("q_proj", "k_proj", "v_proj"), r=4, lora_alpha=8)
    with pytest.raises(KeyError, match=r"a\.safetensors.*missing keys.*transformer\.h\.0\.attn\.k_proj\.lora_A"):
        load_adapter(wider, path)
    other_r = tiny_gpt()
    inject_lora(other_r, ("q_proj", "v_proj"), r=2, lora_alpha=8)
    with pytest.raises(ValueError, match="r=4.*differs.*r=2"):
        load_adapter(other_r, path)
    # same config, but a file whose tensor has the wrong shape
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    t = load_file(path)
    t["transformer.h.0.attn.q_proj.lora_A"] = np.zeros((4, 31), dtype=np.float32)
    bad = str(tmp_path / "bad.safetensors")
    save_file(t, bad, metadata=meta)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A: file \(4, 31\) vs model \(4, 32\)"):
        load_adapter(model, bad)
    with pytest.raises(FileNotFoundError):
        load_adapter(model, str(tmp_path / "nope.safetensors"))


def test_adapter_records_its_base_and_refuses_another(tmp_path):
    """The fingerprint of the base (config + the adapted layers' frozen weights) is stored in the
    adapter file; loading onto another base raises naming both fingerprints and the files; a file
    written before fingerprints loads with a printed warning; check_base=False skips the check."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from minillm.lora import base_model_fingerprint

    model = tiny_gpt(seed=0)
    model.name_or_path = "base0.safetensors"
    inject_lora(model, ("q_proj", "v_proj"), r=4, init_lora_weights=False)
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(model, path)
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    fp = meta["base_fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{64}", fp) and meta["base_model_name_or_path"] == "base0.safetensors"
    assert fp == base_model_fingerprint(model) == base_model_fingerprint(
        tiny_gpt(seed=0), ["transformer.h.0.attn.q_proj", "transformer.h.0.attn.v_proj", "transformer.h.1.attn.q_proj",
                           "transformer.h.1.attn.v_proj"])
    assert fp != base_model_fingerprint(tiny_gpt(seed=0, n_head=4), [n for n, _ in lora_layers(model)])  # config
    assert len(load_adapter(tiny_gpt(seed=0), path)) == 4  # its own base: loads, no warning
    other = tiny_gpt(seed=1)
    other.name_or_path = "base1.safetensors"
    ours = base_model_fingerprint(other, [n for n, _ in lora_layers(model)])
    with pytest.raises(ValueError, match=rf"adapter\.safetensors: the adapter was trained on base model {fp[:12]} "
                                         rf"\(base0\.safetensors\) but this model \(base1\.safetensors\) is {ours[:12]}"):
        load_adapter(other, path)
    assert not lora_layers(other)  # refused before anything was injected
    assert len(load_adapter(other, path, check_base=False)) == 4
    old = str(tmp_path / "old.safetensors")  # an adapter written before the fingerprint existed
    save_file(load_file(path), old, metadata={"format": "minillm-lora", "lora_config": meta["lora_config"]})
    with pytest.warns(UserWarning, match=r"old\.safetensors: the adapter records no base-model fingerprint"):
        assert len(load_adapter(tiny_gpt(seed=1), old)) == 4


def test_qlora_adapter_fingerprint_matches_its_float_base_and_its_4bit_base(tmp_path):
    from minillm.linear4bit import quantize_model

    q = tiny_gpt(seed=0)
    quantize_model(q, blocksize=32)
    inject_lora(q, "all-linear", r=2)
    path = str(tmp_path / "qlora.safetensors")
    save_adapter(q, path)
    again = tiny_gpt(seed=0)
    quantize_model(again, blocksize=32)
    assert len(load_adapter(again, path)) == 12  # the same 4-bit base (6 linear layers x 2 blocks)
    assert len(load_adapter(tiny_gpt(seed=0), path)) == 12  # the float base it was quantized from
    with pytest.raises(ValueError, match="the adapter was trained on base model"):
        load_adapter(tiny_gpt(seed=2), path)


def test_export_peft_layout(tmp_path):
    from safetensors.numpy import load_file

    model = tiny_gpt()
    inject_lora(model, ("q_proj", "v_proj"), r=4, lora_alpha=8)
    train_adapter(model, batch(6), steps=2)
    cfg = export_peft(model, str(tmp_path), base_model_name_or_path="gpt2")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk == cfg
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16  # fused q|v: rank 2r, α' = 2α keeps α'/(2r) = α/r
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["c_attn"]
    assert cfg["use_rslora"] is False and cfg["base_model_name_or_path"] == "gpt2"
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(tensors) == 4
    for k in tensors:
        assert re.fullmatch(r"^base_model\.model\..*\.lora_[AB]\.weight$", k), k
        assert "default" not in k and ".lora." not in k
    layers = dict(lora_layers(model))
    A = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert A.shape == (8, 32) and B.shape == (96, 8) and A.dtype == np.float32
    q, v = layers["transformer.h.0.attn.q_proj"], layers["transformer.h.0.attn.v_proj"]
    np.testing.assert_array_equal(A, np.concatenate([q.lora_A.data, v.lora_A.data]))
    np.testing.assert_array_equal(B[:32, :4], q.lora_B.data)
    np.testing.assert_array_equal(B[64:, 4:], v.lora_B.data)
    assert not B[32:64].any() and not B[:32, 4:].any() and not B[64:, :4].any()
    # rsLoRA: PEFT's α'/√(2r) must equal α/√r  ⇒  α' = √2·α
    rs = tiny_gpt()
    inject_lora(rs, ("q_proj", "v_proj"), r=4, lora_alpha=8, use_rslora=True)
    cfg_rs = export_peft(rs, str(tmp_path / "rs"))
    assert cfg_rs["use_rslora"] is True and cfg_rs["lora_alpha"] == pytest.approx(8 * math.sqrt(2))


def test_export_peft_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layer"):
        export_peft(tiny_gpt(), str(tmp_path))
    model = tiny_gpt(scalar_head=True)
    inject_lora(model, ["score"], r=1)  # the head has out_features 1
    with pytest.raises(ValueError, match="score"):
        export_peft(model, str(tmp_path))


# --------------------------------------------------------------------------- cross-checks


@pytest.mark.crosscheck
@pytest.mark.parametrize("use_rslora", [False, True])
def test_crosscheck_peft_layer_forward_and_grads(torch, monkeypatch, use_rslora):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    peft = require("peft")
    nn = torch.nn
    rng = np.random.default_rng(0)
    n_in, n_out, r, alpha = 12, 7, 4, 12
    W, b = rng.normal(size=(n_out, n_in)).astype(np.float32), rng.normal(size=n_out).astype(np.float32)
    A, B = rng.normal(size=(r, n_in)).astype(np.float32), rng.normal(size=(n_out, r)).astype(np.float32)
    x = rng.normal(size=(2, 5, n_in)).astype(np.float32)
    G = rng.normal(size=(2, 5, n_out)).astype(np.float32)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(n_in, n_out)

        def forward(self, x):
            return self.lin(x)

    tm = Tiny()
    with torch.no_grad():
        tm.lin.weight.copy_(torch.from_numpy(W))
        tm.lin.bias.copy_(torch.from_numpy(b))
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0,
                                                 use_rslora=use_rslora))
    lin = pm.base_model.model.lin
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(torch.from_numpy(A))
        lin.lora_B["default"].weight.copy_(torch.from_numpy(B))
    assert lin.scaling["default"] == pytest.approx(alpha / (math.sqrt(r) if use_rslora else r))
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = pm(tx)
    (ty * torch.from_numpy(G)).sum().backward()

    ours = LoRALinear(linear_with(W, b), r=r, lora_alpha=alpha, use_rslora=use_rslora)
    ours.lora_A.data, ours.lora_B.data = A.copy(), B.copy()
    assert ours.scaling == pytest.approx(lin.scaling["default"], rel=1e-12)
    mx = Tensor(x, requires_grad=True)
    y = ours(mx)
    (y * Tensor(G)).sum().backward()
    np.testing.assert_allclose(y.data, ty.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours.lora_A.grad, lin.lora_A["default"].weight.grad.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours.lora_B.grad, lin.lora_B["default"].weight.grad.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mx.grad, tx.grad.numpy(), atol=1e-5, rtol=1e-5)
    # merged delta equals PEFT's get_delta_weight
    np.testing.assert_allclose(ours.delta_weight(), lin.get_delta_weight("default").detach().numpy(),
                               atol=1e-6, rtol=1e-6)


def hf_gpt2_from_minillm(torch, transformers, model: GPT):
    """A Hugging Face GPT2LMHeadModel with the same weights as a (LoRA-free) minillm GPT."""
    c = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, activation_function="gelu_new",
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    sd = {k: v for k, v in model.state_dict().items()}
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    new = {"transformer.wte.weight": t(sd["transformer.wte.weight"]),
           "transformer.wpe.weight": t(sd["transformer.wpe.weight"]),
           "transformer.ln_f.weight": t(sd["transformer.ln_f.weight"]),
           "transformer.ln_f.bias": t(sd["transformer.ln_f.bias"])}
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            new[p + ln + ".weight"], new[p + ln + ".bias"] = t(sd[p + ln + ".weight"]), t(sd[p + ln + ".bias"])
        qkv = [sd[p + f"attn.{m}.weight"] for m in ("q_proj", "k_proj", "v_proj")]
        new[p + "attn.c_attn.weight"] = t(np.concatenate(qkv, axis=0).T)  # Conv1D (in, out) = (C, 3C)
        new[p + "attn.c_attn.bias"] = t(np.concatenate([sd[p + f"attn.{m}.bias"] for m in ("q_proj", "k_proj", "v_proj")]))
        for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            new[p + m + ".weight"], new[p + m + ".bias"] = t(sd[p + m + ".weight"].T), t(sd[p + m + ".bias"])
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith("attn.bias") or k.endswith("masked_bias")
                                  for k in missing), missing
    hf.eval()
    return hf


@pytest.mark.crosscheck
@pytest.mark.parametrize("targets, use_rslora", [(("q_proj", "v_proj"), False), ("all-linear", True),
                                                 (("q_proj", "v_proj", "c_fc"), False)])
def test_crosscheck_export_loads_in_peft_gpt2(torch, monkeypatch, tmp_path, targets, use_rslora):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = require("transformers")
    peft = require("peft")
    ids = batch(7, B=2, T=10)
    hf = hf_gpt2_from_minillm(torch, transformers, tiny_gpt())
    with torch.no_grad():
        base_logits = hf(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(base_logits, logits_of(tiny_gpt(), ids), atol=1e-5, rtol=1e-5)  # same base model

    model = tiny_gpt()
    inject_lora(model, targets, r=4, lora_alpha=12, use_rslora=use_rslora, seed=3)
    train_adapter(model, ids, steps=3, lr=3e-2)
    model.eval()
    ours = logits_of(model, ids)
    assert np.abs(ours - base_logits).max() > 1e-3  # the adapter is not a no-op
    export_peft(model, str(tmp_path), base_model_name_or_path="minillm-tiny")
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path))
    pm.eval()
    with torch.no_grad():
        theirs = pm(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)
