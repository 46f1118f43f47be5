"""Hugging Face GPT-2 interop: checkpoints and tokenizer files in and out.

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
    * **Tokenizer files.** ``tokenizer_from_gpt2_files(vocab.json, merges.txt)`` and
      ``tokenizer_from_hf_json(tokenizer.json)`` (what transformers ≥ 5 writes) build a
      ``GPT2BPETokenizer``: minillm's ``Tokenizer`` (same encode/decode/special-token API) whose
      ids are the file's ids, so its encodings equal GPT-2's tokenizer's. ``save_gpt2_files``
      writes ``vocab.json``, ``merges.txt``, ``tokenizer.json`` and ``tokenizer_config.json`` from
      a ``GPT2BPETokenizer`` or from a tokenizer minillm trained itself.
    * ``load_any(path)``: a Hugging Face directory or a minillm checkpoint, as ``sft``/``dpo``
      ``--base`` take it; ``tokenizer_from_dict`` reads either tokenizer form from a checkpoint.
    * Command line (``add_arguments`` / ``run``): ``minillm hf export CKPT DIR`` and
      ``minillm hf import DIR CKPT.safetensors [--add-chat-specials]``.

Sources
    * openai/gpt-2 ``src/encoder.py``: ``bytes_to_unicode`` (the 256 bytes as printable
      characters: '!'..'~', '¡'..'¬', '®'..'ÿ' stand for themselves, the other 68 bytes become
      U+0100..U+0143, so a space is 'Ġ'), the ``bpe`` loop (merge the pair of lowest rank,
      every occurrence left to right), the pre-split regex. Radford et al. 2019 §2.2.
    * huggingface/transformers ``models/gpt2/modeling_gpt2.py`` (``Conv1D`` stores (in, out);
      ``c_attn`` is q | k | v; the tied ``lm_head``), ``configuration_gpt2.py`` (field names);
      huggingface/tokenizers ``models/bpe`` (``tokenizer.json``: ``model.vocab``,
      ``model.merges``, ``added_tokens``).
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
    * The pre-split uses the ``regex`` package's Unicode tables (``GPT2_SPLIT_PATTERN``;
      tokenizers uses Oniguruma's): code points assigned in one Unicode version and not the other
      may split differently. ``regex`` is installed with transformers; GPT-2 parity needs it.
      Without it the tokenizer readers fall back, with a warning, to minillm's stdlib twin
      ``GPT2_SPLIT_PATTERN_STDLIB`` (it differs only on Nl/No numerals such as '½', U+001C..U+001F
      and code points newer than Python's Unicode database); ``pip install regex`` restores
      parity, and ``pattern=`` chooses explicitly.
    * Added tokens' ``lstrip`` / ``rstrip`` / ``single_word`` flags are not applied (GPT-2's own
      ``<|endoftext|>`` has none).
    * New special tokens (``add_special_tokens``) get embedding rows equal to the mean of the
      existing rows (Hewitt 2021, "Initializing new word embeddings for pretrained language
      models"), not transformers' random draw around that mean; no option restores the draw.
"""
from __future__ import annotations

import importlib.util
import json
import mmap
import os
import struct
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from minillm import backend
from minillm.checkpoint import write_text_atomic
from minillm.tokenizer import (DEFAULT_SPECIALS, GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN_STDLIB, Tokenizer,
                               check_loaded_pattern, merge_pair, pre_split, special_splitter)

#: GPT-2's end-of-text token (id 50256 in the original vocabulary).
ENDOFTEXT = "<|endoftext|>"
#: ``format`` of ``GPT2BPETokenizer.to_dict`` (minillm's own tokenizer uses "minillm.tokenizer").
GPT2_FORMAT = "minillm.gpt2-bpe"
GPT2_FORMAT_VERSION = 1

#: ``pattern="auto"``: GPT-2's regex if the ``regex`` package is installed, else the stdlib twin.
AUTO = "auto"

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
_BLOCK_TENSORS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                  "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias")
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "tf_model.h5", "flax_model.msgpack")


