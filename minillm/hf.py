"""Hugging Face GPT-2 interop: checkpoints in and out (the tokenizer files: ``minillm.hf_tokenizer``).

Scope
    * **Weights.** ``load_hf_gpt2(dir)`` reads a local directory in Hugging Face GPT-2 layout
      (``config.json`` + ``model.safetensors``, or a sharded ``model.safetensors.index.json``)
      into minillm's ``GPT``; ``save_hf_gpt2(model, dir)`` writes that layout so
      ``transformers.GPT2LMHeadModel.from_pretrained(dir)`` loads it. The mapping (GPT-2 name ->
      minillm name) per block ``h.i``:

      ===============================  ===============================================
      GPT-2 (Conv1D: weight (in, out))  minillm (Linear: weight (out, in))
      ===============================  ===============================================
      ``attn.c_attn.weight`` (C, 3C)    ``attn.q_proj/k_proj/v_proj.weight`` = the three
                                        (C, C) column blocks q | k | v, each transposed
      ``attn.c_attn.bias`` (3C,)        ``q_proj/k_proj/v_proj.bias`` = its three thirds
      ``attn.c_proj.weight`` (C, C)     ``attn.c_proj.weight``ᵀ
      ``mlp.c_fc.weight`` (C, 4C)       ``mlp.c_fc.weight``ᵀ (4C, C)
      ``mlp.c_proj.weight`` (4C, C)     ``mlp.c_proj.weight``ᵀ (C, 4C)
      ``ln_1``, ``ln_2``, ``ln_f``,     same names, same shapes
      ``wte`` (V, C), ``wpe`` (P, C)
      ``lm_head.weight`` (V, C)         tied to ``wte`` (``tie_word_embeddings``, GPT-2's
                                        default: not stored), else ``lm_head.weight``
      ===============================  ===============================================

      Keys may carry the ``transformer.`` prefix (``save_pretrained``) or not (the original
      ``gpt2`` files); the causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` of old
      checkpoints are skipped. float16 / bfloat16 / float64 tensors are converted to float32.
      A missing, unexpected or mis-shaped tensor is an error naming the tensor, its shape, the
      expected shape and the file. ``pytorch_model.bin`` (a pickle) is refused: minillm never
      unpickles.
    * **Tokenizer files** are read and written by ``minillm.hf_tokenizer`` (``load_hf_gpt2`` and
      ``save_hf_gpt2`` call it).
    * **LoRA adapters.** ``export_peft`` writes PEFT's on-disk layout (``adapter_config.json`` +
      ``adapter_model.safetensors``) for the Hugging Face GPT-2 module names, so
      ``peft.PeftModel.from_pretrained(GPT2LMHeadModel, dir)`` reproduces our logits.
    * ``load_any(path)``: a Hugging Face directory or a minillm checkpoint, as ``sft``/``dpo``
      ``--base`` take it.
    * Command line (``add_arguments`` / ``run``): ``minillm hf export CKPT DIR`` and
      ``minillm hf import DIR CKPT.safetensors [--add-chat-specials]``.

Sources
    * huggingface/transformers ``models/gpt2/modeling_gpt2.py`` (``Conv1D`` stores (in, out);
      ``c_attn`` is q | k | v; the tied ``lm_head``), ``configuration_gpt2.py`` (field names).
    * huggingface/peft ``src/peft/utils/save_and_load.py`` (saved key names), ``tuners/lora/config.py``
      (``LoraConfig`` fields of ``adapter_config.json``).
    * safetensors format: 8-byte little-endian header length, a JSON header (dtype, shape,
      data_offsets per tensor, optional ``__metadata__``), then the raw little-endian bytes.

Deviations (each with the option that restores the reference)
    * GPT-2's ``attn_pdrop`` (dropout on attention probabilities) does not exist in minillm;
      ``resid_pdrop`` becomes ``GPTConfig.dropout`` (residual and embedding dropout) and
      ``attn_pdrop`` is ignored. Exported configs write ``attn_pdrop = 0``. Pass
      ``config_overrides={"dropout": 0.0}`` for deterministic fine-tuning. With dropout 0 (eval)
      the two models compute the same function.
    * ``layer_norm_epsilon`` must be 1e-5 and the activation ``gelu_new`` (tanh GELU) /
      ``gelu_pytorch_tanh``; other values are refused rather than approximated.
    * New special tokens (``add_special_tokens``) get embedding rows equal to the mean of the
      existing rows (Hewitt 2021, "Initializing new word embeddings for pretrained language
      models"), not transformers' random draw around that mean; no option restores the draw.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from minillm import backend
from minillm.checkpoint import read_safetensors_any, save_safetensors_atomic, write_text_atomic
from minillm.hf_tokenizer import ENDOFTEXT, GPT2BPETokenizer, load_hf_tokenizer, read_json, save_gpt2_files
from minillm.lora import LoRALinear, is_linear_like, lora_layers, target_matches
from minillm.nn import Module
from minillm.tokenizer import DEFAULT_SPECIALS, Tokenizer

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
_BLOCK_TENSORS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                  "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias")
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "tf_model.h5", "flax_model.msgpack")


# ----------------------------------------------------------------------------------------------
# config.json

def gpt_config_from_hf(hf: Mapping, source: str = "config.json", overrides: Mapping | None = None):
    """A ``GPTConfig`` from a Hugging Face GPT-2 ``config.json`` dict.

    vocab_size, n_positions -> block_size, n_layer, n_head, n_embd, resid_pdrop -> dropout,
    tie_word_embeddings -> tie_weights (default True). ``overrides`` (GPTConfig fields) win.
    Raises ValueError naming ``source`` and the field: an architecture that is not GPT-2, a missing
    size field, ``n_inner`` ≠ 4·n_embd, an activation other than tanh GELU, layer_norm_epsilon ≠
    1e-5, ``scale_attn_weights`` false, ``scale_attn_by_inverse_layer_idx`` or
    ``add_cross_attention`` true.
    """
    from minillm.model import GPTConfig

    archs = hf.get("architectures") or []
    mt = hf.get("model_type")
    if mt != "gpt2" and not (mt is None and any(a in ("GPT2LMHeadModel", "GPT2Model") for a in archs)):
        raise ValueError(f"{source}: model_type {mt!r}, architectures {archs}: not a GPT-2 model; minillm.hf "
                         f"reads only GPT-2 (model_type 'gpt2', GPT2LMHeadModel)")
    for k in ("vocab_size", "n_layer", "n_head", "n_embd"):
        if not isinstance(hf.get(k), int):
            raise ValueError(f"{source}: field {k!r} is missing or not an int ({hf.get(k)!r})")
    n_embd = hf["n_embd"]
    block = hf.get("n_positions", hf.get("n_ctx"))
    if not isinstance(block, int):
        raise ValueError(f"{source}: field 'n_positions' is missing or not an int ({block!r})")
    checks = [
        ("n_inner", hf.get("n_inner") in (None, 4 * n_embd), f"must be null or 4*n_embd={4 * n_embd} (minillm's MLP)"),
        ("activation_function", hf.get("activation_function", "gelu_new") in _ACTIVATIONS,
         f"must be one of {_ACTIVATIONS} (minillm's GELU is the tanh approximation)"),
        ("layer_norm_epsilon", abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12,
         "must be 1e-05 (minillm's LayerNorm)"),
        ("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "must be true"),
        ("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False), "must be false"),
        ("add_cross_attention", not hf.get("add_cross_attention", False), "must be false (decoder-only)"),
    ]
    for field, ok, why in checks:
        if not ok:
            raise ValueError(f"{source}: {field}={hf.get(field)!r} is not supported: {why}")
    cfg = dict(vocab_size=hf["vocab_size"], block_size=block, n_layer=hf["n_layer"], n_head=hf["n_head"],
               n_embd=n_embd, dropout=float(hf.get("resid_pdrop", 0.1) or 0.0), bias=True,
               tie_weights=bool(hf.get("tie_word_embeddings", True)), scalar_head=False)
    cfg.update(overrides or {})
    try:
        return GPTConfig.from_dict(cfg)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def hf_config_from_gpt(config, tokenizer: Tokenizer | None = None) -> dict:
    """The ``config.json`` dict (``GPT2Config`` fields) for a ``GPTConfig``; token ids of bos/eos/pad
    from the tokenizer's ``<|bos|>``/``<|eos|>``/``<|pad|>`` or ``<|endoftext|>`` when it has them."""
    sp = tokenizer.special_tokens if tokenizer is not None else {}
    eot = sp.get(ENDOFTEXT)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": bool(config.tie_weights), "use_cache": True,
        "bos_token_id": sp.get("<|bos|>", eot), "eos_token_id": sp.get("<|eos|>", eot),
        "pad_token_id": sp.get("<|pad|>"), "dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------
