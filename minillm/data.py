"""Data: loaders for real formats, the chat template, and collation into ids / masks / labels.

Scope
    * **Loaders** (``load_dataset`` auto-detects; one function per format): plain text; TRL's
      standard formats (``{"text"}``, prompt-only ``{"prompt"}``, prompt-completion
      ``{"prompt", "completion"}``, standard or conversational);
      Alpaca JSON/JSONL (``instruction``, ``input``, ``output``; Self-Instruct seed tasks with
      nested ``instances`` are flattened); chat (OpenAI ``messages`` role/content, ShareGPT
      ``conversations`` from/value); OASST message trees (one conversation per root-to-assistant-
      leaf path; ``kind="preference"`` gives ranked sibling pairs); preference pairs
      (``prompt``/``chosen``/``rejected`` as strings or chat turns, Alpaca-style
      ``instruction``+``chosen``/``rejected``, LLaMA-Factory ShareGPT pairs) and Anthropic HH-RLHF
      transcripts (the shared prompt is cut at the last ``"\\n\\nAssistant:"``). Records are
      normalised to ``SFTExample(messages)`` or ``PreferenceExample(prompt, chosen, rejected)``;
      quirks (empty outputs, chosen == rejected, trailing user turns, system turns, ...) are
      skipped or handled and *counted* in the dataset's ``LoadReport``. Bad data raises
      ``DataError`` naming the file, the 1-based line (JSON arrays too: the line where the
      record starts, and its index) and the field.
    * **Chat template** ``<|bos|>[INST] {user} [/INST] {assistant}<|eos|>`` (Llama-2's markers with one BOS).
      ``render_chat`` builds ids piece by piece -- special tokens by id, text through
      ``tokenizer.encode`` -- and returns the loss mask with them, so the mask is exact by
      construction (as nanochat's ``render_conversation``): 1 on exactly the assistant tokens and their ``<|eos|>``.
      Multi-turn: one leading ``<|bos|>``, then ``[INST] user [/INST] assistant<|eos|>`` per turn.
      The user text is written ``" {user} "`` between the markers and the response as
      ``" " + response`` (leading space, as mid-sentence in pretraining: docs/task-world.md §2); the
      prompt ends with ``[/INST]`` with no trailing space (docs/bugs.md B02, right boundary).
      Since the tokenizer cuts special strings out before BPE, encoding ``format_chat(messages)``
      as text gives the same ids (docs/bugs.md B09: exactly one ``<|bos|>``).
    * **Collate** -- ``collate`` right-pads (ids, mask) examples to ``input_ids``,
      ``attention_mask`` and unshifted ``labels`` (-100 on prompt, template and padding; the loss
      shifts, as in Hugging Face ``ForCausalLMLoss``). Padding is found from the attention mask,
      never by token id, so ``pad_id == eos_id`` is safe (docs/bugs.md B03). Too-long examples lose
      prompt tokens from the left (after ``keep_first`` tokens, the ``<|bos|>``); an example whose
      trained part alone does not fit is skipped and counted (``CollateReport``), as is one with
      no trained token (docs/bugs.md B02). ``render_preference_pairs`` renders prompt+chosen and
      prompt+rejected with the same renderer (once per pair, counting cuts and skips in the same
      ``CollateReport``) and ``collate_preference`` pads a batch of them, for the reward model and DPO. Batches are host
      (NumPy) arrays: data loading is host-side; the trainer moves them to the device.

Sources
    * Chat template: Llama-2 ``chat_completion`` (meta-llama/llama ``llama/generation.py``):
      ``[INST]``/``[/INST]`` markers, one ``<s>`` ... ``</s>`` per finished turn.
    * Response-only labels and the shift: transformers ``loss_utils.ForCausalLMLoss``; QLoRA's
      ``DataCollatorForCausalLM`` (labels = [-100]*len(source) + target); TRL SFTTrainer
      ``completion_mask`` (docs/reference.md §4). Mask-from-renderer: nanochat ``render_conversation``.
    * Formats: Stanford Alpaca ``alpaca_data.json``; Self-Instruct ``seed_tasks.jsonl``; OpenAI
      chat messages; FastChat/ShareGPT ``conversations``; OpenAssistant message-tree export;
      Anthropic HH-RLHF ``{"chosen", "rejected"}`` transcripts; LLaMA-Factory ``dpo_en_demo.json``;
      TRL preference datasets (``prompt``/``chosen``/``rejected``).

Deviations
    * Llama-2 renders every turn as its own ``<s>...</s>`` sequence and wraps a system prompt in
      ``<<SYS>>`` markers; here one ``<|bos|>`` starts the conversation and a system message is
      prepended to the first user message followed by a blank line (``system + "\\n\\n" +
      user``). Restore Llama-2's form with ``render_chat(..., system_format="llama2")``.
    * Alpaca's prompt ("Below is an instruction ... ### Response:") is not used: the instruction
      (and ``"\\n\\n" + input`` when the input is non-empty) becomes the user turn of the
      project's chat template.
    * No packing: every example is its own row (docs/bugs.md C15 explains the masks
      packing would need).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from minillm.functional import IGNORE_INDEX

BOS, EOS, INST, INST_END, PAD = "<|bos|>", "<|eos|>", "[INST]", "[/INST]", "<|pad|>"

#: ShareGPT / OASST / OpenAI role names -> the three roles used here.
ROLE_MAP = {"user": "user", "human": "user", "prompter": "user",
            "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
            "bing": "assistant", "model": "assistant", "system": "system"}


class DataError(ValueError):
    """Bad data: the message names the file, the 1-based line (and record index) and the field."""


# ----------------------------------------------------------------------------------------------
# Records and reports

@dataclass
class SFTExample:
    """One SFT conversation.

    Attributes:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: an optional
            leading system message, then alternating user/assistant, ending with assistant.
        meta: the record's other fields (task, fact_key, ... for the built-in world; id, ...).
    """

    messages: list[dict]
    meta: dict = field(default_factory=dict)


@dataclass
class PreferenceExample:
    """One preference pair.

    Attributes:
        prompt: messages ending with a user turn (optional leading system message).
        chosen, rejected: the two assistant responses (str, without the opener space).
        chosen_eos, rejected_eos: whether the response ends (the renderer appends ``<|eos|>``);
            False models a response that runs on (the task world's ``no_eos`` kind).
        meta: the record's other fields (kind, cue flags, ...).
    """

    prompt: list[dict]
    chosen: str
    rejected: str
    chosen_eos: bool = True
    rejected_eos: bool = True
    meta: dict = field(default_factory=dict)


@dataclass
class LoadReport:
    """What a loader read, kept and skipped.

    Attributes:
        path: the file. format: the detected format name. n_records: records in the file.
        n_examples: examples produced (OASST trees give several; seed tasks one per instance).
        skipped: ``{reason: count}`` of records/paths dropped (e.g. ``empty_output``,
            ``chosen_equals_rejected``, ``prompter_leaf``).
        notes: ``{quirk: count}`` of records kept but altered (e.g. ``system_turn``,
            ``trailing_user_turn_dropped``, ``instances_flattened``).
    """

    path: str
    format: str
    n_records: int = 0
    n_examples: int = 0
    skipped: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    def skip(self, reason: str, n: int = 1) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def note(self, quirk: str, n: int = 1) -> None:
        if n:
            self.notes[quirk] = self.notes.get(quirk, 0) + n

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class Dataset:
    """A loaded dataset: ``kind`` ("text", "sft" or "preference"), ``records`` and ``report``.

    For "text", ``records`` is ``[the whole text]`` and ``text`` returns it. Supports ``len``,
    iteration and indexing over ``records``.
    """

    kind: str
    records: list
    report: LoadReport

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator:
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]

    @property
    def text(self) -> str:
        if self.kind != "text":
            raise AttributeError(f"a {self.kind} dataset has no .text; iterate its records")
        return self.records[0]


# ----------------------------------------------------------------------------------------------
# Reading files

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


def _read_records(path: Path) -> tuple[list[tuple[str, Any]], str]:
    """Parse a JSON array or JSON Lines file into ``[(location, record), ...]`` and the container name.

    ``location`` is ``"{path}:{line}"`` (JSONL) or ``"{path}:{line} (record [i])"`` (JSON array:
    the line where the record starts). Blank JSONL lines are skipped.
    """
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


def _field(rec: Mapping, name: str, loc: str, types=(str,), required: bool = True, default=None):
    if not isinstance(rec, Mapping):
        raise DataError(f"{loc}: expected a JSON object, got {type(rec).__name__}")
    if name not in rec:
        if required:
            raise DataError(f"{loc}: missing field {name!r} (record has keys {sorted(rec)})")
        return default
    v = rec[name]
    if not isinstance(v, types):
        want = " or ".join(t.__name__ for t in types)
        raise DataError(f"{loc}: field {name!r} must be {want}, got {type(v).__name__}")
    return v


# ----------------------------------------------------------------------------------------------
# Format loaders

def load_text(path: str | os.PathLike) -> Dataset:
    """Plain text for pretraining. Returns a "text" Dataset (``.text``).

    Raises:
        DataError: empty file, not UTF-8 (byte offset and line).
    """
    text = read_text_file(path)
    if not text.strip():
        raise DataError(f"{path}: empty dataset (no text)")
    rep = LoadReport(str(path), "text", n_records=1, n_examples=1)
    rep.note("lines", text.count("\n") + (not text.endswith("\n")))
    rep.note("characters", len(text))
    return Dataset("text", [text], rep)


def _user_turn(instruction: str, inp: str) -> str:
    return instruction if not inp.strip() else f"{instruction}\n\n{inp}"


def _finish(kind: str, records: list, rep: LoadReport) -> Dataset:
    rep.n_examples = len(records)
    if not records:
        why = f"; all skipped: {rep.skipped}" if rep.skipped else ""
        raise DataError(f"{rep.path}: empty dataset (no usable {kind} records{why})")
    return Dataset(kind, records, rep)


def load_alpaca(path: str | os.PathLike) -> Dataset:
    """Alpaca JSON array or JSONL: ``instruction``, ``input`` (may be "" or absent), ``output``.

    Self-Instruct seed tasks (``instruction`` + ``instances: [{input, output}, ...]``) are
    flattened, one example per instance. The user turn is the instruction, plus ``"\\n\\n" + input``
    when the input is not empty; the assistant turn is the output. Other fields go to ``meta``.

    Quirks counted: skipped ``empty_output``, ``nooutput`` (an output starting ``<nooutput>``),
    ``empty_instruction``; notes ``with_input``, ``input_missing``, ``instances_flattened``.

    Raises:
        DataError: missing/non-string field (file:line, field), bad JSON, empty dataset.
    """
    path = Path(path)
    recs, container = _read_records(path)
    rep = LoadReport(str(path), f"alpaca-{container}", n_records=len(recs))
    out = []
    for loc, rec in recs:
        instruction = _field(rec, "instruction", loc)
        if "instances" in rec and "output" not in rec:
            inst = _field(rec, "instances", loc, (list,))
            rep.note("instances_flattened")
            pairs = []
            for k, ins in enumerate(inst):
                iloc = f"{loc} instances[{k}]"
                pairs.append((_field(ins, "input", iloc, required=False, default=""), _field(ins, "output", iloc)))
            meta = {k: v for k, v in rec.items() if k not in ("instruction", "instances")}
        else:
            if "input" not in rec:
                rep.note("input_missing")
            pairs = [(_field(rec, "input", loc, required=False, default=""), _field(rec, "output", loc))]
            meta = {k: v for k, v in rec.items() if k not in ("instruction", "input", "output")}
        for inp, output in pairs:
            if not instruction.strip():
                rep.skip("empty_instruction")
                continue
            if not output.strip():
                rep.skip("empty_output")
                continue
            if output.lstrip().startswith("<nooutput>"):
                rep.skip("nooutput")
                continue
            if inp.strip():
                rep.note("with_input")
            out.append(SFTExample([{"role": "user", "content": _user_turn(instruction, inp)},
                                   {"role": "assistant", "content": output}], dict(meta)))
    return _finish("sft", out, rep)


def _turns(raw: Any, loc: str, key: str) -> list[dict]:
    """OpenAI (role/content) or ShareGPT (from/value) turns -> [{"role", "content"}]."""
    if not isinstance(raw, list):
        raise DataError(f"{loc}: field {key!r} must be a list of turns, got {type(raw).__name__}")
    out = []
    for k, t in enumerate(raw):
        tloc = f"{loc} {key}[{k}]"
        if isinstance(t, Mapping) and "from" in t:
            role, content = _field(t, "from", tloc), _field(t, "value", tloc)
        else:
            role, content = _field(t, "role", tloc), _field(t, "content", tloc)
        if role not in ROLE_MAP:
            raise DataError(f"{tloc}: unknown role {role!r} (known: {sorted(ROLE_MAP)})")
        out.append({"role": ROLE_MAP[role], "content": content})
    return out


def _clean_conversation(msgs: list[dict], rep: LoadReport, end_with: str = "assistant"
                        ) -> list[dict] | None:
    """Validate a conversation; drop a trailing turn of the wrong role. None (and counted) if unusable."""
    if msgs and msgs[0]["role"] == "system":
        rep.note("system_turn")
        body = msgs[1:]
    else:
        body = msgs
    if any(m["role"] == "system" for m in body):
        rep.skip("system_turn_not_first")
        return None
    merged: list[dict] = []
    for m in body:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(dict(m))
    if len(merged) != len(body):
        rep.note("consecutive_turns_merged")
        body = merged
        msgs = (msgs[:1] if msgs[0]["role"] == "system" else []) + body
    if end_with == "assistant" and body and body[-1]["role"] == "user":
        rep.note("trailing_user_turn_dropped")
        body = body[:-1]
        msgs = msgs[:len(msgs) - 1]
    if not body or not any(m["role"] == "assistant" for m in body) and end_with == "assistant":
        rep.skip("no_assistant_turn")
        return None
    for i, m in enumerate(body):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            rep.skip("roles_not_alternating")
            return None
    if body[-1]["role"] != end_with:
        rep.skip(f"does_not_end_with_{end_with}")
        return None
    if any(m["role"] == "assistant" and not m["content"].strip() for m in body):
        rep.skip("empty_response")
        return None
    return msgs


def load_chat(path: str | os.PathLike) -> Dataset:
    """Chat conversations: OpenAI ``{"messages": [{"role", "content"}]}`` or ShareGPT
    ``{"conversations": [{"from", "value"}]}`` (roles human/gpt/system mapped by ``ROLE_MAP``).

    Quirks counted: notes ``system_turn``, ``trailing_user_turn_dropped``,
    ``consecutive_turns_merged`` (two turns of one role in a row are joined with a blank line);
    skipped ``no_assistant_turn``, ``roles_not_alternating``, ``empty_response``,
    ``system_turn_not_first``.

    Raises:
        DataError: unknown role, missing field, bad JSON, empty dataset.
    """
    path = Path(path)
    recs, container = _read_records(path)
    rep = LoadReport(str(path), f"chat-{container}", n_records=len(recs))
    out = []
    for loc, rec in recs:
        key = "messages" if isinstance(rec, Mapping) and "messages" in rec else "conversations"
        msgs = _clean_conversation(_turns(_field(rec, key, loc, (list,)), loc, key), rep)
        if msgs is not None:
            out.append(SFTExample(msgs, {k: v for k, v in rec.items() if k != key}))
    return _finish("sft", out, rep)


def _oasst_text(node: Mapping, loc: str) -> tuple[str, str]:
    role = _field(node, "role", loc)
    if role not in ROLE_MAP:
        raise DataError(f"{loc}: unknown OASST role {role!r}")
    return ROLE_MAP[role], _field(node, "text", loc)


def load_oasst(path: str | os.PathLike, kind: str = "sft") -> Dataset:
    """OpenAssistant message trees (one tree per JSONL line, ``{"prompt": root message}``).

    ``kind="sft"``: one conversation per root-to-leaf path that ends on an assistant message
    (paths ending on a prompter leaf are counted as ``prompter_leaf`` and dropped: they repeat a
    shorter path). ``kind="preference"``: for every parent, each pair of assistant replies with
    different ``rank`` gives (path to parent, lower rank = chosen, higher = rejected).
    Deleted messages (``deleted: true``) and their subtrees are skipped (``deleted``).

    Raises:
        DataError: missing ``prompt``/``text``/``role``, unknown role, bad JSON, empty dataset.
    """
    if kind not in ("sft", "preference"):
        raise ValueError(f"kind={kind!r}: use 'sft' or 'preference'")
    path = Path(path)
    recs, container = _read_records(path)
    rep = LoadReport(str(path), f"oasst-{container}", n_records=len(recs))
    out: list = []

    def walk(node: Mapping, prefix: list[dict], loc: str, tree_id: str) -> None:
        if node.get("deleted"):
            rep.skip("deleted")
            return
        role, text = _oasst_text(node, loc)
        path_msgs = prefix + [{"role": role, "content": text}]
        replies = [r for r in node.get("replies", []) if not (isinstance(r, Mapping) and r.get("deleted"))]
        rep.skip("deleted", len(node.get("replies", [])) - len(replies))
        if kind == "sft" and not replies:
            if role == "assistant":
                msgs = _clean_conversation(path_msgs, rep)
                if msgs is not None:
                    out.append(SFTExample(msgs, {"message_tree_id": tree_id,
                                                 "message_id": node.get("message_id")}))
            else:
                rep.skip("prompter_leaf")
        if kind == "preference" and role == "user":
            ranked = sorted((r for r in replies if isinstance(r, Mapping) and r.get("rank") is not None
                             and r.get("role") == "assistant"), key=lambda r: r["rank"])
            prompt = _clean_conversation(path_msgs, rep, end_with="user") if len(ranked) > 1 else None
            for i in range(len(ranked)):
                for j in range(i + 1, len(ranked)):
                    a, b = ranked[i], ranked[j]
                    if a["rank"] == b["rank"]:
                        rep.skip("equal_rank")
                    elif prompt is None:
                        rep.skip("bad_prompt")
                    elif not a.get("text", "").strip() or not b.get("text", "").strip():
                        rep.skip("empty_response")
                    else:
                        out.append(PreferenceExample(prompt, a["text"], b["text"], meta={
                            "message_tree_id": tree_id, "chosen_rank": a["rank"], "rejected_rank": b["rank"]}))
        for k, r in enumerate(replies):
            walk(r, path_msgs, f"{loc} replies[{k}]", tree_id)

    for loc, rec in recs:
        root = _field(rec, "prompt", loc, (dict,))
        walk(root, [], f"{loc} prompt", str(rec.get("message_tree_id", "")))
    return _finish(kind, out, rep)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


def _hh_split(text: str, loc: str, fld: str) -> tuple[str, str]:
    i = text.rfind(_HH_ASSISTANT)
    if i < 0:
        raise DataError(f"{loc}: field {fld!r} has no '\\n\\nAssistant:' turn (HH-RLHF transcript expected)")
    resp = text[i + len(_HH_ASSISTANT):]
    return text[:i], resp[1:] if resp.startswith(" ") else resp


def _hh_prompt(prefix: str) -> list[dict] | None:
    parts = _HH_TURN.split(prefix)
    if parts[0].strip():
        return None
    msgs = []
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant",
                     "content": content[1:] if content.startswith(" ") else content})
    return msgs


def _response_text(v: Any, loc: str, fld: str) -> tuple[str, list[dict] | None]:
    """A chosen/rejected value: str, one turn dict, or a list of turns (implicit prompt = all but last)."""
    if isinstance(v, str):
        return v, None
    if isinstance(v, Mapping):
        t = _turns([v], loc, fld)[0]
        return t["content"], None
    if isinstance(v, list):
        turns = _turns(v, loc, fld)
        if not turns or turns[-1]["role"] != "assistant":
            raise DataError(f"{loc}: field {fld!r} must end with an assistant turn")
        return turns[-1]["content"], turns[:-1]
    raise DataError(f"{loc}: field {fld!r} must be a string, a turn or a list of turns, got {type(v).__name__}")


def load_preference(path: str | os.PathLike) -> Dataset:
    """Preference pairs, one of these record shapes (detected per record):

    * ``{"prompt": str | turns, "chosen": str | turn | turns, "rejected": ...}`` (TRL; the
      task world's ``pref_*.jsonl`` with ``chosen_eos``/``rejected_eos``; a turns-list
      ``chosen`` without ``prompt`` uses all but its last turn as the prompt);
    * ``{"instruction", "input", "chosen", "rejected"}`` (Alpaca-style, e.g. rasbt's DPO data);
    * ``{"conversations": turns, "chosen": turn, "rejected": turn}`` (LLaMA-Factory);
    * ``{"chosen": transcript, "rejected": transcript}`` (Anthropic HH-RLHF): the prompt is the
      text before the last ``"\\n\\nAssistant:"``; the response's leading space is removed.

    Quirks counted: skipped ``chosen_equals_rejected``, ``empty_response``, ``prompt_mismatch``
    (HH prefixes differ), ``bad_transcript``; notes ``system_turn``, ``consecutive_turns_merged``
    (HH-RLHF has transcripts with two Assistant turns in a row).

    Raises:
        DataError: missing field, wrong type, bad JSON, empty dataset.
    """
    path = Path(path)
    recs, container = _read_records(path)
    rep = LoadReport(str(path), f"preference-{container}", n_records=len(recs))
    out = []
    for loc, rec in recs:
        _field(rec, "chosen", loc, (str, dict, list))
        _field(rec, "rejected", loc, (str, dict, list))
        chosen_eos = bool(rec.get("chosen_eos", True))
        rejected_eos = bool(rec.get("rejected_eos", True))
        skip_keys = {"prompt", "chosen", "rejected", "chosen_eos", "rejected_eos", "instruction",
                     "input", "conversations"}
        meta = {k: v for k, v in rec.items() if k not in skip_keys}
        if "prompt" in rec:
            p = _field(rec, "prompt", loc, (str, list))
            prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _turns(p, loc, "prompt")
            chosen, _ = _response_text(rec["chosen"], loc, "chosen")
            rejected, _ = _response_text(rec["rejected"], loc, "rejected")
        elif "instruction" in rec:
            prompt = [{"role": "user", "content": _user_turn(_field(rec, "instruction", loc),
                                                             _field(rec, "input", loc, required=False, default=""))}]
            chosen, _ = _response_text(rec["chosen"], loc, "chosen")
            rejected, _ = _response_text(rec["rejected"], loc, "rejected")
        elif "conversations" in rec:
            prompt = _turns(_field(rec, "conversations", loc, (list,)), loc, "conversations")
            chosen, _ = _response_text(rec["chosen"], loc, "chosen")
            rejected, _ = _response_text(rec["rejected"], loc, "rejected")
        elif isinstance(rec["chosen"], list):
            chosen, prompt = _response_text(rec["chosen"], loc, "chosen")
            rejected, prompt_r = _response_text(rec["rejected"], loc, "rejected")
            if prompt != prompt_r:
                rep.skip("prompt_mismatch")
                continue
        else:
            cp, chosen = _hh_split(_field(rec, "chosen", loc), loc, "chosen")
            rp, rejected = _hh_split(_field(rec, "rejected", loc), loc, "rejected")
            if cp != rp:
                rep.skip("prompt_mismatch")
                continue
            prompt = _hh_prompt(cp)
            if prompt is None:
                rep.skip("bad_transcript")
                continue
        prompt = _clean_conversation(prompt, rep, end_with="user")
        if prompt is None:
            continue
        if not chosen.strip() or not rejected.strip():
            rep.skip("empty_response")
            continue
        if chosen == rejected and chosen_eos == rejected_eos:
            rep.skip("chosen_equals_rejected")
            continue
        out.append(PreferenceExample(prompt, chosen, rejected, chosen_eos, rejected_eos, meta))
    return _finish("preference", out, rep)


def load_text_records(path: str | os.PathLike) -> Dataset:
    """TRL's standard *language-modeling* format: ``{"text": str}`` records (JSON/JSONL). Returns
    a "text" Dataset whose one record is the texts joined by a blank line (a pretraining corpus).

    Quirks counted: skipped ``empty_text``. Raises DataError: missing/non-string ``text``
    (file:line, field), bad JSON, empty dataset."""
    path = Path(path)
    recs, container = _read_records(path)
    rep = LoadReport(str(path), f"text-records-{container}", n_records=len(recs))
    texts = []
    for loc, rec in recs:
        t = _field(rec, "text", loc)
        if not t.strip():
            rep.skip("empty_text")
            continue
        texts.append(t)
    _finish("text", texts, rep)
    rep.n_examples = 1
    return Dataset("text", ["\n\n".join(texts)], rep)


def _completion_text(v: Any, loc: str) -> str:
    """A completion: a str, or (conversational) a list of turns that are all assistant turns."""
    if isinstance(v, str):
        return v
    turns = _turns(v, loc, "completion") if isinstance(v, list) else None
    if not turns or any(t["role"] != "assistant" for t in turns):
        raise DataError(f"{loc}: field 'completion' must be a string or a list of assistant turns")
    return "\n\n".join(t["content"] for t in turns)


def _prompt_turns(v: Any, loc: str) -> list[dict]:
    """A prompt: a str (one user turn) or (conversational) a list of turns."""
    return [{"role": "user", "content": v}] if isinstance(v, str) else _turns(v, loc, "prompt")


def load_prompt_completion(path: str | os.PathLike) -> Dataset:
    """TRL's standard *prompt-completion* format, standard or conversational:
    ``{"prompt": str, "completion": str}`` or ``{"prompt": [turns], "completion": [assistant turn]}``.
    Each record becomes an SFT conversation (prompt turns + the completion as the assistant turn);
    the loss falls on the completion, as TRL's ``completion_only_loss``.

    Quirks counted as for ``load_chat`` (``empty_response``, ``no_assistant_turn``, ...).
    Raises DataError: missing/wrong-typed field (file:line, field), bad JSON, empty dataset."""
    path = Path(path)
    recs, container = _read_records(path)
    rep = LoadReport(str(path), f"prompt-completion-{container}", n_records=len(recs))
    out = []
    for loc, rec in recs:
        prompt = _prompt_turns(_field(rec, "prompt", loc, (str, list)), loc)
        completion = _completion_text(_field(rec, "completion", loc, (str, list)), loc)
        msgs = _clean_conversation(prompt + [{"role": "assistant", "content": completion}], rep)
        if msgs is not None:
            out.append(SFTExample(msgs, {k: v for k, v in rec.items() if k not in ("prompt", "completion")}))
    return _finish("sft", out, rep)


def load_prompts(path: str | os.PathLike) -> Dataset:
    """TRL's standard *prompt-only* format: ``{"prompt": str}`` or ``{"prompt": [turns]}`` (for
    PPO / generation). Returns a "prompt" Dataset of message lists ending with a user turn.

    Quirks counted: ``trailing_user_turn_dropped`` does not apply; skipped
    ``does_not_end_with_user``, ``roles_not_alternating``. Raises DataError as the other loaders."""
    path = Path(path)
    recs, container = _read_records(path)
    rep = LoadReport(str(path), f"prompt-only-{container}", n_records=len(recs))
    out = []
    for loc, rec in recs:
        msgs = _clean_conversation(_prompt_turns(_field(rec, "prompt", loc, (str, list)), loc), rep, end_with="user")
        if msgs is not None:
            out.append(msgs)
    return _finish("prompt", out, rep)


FORMATS = ("text", "alpaca", "chat", "oasst", "preference", "text-records", "prompt-completion", "prompt-only")


def detect_format(path: str | os.PathLike, kind: str | None = None) -> str:
    """Guess a file's format from its extension and its first record's keys.

    Returns one of ``FORMATS``. ``.txt``/``.md`` (or ``kind="text"``) -> "text"; records with
    ``chosen`` and ``rejected`` -> "preference" (unless ``kind="sft"`` and they also carry
    ``instruction``/``output``: then "alpaca"); ``message_tree_id`` or a ``prompt`` with
    ``replies`` -> "oasst"; ``messages``/``conversations`` -> "chat"; ``instruction`` -> "alpaca".

    Raises:
        DataError: no known keys (the message lists them).
    """
    path = Path(path)
    if kind == "text" or path.suffix.lower() in (".txt", ".md", ".text"):
        return "text"
    recs, _ = _read_records(path)
    loc, first = recs[0]
    if not isinstance(first, Mapping):
        raise DataError(f"{loc}: expected a JSON object, got {type(first).__name__}")
    keys = set(first)
    if {"chosen", "rejected"} <= keys:
        if kind == "sft" and "instruction" in keys and "output" in keys:
            return "alpaca"
        return "preference"
    if "message_tree_id" in keys or (isinstance(first.get("prompt"), Mapping) and "replies" in first["prompt"]):
        return "oasst"
    if "messages" in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if "prompt" in keys:
        return "prompt-only"
    if "text" in keys:
        return "text-records"
    raise DataError(f"{loc}: cannot tell the format from the keys {sorted(keys)}; expected Alpaca "
                    "(instruction/input/output), chat (messages or conversations), OASST (prompt with "
                    "replies), preference (chosen/rejected, with or without prompt) or TRL's text "
                    "(text), prompt-only (prompt) or prompt-completion (prompt/completion)")


def load_dataset(path: str | os.PathLike, kind: str | None = None, format: str | None = None) -> Dataset:
    """Load any supported file: detect the format (``detect_format``) and call its loader.

    Args:
        path: the file.
        kind: optional "text", "sft", "preference" or "prompt": what the caller needs (OASST
            trees give either; an Alpaca file with chosen/rejected is read as SFT with
            ``kind="sft"``; "prompt" takes the prompts of any SFT or preference file).
    TRL's standard formats are all read: language modeling (``text``), prompt-only
    (``prompt``), prompt-completion (``prompt``/``completion``), preference with an explicit
    prompt (``prompt``/``chosen``/``rejected``) or an implicit one (``chosen``/``rejected`` as
    conversations), each standard (strings) or conversational (lists of turns), and
    conversational language modeling (``messages``).
        format: force one of ``FORMATS``.
    Returns:
        ``Dataset`` with ``.kind``, ``.records`` and ``.report``.
    Raises:
        DataError: bad data, empty dataset, or a file that cannot give the requested kind.
        ValueError: unknown kind or format.
    """
    if kind not in (None, "text", "sft", "preference", "prompt"):
        raise ValueError(f"kind={kind!r}: use 'text', 'sft', 'preference' or 'prompt'")
    fmt = format or detect_format(path, kind)
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: use one of {FORMATS}")
    if fmt == "text":
        ds = load_text(path)
    elif fmt == "alpaca":
        ds = load_alpaca(path)
    elif fmt == "chat":
        ds = load_chat(path)
    elif fmt == "oasst":
        ds = load_oasst(path, kind="preference" if kind == "preference" else "sft")
    elif fmt == "text-records":
        ds = load_text_records(path)
    elif fmt == "prompt-completion":
        ds = load_prompt_completion(path)
    elif fmt == "prompt-only":
        ds = load_prompts(path)
    else:
        ds = load_preference(path)
    if kind == "prompt" and ds.kind in ("sft", "preference"):  # the prompts of a conversational dataset
        prompts = [ex.prompt for ex in ds.records] if ds.kind == "preference" else \
            [ex.messages[:max(i for i, m in enumerate(ex.messages) if m["role"] == "user") + 1] for ex in ds.records]
        ds = Dataset("prompt", prompts, ds.report)
    if kind is not None and ds.kind != kind:
        raise DataError(f"{path}: holds {ds.kind} data ({fmt} format), but {kind} data was requested")
    return ds


# ----------------------------------------------------------------------------------------------
# The chat template

def _fold_system(messages: Sequence[Mapping], system_format: str = "plain") -> list[dict]:
    """Validate roles and fold a leading system message into the first user message."""
    msgs = [{"role": m["role"], "content": m["content"], **({"eos": m["eos"]} if "eos" in m else {})}
            for m in messages]
    if not msgs:
        raise ValueError("empty conversation")
    if msgs[0]["role"] == "system":
        if len(msgs) < 2 or msgs[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        sys_text = msgs[0]["content"]
        if system_format == "llama2":
            msgs[1]["content"] = f"<<SYS>>\n{sys_text}\n<</SYS>>\n\n{msgs[1]['content']}"
        elif system_format == "plain":
            msgs[1]["content"] = f"{sys_text}\n\n{msgs[1]['content']}"
        else:
            raise ValueError(f"system_format={system_format!r}: use 'plain' or 'llama2'")
        msgs = msgs[1:]
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {i} has role {m['role']!r}; expected {want!r} (roles must "
                             "alternate user/assistant after an optional system message)")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a str, got {type(m['content']).__name__}")
        if m.get("eos") is False and i != len(msgs) - 1:
            raise ValueError(f"message {i}: only the last assistant turn may have eos=False")
    return msgs


def format_chat(messages: Sequence[Mapping], add_generation_prompt: bool = False,
                system_format: str = "plain") -> str:
    """The chat template as text (for reading, and for the B09 re-encoding check).

    ``<|bos|>[INST] {user} [/INST] {assistant}<|eos|>`` per turn after one ``<|bos|>``; with
    ``add_generation_prompt`` the messages end with a user turn and the text ends with ``[/INST]``.

    Raises:
        ValueError: roles out of order; a final user turn without ``add_generation_prompt`` or vice versa.
    """
    msgs = _fold_system(messages, system_format)
    if add_generation_prompt != (msgs[-1]["role"] == "user"):
        raise ValueError("add_generation_prompt=True needs messages ending with a user turn; "
                         "False needs them ending with an assistant turn")
    parts = [BOS]
    for m in msgs:
        if m["role"] == "user":
            parts.append(f"{INST} {m['content']} {INST_END}")
        else:
            parts.append(f" {m['content']}" + (EOS if m.get("eos", True) else ""))
    return "".join(parts)


def _special(tokenizer, token: str) -> int:
    try:
        return tokenizer.special_tokens[token]
    except KeyError:
        raise ValueError(f"the tokenizer has no special token {token!r} (it has "
                         f"{sorted(tokenizer.special_tokens)})") from None


def _render(messages: Sequence[Mapping], tokenizer, train_on: str, generation: bool,
            system_format: str) -> tuple[list[int], list[int]]:
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on={train_on!r}: use 'all' or 'last'")
    msgs = _fold_system(messages, system_format)
    if generation != (msgs[-1]["role"] == "user"):
        raise ValueError("render_prompt needs messages ending with a user turn; render_chat needs "
                         "them ending with an assistant turn")
    bos, eos = _special(tokenizer, BOS), _special(tokenizer, EOS)
    inst, inst_end = _special(tokenizer, INST), _special(tokenizer, INST_END)

    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, allowed_special="none"))

    ids, mask = [bos], [0]
    last = len(msgs) - 1
    for i, m in enumerate(msgs):
        if m["role"] == "user":
            seg = [inst] + enc(f" {m['content']} ") + [inst_end]
            ids += seg
            mask += [0] * len(seg)
        else:
            seg = enc(" " + m["content"]) + ([eos] if m.get("eos", True) else [])
            trained = 1 if (train_on == "all" or i == last) else 0
            ids += seg
            mask += [trained] * len(seg)
    return ids, mask


def render_chat(messages: Sequence[Mapping], tokenizer, train_on: str = "all",
                system_format: str = "plain") -> tuple[list[int], list[int]]:
    """Token ids and loss mask of a conversation in the chat template.

    Built piece by piece: ``<|bos|>``, then per turn ``[INST]`` + encode(" {user} ") + ``[/INST]``
    and encode(" {assistant}") + ``<|eos|>`` (specials by id, text with
    ``allowed_special="none"``, so a literal "[INST]" in user text stays plain bytes). The mask
    is 1 on the assistant tokens and their ``<|eos|>``, 0 elsewhere -- exact by construction.
    An assistant message with ``"eos": False`` (last turn only) gets no ``<|eos|>``.

    Args:
        messages: ``[{"role", "content"}, ...]``: optional system, then user/assistant
            alternating, ending with assistant.
        tokenizer: has ``encode(text, allowed_special=...)`` and ``special_tokens`` with
            ``<|bos|> <|eos|> [INST] [/INST]``.
        train_on: ``"all"`` assistant turns (SFT) or only the ``"last"`` (preference responses).
        system_format: ``"plain"`` (system + blank line + first user message) or ``"llama2"``.
    Returns:
        ``(ids, loss_mask)``: two lists of int of equal length T; ``loss_mask`` in {0, 1}.
    Raises:
        ValueError: roles out of order, missing special token, bad ``train_on``.
    """
    return _render(messages, tokenizer, train_on, False, system_format)


def render_prompt(messages: Sequence[Mapping], tokenizer, system_format: str = "plain") -> list[int]:
    """Ids of a generation prompt: the conversation ending with a user turn, up to ``[/INST]``.

    ``render_prompt(m) + encode(" " + reply) + [eos] == render_chat(m + [reply])[0]``.

    Raises:
        ValueError: the messages do not end with a user turn; roles out of order.
    """
    return _render(messages, tokenizer, "all", True, system_format)[0]


# ----------------------------------------------------------------------------------------------
# Truncation and collation

@dataclass
class CollateReport:
    """Counts kept by ``truncate`` / ``collate`` (pass one report to accumulate over an epoch).

    Attributes:
        n_examples: examples seen. n_kept: examples in the batches. n_truncated: kept examples
            that lost prompt tokens. n_tokens_cut: prompt tokens removed in all.
        skipped: ``{"response_too_long": n, "no_target": n}``.
    """

    n_examples: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    n_tokens_cut: int = 0
    skipped: dict = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def record(self, result) -> bool:
        """Count one example's ``truncate`` result (a skip reason, or ``(ids, mask, n_cut)``);
        returns True when the example is kept."""
        self.n_examples += 1
        if isinstance(result, str):
            self.skip(result)
            return False
        if result[2]:
            self.n_truncated += 1
            self.n_tokens_cut += result[2]
        self.n_kept += 1
        return True

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def _example(ex) -> tuple[list[int], list[int]]:
    if isinstance(ex, Mapping):
        ids, mask = ex["input_ids"], ex["loss_mask"]
    else:
        ids, mask = ex
    ids, mask = [int(i) for i in ids], [int(m) for m in mask]
    if len(ids) != len(mask):
        raise ValueError(f"input_ids has length {len(ids)} but loss_mask has length {len(mask)}")
    return ids, mask


def truncate(ids: Sequence[int], loss_mask: Sequence[int], max_length: int | None, keep_first: int = 1
             ) -> tuple[list[int], list[int], int] | str:
    """Fit one example into ``max_length`` tokens by cutting prompt tokens from the left.

    Tokens ``[0, keep_first)`` (the ``<|bos|>``) are kept; then the oldest tokens before the
    first trained token are removed. Everything from the first trained token on is kept, and at
    least one token stays before it (label position 0 can never be predicted).

    Returns:
        ``(ids, loss_mask, n_cut)``, or the skip reason ``"no_target"`` (no trained token) or
        ``"response_too_long"`` (the trained part alone does not fit).
    """
    ids, loss_mask = list(ids), list(loss_mask)
    if 1 not in loss_mask:
        return "no_target"
    if max_length is None or len(ids) <= max_length:
        return ids, loss_mask, 0
    first = loss_mask.index(1)
    cut = len(ids) - max_length
    if first - cut < max(keep_first, 1):
        return "response_too_long"
    return (ids[:keep_first] + ids[keep_first + cut:], loss_mask[:keep_first] + loss_mask[keep_first + cut:],
            cut)


def collate(examples: Sequence, pad_id: int, max_length: int | None = None, keep_first: int = 1,
            pad_to: int | None = None, padding_side: str = "right", report: CollateReport | None = None
            ) -> dict[str, np.ndarray]:
    """Pad (ids, loss_mask) examples into a batch with unshifted labels.

    Args:
        examples: each ``(ids, loss_mask)`` or ``{"input_ids", "loss_mask"}`` (from ``render_chat``).
        pad_id: id written into padding (may equal the EOS id: padding is told by
            ``attention_mask``, never by id -- docs/bugs.md B03).
        max_length: longest row; longer examples are cut by ``truncate`` (prompt from the left).
        keep_first: leading tokens never cut (1: the ``<|bos|>``).
        pad_to: pad every row to this length (default: the longest row).
        padding_side: ``"right"`` (training) or ``"left"``.
        report: a ``CollateReport`` to update (skips and truncations are counted there).
    Returns:
        ``{"input_ids": (B, T) int64, "attention_mask": (B, T) int64, "labels": (B, T) int64}``
        with ``labels[b, t] = input_ids[b, t]`` where the loss mask is 1 and ``attention_mask`` is
        1, else -100. B = examples kept (may be 0: arrays of shape (0, 0)).
        Labels are *unshifted*: the loss pairs logits[t] with labels[t+1].
    Raises:
        ValueError: ids/mask lengths differ; ``pad_to`` shorter than a row; bad ``padding_side``.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}: use 'right' or 'left'")
    report = report if report is not None else CollateReport()
    rows = []
    for ex in examples:
        ids, mask = _example(ex)
        res = truncate(ids, mask, max_length, keep_first)
        if report.record(res):
            rows.append(res[:2])
    T = max((len(r[0]) for r in rows), default=0)
    if pad_to is not None:
        if pad_to < T:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({T} tokens)")
        T = pad_to
    B = len(rows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    loss_mask = np.zeros((B, T), dtype=np.int64)
    for b, (ids, mask) in enumerate(rows):
        sl = slice(0, len(ids)) if padding_side == "right" else slice(T - len(ids), T)
        input_ids[b, sl] = ids
        attention_mask[b, sl] = 1
        loss_mask[b, sl] = mask
    labels = np.where((loss_mask == 1) & (attention_mask == 1), input_ids, IGNORE_INDEX).astype(np.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tokenize_sft(examples: Iterable, tokenizer, max_length: int | None = None, keep_first: int = 1,
                 train_on: str = "all", report: CollateReport | None = None) -> list[tuple[list[int], list[int]]]:
    """Render SFT examples (``SFTExample`` or message lists) and truncate them once, up front.

    Returns:
        list of ``(ids, loss_mask)`` ready for ``collate``; skipped examples are counted in ``report``.
    """
    report = report if report is not None else CollateReport()
    out = []
    for ex in examples:
        msgs = ex.messages if isinstance(ex, SFTExample) else ex
        ids, mask = render_chat(msgs, tokenizer, train_on=train_on)
        res = truncate(ids, mask, max_length, keep_first)
        if report.record(res):
            out.append((res[0], res[1]))
    return out


def _as_preference(ex) -> PreferenceExample:
    if isinstance(ex, PreferenceExample):
        return ex
    if isinstance(ex, Mapping):
        p = ex["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        return PreferenceExample(prompt, ex["chosen"], ex["rejected"], bool(ex.get("chosen_eos", True)),
                                 bool(ex.get("rejected_eos", True)))
    raise TypeError(f"expected a PreferenceExample or a dict, got {type(ex).__name__}")


def render_preference(example, tokenizer, max_length: int | None = None, keep_first: int = 1
                      ) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]] | str:
    """Chosen and rejected sequences of one pair, with the same prompt ids.

    Each is ``render_chat(prompt + [assistant response], train_on="last")``; when too long, the
    prompt is cut from the left by the same amount for both (after ``keep_first`` tokens).

    Returns:
        ``((chosen_ids, chosen_mask), (rejected_ids, rejected_mask))`` or a skip reason
        (``"response_too_long"``).
    """
    res = _render_preference(example, tokenizer, max_length, keep_first)
    return res if isinstance(res, str) else (res[0], res[1])