# ----------------------------------------------------------------------------------------------
# GPT-2's byte <-> unicode table

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map byte value (0..255) -> one printable character (openai/gpt-2 ``encoder.py``).

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ', 188 of them) map to themselves; the
    other 68 (control characters, space, U+007F..U+00A0, U+00AD) map to U+0100, U+0101, ... in
    byte order, so the token strings in ``vocab.json`` / ``merges.txt`` contain no whitespace
    (space 0x20 -> 'Ġ' U+0120, newline 0x0A -> 'Ċ' U+010A).
    """
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {c: b for b, c in _BYTE_ENCODER.items()}


def token_to_bytes(token: str) -> bytes | None:
    """The bytes a GPT-2 token string stands for (``'Ġthe'`` -> ``b' the'``); None if a character
    is not one of the 256 byte characters (e.g. a special token written with a real space)."""
    try:
        return bytes(_BYTE_DECODER[c] for c in token)
    except KeyError:
        return None


def bytes_to_token(b: bytes) -> str:
    """Inverse of ``token_to_bytes``: ``b' the'`` -> ``'Ġthe'``."""
    return "".join(_BYTE_ENCODER[x] for x in b)


def gpt2_pattern(pattern: str | None = AUTO) -> str | None:
    """Resolve ``pattern``: ``"auto"`` -> ``GPT2_SPLIT_PATTERN`` when ``regex`` is importable, else
    ``GPT2_SPLIT_PATTERN_STDLIB`` with a ``UserWarning`` saying what differs; anything else as given."""
    if pattern != AUTO:
        return pattern
    if importlib.util.find_spec("regex") is not None:
        return GPT2_SPLIT_PATTERN
    warnings.warn("the `regex` package is not installed: GPT-2's pre-split uses minillm's stdlib twin, which "
                  "splits Nl/No numerals ('½', 'Ⅻ'), U+001C..U+001F and very new code points differently from "
                  "GPT-2 (pip install regex for exact parity)", UserWarning, stacklevel=3)
    return GPT2_SPLIT_PATTERN_STDLIB


# ----------------------------------------------------------------------------------------------
# The tokenizer

class GPT2BPETokenizer(Tokenizer):
    """minillm's ``Tokenizer`` with GPT-2's vocabulary: the ids are those of ``vocab.json``.

    minillm's own layout (byte b = id b, merge k = id 256+k, specials after) cannot hold a GPT-2
    vocabulary, whose 256 byte tokens are permuted (and, in files trained by ``tokenizers``, come
    after the specials), and where two merges may make the same string. So this subclass keeps
    GPT-2's tables: ``byte -> id`` for the 256 bytes, ``(id_a, id_b) -> (rank, id_ab)`` for the
    merges, and ``id -> bytes`` for decoding, and encodes each pre-split chunk with GPT-2's loop
    (``_bpe_ranked``: merge the pair of lowest rank, every occurrence left to right). Everything
    else -- special tokens cut out first (``allowed_special``), ``decode`` with
    ``errors="replace"``, ``special_id``, ``pad_id`` / ``bos_id`` / ``eos_id`` -- is the base
    class's.

    Build one with ``tokenizer_from_gpt2_files``, ``tokenizer_from_hf_json`` or ``from_dict``.

    Args:
        vocab: token string (GPT-2 byte characters, or a special's text) -> id (int ≥ 0).
        merges: ``[(a, b), ...]`` token strings in rank order (line order of merges.txt).
        special_tokens: special string -> id; a special not in ``vocab`` is added with its id.
        pattern: the pre-split regex; ``"auto"`` (default): GPT-2's (``gpt2_pattern``).
        source: a file name for error messages.
    Raises:
        ValueError: naming the source and the bad entry: a byte missing from the vocabulary, a
            merge whose parts or result are not in the vocabulary, a duplicate merge, two tokens
            with one id, a non-byte token that is not special.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]],
                 special_tokens: Mapping[str, int] | None = None, pattern: str | None = AUTO,
                 source: str = "vocab"):
        # the base validates and compiles the pattern; GPT-2's tables replace its merges and specials
        super().__init__(merges=(), special_tokens=(), pattern=gpt2_pattern(pattern))
        special_tokens = dict(special_tokens or {})
        vocab = dict(vocab)
        for s, i in special_tokens.items():
            if not isinstance(s, str) or not s:
                raise ValueError(f"{source}: special token {s!r} is not a non-empty string")
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ValueError(f"{source}: special token {s!r} has id {i!r}, not an int ≥ 0")
            if s in vocab and vocab[s] != i:
                raise ValueError(f"{source}: special token {s!r} has id {i} but the vocabulary gives it {vocab[s]}")
            vocab[s] = i
        by_id: dict[int, str] = {}
        for tok, i in vocab.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ValueError(f"{source}: token {tok!r} has id {i!r}, not an int ≥ 0")
            if i in by_id:
                raise ValueError(f"{source}: tokens {by_id[i]!r} and {tok!r} both have id {i}")
            by_id[i] = tok
        table: list[bytes | None] = [None] * (max(by_id) + 1 if by_id else 0)
        for i, tok in by_id.items():
            b = tok.encode("utf-8") if tok in special_tokens else token_to_bytes(tok)
            if b is None:
                raise ValueError(f"{source}: token {tok!r} (id {i}) is not written in GPT-2's byte characters "
                                 f"and is not a special token")
            table[i] = b
        missing = [b for b in range(256) if _BYTE_ENCODER[b] not in vocab]
        if missing:
            raise ValueError(f"{source}: the vocabulary lacks the single-byte tokens of bytes {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''} ({len(missing)} of 256); a byte-level BPE "
                             f"needs all 256")
        ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(merges):
            for part in (a, b, a + b):
                if part not in vocab:
                    raise ValueError(f"{source}: merge {rank} ({a!r} {b!r}) uses or makes {part!r}, which is not "
                                     f"in the vocabulary")
            pair = (vocab[a], vocab[b])
            if pair in ranks:
                raise ValueError(f"{source}: merge {rank} ({a!r} {b!r}) repeats merge {ranks[pair][0]}")
            ranks[pair] = (rank, vocab[a + b])
        self._vocab = vocab
        self._merge_list = [(a, b) for a, b in merges]
        self._ranks = ranks
        self._byte_ids = [vocab[_BYTE_ENCODER[b]] for b in range(256)]
        self._id_bytes = table  # type: ignore[assignment]  # holes (ids without a token) are None
        self._specials = {s: int(i) for s, i in special_tokens.items()}
        self._special_splitter = special_splitter(self._specials)

    # ------------------------------------------------------------------ encode / decode
    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with no special-token handling: pre-split, bytes -> byte ids, GPT-2's BPE loop."""
        ids: list[int] = []
        chunks = pre_split(text, self._compiled)
        if sum(map(len, chunks)) != len(text):
            raise ValueError("the pre-split pattern skips characters of the text; every character must "
                             "fall into some chunk")
        cache, byte_ids = self._cache, self._byte_ids
        for chunk in chunks:
            hit = cache.get(chunk)
            if hit is None:
                hit = tuple(_bpe_ranked([byte_ids[b] for b in chunk.encode("utf-8")], self._ranks))
                if len(cache) >= 1 << 16:
                    cache.clear()
                cache[chunk] = hit
            ids.extend(hit)
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for (specials as their UTF-8 text).

        Raises ValueError naming the position and value of an id that is not an int, is out of
        range, or is an id the vocabulary skips.
        """
        table = self._id_bytes
        out = []
        for pos, i in enumerate(ids):
            if not hasattr(i, "__index__") or isinstance(i, bool):
                raise ValueError(f"token id at position {pos} is not an int: {i!r}")
            b = table[i] if 0 <= i < len(table) else None
            if b is None:
                raise ValueError(f"token id {int(i)} at position {pos} is not in the vocabulary "
                                 f"(range [0, {len(table)}))")
            out.append(b)
        return b"".join(out)

    # ------------------------------------------------------------------ inspection
    @property
    def merges(self) -> list[tuple[tuple[int, int], int]]:
        """The merges in rank order as ids: ``[((id_a, id_b), id_ab), ...]``."""
        return [(pair, new) for pair, (_, new) in sorted(self._ranks.items(), key=lambda kv: kv[1][0])]

    @property
    def vocab(self) -> dict[str, int]:
        """Token string (GPT-2 byte characters; specials as text) -> id (a copy)."""
        return dict(self._vocab)

    def is_special(self, i: int) -> bool:
        """Whether id ``i`` is a special token."""
        return i in set(self._specials.values())

    def with_special_tokens(self, tokens: Sequence[str]) -> "GPT2BPETokenizer":
        """A copy with ``tokens`` added as specials (ids ``vocab_size``, ``vocab_size+1``, ... in
        order; tokens it already has keep their ids). Returns self when nothing is new."""
        new = [t for t in dict.fromkeys(tokens) if t not in self._specials]
        if not new:
            return self
        specials = dict(self._specials)
        n = self.vocab_size
        for t in new:
            specials[t] = self._vocab.get(t, n)
            if specials[t] == n:
                n += 1
        return GPT2BPETokenizer(self._vocab, self._merge_list, specials, self._pattern)

    def __repr__(self) -> str:
        return (f"GPT2BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._ranks)}, "
                f"special_tokens={self._specials}, pattern={self._pattern!r})")

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        """JSON-ready: format ``minillm.gpt2-bpe``, version, pattern, vocab, merges ["a b", ...],
        special_tokens. Read back with ``GPT2BPETokenizer.from_dict`` or ``tokenizer_from_dict``
        (minillm's ``Tokenizer.from_dict`` refuses it by its format)."""
        return {"format": GPT2_FORMAT, "version": GPT2_FORMAT_VERSION, "pattern": self._pattern,
                "vocab": dict(self._vocab), "merges": [f"{a} {b}" for a, b in self._merge_list],
                "special_tokens": dict(self._specials)}

    @classmethod
    def from_dict(cls, d: Mapping, trust_pattern: bool = False) -> "GPT2BPETokenizer":
        """Inverse of ``to_dict``. Raises ValueError naming the bad field, or a pre-split pattern
        outside ``tokenizer.KNOWN_PATTERNS`` unless ``trust_pattern=True`` (dangerous: the regex runs
        on every text; ``tokenizer.check_loaded_pattern``)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"top level must be a JSON object, got {type(d).__name__}")
        for f in ("format", "version", "pattern", "vocab", "merges", "special_tokens"):
            if f not in d:
                raise ValueError(f"missing field {f!r}")
        if d["format"] != GPT2_FORMAT or d["version"] != GPT2_FORMAT_VERSION:
            raise ValueError(f"format {d['format']!r} version {d['version']!r}; expected {GPT2_FORMAT!r} "
                             f"version {GPT2_FORMAT_VERSION}")
        check_loaded_pattern(d["pattern"], "field 'pattern'", trust_pattern)
        return cls(d["vocab"], _parse_merge_lines(d["merges"], "field 'merges'"), d["special_tokens"], d["pattern"],
                   source="tokenizer dict")


def _bpe_ranked(ids: list[int], ranks: Mapping[tuple[int, int], tuple[int, int]]) -> list[int]:
    """GPT-2's BPE on one chunk of ids: repeatedly merge every occurrence (left to right) of the
    adjacent pair with the lowest rank, until no pair has a rank (openai/gpt-2 ``Encoder.bpe``)."""
    inf = (float("inf"), -1)
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, inf))
        hit = ranks.get(pair)
        if hit is None:
            break
        ids = merge_pair(ids, pair, hit[1])
    return ids


def _parse_merge_lines(lines: Iterable, source: str) -> list[tuple[str, str]]:
    """merges.txt lines ("a b"; "#version" header and blank lines skipped) or [a, b] lists."""
    out = []
    for n, line in enumerate(lines, 1):
        if isinstance(line, (list, tuple)):
            if len(line) != 2 or not all(isinstance(x, str) and x for x in line):
                raise ValueError(f"{source}: entry {n} is {line!r}, expected [a, b] strings")
            out.append((line[0], line[1]))
            continue
        if not isinstance(line, str):
            raise ValueError(f"{source}: entry {n} is {line!r}, expected a string 'a b'")
        s = line.rstrip("\r\n")
        if not s.strip() or (n == 1 and s.startswith("#version")):
            continue
        parts = s.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{source}: line {n} is {s!r}; expected two tokens separated by one space")
        out.append((parts[0], parts[1]))
    return out


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _special_tokens_from_config(folder: Path, vocab: Mapping[str, int]) -> dict[str, int]:
    """Specials named in ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``added_tokens.json``
    of ``folder`` (ids from ``added_tokens_decoder``, ``added_tokens.json`` or the vocabulary), plus
    ``<|endoftext|>`` when the vocabulary has it (transformers' GPT2Tokenizer default for unk/bos/eos)."""
    names: list[str] = []
    ids: dict[str, int] = {}
    if ENDOFTEXT in vocab:
        names.append(ENDOFTEXT)

    def add(v):
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str) and v:
            names.append(v)
        elif isinstance(v, list):
            for x in v:
                add(x)

    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        p = folder / fname
        if p.is_file():
            cfg = _read_json(p)
            if not isinstance(cfg, dict):
                raise ValueError(f"{p}: expected a JSON object")
            for key in ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens",
                        "extra_special_tokens"):
                add(cfg.get(key))
            for i, entry in (cfg.get("added_tokens_decoder") or {}).items():
                if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                    names.append(entry["content"])
                    ids[entry["content"]] = int(i)
    p = folder / "added_tokens.json"
    if p.is_file():
        extra = _read_json(p)
        if not isinstance(extra, dict):
            raise ValueError(f"{p}: expected a JSON object {{token: id}}")
        for s, i in extra.items():
            names.append(s)
            ids[s] = int(i)
    out: dict[str, int] = {}
    n = max(vocab.values()) + 1 if vocab else 0
    for s in dict.fromkeys(names):
        if s in ids:
            out[s] = ids[s]
        elif s in vocab:
            out[s] = vocab[s]
        else:
            out[s] = n
            n += 1
    return out


