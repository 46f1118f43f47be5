"""Data: the chat template, and rendering and collation into ids / masks / labels.

Scope
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
    * **Records** -- ``SFTExample(messages)`` and ``PreferenceExample(prompt, chosen, rejected)``,
      what the file loaders of ``minillm.loaders`` (Alpaca, chat, OASST, HH-RLHF, TRL, ...) produce.

Sources
    * Chat template: Llama-2 ``chat_completion`` (meta-llama/llama ``llama/generation.py``):
      ``[INST]``/``[/INST]`` markers, one ``<s>`` ... ``</s>`` per finished turn.
    * Response-only labels and the shift: transformers ``loss_utils.ForCausalLMLoss``; QLoRA's
      ``DataCollatorForCausalLM`` (labels = [-100]*len(source) + target); TRL SFTTrainer
      ``completion_mask`` (docs/reference.md §4). Mask-from-renderer: nanochat ``render_conversation``.
Deviations
    * Llama-2 renders every turn as its own ``<s>...</s>`` sequence and wraps a system prompt in
      ``<<SYS>>`` markers; here one ``<|bos|>`` starts the conversation and a system message is
      prepended to the first user message followed by a blank line (``system + "\\n\\n" +
      user``). Restore Llama-2's form with ``render_chat(..., system_format="llama2")``.
    * No packing: every example is its own row (docs/bugs.md C15 explains the masks
      packing would need).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from minillm.functional import IGNORE_INDEX


BOS, EOS, INST, INST_END, PAD = "<|bos|>", "<|eos|>", "[INST]", "[/INST]", "<|pad|>"

# ----------------------------------------------------------------------------------------------
# Records

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


def _render(messages: Sequence[Mapping], tokenizer, train_on: str, generation: bool,
            system_format: str) -> tuple[list[int], list[int]]:
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on={train_on!r}: use 'all' or 'last'")
    msgs = _fold_system(messages, system_format)
    if generation != (msgs[-1]["role"] == "user"):
        raise ValueError("render_prompt needs messages ending with a user turn; render_chat needs "
                         "them ending with an assistant turn")
    bos, eos = tokenizer.special_id(BOS), tokenizer.special_id(EOS)
    inst, inst_end = tokenizer.special_id(INST), tokenizer.special_id(INST_END)

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
        tokenizer: has ``encode(text, allowed_special=...)`` and ``special_id(token)`` for
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