# weights

def _read_hf_weights(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of the directory (single file or shards) and, per tensor, the file it came from."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        tensors, _ = read_safetensors_any(single)
        return tensors, {k: single.name for k in tensors}
    if index.is_file():
        idx = read_json(index)
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        tensors, where = {}, {}
        for shard in sorted(set(wm.values())):
            if "/" in shard or "\\" in shard or shard.startswith("."):
                raise ValueError(f"{index}: shard name {shard!r} is not a plain file name")
            part, _ = read_safetensors_any(folder / shard)
            for k, v in part.items():
                tensors[k] = v
                where[k] = shard
        missing = sorted(set(wm) - set(tensors))
        if missing:
            raise ValueError(f"{index}: tensors {missing[:5]} listed in weight_map are not in their shards")
        return tensors, where
    pickles = [p for p in _PICKLES if (folder / p).exists()]
    if pickles:
        raise ValueError(f"{folder}: has only {', '.join(pickles)} (pickle/other formats) and no model.safetensors; "
                         f"minillm reads only safetensors and never unpickles. Convert once with transformers: "
                         f"GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def gpt_state_from_hf(tensors: Mapping[str, np.ndarray], config, where: Mapping[str, str] | None = None,
                      source: str = "model.safetensors") -> dict[str, np.ndarray]:
    """minillm ``GPT.state_dict`` names and layouts from GPT-2 tensors (see the module table).

    tensors: GPT-2 names with or without the ``transformer.`` prefix; config: the GPTConfig.
    Returns name -> float32 array. Raises ValueError listing every missing, unexpected and
    mis-shaped tensor (with its file from ``where`` or ``source``) and the expected shape.
    """
    C, V, P, L = config.n_embd, config.vocab_size, config.block_size, config.n_layer
    t: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for k, v in tensors.items():
        name = k[len("transformer."):] if k.startswith("transformer.") else k
        if name.endswith(".attn.masked_bias") or (name.endswith(".attn.bias") and np.ndim(v) == 4):
            continue  # causal-mask buffers of old checkpoints
        t[name] = v
        origin[name] = (where or {}).get(k, source)
    expected = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
              "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
              "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
              "mlp.c_proj.bias": (C,)}
    for i in range(L):
        for s in _BLOCK_TENSORS:
            expected[f"h.{i}.{s}"] = shapes[s]
    optional = {}
    if not config.tie_weights:
        expected["lm_head.weight"] = (V, C)
    else:
        optional["lm_head.weight"] = (V, C)  # stored by some exports; tied, so ignored
    problems = []
    missing = [k for k in expected if k not in t]
    if missing:
        problems.append(f"missing tensors {missing}")
    unexpected = [k for k in t if k not in expected and k not in optional]
    if unexpected:
        problems.append(f"unexpected tensors {unexpected} (config.json: n_layer={L}, "
                        f"tie_word_embeddings={config.tie_weights})")
    for k, shape in {**expected, **optional}.items():
        if k in t and tuple(np.shape(t[k])) != shape:
            problems.append(f"tensor {k!r} in {origin[k]} has shape {tuple(np.shape(t[k]))}, expected {shape}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    f32 = {k: np.asarray(v, dtype=np.float32) for k, v in t.items()}
    sd = {"transformer.wte.weight": f32["wte.weight"], "transformer.wpe.weight": f32["wpe.weight"],
          "transformer.ln_f.weight": f32["ln_f.weight"], "transformer.ln_f.bias": f32["ln_f.bias"]}
    for i in range(L):
        g, p = f"h.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = f32[g + ln + ".weight"], f32[g + ln + ".bias"]
        w, b = f32[g + "attn.c_attn.weight"], f32[g + "attn.c_attn.bias"]  # (C, 3C) = [q | k | v], (3C,)
        for j, x in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[p + f"attn.{x}.weight"] = np.ascontiguousarray(w[:, j * C:(j + 1) * C].T)  # (C_out, C_in)
            sd[p + f"attn.{x}.bias"] = b[j * C:(j + 1) * C].copy()
        for m in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            sd[p + m + ".weight"] = np.ascontiguousarray(f32[g + m + ".weight"].T)  # Conv1D (in, out) -> (out, in)
            sd[p + m + ".bias"] = f32[g + m + ".bias"]
    if not config.tie_weights:
        sd["lm_head.weight"] = f32["lm_head.weight"]
    return sd


def hf_state_from_gpt(model) -> dict[str, np.ndarray]:
    """GPT-2 tensors (``transformer.``-prefixed names, Conv1D (in, out) layouts, fused c_attn) of a
    plain minillm GPT. A model built with ``bias=False`` gets zero biases (GPT-2 always has them).

    Raises ValueError for a model with LoRA or 4-bit layers (merge / dequantize first), a scalar
    head (GPT2LMHeadModel has none), or any parameter this mapping does not know.
    """
    from minillm.lora import lora_layers

    if lora_layers(model):
        raise ValueError("save_hf_gpt2: the model has LoRA layers; merge them first (lora.merge_and_unload) or "
                         "export the adapter with hf.export_peft")
    cfg = model.config
    if cfg.scalar_head:
        raise ValueError("save_hf_gpt2: the model has a scalar head (score); GPT2LMHeadModel has none")
    sd = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    C, L = cfg.n_embd, cfg.n_layer
    known = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
             "lm_head.weight"}
    for i in range(L):
        p = f"transformer.h.{i}."
        known |= {p + s for s in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")}
        known |= {p + f"{m}.{w}" for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.c_proj", "mlp.c_fc",
                                            "mlp.c_proj") for w in ("weight", "bias")}
    unknown = sorted(set(sd) - known)
    if unknown:
        raise ValueError(f"save_hf_gpt2: parameters/buffers {unknown[:6]} have no GPT-2 counterpart "
                         f"(a 4-bit layer? dequantize first with linear4bit.dequantize_model)")

    def bias(name, n):
        return np.asarray(sd[name], np.float32) if name in sd else np.zeros(n, np.float32)

    out = {k: np.asarray(sd[k], np.float32) for k in ("transformer.wte.weight", "transformer.wpe.weight",
                                                      "transformer.ln_f.weight", "transformer.ln_f.bias")}
    for i in range(L):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"], out[p + ln + ".bias"] = sd[p + ln + ".weight"], sd[p + ln + ".bias"]
        out[p + "attn.c_attn.weight"] = np.concatenate(
            [sd[p + f"attn.{x}.weight"] for x in ("q_proj", "k_proj", "v_proj")], axis=0).T  # (C, 3C)
        out[p + "attn.c_attn.bias"] = np.concatenate([bias(p + f"attn.{x}.bias", C) for x in ("q_proj", "k_proj",
                                                                                                "v_proj")])
        for m, n_out in (("attn.c_proj", C), ("mlp.c_fc", 4 * C), ("mlp.c_proj", C)):
            out[p + m + ".weight"] = sd[p + m + ".weight"].T  # (out, in) -> Conv1D (in, out)
            out[p + m + ".bias"] = bias(p + m + ".bias", n_out)
    if not cfg.tie_weights:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def load_hf_gpt2(folder, special_tokens: Sequence[str] = (), config_overrides: Mapping | None = None):
    """Load a Hugging Face GPT-2 directory into minillm: returns ``(GPT, tokenizer or None)``.

    folder: ``config.json`` + ``model.safetensors`` (or sharded ``model.safetensors.index.json``)
    and optionally ``vocab.json`` + ``merges.txt`` or ``tokenizer.json`` (then the tokenizer is a
    ``GPT2BPETokenizer`` with the file's ids). special_tokens: specials to make sure of (e.g.
    ``tokenizer.DEFAULT_SPECIALS`` for the chat template): missing ones are added to the tokenizer
    and the embedding grows by one row each (``add_special_tokens``). config_overrides: GPTConfig
    fields to replace (e.g. ``{"dropout": 0.0}``; ``{"scalar_head": True}`` adds a freshly
    initialised ``score`` head for a reward or value model, as ``checkpoint.load_model`` does).

    The model is returned in eval mode (dropout off), as ``transformers``' ``from_pretrained``
    does; call ``model.train()`` before training with dropout.

    Raises FileNotFoundError (no directory, no config.json, no weights), ValueError naming the file
    and field or tensor: an architecture that is not GPT-2 (``gpt_config_from_hf``), a missing /
    unexpected / mis-shaped tensor (``gpt_state_from_hf``), a pickle-only directory
    (``pytorch_model.bin``: never unpickled), a tokenizer file at fault, ``special_tokens`` asked
    for a folder without tokenizer files; FloatingPointError naming a tensor with NaN/inf.
    """
    from minillm.model import GPT

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a directory: {folder}")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (a Hugging Face model directory has one)")
    hf = read_json(cfg_path)
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    config = gpt_config_from_hf(hf, str(cfg_path), config_overrides)
    tensors, where = _read_hf_weights(folder)
    sd = gpt_state_from_hf(tensors, config, where, source=str(folder))
    from minillm.checkpoint import check_weights

    check_weights(sd, str(folder))  # no NaN/inf, no diverged weight
    model = GPT(config)
    if config.scalar_head:  # a reward/value head asked for by config_overrides: keep its fresh init
        sd.update({k: v for k, v in model.state_dict().items() if k.startswith("score.")})
    model.load_state_dict(sd, source=str(folder))
    model.eval()  # as transformers' from_pretrained: dropout off until the caller asks for train()
    tok = load_hf_tokenizer(folder)
    if special_tokens:
        if tok is None:
            raise ValueError(f"{folder}: has no tokenizer files (vocab.json + merges.txt or tokenizer.json), so "
                             f"special tokens {list(special_tokens)} cannot be added")
        model, tok = add_special_tokens(model, tok, special_tokens)
    if tok is not None and tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has ids up to {tok.vocab_size - 1} but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    return model, tok