def tokenizer_from_gpt2_files(vocab_json, merges_txt, special_tokens: Sequence[str] | Mapping[str, int] | None = None,
                              pattern: str | None = AUTO) -> GPT2BPETokenizer:
    """Read GPT-2's ``vocab.json`` (token -> id) and ``merges.txt`` (one "a b" merge per line in
    rank order, optional ``#version`` header) into a ``GPT2BPETokenizer``.

    special_tokens: None -> those named in ``tokenizer_config.json`` / ``special_tokens_map.json``
    / ``added_tokens.json`` next to ``vocab.json`` plus ``<|endoftext|>`` if the vocabulary has
    it; a sequence of strings -> their vocabulary ids (new ones get ids after the largest); a dict
    string -> id as given. pattern: ``"auto"`` = GPT-2's pre-split regex (``gpt2_pattern``: needs
    ``regex`` for exact parity).

    Encodes exactly like ``transformers.GPT2Tokenizer`` on these files (see the interop tests).
    Raises FileNotFoundError / ValueError naming the file and the line or entry at fault.
    """
    vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
    vocab = _read_json(vocab_json)
    if not isinstance(vocab, dict):
        raise ValueError(f"{vocab_json}: expected a JSON object {{token: id}}, got {type(vocab).__name__}")
    try:
        lines = merges_txt.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {merges_txt}") from None
    merges = _parse_merge_lines(lines, str(merges_txt))
    if special_tokens is None:
        specials = _special_tokens_from_config(vocab_json.parent, vocab)
    elif isinstance(special_tokens, Mapping):
        specials = dict(special_tokens)
    else:
        specials, n = {}, max(vocab.values()) + 1 if vocab else 0
        for s in dict.fromkeys(special_tokens):
            if s in vocab:
                specials[s] = vocab[s]
            else:
                specials[s], n = n, n + 1
    return GPT2BPETokenizer(vocab, merges, specials, pattern, source=f"{vocab_json} + {merges_txt}")


