"""Hugging Face GPT-2 tokenizer interop: byte-level BPE files in and out.

Scope
    * **Tokenizer files.** ``tokenizer_from_gpt2_files(vocab.json, merges.txt)`` and
      ``tokenizer_from_hf_json(tokenizer.json)`` (what transformers ≥ 5 writes) build a
      ``GPT2BPETokenizer``: minillm's ``Tokenizer`` (same encode/decode/special-token API) whose
      ids are the file's ids, so its encodings equal GPT-2's tokenizer's. ``save_gpt2_files``
      writes ``vocab.json``, ``merges.txt``, ``tokenizer.json`` and ``tokenizer_config.json`` from
      a ``GPT2BPETokenizer`` or from a tokenizer minillm trained itself.
    * ``tokenizer_from_dict`` reads either tokenizer form stored in a minillm checkpoint.
    The weights (``config.json``, ``model.safetensors``) are ``minillm.hf``'s.

Sources
    * openai/gpt-2 ``src/encoder.py``: ``bytes_to_unicode`` (the 256 bytes as printable
      characters: '!'..'~', '¡'..'¬', '®'..'ÿ' stand for themselves, the other 68 bytes become
      U+0100..U+0143, so a space is 'Ġ'), the ``bpe`` loop (merge the pair of lowest rank,
      every occurrence left to right), the pre-split regex. Radford et al. 2019 §2.2.
    * huggingface/tokenizers ``models/bpe`` (``tokenizer.json``: ``model.vocab``,
      ``model.merges``, ``added_tokens``); transformers ``GPT2Tokenizer`` (``vocab.json``, ``merges.txt``).

Deviations (each with the option that restores the reference)
    * The pre-split uses the ``regex`` package's Unicode tables (``GPT2_SPLIT_PATTERN``;
      tokenizers uses Oniguruma's): code points assigned in one Unicode version and not the other
      may split differently. ``regex`` is installed with transformers; GPT-2 parity needs it.
      Without it the tokenizer readers fall back, with a warning, to minillm's stdlib twin
      ``GPT2_SPLIT_PATTERN_STDLIB`` (it differs only on Nl/No numerals such as '½', U+001C..U+001F
      and code points newer than Python's Unicode database); ``pip install regex`` restores
      parity, and ``pattern=`` chooses explicitly.
    * Added tokens' ``lstrip`` / ``rstrip`` / ``single_word`` flags are not applied (GPT-2's own
      ``<|endoftext|>`` has none).
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from minillm.checkpoint import write_text_atomic
from minillm.pretokenize import GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN_STDLIB, check_loaded_pattern
from minillm.tokenizer import Tokenizer, merge_pair, special_splitter

#: GPT-2's end-of-text token (id 50256 in the original vocabulary).
ENDOFTEXT = "<|endoftext|>"
#: ``format`` of ``GPT2BPETokenizer.to_dict`` (minillm's own tokenizer uses "minillm.tokenizer").
GPT2_FORMAT = "minillm.gpt2-bpe"
GPT2_FORMAT_VERSION = 1

#: ``pattern="auto"``: GPT-2's regex if the ``regex`` package is installed, else the stdlib twin.
AUTO = "auto"


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
    def _bpe_chunk(self, data: bytes) -> list[int]:
        """The ids of one pre-split chunk: bytes -> byte ids, then GPT-2's BPE loop (lowest rank first);
        ``Tokenizer.encode_ordinary`` pre-splits and caches around it."""
        return _bpe_ranked([self._byte_ids[b] for b in data], self._ranks)

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
        outside ``pretokenize.KNOWN_PATTERNS`` unless ``trust_pattern=True`` (dangerous: the regex runs
        on every text; ``pretokenize.check_loaded_pattern``)."""
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


def read_json(path: Path) -> object:
    """A UTF-8 JSON file. Raises FileNotFoundError naming it, or ValueError (not UTF-8, not JSON: line, column)."""
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
            cfg = read_json(p)
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
        extra = read_json(p)
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
    vocab = read_json(vocab_json)
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
    d = read_json(path)
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
    pre-split pattern outside ``pretokenize.KNOWN_PATTERNS`` unless ``trust_pattern=True`` (dangerous)."""
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


__all__ = [
    "ENDOFTEXT", "AUTO", "gpt2_pattern", "bytes_to_unicode", "token_to_bytes", "bytes_to_token", "GPT2BPETokenizer",
    "tokenizer_from_gpt2_files", "tokenizer_from_hf_json", "tokenizer_from_dict", "load_hf_tokenizer",
    "save_gpt2_files", "read_json",
]
