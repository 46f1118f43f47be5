"""Byte-level BPE tokenizer: train, encode, decode, special tokens, save/load.

Scope
    A readable byte-pair-encoding tokenizer in pure Python, built in the same three steps as
    karpathy/minbpe: steps 1 and 3 are sections of this file, step 2 (the pre-split regexes) is
    ``pretokenize.py``:

    1. **Byte-level BPE.** Text is UTF-8 bytes; the base vocabulary is the 256 byte values (ids
       0..255), so every string can be encoded and nothing is ever "unknown". Training repeatedly
       replaces the most frequent adjacent pair of ids by a new id (``get_pair_counts``,
       ``merge_pair``); encoding applies the learned merges in the order they were learned
       (``bpe``).
    2. **Regex pre-split.** Before BPE the text is cut into chunks (words with their leading space,
       runs of digits, runs of punctuation, whitespace) and merges never cross a chunk boundary, so
       "dog." and "dog!" share the token " dog" (``pre_split``).
    3. **Special tokens.** Strings such as ``<|eos|>`` are cut out *before* steps 1-2 and map to one
       id each; they never take part in merges (``split_specials``). The default specials are
       ``<|pad|> <|bos|> <|eos|> [INST] [/INST]`` (``DEFAULT_SPECIALS``), the markers of the chat
       template ``<|bos|>[INST] {instruction} [/INST] {response}<|eos|>`` (``data.render_chat``).

    Id layout (fixed by construction and checked on load)::

        0 .. 255                      the 256 single bytes (id == byte value)
        256 .. 256+M-1                merge k (k = 0..M-1) makes id 256+k; id order == merge rank
        256+M .. 256+M+S-1            the S special tokens, in the order given (after the merges,
                                      as GPT-2 puts <|endoftext|> = 50256 after its 50,000 merges)

    so ``vocab_size = 256 + M + S``; with the defaults, ``pad_id = vocab_size-5``, ``bos_id =
    vocab_size-4``, ``eos_id = vocab_size-3``, ``[INST] = vocab_size-2``, ``[/INST] = vocab_size-1``.

    ``encode`` never adds BOS/EOS by itself: the chat-template renderer (``minillm.data``) writes
    ``<|bos|>`` and ``<|eos|>`` into the text, and a second, implicit BOS is exactly docs/bugs.md B09.

Sources
    * R. Sennrich, B. Haddow, A. Birch, "Neural Machine Translation of Rare Words with Subword
      Units", ACL 2016, §3.2 (BPE: merge the most frequent pair, count over a word-frequency
      dictionary rather than the running text -- our "chunk counting").
    * A. Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019, §2.2
      (byte-level BPE; do not merge across character categories -- the pre-split regex);
      openai/gpt-2 ``src/encoder.py`` (the split pattern ``GPT2_SPLIT_PATTERN``).
    * karpathy/minbpe (``basic.py``, ``regex.py``: ``get_stats``, ``merge``, the encode loop
      "merge the pair with the lowest merge index first", special-token handling as in tiktoken's
      ``allowed_special``) -- the teaching reference this file follows.

Deviations (each with the option that restores the reference)
    * **Stdlib ``re`` instead of the ``regex`` package.** GPT-2's pattern needs the Unicode
      classes ``\\p{L}`` (letters) and ``\\p{N}`` (numbers), which Python's ``re`` lacks. The default
      ``GPT2_SPLIT_PATTERN_STDLIB`` writes letters as ``[^\\W\\d_]``, numbers as ``\\d`` and "other"
      as ``(?:[^\\s\\w]|_)``. It splits exactly like GPT-2's pattern except for
      (a) characters of Unicode categories Nl/No (``²``, ``½``, ``Ⅻ``, ``①``): numeric but not
      decimal, so they join the *letter* runs here but the *number* runs in GPT-2;
      (b) U+001C..U+001F, which ``re`` counts as whitespace (``str.isspace``) and ``regex`` does
      not; (c) code points unassigned in Python's own Unicode database (``unicodedata``, 14.0 in
      Python 3.11) but assigned in the newer one of ``regex`` are "other" here. The ch02 tests
      check, code point by code point, that the two patterns agree on everything else.
      Restore: ``pattern=GPT2_SPLIT_PATTERN`` (needs ``pip install regex``; any pattern containing
      ``\\p{`` is compiled with ``regex``). ``GPT4_SPLIT_PATTERN`` (cl100k, from minbpe) works too.
    * **Tie-breaking.** Sennrich et al. and minbpe take "the" most frequent pair; on ties minbpe
      gets whichever pair its dict saw first. Here ties go to the *smallest pair* ``(a, b)``
      (lexicographic on ids), a rule that does not depend on data-structure order, so training is
      deterministic. There is no option for "first seen", because incremental counting does not
      keep that order.
    * **Incremental pair counts.** minbpe recounts every pair after every merge; here the counts are
      updated only for the chunks that contain the merged pair (same result, much faster: 1 MB of
      text to 1024 tokens in seconds). ``tests`` compare with a full recount.
    * **Base bytes are ids 0..255 in byte order.** GPT-2's ``encoder.json`` permutes the 256 byte
      tokens (printable bytes first), so GPT-2's own ``vocab.json``/``merges.txt`` are loaded by
      ``hf_tokenizer.GPT2BPETokenizer`` (``hf_tokenizer.tokenizer_from_gpt2_files``), a subclass that keeps GPT-2's
      byte and merge tables instead of this layout.
    * ``pattern=None`` means *no pre-split* (minbpe's ``BasicTokenizer``): merges may cross word
      boundaries. Used for toy examples (docs/bugs.md B02's one-merge tokenizer); encoding long texts
      this way is slow (quadratic per chunk).
    * **A loaded tokenizer runs only a known pre-split pattern.** ``from_dict`` / ``from_json`` /
      ``load`` (and every checkpoint load) accept ``KNOWN_PATTERNS`` (GPT-2's, its stdlib twin,
      GPT-4's) or None and refuse any other pattern in a file, naming the file and the pattern: a
      regex from a file can backtrack catastrophically (``(a+)+$`` on a long run of "a" takes
      exponential time), so encoding would hang. Restore (for a file you trust):
      ``trust_pattern=True``. Patterns passed to the constructor in code are not restricted.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

from minillm.pretokenize import GPT2_SPLIT_PATTERN_STDLIB, check_loaded_pattern, compile_pattern, pre_split

# ----------------------------------------------------------------------------------------------
# Constants

#: The project's special tokens (the chat template of ``data.render_chat``); ids come after the merges, in this order.
PAD, BOS, EOS, INST, INST_END = "<|pad|>", "<|bos|>", "<|eos|>", "[INST]", "[/INST]"
DEFAULT_SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, INST, INST_END)

#: ``format`` and ``version`` fields of the JSON file written by ``Tokenizer.save``.
FORMAT = "minillm.tokenizer"
FORMAT_VERSION = 1

_NUM_BYTES = 256
_CACHE_LIMIT = 1 << 16  # chunks remembered by Tokenizer.encode before the cache is cleared

Pair = tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Step 1: byte-level BPE on one list of ids (minbpe basic.py)

def get_pair_counts(ids: Sequence[int], counts: dict[Pair, int] | None = None, weight: int = 1
                    ) -> dict[Pair, int]:
    """Count adjacent pairs: ``[1, 2, 3, 1, 2] -> {(1, 2): 2, (2, 3): 1, (3, 1): 1}``.

    Args:
        ids: a sequence of token ids (ints).
        counts: a dict to add into (updated in place and returned); a new one if None.
        weight: how much each occurrence counts (the frequency of the chunk ``ids`` stands for).
    Returns:
        dict (a, b) -> count. Source: minbpe ``get_stats``.
    """
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + weight
    return counts


def merge_pair(ids: Sequence[int], pair: Pair, new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id``, scanning left to right.

    Non-overlapping, leftmost first: ``merge_pair([5, 5, 5], (5, 5), 9) == [9, 5]``.
    Source: minbpe ``merge``. Returns a new list; ``ids`` is not modified.
    """
    out: list[int] = []
    a, b = pair
    i, n = 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def bpe(ids: Sequence[int], merge_ids: Mapping[Pair, int]) -> list[int]:
    """Encode one chunk: apply learned merges, always the one learned earliest (lowest id) first.

    Args:
        ids: the chunk's byte values (ints 0..255), or ids already partly merged.
        merge_ids: (a, b) -> new id; new ids increase with merge rank (id 256+k for merge k),
            so "lowest new id" == "earliest merge", as minbpe's encode loop.
    Returns:
        list of ids. Source: minbpe ``RegexTokenizer._encode_chunk``.
    """
    ids = list(ids)
    inf = float("inf")
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda p: merge_ids.get(p, inf))
        if pair not in merge_ids:
            break  # nothing left to merge
        ids = merge_pair(ids, pair, merge_ids[pair])
    return ids