def tokenizer_from_hf_json(path, pattern: str | None = AUTO) -> GPT2BPETokenizer:
    """Read a ``tokenizers`` ``tokenizer.json`` of GPT-2's kind (what transformers ≥ 5 saves):
    ``model`` of type BPE (``vocab``, ``merges`` as "a b" strings or [a, b] lists), a ByteLevel
    pre-tokenizer without prefix space, no normalizer; every entry of ``added_tokens`` becomes a
    special token with its id.

    Raises ValueError naming the file and the unsupported part (another model type, a
    normalizer, ``add_prefix_space``, BPE dropout, a continuing-subword prefix).
    """
    path = Path(path)
    d = _read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        raise ValueError(f"{path}: not a tokenizers file (no 'model' object)")
    m = d["model"]
    if m.get("type") != "BPE":
        raise ValueError(f"{path}: model type {m.get('type')!r}; minillm reads only byte-level BPE (GPT-2)")
    if d.get("normalizer") is not None:
        raise ValueError(f"{path}: has a normalizer {d['normalizer'].get('type')!r}; GPT-2 has none")
    pre = d.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or pre.get("use_regex", True) is False:
        raise ValueError(f"{path}: pre_tokenizer {pre!r}; expected GPT-2's ByteLevel with add_prefix_space "
                         f"false and use_regex true")
    for key, ok in (("dropout", None), ("continuing_subword_prefix", ""), ("end_of_word_suffix", "")):
        if m.get(key) not in (ok, None):
            raise ValueError(f"{path}: model.{key}={m.get(key)!r} is not supported")
    if not isinstance(m.get("vocab"), dict) or not isinstance(m.get("merges"), list):
        raise ValueError(f"{path}: model.vocab must be an object and model.merges a list")
    specials = {}
    for k, a in enumerate(d.get("added_tokens") or []):
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not isinstance(a.get("id"), int):
            raise ValueError(f"{path}: added_tokens[{k}] is {a!r}, expected {{'id': int, 'content': str, ...}}")
        specials[a["content"]] = a["id"]
    return GPT2BPETokenizer(m["vocab"], _parse_merge_lines(m["merges"], f"{path}: model.merges"), specials, pattern,
                            source=str(path))