def _render_preference(example, tokenizer, max_length, keep_first):
    """``render_preference`` plus the number of prompt tokens cut (third element)."""
    ex = _as_preference(example)
    seqs = []
    for text, eos in ((ex.chosen, ex.chosen_eos), (ex.rejected, ex.rejected_eos)):
        msgs = list(ex.prompt) + [{"role": "assistant", "content": text, "eos": eos}]
        seqs.append(render_chat(msgs, tokenizer, train_on="last"))
    cut = 0 if max_length is None else max(0, max(len(s[0]) for s in seqs) - max_length)
    if cut > 0:
        first = min(s[1].index(1) for s in seqs)  # the shared prompt length
        if first - cut < max(keep_first, 1):
            return "response_too_long"
        seqs = [(i[:keep_first] + i[keep_first + cut:], m[:keep_first] + m[keep_first + cut:]) for i, m in seqs]
    return seqs[0], seqs[1], cut


@dataclass
class RenderedPair:
    """One rendered preference pair: chosen/rejected ids (lists of int, the same prompt ids first),
    their response masks (1 on response tokens and their ``<|eos|>``), the per-pair margin (float or
    None) and the record's metadata (kind, cue flags, ...)."""

    chosen_ids: list
    rejected_ids: list
    margin: float | None = None
    meta: dict = field(default_factory=dict)
    chosen_mask: list = field(default_factory=list)
    rejected_mask: list = field(default_factory=list)