# ----------------------------------------------------------------------------------------------
# Step 3: special tokens are cut out first and never merged (docs/bugs.md B09)

def special_splitter(specials: Iterable[str]):
    """A compiled regex that finds any of ``specials`` (longest first, so no prefix wins early)."""
    alternatives = sorted(set(specials), key=lambda s: (-len(s), s))
    if not alternatives:
        return None
    return re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")


def split_specials(text: str, splitter) -> list[tuple[str, bool]]:
    """Split ``text`` into ``(piece, is_special)`` pieces; empty ordinary pieces are dropped.

    ``split_specials("a<|eos|>b", special_splitter(["<|eos|>"]))
    == [("a", False), ("<|eos|>", True), ("b", False)]``.
    """
    if splitter is None:
        return [(text, False)] if text else []
    parts = splitter.split(text)  # the capture group keeps the specials at the odd positions
    return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]


# ----------------------------------------------------------------------------------------------
# Training (Sennrich et al. 2016 §3.2, with incremental pair counts)

def train_merges(chunk_counts: Mapping[bytes, int], num_merges: int, verbose: bool = False
                 ) -> list[tuple[Pair, int]]:
    """Learn ``num_merges`` merges from chunk frequencies.

    Args:
        chunk_counts: each distinct pre-split chunk (as UTF-8 bytes) -> how often it occurs.
        num_merges: number of merges to learn (>= 0).
        verbose: print each merge.
    Returns:
        ``[((a, b), 256 + k) for k in range(num_merges)]`` in rank order.
    Raises:
        ValueError: if the chunks run out of pairs first (every chunk is already one token).

    Each step merges the most frequent pair; ties go to the smallest ``(a, b)``. After a merge
    only the chunks that contained the pair (``where[pair]``) are re-counted: their old pairs are
    subtracted and their new pairs added, each weighted by the chunk's frequency. The result is
    identical to recounting everything (minbpe), which the tests check.
    """
    words: list[list[int]] = [list(chunk) for chunk in chunk_counts]
    freqs: list[int] = list(chunk_counts.values())
    counts: dict[Pair, int] = {}
    where: dict[Pair, set[int]] = defaultdict(set)  # pair -> chunks that (may) contain it
    for i, (w, f) in enumerate(zip(words, freqs)):
        get_pair_counts(w, counts, f)
        for pair in zip(w, w[1:]):
            where[pair].add(i)

    merges: list[tuple[Pair, int]] = []
    for k in range(num_merges):
        if not counts:
            raise ValueError(
                f"the training text supports only {k} merges (every chunk is a single token "
                f"after that); asked for {num_merges}. Use more text or a smaller vocab_size."
            )
        # most frequent pair; ties -> smallest (a, b)
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        new_id = _NUM_BYTES + k
        if verbose:
            print(f"merge {k + 1}/{num_merges}: {pair} -> {new_id} ({counts[pair]} occurrences)")
        for i in where.pop(pair):
            old = words[i]
            new = merge_pair(old, pair, new_id)
            if len(new) == len(old):
                continue  # stale entry: this chunk lost the pair to an earlier merge
            f = freqs[i]
            for p in zip(old, old[1:]):
                c = counts[p] - f
                if c:
                    counts[p] = c
                else:
                    del counts[p]
            for p in zip(new, new[1:]):
                counts[p] = counts.get(p, 0) + f
                where[p].add(i)
            words[i] = new
        assert pair not in counts, "internal error: merged pair still counted"
        merges.append((pair, new_id))
    return merges