def tokenizer_from_dict(d: Mapping, trust_pattern: bool = False) -> Tokenizer:
    """Either tokenizer form stored in a minillm checkpoint: ``minillm.tokenizer`` (minillm's own
    layout) or ``minillm.gpt2-bpe`` (a GPT-2 vocabulary). Raises ValueError naming the field, or a
    pre-split pattern outside ``tokenizer.KNOWN_PATTERNS`` unless ``trust_pattern=True`` (dangerous)."""
    if isinstance(d, Mapping) and d.get("format") == GPT2_FORMAT:
        return GPT2BPETokenizer.from_dict(d, trust_pattern=trust_pattern)
    return Tokenizer.from_dict(d, trust_pattern=trust_pattern)


def load_hf_tokenizer(folder) -> GPT2BPETokenizer | None:
    """The tokenizer of a Hugging Face directory: ``vocab.json`` + ``merges.txt`` if present, else
    ``tokenizer.json``; None when it has neither."""
    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return tokenizer_from_gpt2_files(folder / "vocab.json", folder / "merges.txt")
    if (folder / "tokenizer.json").is_file():
        return tokenizer_from_hf_json(folder / "tokenizer.json")
    return None


def _gpt2_tables(tokenizer: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]], dict[str, int]]:
    """(vocab, merges, specials) in GPT-2 terms for a GPT2BPETokenizer or a minillm Tokenizer."""
    if isinstance(tokenizer, GPT2BPETokenizer):
        return tokenizer.vocab, list(tokenizer._merge_list), tokenizer.special_tokens
    if tokenizer.pattern not in (GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN_STDLIB):
        raise ValueError(f"save_gpt2_files: the tokenizer's pre-split pattern {tokenizer.pattern!r} is not GPT-2's; "
                         f"GPT-2 files always pre-split with GPT-2's regex, so encodings would differ")
    vocab: dict[str, int] = {}
    strings: list[str] = []
    for i in range(256 + len(tokenizer.merges)):
        s = bytes_to_token(tokenizer.id_to_token(i))
        if s in vocab:
            raise ValueError(f"save_gpt2_files: ids {vocab[s]} and {i} are both the bytes "
                             f"{tokenizer.id_to_token(i)!r}; "
                             f"a GPT-2 vocabulary maps each string to one id")
        vocab[s] = i
        strings.append(s)
    merges = [(strings[a], strings[b]) for (a, b), _ in tokenizer.merges]
    specials = tokenizer.special_tokens
    for s, i in specials.items():
        vocab[s] = i
    return vocab, merges, specials


