"""Hugging Face GPT-2 interop (minillm/hf.py): checkpoints and tokenizer files in and out.

Without torch: round trips through the GPT-2 layout, the byte table, the safetensors reader
(bfloat16 included), ``load_any`` and the bad-input errors (missing / mis-shaped tensor, unknown
architecture, pickle-only directory). Marked ``crosscheck`` (torch, transformers, tokenizers,
peft): a random tiny GPT-2 (2 layers, 64 wide, vocab 1000) built by transformers gives the same
logits (1e-5), loss and every parameter gradient in minillm; a minillm export loads in
transformers with the same logits; GPT-2 tokenizer files trained by ``tokenizers`` encode tricky
strings exactly as transformers does; a minillm LoRA adapter loads with peft and reproduces the
merged model's logits. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import importlib.util
import json
import os
import struct

import numpy as np
import pytest

from conftest import require
from minillm import checkpoint, hf, hf_tokenizer
from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.model import GPT, GPTConfig, IGNORE_INDEX
from minillm.tensor import no_grad
from minillm.pretokenize import GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN_STDLIB
from minillm.tokenizer import DEFAULT_SPECIALS, Tokenizer

HAS_REGEX = importlib.util.find_spec("regex") is not None
#: GPT-2's pre-split; the stdlib twin where ``regex`` is missing (tests without the crosscheck extra)
PATTERN = GPT2_SPLIT_PATTERN if HAS_REGEX else GPT2_SPLIT_PATTERN_STDLIB

TINY = dict(vocab_size=1000, block_size=64, n_layer=2, n_head=2, n_embd=64)

#: Strings where GPT-2's pre-split and byte handling are easy to get wrong.
TRICKY = [
    "", " ", "   ", "hello", " hello", "hello ", "  hello  world  ", "a  b   c    d", "trailing\n",
    "don't", "I'll", "we've", "they're", "I'm", "she'd", "it's", "DON'T", "'s'", "rock 'n' roll",
    "naïve café résumé", "Zürich Ελληνικά русский", "日本語のテキスト", "中文 测试", "한국어",
    "😀🎉 emoji 👩‍👩‍👧 ok", "\n\n", "a\n\nb", "\tTab\r\nCRLF", " \n \n", "12345 678 3.14",
    "2024-01-01T10:00", "<|endoftext|>", "a<|endoftext|>b", " <|endoftext|> ", "x<|endoftext|><|endoftext|>y",
    "<|endoftext", "$$$ !!! ???", "__init__(self)", "\u00a0nbsp\u2003em", "Ⅻ ½ ² ①", "mixed123abc456",
    "The quick brown fox jumps over the lazy dog.", "ﬁ ligature", "e\u0301 combining",
]

CORPUS = (
    "The quick brown fox jumps over the lazy dog. I'll say it's fine, don't worry; we've done it, they're here. "
    "Naïve café résumé in Zürich. Ελληνικά и русский текст. 日本語のテキストと中文测试。한국어 문장. "
    "Emoji 😀🎉👍 and numbers 12345, 3.14, 2024-01-01. Tabs\tand\nnew lines\n\nand   many   spaces.  "
)


def logits_of(model, ids, **kw) -> np.ndarray:
    with no_grad():
        return model(ids, **kw)[0].data.copy()


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    return GPT(GPTConfig(**(TINY | kw)), seed=seed)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------
# no torch needed

def test_bytes_to_unicode_is_gpt2s_table():
    table = hf_tokenizer.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a" and table[0] == "Ā"
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    b = bytes(range(256))
    assert hf_tokenizer.token_to_bytes(hf_tokenizer.bytes_to_token(b)) == b
    assert hf_tokenizer.token_to_bytes("a b") is None  # a real space is not a byte character


def test_pattern_auto_falls_back_with_a_warning(monkeypatch):
    assert hf_tokenizer.gpt2_pattern(None) is None and hf_tokenizer.gpt2_pattern(GPT2_SPLIT_PATTERN_STDLIB) == GPT2_SPLIT_PATTERN_STDLIB
    if HAS_REGEX:
        assert hf_tokenizer.gpt2_pattern() == GPT2_SPLIT_PATTERN
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "regex" else real(name, *a))
    with pytest.warns(UserWarning, match="pip install regex"):
        assert hf_tokenizer.gpt2_pattern() == GPT2_SPLIT_PATTERN_STDLIB


def test_save_and_load_roundtrip_without_torch(tmp_path):
    for kw in (dict(), dict(tie_weights=False), dict(bias=False)):
        model = tiny_gpt(3, **kw)
        d = hf.save_hf_gpt2(model, tmp_path / str(len(kw)) / "m")
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
        assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"], cfg["n_positions"]) == (2, 64, 2, 1000, 64)
        assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
        assert cfg["tie_word_embeddings"] is model.config.tie_weights
        tensors, meta = checkpoint.read_safetensors_any(d / "model.safetensors")
        assert meta == {"format": "pt"}
        assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D (in, out)
        assert tensors["transformer.h.1.mlp.c_fc.weight"].shape == (64, 256)
        assert ("lm_head.weight" in tensors) is (not model.config.tie_weights)
        back, tok = hf.load_hf_gpt2(d)
        assert tok is None
        ids = np.random.default_rng(0).integers(0, 1000, (2, 9))
        np.testing.assert_array_equal(logits_of(back, ids), logits_of(model, ids))
        assert back.config.tie_weights is model.config.tie_weights
    # c_attn is exactly q | k | v stacked and transposed
    sd = model.state_dict()
    np.testing.assert_array_equal(tensors["transformer.h.1.attn.c_attn.weight"][:, 64:128],
                                  sd["transformer.h.1.attn.k_proj.weight"].T)
    np.testing.assert_array_equal(tensors["transformer.h.0.attn.c_attn.bias"][128:], np.zeros(64, np.float32))


def _write_safetensors(path, entries, metadata=None, header_len=None):
    """A safetensors file by hand: entries = [(name, dtype, shape, raw bytes)]; the JSON header is
    padded with spaces to ``header_len`` bytes when given (as safetensors pads to 8)."""
    header, off, blobs = {}, 0, []
    for name, dt, shape, raw in entries:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
        blobs.append(raw)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    if header_len is not None:
        h = h.ljust(header_len)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_read_safetensors_bf16_f16_and_errors(tmp_path):
    x = np.array([[1.0, -2.5, 3.140625], [0.0, 1e-3, -7.0]], np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    p = tmp_path / "a.safetensors"
    _write_safetensors(p, [("w", "BF16", x.shape, bf16), ("h", "F16", x.shape, x.astype("<f2").tobytes()),
                           ("i", "I64", (3,), np.arange(3, dtype="<i8").tobytes())], {"k": "v"})
    t, meta = checkpoint.read_safetensors_any(p)
    assert meta == {"k": "v"} and t["w"].dtype == np.float32 and t["h"].dtype == np.float32
    np.testing.assert_array_equal(t["w"], (x.view(np.uint32) & 0xFFFF0000).view(np.float32))  # truncated mantissa
    np.testing.assert_array_equal(t["h"], x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(t["i"], [0, 1, 2])
    bad = tmp_path / "b.safetensors"
    _write_safetensors(bad, [("w", "F32", (2, 3), b"\0" * 20)])
    with pytest.raises(ValueError, match=r"'w' F32\[2, 3\] has 20 bytes, expected 24"):
        checkpoint.read_safetensors_any(bad)
    # a header of 128 bytes makes the file start with 0x80, like a pickle: still read as safetensors
    ok = tmp_path / "d.safetensors"
    _write_safetensors(ok, [("w", "F32", (2, 3), x.tobytes())], header_len=128)
    assert ok.read_bytes()[:1] == b"\x80"
    np.testing.assert_array_equal(checkpoint.read_safetensors_any(ok)[0]["w"], x)
    pk = tmp_path / "c.safetensors"
    pk.write_bytes(b"\x80\x02}q\x00.")  # a pickle
    with pytest.raises(ValueError, match="never unpickles"):
        checkpoint.read_safetensors_any(pk)


@pytest.fixture
def exported(tmp_path):
    """A minillm-exported GPT-2 directory and its model."""
    model = tiny_gpt(1)
    return hf.save_hf_gpt2(model, tmp_path / "gpt2"), model


def _rewrite(d, fn):
    tensors, meta = checkpoint.read_safetensors_any(d / "model.safetensors")
    fn(tensors)
    from minillm.checkpoint import save_safetensors_atomic
    save_safetensors_atomic(d / "model.safetensors", tensors, meta)


def test_bad_input_missing_tensor(exported):
    d, _ = exported
    _rewrite(d, lambda t: t.pop("transformer.h.1.mlp.c_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['h\.1\.mlp\.c_proj\.bias'\]") as e:
        hf.load_hf_gpt2(d)
    assert str(d) in str(e.value)


def test_bad_input_wrong_shape(exported):
    d, _ = exported
    _rewrite(d, lambda t: t.update({"transformer.h.0.attn.c_attn.weight": np.zeros((192, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"'h\.0\.attn\.c_attn\.weight' in model\.safetensors has shape \(192, 64\), "
                                         r"expected \(64, 192\)"):
        hf.load_hf_gpt2(d)


def test_bad_input_extra_layer_is_named(exported):
    d, _ = exported
    _rewrite(d, lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(64, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['h\.2\.ln_1\.weight'\].*n_layer=2"):
        hf.load_hf_gpt2(d)


@pytest.mark.parametrize("patch, message", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, r"model_type 'llama'.*not a GPT-2 model"),
    ({"activation_function": "relu"}, r"activation_function='relu' is not supported"),
    ({"layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon=1e-06 is not supported"),
    ({"n_inner": 100}, r"n_inner=100 is not supported"),
    ({"n_head": None}, r"field 'n_head' is missing"),
])
def test_bad_input_config(exported, patch, message):
    d, _ = exported
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(patch)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message) as e:
        hf.load_hf_gpt2(d)
    assert "config.json" in str(e.value)


def test_bad_input_pickle_only_directory(exported, monkeypatch):
    d, _ = exported
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not unpickled")
    import pickle

    def boom(*a, **k):  # pragma: no cover - the point is that it is never called
        raise AssertionError("minillm unpickled something")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    with pytest.raises(ValueError, match=r"only pytorch_model\.bin.*never unpickles.*safe_serialization=True"):
        hf.load_hf_gpt2(d)
    with pytest.raises(ValueError, match="never unpickles"):
        hf.load_any(d)
    # a pickle renamed to model.safetensors is refused too
    (d / "model.safetensors").write_bytes(b"\x80\x04\x95 pickle bytes")
    with pytest.raises(ValueError, match="never unpickles"):
        hf.load_hf_gpt2(d)


def test_bad_input_no_config_and_no_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.load_hf_gpt2(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face directory"):
        hf.load_any(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        hf.load_any(tmp_path / "nothing.safetensors")
    d = hf.save_hf_gpt2(tiny_gpt(), tmp_path / "m")
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.load_hf_gpt2(d)


def test_export_refuses_lora_and_scalar_head(tmp_path):
    from minillm.lora import inject_lora

    m = tiny_gpt()
    inject_lora(m, ("q_proj", "v_proj"), r=2)
    with pytest.raises(ValueError, match="LoRA layers; merge them first"):
        hf.save_hf_gpt2(m, tmp_path / "a")
    with pytest.raises(ValueError, match="scalar head"):
        hf.save_hf_gpt2(tiny_gpt(scalar_head=True), tmp_path / "b")
    assert not (tmp_path / "a" / "model.safetensors").exists()


def _minillm_tokenizer():
    text = CORPUS * 3 + "<|bos|>[INST] hi [/INST] hello<|eos|>"
    return Tokenizer.train(text, vocab_size=256 + 120 + len(DEFAULT_SPECIALS), pattern=PATTERN)


def test_minillm_tokenizer_as_gpt2_files_roundtrip(tmp_path):
    tok = _minillm_tokenizer()
    hf_tokenizer.save_gpt2_files(tok, tmp_path)
    assert (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\n")
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert vocab["Ġ"] == 32 and vocab["a"] == 97 and vocab["<|eos|>"] == tok.eos_id
    back = hf_tokenizer.tokenizer_from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    again = hf_tokenizer.tokenizer_from_hf_json(tmp_path / "tokenizer.json")
    assert back.special_tokens == tok.special_tokens == again.special_tokens
    for s in TRICKY + ["<|bos|>[INST] What is 2+2? [/INST] 4<|eos|>"]:
        assert back.encode(s) == tok.encode(s) == again.encode(s), s
        assert back.decode(back.encode(s)) == s
    assert back.pad_id == tok.pad_id and back.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="not GPT-2's"):
        hf_tokenizer.save_gpt2_files(Tokenizer.train(CORPUS, 300, pattern=None), tmp_path / "x")


def test_gpt2_tokenizer_dict_roundtrip_and_checkpoint(tmp_path):
    tok = hf_tokenizer.tokenizer_from_gpt2_files(*_files(tmp_path, _minillm_tokenizer()))
    d = tok.to_dict()
    assert d["format"] == "minillm.gpt2-bpe"
    assert hf_tokenizer.tokenizer_from_dict(json.loads(json.dumps(d))) == tok
    assert isinstance(hf_tokenizer.tokenizer_from_dict(_minillm_tokenizer().to_dict()), Tokenizer)
    with pytest.raises(ValueError, match="format"):
        Tokenizer.from_dict(d)  # minillm's own reader refuses, it does not misread
    model = tiny_gpt(vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "ck.safetensors", model, tok)
    ck = load_checkpoint(tmp_path / "ck.safetensors")
    back = hf_tokenizer.tokenizer_from_dict(ck.tokenizer)
    assert back.encode("I'll café <|eos|>") == tok.encode("I'll café <|eos|>")


def _files(folder, tok):
    hf_tokenizer.save_gpt2_files(tok, folder)
    return folder / "vocab.json", folder / "merges.txt"


def test_bad_tokenizer_files(tmp_path):
    v, m = _files(tmp_path, _minillm_tokenizer())
    lines = m.read_text().split("\n")
    m.write_text("\n".join(lines[:5] + ["a b c"] + lines[5:]))
    with pytest.raises(ValueError, match=r"merges\.txt: line 6 is 'a b c'"):
        hf_tokenizer.tokenizer_from_gpt2_files(v, m)
    m.write_text("\n".join(lines[:5] + ["zz q"] + lines[5:]))
    with pytest.raises(ValueError, match=r"merge 4 \('zz' 'q'\) uses or makes 'zz', which is not in the vocabulary"):
        hf_tokenizer.tokenizer_from_gpt2_files(v, m)
    m.write_text("\n".join(lines))
    vocab = json.loads(v.read_text())
    del vocab["Ġ"]
    v.write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"lacks the single-byte tokens of bytes \[32\]"):
        hf_tokenizer.tokenizer_from_gpt2_files(v, m, special_tokens=())
    v.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        hf_tokenizer.tokenizer_from_gpt2_files(v, m)


def test_load_any_dispatch_and_chat_specials(tmp_path):
    model, tok = tiny_gpt(2, vocab_size=500), _minillm_tokenizer()
    # a Hugging Face directory whose tokenizer has only <|endoftext|>: the chat specials are added
    gtok = Tokenizer.train(CORPUS * 3, vocab_size=256 + 120 + 1, special_tokens=[hf_tokenizer.ENDOFTEXT],
                           pattern=PATTERN)
    assert gtok.special_tokens == {hf_tokenizer.ENDOFTEXT: 376}
    d = hf.save_hf_gpt2(tiny_gpt(2, vocab_size=gtok.vocab_size), tmp_path / "hfdir", gtok)
    m2, t2, ck = hf.load_any(d)
    assert ck.train_state["source"] == "huggingface-gpt2"
    assert list(t2.special_tokens) == [hf_tokenizer.ENDOFTEXT, *DEFAULT_SPECIALS]
    assert (t2.pad_id, t2.eos_id) == (377, 379) and m2.config.vocab_size == 382 == t2.vocab_size
    wte = m2.transformer.wte.weight.data
    np.testing.assert_allclose(wte[377:], np.repeat(wte[:377].mean(0, keepdims=True), 5, 0), rtol=1e-6)
    ids = np.array([[5, 40, 300, 376]])
    base, _ = hf.load_hf_gpt2(d)
    np.testing.assert_allclose(logits_of(m2, ids)[..., :377], logits_of(base, ids), rtol=1e-5, atol=1e-6)
    assert t2.encode("<|bos|>[INST] hi", allowed_special="all") [:2] == [t2.bos_id, t2.special_id("[INST]")]
    # a reward model's scalar head on a Hugging Face base (reward.py's config_overrides)
    rm, _, _ = hf.load_any(d, config_overrides={"scalar_head": True, "dropout": 0.0})
    assert rm.score is not None and rm.config.dropout == 0.0
    np.testing.assert_array_equal(rm.transformer.wte.weight.data, m2.transformer.wte.weight.data)
    # a minillm checkpoint file and a run directory
    save_checkpoint(tmp_path / "run" / "checkpoint.safetensors", model, tok)
    for p in (tmp_path / "run" / "checkpoint.safetensors", tmp_path / "run"):
        m3, t3, _ = hf.load_any(p)
        assert t3 == tok
        np.testing.assert_array_equal(logits_of(m3, ids), logits_of(model, ids))


def test_command_line_export_and_import(tmp_path, capsys):
    import argparse

    tok = _minillm_tokenizer()
    model = tiny_gpt(6, vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "ck.safetensors", model, tok)
    parser = argparse.ArgumentParser()
    hf.add_arguments(parser)
    assert hf.run(parser.parse_args(["export", str(tmp_path / "ck.safetensors"), str(tmp_path / "hfdir")])) == 0
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "hfdir"))
    assert hf.run(parser.parse_args(["import", str(tmp_path / "hfdir"), str(tmp_path / "back.safetensors")])) == 0
    assert "wrote" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "back.safetensors")
    back_tok = hf_tokenizer.tokenizer_from_dict(ck.tokenizer)
    assert back_tok.encode(TRICKY[20]) == tok.encode(TRICKY[20])
    with pytest.raises(FileNotFoundError, match="not a Hugging Face directory"):
        hf.run(parser.parse_args(["import", str(tmp_path / "ck.safetensors"), str(tmp_path / "x.safetensors")]))


def test_sft_loop_on_a_hugging_face_base(tmp_path):
    """What ``minillm sft --base DIR`` does after loading: render chats, train LoRA, merge, save."""
    from minillm.data import tokenize_sft
    from minillm.train.sft import SFTConfig, merge_for_saving, apply_peft, train_sft

    tok = hf_tokenizer.tokenizer_from_gpt2_files(*_files(tmp_path / "t", _minillm_tokenizer()))
    d = hf.save_hf_gpt2(tiny_gpt(4, vocab_size=tok.vocab_size), tmp_path / "base", tok)
    model, tok, _ = hf.load_any(d)
    chats = [[{"role": "user", "content": f"What is {i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]
             for i in range(8)]
    examples = tokenize_sft(chats, tok, max_length=model.config.block_size)
    assert len(examples) == 8
    cfg = SFTConfig(lora=True, max_steps=12, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, lora_r=4)
    apply_peft(model, cfg)
    losses = train_sft(model, tok, examples, cfg)
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    merged = merge_for_saving(model)
    out = hf.save_hf_gpt2(merged, tmp_path / "sft", tok)
    back, tok2 = hf.load_hf_gpt2(out)
    ids = np.array([examples[0][0]])
    np.testing.assert_allclose(logits_of(back, ids), logits_of(merged, ids), rtol=1e-6, atol=1e-6)
    assert tok2.encode("<|bos|>[INST] x") == tok.encode("<|bos|>[INST] x")


# ---------------------------------------------------------------------------------------------
# crosschecks against transformers / tokenizers / peft

@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """A random tiny GPT-2 made by transformers (2 layers, 64 wide, vocab 1000), saved as safetensors."""
    torch = require("torch")
    transformers = require("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial LayerNorm and bias values, so a swapped tensor shows
        for n, p in model.named_parameters():
            if "ln_" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(d, safe_serialization=True)
    assert (d / "model.safetensors").is_file() and not (d / "pytorch_model.bin").exists()
    return d, model.eval()


@pytest.mark.crosscheck
def test_crosscheck_logits_loss_and_every_gradient(hf_tiny, torch, offline):
    d, ref = hf_tiny
    model, tok = hf.load_hf_gpt2(d)
    assert tok is None and model.config == GPTConfig(dropout=0.0, **TINY)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 1000, (3, 20))
    labels = ids.copy()
    labels[0, :5] = IGNORE_INDEX
    labels[2, 12:] = IGNORE_INDEX
    ref.zero_grad()
    out = ref(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    out.loss.backward()
    model.train()
    logits, loss = model(ids, labels=labels)
    loss.backward()
    np.testing.assert_allclose(logits.data, out.logits.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert logits.data.dtype == np.float32
    np.testing.assert_allclose(float(loss.item()), float(out.loss.detach()), rtol=1e-5)
    g = {n: p.grad for n, p in model.named_parameters()}
    hg = {n.removeprefix("transformer."): p.grad.numpy() for n, p in ref.named_parameters()}
    checked = 0
    for name, ref_grad in hg.items():
        if name.endswith("attn.c_attn.weight"):
            p = "transformer." + name[: -len("c_attn.weight")]
            ours = np.concatenate([g[p + f"{x}_proj.weight"] for x in "qkv"], axis=0).T
        elif name.endswith("attn.c_attn.bias"):
            p = "transformer." + name[: -len("c_attn.bias")]
            ours = np.concatenate([g[p + f"{x}_proj.bias"] for x in "qkv"])
        elif name.endswith(("c_proj.weight", "c_fc.weight")):
            ours = g["transformer." + name].T
        else:
            ours = g["transformer." + name]
        assert ours.dtype == np.float32
        scale = max(np.abs(ref_grad).max(), 1e-8)
        np.testing.assert_allclose(ours / scale, ref_grad / scale, atol=1e-5, err_msg=name)
        checked += 1
    assert checked == 4 + 12 * 2 == len(list(ref.parameters()))


@pytest.mark.crosscheck
def test_crosscheck_padded_batch_logits(hf_tiny, torch, offline):
    d, ref = hf_tiny
    model, _ = hf.load_hf_gpt2(d)
    ids = np.random.default_rng(2).integers(0, 1000, (2, 12))
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(pos)).logits.numpy()
    ours = logits_of(model, ids, attention_mask=mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


@pytest.mark.crosscheck
@pytest.mark.parametrize("kw", [dict(), dict(tie_weights=False), dict(bias=False, dropout=0.1)])
def test_crosscheck_export_loads_in_transformers(tmp_path, torch, offline, kw):
    transformers = require("transformers")
    model = tiny_gpt(5, **kw)
    with no_grad():  # non-zero biases and LayerNorm shifts
        for n, p in model.named_parameters():
            if n.endswith("bias") or "ln_" in n:
                p.data += np.random.default_rng(len(n)).normal(0, 0.1, p.shape).astype(np.float32)
    d = hf.save_hf_gpt2(model, tmp_path / "m")
    ref = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
    assert ref.config.tie_word_embeddings is model.config.tie_weights
    model.eval()
    ids = np.random.default_rng(3).integers(0, 1000, (2, 16))
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits_of(model, ids), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.crosscheck
def test_crosscheck_sharded_untied_bf16_checkpoints(tmp_path, torch, offline):
    transformers = require("transformers")
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    ids = np.random.default_rng(4).integers(0, 1000, (2, 10))
    for sub in ("sharded", "bf16"):
        model, _ = hf.load_hf_gpt2(tmp_path / sub)
        assert model.config.tie_weights is False
        ref32 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / sub, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = ref32(torch.from_numpy(ids)).logits.numpy()
        np.testing.assert_allclose(logits_of(model, ids), theirs, rtol=1e-5, atol=1e-5, err_msg=sub)


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """GPT-2 style vocab.json + merges.txt trained offline by the tokenizers library."""
    tokenizers = require("tokenizers")
    t = tokenizers.ByteLevelBPETokenizer()
    t.train_from_iterator([CORPUS] * 5 + [s for s in TRICKY if s], vocab_size=600, min_frequency=1,
                          special_tokens=["<|endoftext|>"])
    d = tmp_path_factory.mktemp("gpt2_tok")
    t.save_model(str(d))
    return d


@pytest.mark.crosscheck
def test_crosscheck_tokenizer_files_encode_like_transformers(gpt2_files, offline):
    transformers = require("transformers")
    require("regex")
    d = gpt2_files
    ref = transformers.GPT2Tokenizer.from_pretrained(d)
    ours = hf_tokenizer.tokenizer_from_gpt2_files(d / "vocab.json", d / "merges.txt")
    assert ours.special_tokens == {"<|endoftext|>": 0} and ours.vocab_size == len(ref)
    assert len(ours.merges) > 150
    for s in TRICKY:
        ids = ours.encode(s, allowed_special="all")  # transformers parses specials in text
        assert ids == ref(s)["input_ids"], s
        assert ours.decode(ids) == ref.decode(ids) == s
    # random strings over an alphabet of tricky characters
    alphabet = list(" \n\t'sdtlmvre0123456789aAéßΩжх日本😀!?.,-_\u00a0\u0301") + ["'ll", "'ve", " the", "  "]
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = "".join(rng.choice(alphabet, size=rng.integers(1, 25)))
        assert ours.encode(s) == ref(s)["input_ids"], repr(s)
    # the same files through tokenizer.json (what transformers 5 saves)
    ref.save_pretrained(d / "saved")
    again = hf_tokenizer.load_hf_tokenizer(d / "saved")
    for s in TRICKY:
        assert again.encode(s) == ours.encode(s)


@pytest.mark.crosscheck
def test_crosscheck_saved_tokenizer_loads_in_transformers(tmp_path, gpt2_files, offline):
    transformers = require("transformers")
    require("regex")
    for tok in (_minillm_tokenizer(), hf_tokenizer.tokenizer_from_gpt2_files(gpt2_files / "vocab.json",
                                                                  gpt2_files / "merges.txt")):
        d = tmp_path / type(tok).__name__
        hf_tokenizer.save_gpt2_files(tok, d)
        for ref in (transformers.AutoTokenizer.from_pretrained(d), transformers.GPT2Tokenizer.from_pretrained(d)):
            for s in TRICKY + ["<|bos|>[INST] Who? [/INST] Me.<|eos|><|pad|>"]:
                assert ref(s)["input_ids"] == tok.encode(s, allowed_special="all"), (type(tok).__name__, s)
            assert set(ref.all_special_tokens) >= set(tok.special_tokens)


@pytest.mark.crosscheck
def test_crosscheck_lora_adapter_loads_with_peft(hf_tiny, tmp_path, torch, offline):
    transformers = require("transformers")
    peft = require("peft")
    from minillm.hf import export_peft
    from minillm.lora import inject_lora, merge_and_unload, trainable_lora_parameters
    from minillm.optim import AdamW

    d, _ = hf_tiny
    model, _ = hf.load_hf_gpt2(d)
    inject_lora(model, ("q_proj", "v_proj", "c_fc"), r=4, lora_alpha=8, seed=1)
    opt = AdamW(trainable_lora_parameters(model), lr=3e-2, weight_decay=0.0)
    ids = np.random.default_rng(5).integers(0, 1000, (2, 16))
    model.train()
    for _ in range(4):
        _, loss = model(ids, labels=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    export_peft(model, str(tmp_path / "adapter"), base_model_name_or_path=str(d))
    merged = merge_and_unload(model)
    ours = logits_of(merged, ids)
    base = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
    with torch.no_grad():
        before = base(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ours - before).max() > 1e-2  # the adapter changed the model
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = pm(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    # and the merged model exported as a full GPT-2 checkpoint gives the same logits in transformers
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf.save_hf_gpt2(merged, tmp_path / "merged")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(ref(torch.from_numpy(ids)).logits.numpy(), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.crosscheck
def test_crosscheck_two_merges_making_one_token(tmp_path):
    """Two merges may make the same string ("a bc" and "ab c" both make "abc"): the file gives it one
    id, which later merges ("abc d") use. minillm's own layout (merge k = id 256+k) could not hold it."""
    tokenizers = require("tokenizers")
    require("regex")
    vocab = {c: i for i, c in enumerate(hf_tokenizer.bytes_to_unicode().values())}
    for t in ("bc", "abc", "ab", "abcd", "Ġabc"):
        vocab[t] = len(vocab)
    merges = [("b", "c"), ("a", "bc"), ("a", "b"), ("ab", "c"), ("abc", "d"), ("Ġ", "abc")]
    ours = hf_tokenizer.GPT2BPETokenizer(vocab, merges)
    ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    rng = np.random.default_rng(0)
    for _ in range(300):
        s = "".join(rng.choice(list("abcd x"), size=rng.integers(1, 14)))
        assert ours.encode(s) == ref.encode(s).ids, repr(s)
    assert ours.encode("abcd abc") == [vocab["abcd"], vocab["Ġabc"]]