# ----------------------------------------------------------------------------------------------
# The tokenizer

class Tokenizer:
    """Byte-level BPE tokenizer with a regex pre-split and special tokens.

    Build one with ``Tokenizer.train(text, vocab_size)``, ``Tokenizer.load(path)``, or directly
    from explicit merges (a toy tokenizer, e.g. docs/bugs.md B02)::

        Tokenizer(merges=[((10, 35), 256)], special_tokens=(), pattern=None)

    Args:
        merges: ordered ``((a, b), new_id)``; merge k must have ``new_id == 256 + k`` and ``a``,
            ``b`` must be ids defined before it (< 256 + k).
        special_tokens: a sequence of distinct non-empty strings (ids 256+M, 256+M+1, ... in
            order) or a dict string -> id whose ids are exactly ``256+M .. 256+M+S-1``.
            Default ``DEFAULT_SPECIALS``.
        pattern: the pre-split regex (``GPT2_SPLIT_PATTERN_STDLIB`` by default), or None for no
            pre-split.
    Raises:
        ValueError: naming the bad field (``merges[k]``, ``special_tokens[...]``, ``pattern``).

    Attributes (read-only properties): ``vocab_size``, ``merges``, ``special_tokens``,
    ``pattern``, ``pad_id``, ``bos_id``, ``eos_id``.
    """

    def __init__(self, merges: Iterable[tuple[Pair, int]] = (),
                 special_tokens: Sequence[str] | Mapping[str, int] = DEFAULT_SPECIALS,
                 pattern: str | None = GPT2_SPLIT_PATTERN_STDLIB):
        # --- merges -> vocab (id -> bytes) ---
        self._merge_ids: dict[Pair, int] = {}
        vocab: list[bytes] = [bytes([b]) for b in range(_NUM_BYTES)]
        for k, entry in enumerate(merges):
            try:
                (a, b), new_id = entry
            except (TypeError, ValueError):
                raise ValueError(f"merges[{k}]: expected ((a, b), new_id), got {entry!r}") from None
            for name, v in (("a", a), ("b", b), ("new_id", new_id)):
                if not _is_int(v):
                    raise ValueError(f"merges[{k}]: {name}={v!r} is not an int")
            if new_id != _NUM_BYTES + k:
                raise ValueError(f"merges[{k}]: new_id={new_id}, expected {_NUM_BYTES + k} "
                                 f"(merge k makes id 256+k)")
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise ValueError(f"merges[{k}]: pair ({a}, {b}) uses an id not defined before "
                                 f"id {new_id}")
            if (a, b) in self._merge_ids:
                raise ValueError(f"merges[{k}]: pair ({a}, {b}) is already merges"
                                 f"[{self._merge_ids[(a, b)] - _NUM_BYTES}]")
            self._merge_ids[(int(a), int(b))] = int(new_id)
            vocab.append(vocab[a] + vocab[b])
        n_base = len(vocab)

        # --- special tokens, after the merges ---
        if isinstance(special_tokens, Mapping):
            specials = dict(special_tokens)
        elif isinstance(special_tokens, str):
            raise ValueError("special_tokens must be a sequence of strings, not one string")
        else:
            specials = {}
            for s in special_tokens:
                if s in specials:
                    raise ValueError(f"special_tokens: {s!r} is listed twice")
                specials[s] = n_base + len(specials)
        for s, i in specials.items():
            if not isinstance(s, str) or not s:
                raise ValueError(f"special_tokens: {s!r} is not a non-empty string")
            if not _is_int(i):
                raise ValueError(f"special_tokens[{s!r}]: id {i!r} is not an int")
        if sorted(specials.values()) != list(range(n_base, n_base + len(specials))):
            raise ValueError(f"special_tokens: ids {sorted(specials.values())} must be exactly "
                             f"{n_base}..{n_base + len(specials) - 1} (right after the "
                             f"{len(self._merge_ids)} merges)")
        self._specials: dict[str, int] = {s: int(i) for s, i in specials.items()}
        self._special_splitter = special_splitter(self._specials)

        # id -> bytes for every id, specials as their UTF-8 text (what decode emits)
        self._id_bytes: list[bytes] = vocab + [b""] * len(self._specials)
        for s, i in self._specials.items():
            self._id_bytes[i] = s.encode("utf-8")

        # --- pre-split ---
        try:
            self._compiled = compile_pattern(pattern)
        except ValueError as e:
            raise ValueError(f"pattern: {e}") from None
        self._pattern = pattern
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIALS,
              pattern: str | None = GPT2_SPLIT_PATTERN_STDLIB, verbose: bool = False
              ) -> "Tokenizer":
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text``.

        Steps: cut out the special strings (they never contribute to merges), pre-split the rest
        into chunks, count each distinct chunk once with its frequency (Sennrich et al. §3.2),
        then ``train_merges``. Deterministic: the same inputs give the same merges.

        Args:
            text: the training corpus (str, non-empty).
            vocab_size: total ids: 256 bytes + merges + specials.
            special_tokens: strings given ids after the merges, in this order.
            pattern: pre-split regex or None.
            verbose: print each merge.
        Returns:
            a Tokenizer with ``tok.vocab_size == vocab_size``.
        Raises:
            ValueError: empty text; ``vocab_size < 256 + len(special_tokens)`` (message names
                both); text too small for that many merges.
        """
        if not isinstance(text, str):
            raise ValueError(f"training text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("training text is empty")
        special_tokens = tuple(special_tokens)
        minimum = _NUM_BYTES + len(special_tokens)
        if not _is_int(vocab_size) or vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size!r} is too small: it must be at least "
                             f"{minimum} = 256 byte tokens + {len(special_tokens)} special tokens")
        # validates specials and pattern before the (slow) training
        base = cls(merges=(), special_tokens=special_tokens, pattern=pattern)

        chunk_counts: Counter[str] = Counter()
        for piece, is_special in split_specials(text, base._special_splitter):
            if not is_special:
                chunk_counts.update(pre_split(piece, base._compiled))
        by_bytes = {chunk.encode("utf-8"): n for chunk, n in chunk_counts.items()}
        merges = train_merges(by_bytes, vocab_size - minimum, verbose=verbose)
        return cls(merges=merges, special_tokens=special_tokens, pattern=pattern)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, allowed_special: str | Iterable[str] = "none") -> list[int]:
        """Encode ``text`` to token ids. Never adds BOS/EOS (the chat template writes them).

        Args:
            text: any str without lone surrogates.
            allowed_special: which special strings in ``text`` become their special id:
                ``"none"`` (default: ordinary text is never parsed for specials, tiktoken's
                convention, so user text containing ``<|eos|>`` or ``[/INST]`` cannot become a
                control token), ``"all"`` (for trusted text such as a pretraining corpus with
                ``<|bos|>`` separators), or a set of special strings. A special string that is not
                allowed is encoded as ordinary text (its bytes, merged like any other text), so
                the special id is never produced from it. (tiktoken raises instead; minillm's
                policy is plain bytes, so any user text can be encoded.)
        Returns:
            list of ints in ``[0, vocab_size)``.
        Raises:
            ValueError: unknown ``allowed_special`` entry; ``UnicodeEncodeError`` (a ValueError)
                for lone surrogates.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        splitter = self._splitter_for(allowed_special)
        ids: list[int] = []
        for piece, is_special in split_specials(text, splitter):
            if is_special:
                ids.append(self._specials[piece])
            else:
                ids.extend(self.encode_ordinary(piece))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with no special-token handling (== ``encode(text, allowed_special="none")``)."""
        ids: list[int] = []
        chunks = pre_split(text, self._compiled)
        if sum(map(len, chunks)) != len(text):
            raise ValueError("the pre-split pattern skips characters of the text; every "
                             "character must fall into some chunk")
        cache = self._cache
        for chunk in chunks:
            hit = cache.get(chunk)
            if hit is None:
                hit = tuple(self._bpe_chunk(chunk.encode("utf-8")))
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[chunk] = hit
            ids.extend(hit)
        return ids

    def _bpe_chunk(self, data: bytes) -> list[int]:
        """The ids of one pre-split chunk: the merges applied in training order (``bpe``)."""
        return bpe(data, self._merge_ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the ids stand for (specials as their UTF-8 text).

        Args:
            ids: ints (list, tuple, or 1-D integer array), each in ``[0, vocab_size)``.
        Raises:
            ValueError: naming the position and value of an id out of range or not an int.
        """
        table = self._id_bytes
        ids = list(ids)
        try:
            if all(0 <= i < len(table) for i in ids):
                return b"".join([table[i] for i in ids])
        except TypeError:
            pass
        for pos, i in enumerate(ids):
            if not _is_int(i):
                raise ValueError(f"token id at position {pos} is not an int: {i!r}")
            if not 0 <= i < len(table):
                raise ValueError(f"token id {int(i)} at position {pos} is out of range "
                                 f"[0, {len(table)})")
        raise AssertionError("unreachable")  # pragma: no cover

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; ``decode(encode(s)) == s`` for every str ``s`` (and any allowed_special).

        Byte sequences that are not valid UTF-8 -- only possible for id lists that cut a
        multi-byte character apart, e.g. a slice of an encoding or model samples -- decode with
        ``errors="replace"`` (U+FFFD), as minbpe and GPT-2's encoder.py do. Use ``decode_bytes``
        for the exact bytes. Raises ValueError for ids out of range (see ``decode_bytes``).
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ inspection
    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 + len(merges) + len(special_tokens)."""
        return len(self._id_bytes)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def merges(self) -> list[tuple[Pair, int]]:
        """The merges in rank order, ``[((a, b), new_id), ...]`` (a copy)."""
        return list(self._merge_ids.items())

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special string -> id (a copy)."""
        return dict(self._specials)

    @property
    def pattern(self) -> str | None:
        """The pre-split regex (None: no pre-split)."""
        return self._pattern

    def special_id(self, token: str) -> int:
        """The id of special token ``token``; ValueError naming it if this tokenizer lacks it."""
        try:
            return self._specials[token]
        except KeyError:
            raise ValueError(f"this tokenizer has no special token {token!r}; it has "
                             f"{list(self._specials)}") from None

    @property
    def pad_id(self) -> int:
        """Id of ``<|pad|>`` (ValueError if absent)."""
        return self.special_id(PAD)

    @property
    def bos_id(self) -> int:
        """Id of ``<|bos|>`` (ValueError if absent)."""
        return self.special_id(BOS)

    @property
    def eos_id(self) -> int:
        """Id of ``<|eos|>`` (ValueError if absent)."""
        return self.special_id(EOS)

    def id_to_token(self, i: int) -> bytes:
        """The bytes of token ``i`` (a special token's UTF-8 text). ValueError if out of range."""
        return self.decode_bytes([i])

    def is_special(self, i: int) -> bool:
        """Whether id ``i`` is a special token."""
        return i >= _NUM_BYTES + len(self._merge_ids) and i < self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merge_ids)}, "
                f"special_tokens={list(self._specials)}, pattern={self._pattern!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable cache, compare by content

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        """A JSON-ready dict: format, version, pattern, merges ``[[a, b, new_id], ...]``, specials."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "pattern": self._pattern,
            "merges": [[a, b, i] for (a, b), i in self._merge_ids.items()],
            "special_tokens": dict(self._specials),
        }

    @classmethod
    def from_dict(cls, d: Mapping, trust_pattern: bool = False) -> "Tokenizer":
        """Inverse of ``to_dict``. Raises ValueError naming the bad field, or a pre-split pattern
        outside ``KNOWN_PATTERNS`` unless ``trust_pattern=True`` (dangerous: ``check_loaded_pattern``)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"top level must be a JSON object, got {type(d).__name__}")
        for field in ("format", "version", "pattern", "merges", "special_tokens"):
            if field not in d:
                raise ValueError(f"missing field {field!r}")
        if d["format"] != FORMAT:
            raise ValueError(f"field 'format' is {d['format']!r}, expected {FORMAT!r}")
        if d["version"] != FORMAT_VERSION:
            raise ValueError(f"field 'version' is {d['version']!r}; this minillm reads version "
                             f"{FORMAT_VERSION}")
        if d["pattern"] is not None and not isinstance(d["pattern"], str):
            raise ValueError(f"field 'pattern' must be a string or null, got {d['pattern']!r}")
        check_loaded_pattern(d["pattern"], "field 'pattern'", trust_pattern)
        if not isinstance(d["merges"], list):
            raise ValueError("field 'merges' must be a list of [a, b, new_id]")
        merges = []
        for k, m in enumerate(d["merges"]):
            if not (isinstance(m, list) and len(m) == 3 and all(_is_int(v) for v in m)):
                raise ValueError(f"field 'merges[{k}]' must be [a, b, new_id] ints, got {m!r}")
            merges.append(((m[0], m[1]), m[2]))
        if not isinstance(d["special_tokens"], Mapping):
            raise ValueError("field 'special_tokens' must be an object {string: id}")
        return cls(merges=merges, special_tokens=d["special_tokens"], pattern=d["pattern"])

    def to_json(self) -> str:
        """``to_dict`` as a JSON string (e.g. for safetensors metadata, which holds only strings)."""
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, source: str = "<string>", trust_pattern: bool = False) -> "Tokenizer":
        """Inverse of ``to_json``. ValueError names ``source`` and the bad field or JSON position;
        ``trust_pattern`` as in ``from_dict``."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: "
                             f"{e.msg})") from None
        try:
            return cls.from_dict(d, trust_pattern=trust_pattern)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as JSON, atomically (temp file in the same folder + os.replace)."""
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, trust_pattern: bool = False) -> "Tokenizer":
        """Read a file written by ``save``. ValueError names the file and the bad field, or a
        pre-split pattern outside ``KNOWN_PATTERNS`` (``trust_pattern=True``, dangerous, loads it)."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return cls.from_json(text, source=path, trust_pattern=trust_pattern)

    # ------------------------------------------------------------------ helpers
    def _splitter_for(self, allowed_special):
        if isinstance(allowed_special, str):
            if allowed_special == "all":
                return self._special_splitter
            if allowed_special == "none":
                return None
            raise ValueError(f"allowed_special={allowed_special!r}: use 'all', 'none' or a set "
                             f"of special strings")
        allowed = set(allowed_special)
        unknown = allowed - set(self._specials)
        if unknown:
            raise ValueError(f"allowed_special: {sorted(unknown)} are not special tokens of this "
                             f"tokenizer ({list(self._specials)})")
        return special_splitter(allowed)


def _is_int(v) -> bool:
    """True for Python/NumPy integers, False for bool and everything else."""
    return hasattr(v, "__index__") and not isinstance(v, bool) and not isinstance(v, (bytes, str))
