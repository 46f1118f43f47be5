"""Dataset loaders: real file formats in, ``SFTExample`` / ``PreferenceExample`` records out.

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
    The records go on to the chat template and collation of ``minillm.data`` (chapter 04).

Sources
    * Formats: Stanford Alpaca ``alpaca_data.json``; Self-Instruct ``seed_tasks.jsonl``; OpenAI
      chat messages; FastChat/ShareGPT ``conversations``; OpenAssistant message-tree export;
      Anthropic HH-RLHF ``{"chosen", "rejected"}`` transcripts; LLaMA-Factory ``dpo_en_demo.json``;
      TRL preference datasets (``prompt``/``chosen``/``rejected``).

Deviations
    * Alpaca's prompt ("Below is an instruction ... ### Response:") is not used: the instruction
      (and ``"\\n\\n" + input`` when the input is non-empty) becomes the user turn of the
      project's chat template.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from minillm.data import PreferenceExample, SFTExample
from minillm.textfiles import DataError, read_records, read_text_file

#: ShareGPT / OASST / OpenAI role names -> the three roles used here.
ROLE_MAP = {"user": "user", "human": "user", "prompter": "user",
            "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
            "bing": "assistant", "model": "assistant", "system": "system"}


# ----------------------------------------------------------------------------------------------
# Reports and datasets

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


def _load_each(path: str | os.PathLike, fmt: str, kind: str,
               convert: Callable[[str, Any, LoadReport], Iterable]) -> Dataset:
    """The record loop every JSON/JSONL loader shares: read the records (``textfiles.read_records``), turn
    each into zero or more examples with ``convert(location, record, report)`` (which counts what
    it skips or alters in the report), and finish (``_finish``: DataError when nothing is left).
    The report's format is ``"{fmt}-{json|jsonl}"``."""
    path = Path(path)
    recs, container = read_records(path)
    rep = LoadReport(str(path), f"{fmt}-{container}", n_records=len(recs))
    out: list = []
    for loc, rec in recs:
        out.extend(convert(loc, rec, rep))
    return _finish(kind, out, rep)


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
    return _load_each(path, "alpaca", "sft", _alpaca_examples)


def _alpaca_examples(loc: str, rec: Any, rep: LoadReport) -> list[SFTExample]:
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
    out = []
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
    return out


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
    return _load_each(path, "chat", "sft", _chat_examples)


def _chat_examples(loc: str, rec: Any, rep: LoadReport) -> list[SFTExample]:
    key = "messages" if isinstance(rec, Mapping) and "messages" in rec else "conversations"
    msgs = _clean_conversation(_turns(_field(rec, key, loc, (list,)), loc, key), rep)
    return [] if msgs is None else [SFTExample(msgs, {k: v for k, v in rec.items() if k != key})]


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
    return _load_each(path, "oasst", kind, partial(_oasst_examples, kind))


def _oasst_examples(kind: str, loc: str, rec: Any, rep: LoadReport) -> list:
    """The SFT paths or ranked pairs of one message tree (``load_oasst``)."""
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

    root = _field(rec, "prompt", loc, (dict,))
    walk(root, [], f"{loc} prompt", str(rec.get("message_tree_id", "")))
    return out


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
    return _load_each(path, "preference", "preference", _preference_examples)


def _preference_examples(loc: str, rec: Any, rep: LoadReport) -> list[PreferenceExample]:
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
            return []
    else:
        cp, chosen = _hh_split(_field(rec, "chosen", loc), loc, "chosen")
        rp, rejected = _hh_split(_field(rec, "rejected", loc), loc, "rejected")
        if cp != rp:
            rep.skip("prompt_mismatch")
            return []
        prompt = _hh_prompt(cp)
        if prompt is None:
            rep.skip("bad_transcript")
            return []
    prompt = _clean_conversation(prompt, rep, end_with="user")
    if prompt is None:
        return []
    if not chosen.strip() or not rejected.strip():
        rep.skip("empty_response")
        return []
    if chosen == rejected and chosen_eos == rejected_eos:
        rep.skip("chosen_equals_rejected")
        return []
    return [PreferenceExample(prompt, chosen, rejected, chosen_eos, rejected_eos, meta)]


def load_text_records(path: str | os.PathLike) -> Dataset:
    """TRL's standard *language-modeling* format: ``{"text": str}`` records (JSON/JSONL). Returns
    a "text" Dataset whose one record is the texts joined by a blank line (a pretraining corpus).

    Quirks counted: skipped ``empty_text``. Raises DataError: missing/non-string ``text``
    (file:line, field), bad JSON, empty dataset."""
    ds = _load_each(path, "text-records", "text", _text_record)
    ds.report.n_examples = 1
    return Dataset("text", ["\n\n".join(ds.records)], ds.report)


def _text_record(loc: str, rec: Any, rep: LoadReport) -> list[str]:
    t = _field(rec, "text", loc)
    if not t.strip():
        rep.skip("empty_text")
        return []
    return [t]


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
    return _load_each(path, "prompt-completion", "sft", _prompt_completion_examples)


def _prompt_completion_examples(loc: str, rec: Any, rep: LoadReport) -> list[SFTExample]:
    prompt = _prompt_turns(_field(rec, "prompt", loc, (str, list)), loc)
    completion = _completion_text(_field(rec, "completion", loc, (str, list)), loc)
    msgs = _clean_conversation(prompt + [{"role": "assistant", "content": completion}], rep)
    return [] if msgs is None else [SFTExample(msgs, {k: v for k, v in rec.items() if k not in ("prompt", "completion")})]


def load_prompts(path: str | os.PathLike) -> Dataset:
    """TRL's standard *prompt-only* format: ``{"prompt": str}`` or ``{"prompt": [turns]}`` (for
    PPO / generation). Returns a "prompt" Dataset of message lists ending with a user turn.

    Quirks counted: ``trailing_user_turn_dropped`` does not apply; skipped
    ``does_not_end_with_user``, ``roles_not_alternating``. Raises DataError as the other loaders."""
    return _load_each(path, "prompt-only", "prompt", _prompt_only)


def _prompt_only(loc: str, rec: Any, rep: LoadReport) -> list[list[dict]]:
    msgs = _clean_conversation(_prompt_turns(_field(rec, "prompt", loc, (str, list)), loc), rep, end_with="user")
    return [] if msgs is None else [msgs]




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
    recs, _ = read_records(path)
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


#: format name -> its loader (``load_oasst`` also takes ``kind``).
LOADERS = {"text": load_text, "alpaca": load_alpaca, "chat": load_chat, "oasst": load_oasst,
           "preference": load_preference, "text-records": load_text_records,
           "prompt-completion": load_prompt_completion, "prompt-only": load_prompts}
FORMATS = tuple(LOADERS)


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
    if fmt == "oasst":
        ds = load_oasst(path, kind="preference" if kind == "preference" else "sft")
    else:
        ds = LOADERS[fmt](path)
    if kind == "prompt" and ds.kind in ("sft", "preference"):  # the prompts of a conversational dataset
        prompts = [ex.prompt for ex in ds.records] if ds.kind == "preference" else \
            [ex.messages[:max(i for i, m in enumerate(ex.messages) if m["role"] == "user") + 1] for ex in ds.records]
        ds = Dataset("prompt", prompts, ds.report)
    if kind is not None and ds.kind != kind:
        raise DataError(f"{path}: holds {ds.kind} data ({fmt} format), but {kind} data was requested")
    return ds
