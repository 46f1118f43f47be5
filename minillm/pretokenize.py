"""Step 2 of the tokenizer: the regex pre-split that cuts text into chunks before BPE (chapter 02).

Scope
    The pre-split patterns (GPT-2's verbatim, its stdlib-``re`` twin — the default — and GPT-4's),
    ``compile_pattern`` (stdlib ``re``, or the ``regex`` package for ``\\p{...}`` classes),
    ``pre_split`` (text -> chunks; merges never cross a chunk boundary, so "dog." and "dog!" share
    " dog"), and ``check_loaded_pattern``, which keeps a pattern read from a file to the known ones.
    ``tokenizer.py`` holds steps 1 and 3 (byte-level BPE, special tokens) and the ``Tokenizer``.

Sources
    A. Radford et al. 2019 (GPT-2) §2.2 (do not merge across character categories); openai/gpt-2
    ``src/encoder.py`` (``GPT2_SPLIT_PATTERN``); karpathy/minbpe ``regex.py`` (``GPT4_SPLIT_PATTERN``).

Deviations
    * The default pattern is written for stdlib ``re`` (``GPT2_SPLIT_PATTERN_STDLIB``), which lacks
      ``\\p{L}``/``\\p{N}``; where it splits differently from GPT-2's is listed in ``tokenizer.py``'s
      module docstring. Restore: ``pattern=GPT2_SPLIT_PATTERN`` (needs ``pip install regex``).
    * A pattern read from a file must be one of ``KNOWN_PATTERNS`` (or None) unless the caller
      passes ``trust_pattern=True`` (``check_loaded_pattern``).
"""
from __future__ import annotations

import re

#: GPT-2's pre-split pattern, verbatim from openai/gpt-2 src/encoder.py. Needs the ``regex`` package.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

#: GPT-4's (cl100k_base) pre-split pattern as in karpathy/minbpe regex.py. Needs ``regex``.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

#: The default: GPT-2's pattern in stdlib ``re`` (letters [^\W\d_], numbers \d, other [^\s\w]|_).
#: Differs from GPT2_SPLIT_PATTERN only on Unicode Nl/No, U+001C..U+001F and code points newer than
#: Python's Unicode database (module docstring).
GPT2_SPLIT_PATTERN_STDLIB = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)

#: The pre-split patterns a tokenizer read from a file may carry (besides None, no pre-split): those
#: minillm itself writes. Any other is refused at load (``check_loaded_pattern``) unless the caller
#: passes ``trust_pattern=True``.
KNOWN_PATTERNS: tuple[str, ...] = (GPT2_SPLIT_PATTERN, GPT2_SPLIT_PATTERN_STDLIB, GPT4_SPLIT_PATTERN)


def check_loaded_pattern(pattern, source: str = "tokenizer", trust_pattern: bool = False) -> None:
    """Refuse a pre-split ``pattern`` read from ``source`` (a file name) unless it is None, one of
    ``KNOWN_PATTERNS``, or ``trust_pattern`` is True.

    Why: the pattern is a regex run on every text encoded; one from an untrusted file can backtrack
    catastrophically (e.g. ``(a+)+$``) and make encoding hang. ``trust_pattern=True`` is dangerous:
    use it only for a file you made. Raises ValueError naming ``source`` and the pattern, before
    the pattern is compiled.
    """
    if pattern is None or trust_pattern or pattern in KNOWN_PATTERNS:
        return
    raise ValueError(f"{source}: pre-split pattern {pattern!r} is not one minillm writes (GPT-2's, its stdlib "
                     f"twin or GPT-4's); a regex from a file can make encoding hang (catastrophic backtracking), "
                     f"so it is refused (trust_pattern=True loads it, only for a file you trust)")


def compile_pattern(pattern: str | None):
    """Compile a pre-split pattern: stdlib ``re``, or ``regex`` if it uses ``\\p{...}`` classes.

    Returns None for ``pattern=None`` (no pre-split). Raises ValueError if the pattern does not
    compile, or needs the ``regex`` package and it is not installed.
    """
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a str or None, got {type(pattern).__name__}")
    if r"\p{" in pattern:
        try:
            import regex  # type: ignore
        except ImportError as e:
            raise ValueError(
                "this pre-split pattern uses \\p{...} Unicode classes, which need the `regex` "
                "package (pip install regex); or use GPT2_SPLIT_PATTERN_STDLIB"
            ) from e
        try:
            return regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"pattern {pattern!r} does not compile: {e}") from e
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} does not compile: {e}") from e


def pre_split(text: str, compiled) -> list[str]:
    """Cut ``text`` into the chunks BPE works on; ``compiled=None`` keeps it whole.

    The patterns in this module match every character, so ``"".join(chunks) == text``; a custom
    pattern that skips characters would lose them, and ``Tokenizer`` checks this on encode.
    """
    if compiled is None:
        return [text] if text else []
    return compiled.findall(text)