_PAIR_TEXT_KEYS = {"prompt", "chosen", "rejected", "chosen_eos", "rejected_eos"}


def render_preference_pairs(examples: Iterable, tokenizer, max_length: int | None = None, keep_first: int = 1,
                            report: CollateReport | None = None, default_margin: float | None = None
                            ) -> list[RenderedPair]:
    """Render preference pairs once, for the reward model and DPO (each pair is padded per batch
    later by ``collate_preference``).

    Args:
        examples: ``PreferenceExample``s or dicts (prompt, chosen, rejected, optional ``*_eos``,
            ``margin`` and metadata such as ``kind``).
        tokenizer: as for ``render_chat``.
        max_length: longest sequence; the shared prompt is cut from the left by the same amount for
            both halves (after ``keep_first`` tokens), counted in ``report.n_truncated`` /
            ``n_tokens_cut``.
        report: a ``CollateReport``; skips ``response_too_long`` and ``chosen_equals_rejected``
            (identical token sequences carry no preference).
        default_margin: margin of a pair without a ``margin`` field.
    Returns:
        list of RenderedPair (metadata: the dict's non-text fields or the example's ``meta``).
    """
    report = report if report is not None else CollateReport()
    out = []
    for ex in examples:
        meta = dict(ex.meta) if hasattr(ex, "meta") else {k: v for k, v in ex.items() if k not in _PAIR_TEXT_KEYS}
        res = _render_preference(ex, tokenizer, max_length, keep_first)
        if not isinstance(res, str) and res[0][0] == res[1][0]:
            res = "chosen_equals_rejected"
        if not report.record(res):
            continue
        (ci, cm), (ri, rm) = res[0], res[1]
        m = meta.get("margin", default_margin)
        out.append(RenderedPair(ci, ri, None if m is None else float(m), meta, cm, rm))
    return out


def collate_preference(pairs: Sequence[RenderedPair], pad_id: int) -> dict:
    """Right-pad a batch of rendered pairs for a reward model or DPO.

    Args:
        pairs: from ``render_preference_pairs``.
        pad_id: id written into padding (found by ``attention_mask``, never by id).
    Returns:
        ``{"chosen": collate(...), "rejected": collate(...), "margin": (B,) float32 or None}``; each
        half is ``{"input_ids", "attention_mask", "labels"}`` (B, T_half) int64, padded to its own
        longest row (less padding than one (2B, T) block; the model sees the same tokens either
        way); labels are -100 except on the response tokens and their ``<|eos|>``.
    """
    chosen = collate([(p.chosen_ids, p.chosen_mask) for p in pairs], pad_id)
    rejected = collate([(p.rejected_ids, p.rejected_mask) for p in pairs], pad_id)
    margins = [p.margin for p in pairs]
    margin = None if all(m is None for m in margins) else np.array(
        [0.0 if m is None else m for m in margins], dtype=np.float32)
    return {"chosen": chosen, "rejected": rejected, "margin": margin}