def add_special_tokens(model, tokenizer: GPT2BPETokenizer, tokens: Sequence[str]):
    """Add ``tokens`` (those the tokenizer lacks) as specials and grow the model's embedding (and an
    untied LM head) to the new vocabulary size; new rows = the mean of the existing rows.
    Returns ``(model, tokenizer)`` -- new objects when something was added, else the same ones."""
    from minillm.model import GPT

    if not isinstance(tokenizer, GPT2BPETokenizer):
        raise ValueError("add_special_tokens: only a GPT2BPETokenizer (Hugging Face files) grows; a minillm "
                         "tokenizer fixes its specials when trained")
    tok = tokenizer.with_special_tokens(tokens)
    V_old, V = model.config.vocab_size, max(tok.vocab_size, model.config.vocab_size)
    if V == V_old:
        return model, tok
    sd = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
    for k in ("transformer.wte.weight", "lm_head.weight"):
        if k in sd:
            w = sd[k]
            sd[k] = np.concatenate([w, np.repeat(w.mean(axis=0, keepdims=True), V - V_old, axis=0)]).astype(np.float32)
    new = GPT(replace(model.config, vocab_size=V))
    new.load_state_dict(sd, source="add_special_tokens")
    new.train(model.training)
    return new, tok


def save_hf_gpt2(model, folder, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 directory: ``config.json`` (``GPT2Config`` fields,
    ``hf_config_from_gpt``), ``model.safetensors`` (``hf_state_from_gpt``; metadata format "pt";
    the tied ``lm_head`` not stored, as ``save_pretrained`` does) and, with a tokenizer,
    ``save_gpt2_files``. Every file is written atomically. Returns the folder.

    ``transformers.GPT2LMHeadModel.from_pretrained(folder)`` then gives minillm's logits (tested to
    1e-5). Raises ValueError as ``hf_state_from_gpt`` and ``save_gpt2_files`` do, and when the
    tokenizer has more ids than the model's vocab_size.
    """
    from minillm.checkpoint import save_safetensors_atomic

    folder = Path(folder)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"save_hf_gpt2: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    tensors = hf_state_from_gpt(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    write_text_atomic(folder / "config.json",
                       json.dumps(hf_config_from_gpt(model.config, tokenizer), indent=2) + "\n")
    if tokenizer is not None:
        save_gpt2_files(tokenizer, folder, model_max_length=model.config.block_size)
    return folder


def is_hf_dir(path) -> bool:
    """True for a directory with a ``config.json`` (a Hugging Face model directory)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load_any(path, special_tokens: Sequence[str] = DEFAULT_SPECIALS, config_overrides: Mapping | None = None):
    """Load a base model for training, whatever its form: returns ``(GPT, tokenizer or None, Checkpoint)``
    like ``checkpoint.load_model``.

    * a directory with ``config.json``: ``load_hf_gpt2`` (Hugging Face GPT-2), with
      ``special_tokens`` (default: minillm's chat-template specials) added where missing; the
      Checkpoint's train_state is ``{"source": "huggingface-gpt2", "path": ...}``. A folder with
      weights but no tokenizer files loads with tokenizer None (no specials added): enough for
      ``hf export`` or scoring token ids; every trainer, which needs a tokenizer, then refuses it
      with an error naming the folder;
    * a directory with ``checkpoint.safetensors`` (a minillm run directory): that file;
    * a file: ``checkpoint.load_model`` (a minillm checkpoint; a pickle is refused there).

    Raises FileNotFoundError for a path that does not exist or a directory with neither file,
    and the loaders' ValueErrors.
    """
    from minillm.checkpoint import Checkpoint, load_model

    p = Path(path)
    if is_hf_dir(p):
        has_tokenizer = any((p / f).is_file() for f in ("vocab.json", "tokenizer.json"))
        model, tok = load_hf_gpt2(p, special_tokens=special_tokens if special_tokens and has_tokenizer else (),
                                  config_overrides=config_overrides)
        ck = Checkpoint(path=p, config=model.config.to_dict(), model_state=model.state_dict(),
                        tokenizer=tok.to_dict() if tok is not None else None,
                        train_state={"source": "huggingface-gpt2", "path": str(p)})
        return model, tok, ck
    if p.is_dir():
        if (p / "checkpoint.safetensors").is_file():
            return load_model(p / "checkpoint.safetensors", config_overrides=dict(config_overrides or {}) or None)
        pickles = [x for x in _PICKLES if (p / x).exists()]
        if pickles:
            raise ValueError(f"{p}: has {', '.join(pickles)} but no config.json/model.safetensors; minillm reads only "
                             f"safetensors and never unpickles")
        raise FileNotFoundError(f"{p}: neither a Hugging Face directory (config.json) nor a minillm run directory "
                                f"(checkpoint.safetensors)")
    if not p.exists():
        raise FileNotFoundError(f"base model not found: {p}")
    return load_model(p, config_overrides=dict(config_overrides or {}) or None)


