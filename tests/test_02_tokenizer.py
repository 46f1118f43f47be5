"""Chapter 02: the byte-level BPE tokenizer (minillm/tokenizer.py).

What is measured: exact round trips on arbitrary Unicode (hypothesis), special-token handling
(docs/bugs.md B09), the toy one-merge BPE of docs/bugs.md B02, that incremental training equals a full
recount each merge (minbpe's way), determinism, exact vocab sizes, the stdlib pre-split pattern
against GPT-2's ``regex`` pattern, save/load and its error messages.
"""
from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.pretokenize import GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN_STDLIB, compile_pattern, pre_split
from minillm.tokenizer import (
    BOS,
    DEFAULT_SPECIALS,
    EOS,
    INST,
    INST_END,
    PAD,
    Tokenizer,
    bpe,
    get_pair_counts,
    merge_pair,
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog. It's 2024; the dog didn't mind!\n"
    "Naïve café owners sell crème brûlée — ça coûte 3,50 €. Ünïcödé: 日本語のテキスト, "
    "русский текст, emoji 🙂🙃 and tabs\tand  double  spaces.\n\n"
    "<|bos|>[INST] What is 12 + 30? [/INST] 42<|eos|>\n"
) * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=256 + 5 + 120)


# ----------------------------------------------------------------------------------------------
# the building blocks


def test_pair_counts_and_merge():
    assert get_pair_counts([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert get_pair_counts([7, 7], weight=5) == {(7, 7): 5}
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert merge_pair([5, 5, 5], (5, 5), 9) == [9, 5]  # leftmost, non-overlapping
    # bpe applies the earliest merge first: (b, c) was learned before (a, b)
    assert bpe(b"abc", {(98, 99): 256, (97, 98): 257}) == [97, 256]
    assert bpe(b"abc", {(97, 98): 256, (98, 99): 257}) == [256, 99]


def test_toy_bpe_with_one_merge_across_a_newline():
    """docs/bugs.md B02 on the project's own BPE: one merge (10, 35) -> 256, i.e. b"\\n#"."""
    toy = Tokenizer(merges=[((10, 35), 256)], special_tokens=(), pattern=None)
    assert toy.vocab_size == 257
    assert toy.id_to_token(256) == b"\n#"
    assert toy.encode("hi\n#A:yo") == [104, 105, 256, 65, 58, 121, 111]
    template = toy.encode("#A:")
    assert template == [35, 65, 58]
    ids = toy.encode("hi\n#A:yo")
    assert not any(ids[i:i + 3] == template for i in range(len(ids)))  # out of context: not found
    # with GPT-2's pre-split, "\n" and "#" land in different chunks and the merge never applies
    split = Tokenizer(merges=[((10, 35), 256)], special_tokens=())
    assert pre_split("hi\n#A:yo", compile_pattern(GPT2_SPLIT_PATTERN_STDLIB)) == [
        "hi", "\n", "#", "A", ":", "yo"]
    assert split.encode("hi\n#A:yo") == [104, 105, 10, 35, 65, 58, 121, 111]


# ----------------------------------------------------------------------------------------------
# round trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.text())
def test_roundtrip_arbitrary_text(tok, s):
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s
    assert tok.decode_bytes(ids) == s.encode("utf-8")
    assert tok.decode(tok.encode(s, allowed_special="none")) == s


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(st.text(max_size=12), st.sampled_from(DEFAULT_SPECIALS)), max_size=8))
def test_roundtrip_with_specials(tok, parts):
    s = "".join(parts)
    specials = set(tok.special_tokens.values())
    for allowed in ("all", "none", {EOS}):
        ids = tok.encode(s, allowed_special=allowed)
        assert tok.decode(ids) == s
    # with "all", the number of special ids equals the number of special strings in the text
    n_special_strings = sum(p in DEFAULT_SPECIALS for p in parts)
    n_ids = sum(i in specials for i in tok.encode(s, allowed_special="all"))
    # every sampled special becomes one id (a random text part could, rarely, hold another)
    assert n_ids >= n_special_strings
    assert not any(i in specials for i in tok.encode(s, allowed_special="none"))
    assert tok.encode(s) == tok.encode(s, allowed_special="none")  # the default parses no specials