def save_gpt2_files(tokenizer: Tokenizer, folder, model_max_length: int | None = None) -> list[Path]:
    """Write ``vocab.json``, ``merges.txt`` (``#version: 0.2`` header), ``tokenizer.json`` and
    ``tokenizer_config.json`` into ``folder``, each atomically, so that
    ``transformers.GPT2Tokenizer.from_pretrained(folder)`` / ``AutoTokenizer`` and
    ``tokenizer_from_gpt2_files`` encode like ``tokenizer``.

    ``tokenizer`` is a ``GPT2BPETokenizer`` or a tokenizer minillm trained (its ids are kept: byte
    b -> id b, merge k -> 256+k, the specials after). Its specials are written as added tokens
    (``special: true``). Returns the paths written.

    Raises ValueError for a minillm tokenizer whose pattern is not GPT-2's (``pattern=None``,
    GPT-4's), or two of whose ids are the same bytes (a GPT-2 vocabulary cannot hold that).
    A minillm tokenizer with the default stdlib pattern is written as GPT-2's regex: the two
    differ only on rare characters (tokenizer.py's module docstring).
    """
    vocab, merges, specials = _gpt2_tables(tokenizer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in sorted(specials.items(), key=lambda kv: kv[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tok_json = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
                "pre_tokenizer": byte_level, "post_processor": dict(byte_level, add_prefix_space=True),
                "decoder": dict(byte_level, add_prefix_space=True),
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                          "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                          "vocab": ordered, "merges": [[a, b] for a, b in merges]}}
    config: dict = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "errors": "replace",
                    "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}}
    eot = ENDOFTEXT if ENDOFTEXT in specials else None
    config.update({"bos_token": "<|bos|>" if "<|bos|>" in specials else eot,
                   "eos_token": "<|eos|>" if "<|eos|>" in specials else eot,
                   "unk_token": eot, "pad_token": "<|pad|>" if "<|pad|>" in specials else None})
    named = {config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]}
    config["additional_special_tokens"] = [s for s in specials if s not in named]
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    paths = []
    for name, text in (("vocab.json", json.dumps(ordered, ensure_ascii=False)),
                       ("merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)),
                       ("tokenizer.json", json.dumps(tok_json, ensure_ascii=False, indent=1)),
                       ("tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n")):
        write_text_atomic(folder / name, text)
        paths.append(folder / name)
    return paths


# ----------------------------------------------------------------------------------------------
# safetensors reading (float16/bfloat16 included, never a pickle)

_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "BOOL": "?"}


def read_safetensors_any(path) -> tuple[dict[str, np.ndarray], dict]:
    """(name -> host array, metadata) of a safetensors file; float16 / bfloat16 / float64 become
    float32 (bfloat16 = the upper 16 bits of a float32). Raises FileNotFoundError, or ValueError
    naming the file for a pickle (PyTorch ``.bin``), a bad header, an unknown dtype or a tensor
    whose bytes do not match its shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = None
        if 0 < n <= min(size - 8, 100_000_000):
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
        if not isinstance(header, dict):
            # only now look for a pickle's magic: a valid header length may itself start with 0x80
            if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise ValueError(f"{path}: a pickle/zip (PyTorch .bin/.pt) file; minillm reads only safetensors "
                                 f"and never unpickles")
            raise ValueError(f"{path}: not a safetensors file (the 8-byte header length {n} and the JSON header "
                             f"after it do not fit a file of {size} bytes)")
        meta = header.pop("__metadata__", None) or {}
        out: dict[str, np.ndarray] = {}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name, info in header.items():
                try:
                    dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                except (KeyError, TypeError, ValueError):
                    raise ValueError(f"{path}: header entry {name!r} is malformed: {info!r}") from None
                lo, hi = 8 + n + start, 8 + n + end
                count = int(np.prod(shape, dtype=np.int64))
                if dtype == "BF16":
                    width = 2
                elif dtype in _ST_DTYPES:
                    width = np.dtype(_ST_DTYPES[dtype]).itemsize
                else:
                    raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which minillm does not read")
                if hi - lo != count * width or hi > size or lo < 8 + n:
                    raise ValueError(f"{path}: tensor {name!r} {dtype}{list(shape)} has {hi - lo} bytes, "
                                     f"expected {count * width}")
                buf = mm[lo:hi]  # a bytes copy
                if dtype == "BF16":  # bfloat16 = the upper half of a float32
                    arr = (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)
                else:
                    arr = np.frombuffer(buf, _ST_DTYPES[dtype])
                    arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr.copy()
                out[name] = arr.reshape(shape)
    return out, meta


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
        idx = _read_json(index)
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
                         "export the adapter with lora.export_peft")
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
    hf = _read_json(cfg_path)
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
    "ENDOFTEXT", "AUTO", "gpt2_pattern", "bytes_to_unicode", "token_to_bytes", "bytes_to_token", "GPT2BPETokenizer",
    "tokenizer_from_gpt2_files", "tokenizer_from_hf_json", "tokenizer_from_dict", "load_hf_tokenizer",
    "save_gpt2_files", "read_safetensors_any", "gpt_config_from_hf", "hf_config_from_gpt", "gpt_state_from_hf",
    "hf_state_from_gpt", "load_hf_gpt2", "add_special_tokens", "save_hf_gpt2", "is_hf_dir", "load_any",
]
