"""Reading data files strictly: UTF-8 text and JSON / JSON Lines records, errors naming file and line.

Scope
    ``read_text_file`` (strict UTF-8: the error names the byte offset, line and column of the first
    bad byte) and ``read_records`` (a JSON array or a JSON Lines file as ``[(location, record)]``,
    where ``location`` is ``"{path}:{line}"``, for a JSON array the line where the record starts,
    and its index). Bad input raises ``DataError`` (a ``ValueError``). Used by the dataset loaders
    (``minillm.loaders``) and the pretraining corpus reader.

Sources
    * JSON Lines: https://jsonlines.org (one JSON value per line, UTF-8).
    * RFC 8259 (JSON) §8.2: unpaired surrogate escapes are valid JSON but not Unicode text.

Deviations
    * A UTF-8 byte-order mark at the start of a JSONL file is accepted, as Python's ``json`` does for
      a ``.json`` file read with ``utf-8-sig``; blank JSONL lines are skipped.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

class DataError(ValueError):
    """Bad data: the message names the file, the 1-based line (and record index) and the field."""


def read_text_file(path: str | os.PathLike) -> str:
    """The file decoded as UTF-8 (strict).

    Raises:
        DataError: not valid UTF-8 (names the byte offset, line and column of the first bad byte);
            FileNotFoundError.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 at byte offset {e.start} (line {line}, "
                        f"byte column {col}, byte 0x{data[e.start]:02x}): {e.reason}") from None


def read_records(path: str | os.PathLike) -> tuple[list[tuple[str, Any]], str]:
    """Parse a JSON array or JSON Lines file into ``[(location, record), ...]`` and the container name.

    ``location`` is ``"{path}:{line}"`` (JSONL) or ``"{path}:{line} (record [i])"`` (JSON array:
    the line where the record starts). Blank JSONL lines are skipped.

    Raises:
        DataError: not UTF-8, not valid JSON (file:line, column), a lone surrogate escape, empty file.
    """
    path = Path(path)
    text = read_text_file(path)
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise DataError(f"{path}: empty dataset (the file has no records)")
    if stripped[0] == "[":
        return _parse_json_array(text, path), "json"
    out = []
    text = text[1:] if text.startswith("\ufeff") else text  # a UTF-8 BOM, accepted as in a .json file
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON at column {e.colno}: {e.msg} (a .jsonl "
                            "file holds one JSON object per line; a .json file one array)") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: JSON nested too deeply to read") from None
        out.append((f"{path}:{lineno}", _checked_text(rec, f"{path}:{lineno}")))
    return out, "jsonl"


def _checked_text(rec: Any, loc: str) -> Any:
    """``rec`` unchanged, or DataError naming ``loc`` when a string in it holds a lone surrogate
    (a ``\\ud800``-style JSON escape with no pair: valid JSON, but not text that UTF-8 can hold)."""
    try:
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{loc}: a string holds a lone surrogate escape ({e.object[e.start:e.end]!r}); "
                        "JSON \\uD800-\\uDFFF escapes must come in valid pairs") from None
    return rec


_WS = re.compile(r"[ \t\r\n\ufeff]*")


def _parse_json_array(text: str, path: Path) -> list[tuple[str, Any]]:
    """Parse ``[rec, rec, ...]`` element by element so each record knows its starting line."""
    dec = json.JSONDecoder()
    out: list[tuple[str, Any]] = []
    pos = _WS.match(text, 0).end() + 1  # past "["
    line, line_pos = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, line_pos
        line += text.count("\n", line_pos, i)
        line_pos = i
        return line

    pos = _WS.match(text, pos).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            pos = _WS.match(text, pos).end()
            try:
                rec, end = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON at column {e.colno} in record "
                                f"[{len(out)}]: {e.msg}") from None
            except RecursionError:
                raise DataError(f"{path}:{line_at(pos)}: record [{len(out)}] is JSON nested too deeply to read") from None
            loc = f"{path}:{line_at(pos)} (record [{len(out)}])"
            out.append((loc, _checked_text(rec, loc)))
            pos = _WS.match(text, end).end()
            if text.startswith(",", pos):
                pos += 1
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            ln = line_at(pos)
            raise DataError(f"{path}:{ln}: expected ',' or ']' after record [{len(out) - 1}]")
    if _WS.match(text, pos).end() != len(text):
        raise DataError(f"{path}:{line_at(pos)}: extra data after the closing ']'")
    return out