def test_decode_of_a_cut_character_replaces_and_bytes_are_exact(tok):
    s = "crème brûlée 日本語 🙂"
    ids = tok.encode(s)
    for cut in range(len(ids) + 1):
        assert tok.decode_bytes(ids[:cut]) + tok.decode_bytes(ids[cut:]) == s.encode("utf-8")
    # a lone continuation byte is not valid UTF-8 -> U+FFFD
    assert tok.decode([0xA9]) == "\ufffd"


def test_training_text_roundtrips_and_compresses(tok):
    ids = tok.encode(CORPUS)
    assert tok.decode(ids) == CORPUS
    assert len(CORPUS.encode("utf-8")) / len(ids) > 2.0  # 120 merges: 2.43 bytes/token


# ----------------------------------------------------------------------------------------------
# special tokens (docs/bugs.md B09)


def test_special_ids_come_after_the_merges(tok):
    V = tok.vocab_size
    assert V == 256 + 120 + 5
    assert tok.special_tokens == {PAD: V - 5, BOS: V - 4, EOS: V - 3, INST: V - 2, INST_END: V - 1}
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (V - 5, V - 4, V - 3)
    assert tok.id_to_token(tok.eos_id) == b"<|eos|>"
    assert tok.is_special(tok.pad_id) and not tok.is_special(V - 6) and not tok.is_special(V)


def test_special_tokens_are_never_split_and_bos_appears_once(tok):
    assert tok.encode("<|eos|>", allowed_special="all") == [tok.eos_id]
    assert tok.decode(tok.encode("a<|eos|>b", allowed_special="all")) == "a<|eos|>b"
    ids = tok.encode("a<|eos|>b", allowed_special="all")
    assert ids == tok.encode("a") + [tok.eos_id] + tok.encode("b")

    text = "<|bos|>[INST] hi [/INST] yo<|eos|>"
    ids = tok.encode(text, allowed_special="all")
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id  # no second, implicit BOS
    assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id
    assert ids.count(tok.special_id(INST)) == 1 and ids.count(tok.special_id(INST_END)) == 1
    assert tok.decode(ids) == text

    plain = tok.encode(text, allowed_special="none")
    assert not any(tok.is_special(i) for i in plain)
    assert tok.decode(plain) == text
    assert len(plain) > len(ids)

    only_eos = tok.encode(text, allowed_special={EOS})
    assert only_eos[-1] == tok.eos_id and tok.bos_id not in only_eos


def test_specials_never_merged_even_when_the_corpus_has_them():
    # '<', '|', '>', '[', ']', '/' occur only inside special strings here, hundreds of times
    corpus = ("<|bos|>[INST] say hello [/INST] hello world<|eos|><|pad|><|pad|>\n") * 300
    t = Tokenizer.train(corpus, vocab_size=256 + 5 + 10)
    for (a, b), new_id in t.merges:
        token = t.id_to_token(new_id)
        assert not any(ch in token for ch in b"<|>[]/"), (new_id, token)
    ids = t.encode(corpus[:70], allowed_special="all")
    assert ids[0] == t.bos_id and t.eos_id in ids


def test_allowed_special_errors(tok):
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode("x", allowed_special="some")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="no special token"):
        Tokenizer(special_tokens=()).bos_id


def test_decode_accepts_integer_arrays(tok):
    import numpy as np

    s = "<|bos|>[INST] hi [/INST] yo<|eos|>"
    ids = tok.encode(s)
    for dtype in (np.int32, np.int64):
        assert tok.decode(np.asarray(ids, dtype=dtype)) == s


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match=r"token id -1 at position 1 is out of range"):
        tok.decode([65, -1])
    with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} at position 0"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="position 0 is not an int"):
        tok.decode([1.5])


# ----------------------------------------------------------------------------------------------
# training