# ----------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's layout (chapter 05)

_GPT2_ATTN = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
_GPT2_DIRECT = {"attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
_BLOCK = re.compile(r"^(transformer\.h\.\d+)\.(attn|mlp)\.(\w+)$")


def _gpt2_groups(layers: Sequence[tuple[str, LoRALinear]]) -> list[tuple[str, np.ndarray, np.ndarray, int, float]]:
    """Map minillm LoRA layers to Hugging Face GPT-2 modules: [(hf path, A, B, r, scaling)].

    q_proj/k_proj/v_proj of block i become ONE LoRA on ``transformer.h.i.attn.c_attn`` (fused q|k|v,
    out = 3C): A = concat(A_q, A_k, A_v present, axis 0) (Σr, C); B (3C, Σr) block-structured: the q
    rows [0, C) use the q columns, k rows [C, 2C) the k columns, v rows [2C, 3C) the v columns,
    zero elsewhere. The fused scaling s' is the first layer's scaling; a layer whose own scaling s
    differs has its B block multiplied by s/s' (exact when all scalings agree, factor 1).
    """
    fused: dict[str, list[tuple[int, LoRALinear]]] = {}
    out = []
    for name, m in layers:
        mt = _BLOCK.match(name)
        if mt and mt.group(2) == "attn" and mt.group(3) in _GPT2_ATTN:
            fused.setdefault(f"{mt.group(1)}.attn.c_attn", []).append((_GPT2_ATTN[mt.group(3)], m))
        elif mt and f"{mt.group(2)}.{mt.group(3)}" in _GPT2_DIRECT:
            out.append((name, backend.to_numpy(m.lora_A.data), backend.to_numpy(m.lora_B.data), m.r, m.scaling))
        else:
            raise ValueError(f"export_peft(layout='gpt2'): no Hugging Face GPT-2 module for LoRA layer {name!r}")
    for path, parts in fused.items():
        parts.sort(key=lambda t: t[0])
        C = parts[0][1].out_features
        s_ref = parts[0][1].scaling
        r_tot = sum(m.r for _, m in parts)
        A = np.concatenate([backend.to_numpy(m.lora_A.data) for _, m in parts], axis=0).astype(np.float32)  # (Σr, C)
        B = np.zeros((3 * C, r_tot), dtype=np.float32)  # (3C, Σr)
        col = 0
        for slot, m in parts:
            b = backend.to_numpy(m.lora_B.data).astype(np.float32)  # (C, r)
            if m.scaling != s_ref:
                b = b * np.float32(m.scaling / s_ref)
            B[slot * C:(slot + 1) * C, col:col + m.r] = b
            col += m.r
        out.append((path, A, B, r_tot, s_ref))
    return out


def _peft_alpha(scaling: float, r: int, use_rslora: bool):
    """The lora_alpha PEFT needs so that its scaling (α/r, or α/√r) equals ``scaling``."""
    alpha = scaling * (math.sqrt(r) if use_rslora else r)
    return int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha


def _short_targets(paths: list[str], all_paths: list[str]) -> list[str]:
    """Shortest name suffixes that select exactly ``paths`` among ``all_paths`` (PEFT list matching)."""
    chosen = set(paths)
    out = []
    for p in paths:
        parts = p.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            hits = {q for q in all_paths if target_matches(q, [suffix])}
            if hits <= chosen:
                if suffix not in out:
                    out.append(suffix)
                break
    return sorted(out)


def peft_adapter_config(target_modules: list[str], r: int, lora_alpha, lora_dropout: float = 0.0,
                        use_rslora: bool = False, fan_in_fan_out: bool = False, base_model_name_or_path=None,
                        rank_pattern: dict | None = None, alpha_pattern: dict | None = None,
                        init_lora_weights=True) -> dict:
    """PEFT's ``adapter_config.json`` for a LoRA adapter (keys of peft ``LoraConfig``; docs/reference.md §1)."""
    return {
        "alpha_pattern": alpha_pattern or {}, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "inference_mode": True, "init_lora_weights": init_lora_weights,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": lora_alpha, "lora_bias": False, "lora_dropout": lora_dropout, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": r,
        "rank_pattern": rank_pattern or {}, "revision": None, "target_modules": target_modules,
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": use_rslora,
    }


def export_peft(model: Module, out_dir: str, base_model_name_or_path: str | None = None,
                layout: str = "gpt2") -> dict:
    """Write the model's adapter in PEFT's layout: ``out_dir/adapter_config.json`` and
    ``out_dir/adapter_model.safetensors`` (keys ``base_model.model.<module path>.lora_A.weight`` (r, in)
    and ``….lora_B.weight`` (out, r), float32, no adapter name; docs/bugs.md C5). Both files
    are written atomically. Returns the config dict.

    layout="gpt2" (default) targets Hugging Face ``GPT2LMHeadModel`` names, whose linear layers
    are ``Conv1D`` with weight (in, out) (so ``fan_in_fan_out=True``):
      * ``attn.q_proj``/``k_proj``/``v_proj`` of block i -> ONE LoRA on ``transformer.h.i.attn.c_attn``
        (fused q|k|v) of rank Σr (2r for q and v): lora_A = concat([A_q, A_v]) (2r, C), lora_B (3C, 2r)
        with B_q in rows [0, C) × columns [0, r), zero k rows [C, 2C), B_v in rows [2C, 3C) ×
        columns [r, 2r). PEFT then computes exactly our two updates.
      * PEFT's scaling for that fused layer is α'/(2r) (α'/√(2r) with rsLoRA), so the exported
        lora_alpha is α' = s·2r = 2α for plain LoRA and α' = s·√(2r) = √2·α with rsLoRA
        (``use_rslora`` is kept), where s is our scaling. α' is written as an int when integral.
      * ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` map one to one (A, B unchanged).
      Modules whose rank/alpha differ from the most common one go to ``rank_pattern`` /
      ``alpha_pattern`` under their full path. ``target_modules`` lists the shortest name suffixes
      that select exactly the adapted modules (e.g. ``["c_attn"]``).
    layout="same": the model's own module names (nn.Linear layout, ``fan_in_fan_out=False``), for
      models whose names already match the Hugging Face model (e.g. llama-style q_proj/v_proj).

    Raises ValueError for a model without LoRA layers, a merged adapter, an unknown layout, or
    (gpt2) a LoRA layer with no GPT-2 counterpart (e.g. on ``score``).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no LoRA layer (call inject_lora first)")
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"export_peft: unmerge the adapters first; merged layers: {merged}")
    rs = {m.use_rslora for _, m in layers}
    if len(rs) > 1:
        raise ValueError("export_peft: the LoRA layers mix use_rslora True and False")
    use_rslora = rs.pop()
    dropout = max(m.lora_dropout.p for _, m in layers)
    if layout == "gpt2":
        groups = _gpt2_groups(layers)
        n_layer = 1 + max(int(_BLOCK.match(n).group(1).split(".")[-1]) for n, _ in layers)
        all_paths = [f"transformer.h.{i}.{s}" for i in range(n_layer)
                     for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        fan_in_fan_out = True
    elif layout == "same":
        groups = [(n, backend.to_numpy(m.lora_A.data), backend.to_numpy(m.lora_B.data), m.r, m.scaling)
                  for n, m in layers]
        all_paths = [n for n, m in model.named_modules() if is_linear_like(m) and not n.endswith("base_layer")]
        all_paths += [n for n, _ in layers]
        fan_in_fan_out = False
    else:
        raise ValueError(f"export_peft: unknown layout {layout!r}; expected 'gpt2' or 'same'")
    per_module = {path: (r, _peft_alpha(s, r, use_rslora)) for path, _, _, r, s in groups}
    counts: dict = {}
    for ra in per_module.values():
        counts[ra] = counts.get(ra, 0) + 1
    r0, alpha0 = max(counts, key=lambda k: counts[k])
    rank_pattern = {p: ra[0] for p, ra in per_module.items() if ra[0] != r0}
    alpha_pattern = {p: ra[1] for p, ra in per_module.items() if ra[1] != alpha0}
    cfg = peft_adapter_config(_short_targets(sorted(per_module), all_paths), r0, alpha0, dropout, use_rslora,
                              fan_in_fan_out, base_model_name_or_path, rank_pattern, alpha_pattern,
                              layers[0][1].init_lora_weights)
    tensors = {}
    for path, A, B, _, _ in groups:
        tensors[f"base_model.model.{path}.lora_A.weight"] = np.asarray(A, dtype=np.float32)  # (r, in)
        tensors[f"base_model.model.{path}.lora_B.weight"] = np.asarray(B, dtype=np.float32)  # (out, r)
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors_atomic(os.path.join(out_dir, "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    write_text_atomic(os.path.join(out_dir, "adapter_config.json"), json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


# ----------------------------------------------------------------------------------------------
# command line: ``minillm hf export|import`` (module convention: add_arguments / run)

def add_arguments(parser) -> None:
    """``export SRC OUT``: a minillm checkpoint (or any ``load_any`` source) -> a Hugging Face GPT-2
    directory; ``import SRC OUT``: a Hugging Face directory -> a minillm checkpoint file."""
    parser.add_argument("action", choices=("export", "import"), help="export: minillm -> HF dir; import: HF dir -> "
                                                                     "minillm checkpoint")
    parser.add_argument("src", help="export: a checkpoint file or run directory; import: a Hugging Face directory")
    parser.add_argument("out", help="export: the directory to write; import: the .safetensors file to write")
    parser.add_argument("--add-chat-specials", action="store_true",
                        help="import: add minillm's chat-template special tokens (<|pad|> <|bos|> ...) if missing")


def run(args) -> int:
    """Run ``add_arguments``' command; prints what was written. Returns 0."""
    from minillm.checkpoint import save_checkpoint

    if args.action == "export":
        model, tok, _ = load_any(args.src, special_tokens=())
        out = save_hf_gpt2(model, args.out, tok)
        print(f"wrote {out} (config.json, model.safetensors{', tokenizer files' if tok is not None else ''})")
    else:
        if not is_hf_dir(args.src):
            raise FileNotFoundError(f"{args.src}: not a Hugging Face directory (no config.json)")
        model, tok = load_hf_gpt2(args.src, special_tokens=DEFAULT_SPECIALS if args.add_chat_specials else ())
        path = save_checkpoint(args.out, model, tok, train_state={"source": "huggingface-gpt2", "path": args.src})
        print(f"wrote {path} (vocab_size {model.config.vocab_size}, tokenizer: {tok!r})")
    return 0


__all__ = [
    "gpt_config_from_hf", "hf_config_from_gpt", "gpt_state_from_hf", "hf_state_from_gpt",
    "load_hf_gpt2", "add_special_tokens", "save_hf_gpt2", "is_hf_dir", "load_any", "peft_adapter_config", "export_peft",
]