def _naive_train(text_chunks: list[bytes], num_merges: int) -> list:
    """minbpe's way: recount all pairs of all chunks after every merge; ties -> smallest pair."""
    words = [list(c) for c in text_chunks]
    merges = []
    for k in range(num_merges):
        counts: dict = {}
        for w in words:
            get_pair_counts(w, counts)
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))
        words = [merge_pair(w, pair, 256 + k) for w in words]
        merges.append((pair, 256 + k))
    return merges


def test_incremental_training_equals_full_recount():
    text = CORPUS[:3000]
    t = Tokenizer.train(text, vocab_size=256 + 5 + 150)
    chunks = []
    for piece in text.replace("<|bos|>", "\0").replace("<|eos|>", "\0").replace(
            "[INST]", "\0").replace("[/INST]", "\0").split("\0"):
        chunks += [c.encode() for c in pre_split(piece, compile_pattern(GPT2_SPLIT_PATTERN_STDLIB))]
    assert t.merges == _naive_train(chunks, 150)


def test_deterministic_and_exact_vocab_size():
    a = Tokenizer.train(CORPUS, vocab_size=300)
    b = Tokenizer.train(CORPUS, vocab_size=300)
    assert a.merges == b.merges and a == b
    assert a.vocab_size == len(a) == 300
    assert len(a.merges) == 300 - 256 - 5
    c = Tokenizer.train(CORPUS, vocab_size=261)  # zero merges: pure bytes + specials
    assert c.merges == [] and c.encode("hé") == [104, 0xC3, 0xA9]
    d = Tokenizer.train(CORPUS, vocab_size=270, special_tokens=())
    assert d.vocab_size == 270 and d.special_tokens == {}


def test_tie_break_is_smallest_pair():
    # "cd", "d ", " a", "ab" each occur twice; the smallest pair is (32, 97) = " a"
    t = Tokenizer.train("cd ab cd ab", vocab_size=257, special_tokens=(), pattern=None)
    assert t.merges[0] == ((32, 97), 256)
    counts = get_pair_counts(list(b"cd ab cd ab"))
    top = max(counts.values())
    smallest = min(p for p, c in counts.items() if c == top)
    assert t.merges[0] == (smallest, 256)


def test_training_errors():
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train("", vocab_size=300)
    with pytest.raises(ValueError, match=r"vocab_size=200.*261 = 256 byte tokens \+ 5 special"):
        Tokenizer.train("hello", vocab_size=200)
    with pytest.raises(ValueError, match="supports only"):
        Tokenizer.train("ab", vocab_size=256 + 5 + 3)
    with pytest.raises(ValueError, match="listed twice"):
        Tokenizer.train("hello", vocab_size=300, special_tokens=[EOS, EOS])


def test_constructor_validates_merges():
    with pytest.raises(ValueError, match=r"merges\[0\]: new_id=300, expected 256"):
        Tokenizer(merges=[((1, 2), 300)])
    with pytest.raises(ValueError, match=r"merges\[1\]: pair \(1, 999\)"):
        Tokenizer(merges=[((1, 2), 256), ((1, 999), 257)])
    with pytest.raises(ValueError, match=r"merges\[1\].*already"):
        Tokenizer(merges=[((1, 2), 256), ((1, 2), 257)])
    with pytest.raises(ValueError, match="special_tokens"):
        Tokenizer(special_tokens={EOS: 5})


# ----------------------------------------------------------------------------------------------
# the pre-split pattern


def test_pre_split_covers_every_character():
    pat = compile_pattern(GPT2_SPLIT_PATTERN_STDLIB)
    s = "Hello world's 123 _x_ ½² \t\n\n  end  "
    chunks = pre_split(s, pat)
    assert "".join(chunks) == s
    assert pre_split("I'm here, 42 times!!", pat) == ["I", "'m", " here", ",", " 42", " times", "!!"]


@pytest.mark.crosscheck
def test_stdlib_pattern_matches_gpt2_regex_pattern():
    """The stdlib pattern splits like GPT-2's \\p{L}/\\p{N} pattern except on Nl/No and U+1C..1F."""
    from conftest import require

    require("regex")
    exact = compile_pattern(GPT2_SPLIT_PATTERN)
    approx = compile_pattern(GPT2_SPLIT_PATTERN_STDLIB)
    text = CORPUS + "snake_case __init__ x_1 a1b2 'tis 'S ''  \u00a0\u2003nbsp\r\n\x0b\x0c"
    assert pre_split(text, approx) == pre_split(text, exact)
    # every code point Python's unicodedata knows, in several contexts, agrees except the documented
    differ = []
    for cp in range(0x110000):
        ch = chr(cp)
        if unicodedata.category(ch) in ("Cs", "Cn"):  # surrogates; unassigned in Python's database
            continue
        s = f"a{ch}b 1{ch}2 {ch}!{ch}{ch} {ch}\n{ch}"
        if pre_split(s, approx) != pre_split(s, exact):
            differ.append(ch)
    cats = {unicodedata.category(ch) for ch in differ}
    assert cats == {"Nl", "No", "Cc"}, cats
    assert [hex(ord(ch)) for ch in differ if unicodedata.category(ch) == "Cc"] == [
        "0x1c", "0x1d", "0x1e", "0x1f"]
    assert "\u00b2" in differ and "\u2160" in differ  # '²' (No) and 'Ⅰ' (Nl)


# ----------------------------------------------------------------------------------------------
# save / load


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    again = Tokenizer.load(path)
    assert again == tok
    assert again.merges == tok.merges and again.special_tokens == tok.special_tokens
    s = "<|bos|>[INST] naïve 🙂 [/INST] ok<|eos|>"
    assert again.encode(s) == tok.encode(s)
    assert Tokenizer.from_json(tok.to_json()) == tok
    assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temp file left behind
    toy = Tokenizer(merges=[((10, 35), 256)], special_tokens=(), pattern=None)
    toy.save(path)
    assert Tokenizer.load(path).pattern is None and Tokenizer.load(path) == toy


def test_load_errors_name_file_and_field(tok, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(line 1"):
        Tokenizer.load(path)

    good = tok.to_dict()

    def check(d, pattern):
        path.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=r"bad\.json: .*" + pattern):
            Tokenizer.load(path)

    check({k: v for k, v in good.items() if k != "merges"}, "missing field 'merges'")
    check({**good, "version": 99}, "field 'version' is 99")
    check({**good, "format": "other"}, "field 'format'")
    bad = [list(m) for m in good["merges"]]
    bad[7] = [1, 2]
    check({**good, "merges": bad}, r"merges\[7\]")
    bad = [list(m) for m in good["merges"]]
    bad[3][2] = 9999
    check({**good, "merges": bad}, r"merges\[3\]: new_id=9999")
    check({**good, "special_tokens": {EOS: 1}}, "special_tokens")
    check({**good, "pattern": "(unclosed"}, "pattern")
    check([1, 2], "top level")


def test_a_loaded_pattern_that_is_not_minillms_is_refused_before_it_can_hang(tmp_path):
    """A regex from a file could backtrack catastrophically: (a+)+$ on 40 "a"s and a "b" takes hours
    (measured: 24 "a"s 1.8 s, doubling per "a"). Loading refuses it, fast, naming file and pattern;
    the patterns minillm writes (and None) load; trust_pattern=True is the explicit opt-in."""
    import time

    evil = r"(a+)+$"
    path = tmp_path / "evil.json"
    Tokenizer(merges=[((97, 97), 256)], special_tokens=DEFAULT_SPECIALS, pattern=evil).save(path)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"evil\.json: field 'pattern': pre-split pattern '\(a\+\)\+\$' is not one "
                                         r"minillm writes.*trust_pattern=True"):
        Tokenizer.load(path)
    assert time.perf_counter() - t0 < 1.0
    assert Tokenizer.load(path, trust_pattern=True).pattern == evil
    from minillm.pretokenize import GPT4_SPLIT_PATTERN, KNOWN_PATTERNS

    assert set(KNOWN_PATTERNS) == {GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN_STDLIB, GPT4_SPLIT_PATTERN}
    for pattern in (GPT2_SPLIT_PATTERN_STDLIB, None):
        Tokenizer(merges=[((97, 97), 256)], special_tokens=DEFAULT_SPECIALS, pattern=pattern).save(path)
        assert Tokenizer.load(path).pattern == pattern
