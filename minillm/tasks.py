"""The built-in task world: the train/test split, pretraining corpus, instructions, preference pairs.

Scope
    A small, deterministic world whose every stage (pretraining, prompting, SFT, reward model,
    PPO, DPO) shows its effect on a CPU in minutes (the README's chapters 02-12):

    * **Knowledge** -- the 322 facts of ``minillm.facts`` (six relations; docs/task-world.md §2).
    * **Split** -- per relation 30 % of the fact keys are held out (seeded); an opposite pair is
      held out as a whole, so neither direction of a test pair is ever in SFT. 225 train facts,
      97 test facts. Test facts appear *only* in the pretraining corpus: SFT teaches the format,
      knowledge comes from pretraining.
    * **Pretraining corpus** (``corpus_documents``) -- every fact is mentioned 30 times, each time
      in one of 13 prose templates drawn uniformly (10 declarative, 2-3 of them with the answer
      before the subject, plus 3 "quiz-prose" templates: question-shaped prose such as "Which city
      is the capital of France? The answer is Paris."). Sentences of all relations are shuffled
      into documents of 3-8 sentences, each written ``<|bos|>`` + sentences + ``<|eos|>``. Never
      the instruction format: no ``[INST]`` in the corpus.
    * **Instructions** (``sft_records``) -- Alpaca fields (``instruction``, ``input`` = "",
      ``output``) plus metadata (``task``, ``fact_key``, ``answer``, ``template_id``,
      ``fact_split``, ``style``). 5 question templates per relation are used for SFT and the
      test split; a 6th per relation is never used in SFT and forms the *paraphrase* test split.
      The output is ``"{answer}."``. Variants: ``plain``; ``opener`` (25 % of outputs start with
      the eager opener ``"Sure! "``: docs/rlhf-notes.md §2, SFT "a"); ``noisy`` (as ``opener``, plus 20 % of
      demonstrations that ramble, repeat or are rude but still contain the answer: docs/rlhf-notes.md §2,
      SFT "g", the realistic SFT data DPO later cleans up).
    * **Preference pairs** (``preference_records``, drawn by ``minillm.preferences``) --
      ``prompt``, ``chosen``, ``rejected`` of one fault ``kind``, and the controlled spurious
      cue, the opener ``"Sure! "`` (docs/rlhf-notes.md §2, recipe "e").
    * The gold judge that scores any response to these prompts is ``minillm.judge.GoldJudge``.
    * ``tokenizer_training_text`` (corpus + every instruction, response, opener and preference
      string, so "Sure!" becomes whole tokens: docs/task-world.md §2, docs/rlhf-notes.md §2),
      ``build_kshot_prompt`` (chapter 03), ``write_datasets`` and the ``minillm datasets`` CLI.

Sources
    * docs/task-world.md and docs/rlhf-notes.md (this project's measured PyTorch prototype): sizes,
      templates, split, recipes "a", "g" (SFT) and "e" (reward-model pairs).
    * Alpaca record format: R. Taori et al., Stanford Alpaca (2023), ``alpaca_data.json``.
    * Knowledge storage vs extraction and the role of paraphrased mentions: Z. Allen-Zhu, Y. Li,
      "Physics of Language Models: Part 3.1, Knowledge Storage and Extraction" (2023), §4-§5.
    * Spurious-cue reward hacking: L. Gao, J. Schulman, J. Hilton, "Scaling Laws for Reward Model
      Overoptimization" (2022), §3 (gold vs proxy reward).

Deviations
    * A 6th, held-out question template per relation (the paraphrase split) is added to the
      prototype's 5; it never enters SFT, so SFT and test sizes equal the prototype's (1,125 / 485).
    * The rambles, the ``no_eos`` kind and recipe "f": see ``minillm.facts`` and ``minillm.preferences``.

Determinism: every random choice comes from ``numpy.random.default_rng([seed, stream])`` with a
fixed stream number per product; no global random state, no set iteration without sorting, so
the output does not depend on ``PYTHONHASHSEED``.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from minillm.checkpoint import write_text_atomic
from minillm.facts import (BOS, EOS, INST, INST_END, OFF_FORMAT_TEMPLATES, OPENER, RAMBLE_ENDINGS, RAMBLE_FILLERS,
                           REFUSAL, RELATIONS, RUDE_TEMPLATES, TEMPLATES, Fact, build_facts, build_unanswerable_facts,
                           noisy_response)
from minillm.preferences import PreferenceConfig, preference_records, refusal_pair_records


@dataclass(frozen=True)
class WorldConfig:
    """Every knob of the task world (defaults: docs/task-world.md §7 and docs/rlhf-notes.md §2).

    Attributes:
        seed: the one seed every random choice derives from.
        test_fraction: fraction of each relation's fact groups held out of SFT (0.3).
        mentions_per_fact: pretraining mentions of each fact (30).
        doc_sentences: (min, max) sentences per pretraining document (3, 8), inclusive.
        p_opener_sft: fraction of "opener"/"noisy" SFT outputs that start with ``"Sure! "`` (0.25).
        p_noisy_sft: fraction of "noisy" SFT outputs that ramble, repeat or are rude (0.20).
        preference: ``PreferenceConfig``.
    """

    seed: int = 0
    test_fraction: float = 0.3
    mentions_per_fact: int = 30
    doc_sentences: tuple[int, int] = (3, 8)
    p_opener_sft: float = 0.25
    p_noisy_sft: float = 0.20
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)



# Stream numbers: one independent random stream per product, so changing one product never
# changes another (the preference pairs use 4, 5 and 8: minillm.preferences).
_STREAM_SPLIT, _STREAM_CORPUS, _STREAM_SFT = 1, 2, 3
_STREAM_SHOTS = 6
_STREAM_UNKNOWN_SPLIT = 7


# ----------------------------------------------------------------------------------------------
# The world

class TaskWorld:
    """The facts, their train/test split, and every data product of the world.

    Args:
        config: ``WorldConfig`` (or ``seed=`` as a shortcut).
    Raises:
        ValueError: ``test_fraction`` outside (0, 1), ``doc_sentences`` not 1 <= min <= max.
    """

    def __init__(self, config: WorldConfig | None = None, *, seed: int | None = None):
        if config is None:
            config = WorldConfig() if seed is None else WorldConfig(seed=seed)
        elif seed is not None:
            raise ValueError("give either config or seed, not both")
        if not 0.0 < config.test_fraction < 1.0:
            raise ValueError(f"test_fraction={config.test_fraction} must be in (0, 1)")
        lo, hi = config.doc_sentences
        if not 1 <= lo <= hi:
            raise ValueError(f"doc_sentences={config.doc_sentences} must satisfy 1 <= min <= max")
        self.config = config
        self.facts: list[Fact] = build_facts()
        self._by_key = {f.key: f for f in self.facts}
        self._split = self._make_split()
        self._prompt_index: dict[str, tuple[Fact, str]] | None = None

    # -------------------------------------------------------------- split
    def rng(self, stream: int) -> np.random.Generator:
        """The random generator of one product: ``numpy.random.default_rng([seed, stream])``."""
        return np.random.default_rng([self.config.seed, stream])

    def _make_split(self) -> dict[str, str]:
        """Per relation, hold out round(test_fraction * #groups) groups (an opposite pair is one group)."""
        rng = self.rng(_STREAM_SPLIT)
        split: dict[str, str] = {}
        for rel in RELATIONS:
            groups = sorted({f.group for f in self.facts if f.relation == rel})
            n_test = int(round(self.config.test_fraction * len(groups)))
            held = {groups[i] for i in rng.choice(len(groups), size=n_test, replace=False)}
            for f in self.facts:
                if f.relation == rel:
                    split[f.key] = "test" if f.group in held else "train"
        return split

    def split_of(self, fact: Fact | str) -> str:
        """``"train"`` or ``"test"`` for a fact (or its key)."""
        key = fact if isinstance(fact, str) else fact.key
        return self._split[key]

    def fact(self, key: str) -> Fact:
        """The fact with this key. Raises KeyError naming the key."""
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"no fact with key {key!r} in the task world") from None

    @property
    def train_facts(self) -> list[Fact]:
        """Facts whose questions appear in SFT (225 with the defaults)."""
        return [f for f in self.facts if self._split[f.key] == "train"]

    @property
    def test_facts(self) -> list[Fact]:
        """Facts seen only in pretraining (97 with the defaults)."""
        return [f for f in self.facts if self._split[f.key] == "test"]

    # -------------------------------------------------------------- corpus
    def corpus_sentences(self) -> list[str]:
        """All pretraining sentences, shuffled (322 facts x 30 mentions = 9,660 with the defaults)."""
        rng = self.rng(_STREAM_CORPUS)
        sentences: list[str] = []
        for f in self.facts:
            t = TEMPLATES[f.relation]
            pool = t["declarative"] + t["quiz"]
            for i in rng.integers(0, len(pool), size=self.config.mentions_per_fact):
                sentences.append(f.fill(pool[int(i)]))
        order = rng.permutation(len(sentences))
        return [sentences[i] for i in order]

    def corpus_documents(self) -> list[str]:
        """Pretraining documents: ``<|bos|>`` + 3-8 sentences joined by spaces + ``<|eos|>``.

        Returns:
            list of str (1,7xx documents, about 370 K characters with the defaults).
        """
        rng = np.random.default_rng([self.config.seed, _STREAM_CORPUS, 1])
        sentences = self.corpus_sentences()
        lo, hi = self.config.doc_sentences
        docs, i = [], 0
        while i < len(sentences):
            n = int(rng.integers(lo, hi + 1))
            docs.append(BOS + " ".join(sentences[i:i + n]) + EOS)
            i += n
        return docs

    def corpus_text(self) -> str:
        """The corpus as one string: documents one per line (``"\\n"`` separates documents)."""
        return "\n".join(self.corpus_documents()) + "\n"

    # -------------------------------------------------------------- instructions
    def questions(self, fact: Fact, heldout: bool = False) -> list[tuple[str, str]]:
        """``(template_id, instruction)`` for the fact's 5 SFT question templates (or the held-out one)."""
        t = TEMPLATES[fact.relation]
        if heldout:
            return [(f"{fact.relation}/h0", fact.fill(q)) for q in t["heldout_question"]]
        return [(f"{fact.relation}/q{i}", fact.fill(q)) for i, q in enumerate(t["question"])]

    def _sft_record(self, fact: Fact, template_id: str, instruction: str, output: str, style: str
                    ) -> dict:
        return {"instruction": instruction, "input": "", "output": output, "task": fact.relation,
                "fact_key": fact.key, "answer": fact.answer, "template_id": template_id,
                "fact_split": self.split_of(fact), "style": style}

    def sft_records(self, variant: str = "plain") -> list[dict]:
        """SFT training rows (Alpaca fields + metadata): train facts x 5 question templates.

        Args:
            variant: ``"plain"`` (every output ``"{answer}."``), ``"opener"`` (docs/rlhf-notes.md §2, SFT "a":
                ``p_opener_sft`` of the outputs are ``"Sure! {answer}."``) or ``"noisy"`` (SFT
                "g": as "opener", and ``p_noisy_sft`` of the rows are a ramble, a repetition or a
                rude reply that still contains the answer; ``style`` says which).
        Returns:
            list of dict with keys instruction, input (""), output, task, fact_key, answer,
            template_id, fact_split ("train"), style; 1,125 rows with the defaults.
        Raises:
            ValueError: unknown variant.
        """
        if variant not in ("plain", "opener", "noisy"):
            raise ValueError(f"variant={variant!r}: use 'plain', 'opener' or 'noisy'")
        rng = np.random.default_rng([self.config.seed, _STREAM_SFT, ("plain", "opener", "noisy").index(variant)])
        rows = []
        for f in self.train_facts:
            for tid, q in self.questions(f):
                style, out = "plain", f"{f.answer}."
                if variant != "plain":
                    if variant == "noisy" and rng.random() < self.config.p_noisy_sft:
                        style = ("ramble", "repeat", "rude")[int(rng.integers(0, 3))]
                        out = noisy_response(style, f, q, rng)
                    if rng.random() < self.config.p_opener_sft:
                        out = f"{OPENER} {out}"
                        style = "opener" if style == "plain" else f"opener+{style}"
                rows.append(self._sft_record(f, tid, q, out, style))
        return rows

    def sft_test_records(self) -> list[dict]:
        """Held-out-fact rows: test facts x the 5 SFT question templates (485); outputs ``"{answer}."``."""
        return [self._sft_record(f, tid, q, f"{f.answer}.", "plain")
                for f in self.test_facts for tid, q in self.questions(f)]

    def sft_paraphrase_records(self) -> list[dict]:
        """The held-out question template on every fact (322 rows; ``fact_split`` tells train/test facts)."""
        return [self._sft_record(f, tid, q, f"{f.answer}.", "plain")
                for f in self.facts for tid, q in self.questions(f, heldout=True)]

    def kshot_shots(self, fact: Fact | str, k: int = 3, seed: int = 0) -> list[tuple[str, str]]:
        """k demonstrations for a k-shot prompt: train-split SFT pairs of the same relation.

        Args:
            fact: the fact asked about (or its key); shots never use this fact.
            k: number of shots (0 allowed).
            seed: picks the shots (with the world seed).
        Returns:
            list of ``(instruction, output)``; outputs are ``"{answer}."``.
        """
        fact = self.fact(fact) if isinstance(fact, str) else fact
        pool = [(q, f"{g.answer}.") for g in self.train_facts if g.relation == fact.relation
                and g.group != fact.group for _, q in self.questions(g)]
        rng = np.random.default_rng([self.config.seed, _STREAM_SHOTS, seed, self.facts.index(fact)])
        return [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)]

    # -------------------------------------------------------------- preferences
    def preference_records(self, split: str = "train", config: PreferenceConfig | None = None,
                           wrong_samples: Mapping[str, Sequence[str]] | None = None) -> list[dict]:
        """Preference pairs over all 1,610 prompts: ``minillm.preferences.preference_records`` of this
        world (``config`` default: the world's ``config.preference``)."""
        return preference_records(self, split, config, wrong_samples)

    # -------------------------------------------------------------- over-refusal (issue 14)
    def unanswerable_split(self) -> dict[str, str]:
        """``{fact key: "train" | "test"}`` of the unanswerable entities (``test_fraction`` held out, seeded)."""
        facts = build_unanswerable_facts()
        rng = self.rng(_STREAM_UNKNOWN_SPLIT)
        n_test = int(round(self.config.test_fraction * len(facts)))
        held = {int(i) for i in rng.choice(len(facts), size=n_test, replace=False)}
        return {f.key: ("test" if i in held else "train") for i, f in enumerate(facts)}

    def unanswerable_records(self, split: str = "test") -> list[dict]:
        """Questions about entities the world does not contain (5 SFT templates each), as SFT-shaped
        rows whose output is ``REFUSAL``; ``answerable`` False. Raises ValueError for an unknown split."""
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: use 'train' or 'test'")
        sp = self.unanswerable_split()
        return [{"instruction": q, "input": "", "output": REFUSAL, "task": f.relation, "fact_key": f.key,
                 "answer": REFUSAL, "template_id": tid, "fact_split": split, "style": "plain", "answerable": False}
                for f in build_unanswerable_facts() if sp[f.key] == split for tid, q in self.questions(f)]

    def refusal_pair_records(self, n_unanswerable: int = 600, n_overcautious: int = 600, n_helpful: int = 0
                             ) -> list[dict]:
        """Preference pairs of a cautious rater, with optional helpfulness pairs (issue 14):
        ``minillm.preferences.refusal_pair_records`` of this world."""
        return refusal_pair_records(self, n_unanswerable, n_overcautious, n_helpful)

    # -------------------------------------------------------------- prompts -> facts (judge)
    def prompt_index(self) -> dict[str, tuple[Fact, str]]:
        """``{instruction: (fact, template_id)}`` over every question template (6 x 322 = 1,932)."""
        if self._prompt_index is None:
            idx: dict[str, tuple[Fact, str]] = {}
            for f in self.facts:
                for tid, q in self.questions(f) + self.questions(f, heldout=True):
                    if q in idx:
                        raise RuntimeError(f"two facts share the prompt {q!r}")  # pragma: no cover
                    idx[q] = (f, tid)
            self._prompt_index = idx
        return self._prompt_index


_DEFAULT_WORLD: TaskWorld | None = None


def default_world() -> TaskWorld:
    """The world with ``WorldConfig()`` (seed 0), built once and cached."""
    global _DEFAULT_WORLD
    if _DEFAULT_WORLD is None:
        _DEFAULT_WORLD = TaskWorld()
    return _DEFAULT_WORLD


# ----------------------------------------------------------------------------------------------
# Prompting (chapter 03) and tokenizer text

KSHOT_TEMPLATES = ("chat", "plain")


def build_kshot_prompt(question: str, shots: Sequence[tuple[str, str]] = (), template: str = "chat"
                       ) -> str:
    """A k-shot prompt for a base model, as text.

    Formats (k = len(shots); each shot is ``(instruction, response)``):

    * ``"chat"`` (default; docs/task-world.md §4) -- the shots as earlier turns of the chat template,
      one leading ``<|bos|>``, the prompt ending right after ``[/INST]``::

          <|bos|>[INST] {q1} [/INST] {r1}<|eos|>[INST] {q2} [/INST] {r2}<|eos|>[INST] {question} [/INST]

      It equals ``minillm.data.format_chat`` of those messages with ``add_generation_prompt=True``.
    * ``"plain"`` -- no special markers (for a model that never saw them)::

          <|bos|>Question: {q1}\\nAnswer: {r1}\\n\\nQuestion: {question}\\nAnswer:

    Args:
        question: the instruction asked.
        shots: demonstrations, e.g. ``world.kshot_shots(fact, k)``.
        template: ``"chat"`` or ``"plain"``.
    Returns:
        str (encode with ``allowed_special="all"``; contains exactly one ``<|bos|>``).
    Raises:
        ValueError: unknown template.
    """
    if template == "chat":
        parts = [BOS]
        for q, r in shots:
            parts.append(f"{INST} {q} {INST_END} {r}{EOS}")
        parts.append(f"{INST} {question} {INST_END}")
        return "".join(parts)
    if template == "plain":
        body = "".join(f"Question: {q}\nAnswer: {r}\n\n" for q, r in shots)
        return f"{BOS}{body}Question: {question}\nAnswer:"
    raise ValueError(f"template={template!r}: use one of {KSHOT_TEMPLATES}")


def tokenizer_training_text(world: TaskWorld | None = None) -> str:
    """Text to train the BPE tokenizer on: the corpus plus every string later stages emit.

    Contents, joined by newlines: the corpus documents (with their ``<|bos|>``/``<|eos|>``, which
    the tokenizer cuts out before counting); every instruction of all 6 templates; every response
    as it is encoded after ``[/INST]`` (``" {answer}."`` and ``" Sure! {answer}."``); every SFT and
    preference response of the written datasets; and 30 copies of each ramble, rude and
    off-format string (docs/rlhf-notes.md §2), so that ``" Sure!"`` and these phrases become whole tokens.

    Returns:
        str (about 0.8 MB with the defaults).
    """
    world = world or default_world()
    parts = list(world.corpus_documents())
    for f in world.facts:
        for _, q in world.questions(f) + world.questions(f, heldout=True):
            parts.append(q)
        parts.append(f" {f.answer}.")
        parts.append(f" {OPENER} {f.answer}.")
    for variant in ("opener", "noisy"):
        parts.extend(" " + r["output"] for r in world.sft_records(variant))
    for split in ("train", "test"):
        for r in world.preference_records(split):
            parts.append(" " + r["chosen"])
            parts.append(" " + r["rejected"])
    extra = RAMBLE_FILLERS + [e.format(o="it") for e in RAMBLE_ENDINGS] + \
        [t.format(o="it") for t in RUDE_TEMPLATES] + [t for t in OFF_FORMAT_TEMPLATES if "{" not in t]
    for _ in range(30):
        parts.extend(" " + s for s in extra)
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Writing the datasets

#: File name -> one-line description (the datasheet table).
DATASET_FILES: dict[str, str] = {
    "corpus.txt": "pretraining corpus: one document per line, `<|bos|>` + 3-8 sentences + `<|eos|>`",
    "facts.jsonl": "every fact: relation, subject, answer, key, split",
    "sft_train.jsonl": "SFT rows, train facts x 5 question templates, output `{answer}.`",
    "sft_train_opener.jsonl": "as sft_train, 25 % of outputs `Sure! {answer}.` (docs/rlhf-notes.md §2, SFT \"a\")",
    "sft_train_noisy.jsonl": "as sft_train_opener, 20 % ramble/repeat/rude demonstrations that contain the answer (SFT \"g\")",
    "sft_test.jsonl": "held-out facts (seen only in pretraining) x the 5 question templates",
    "sft_test_paraphrase.jsonl": "the held-out 6th question template on every fact (never in SFT)",
    "pref_train.jsonl": "preference pairs (RM recipe \"e\"), drawn over all prompts",
    "pref_test.jsonl": "held-out preference pairs: fresh draws over the same prompts, none equal to a train pair",
}


def _jsonl(records: Iterable[Mapping]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def dataset_files(world: TaskWorld | None = None) -> dict[str, str]:
    """Every file of ``datasets/`` as ``{name: text}`` (README.md included), generated in memory."""
    world = world or default_world()
    facts = [{"relation": f.relation, "subject": f.subject, "answer": f.answer, "key": f.key,
              "split": world.split_of(f)} for f in world.facts]
    files = {
        "corpus.txt": world.corpus_text(),
        "facts.jsonl": _jsonl(facts),
        "sft_train.jsonl": _jsonl(world.sft_records("plain")),
        "sft_train_opener.jsonl": _jsonl(world.sft_records("opener")),
        "sft_train_noisy.jsonl": _jsonl(world.sft_records("noisy")),
        "sft_test.jsonl": _jsonl(world.sft_test_records()),
        "sft_test_paraphrase.jsonl": _jsonl(world.sft_paraphrase_records()),
        "pref_train.jsonl": _jsonl(world.preference_records("train")),
        "pref_test.jsonl": _jsonl(world.preference_records("test")),
    }
    files["README.md"] = _datasheet(world, files)
    return files


def _count(records: Iterable[Mapping], key: str) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[str(r[key])] = counts.get(str(r[key]), 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _datasheet(world: TaskWorld, files: Mapping[str, str]) -> str:
    cfg = world.config
    pcfg = cfg.preference
    docs = world.corpus_documents()
    n_sent = len(world.facts) * cfg.mentions_per_fact
    rows = []
    for name, desc in DATASET_FILES.items():
        text = files[name]
        n = text.count("\n")
        rows.append(f"| `{name}` | {n:,} | {len(text.encode('utf-8')):,} | {desc} |")
    pref_train = world.preference_records("train")
    pref_test = world.preference_records("test")
    noisy = world.sft_records("noisy")
    opener = world.sft_records("opener")
    lines = [
        "# datasets/: the built-in task world (generated)",
        "",
        "Generated by `python -m minillm.tasks --out datasets` (`make datasets`, `minillm datasets`)",
        f"from `minillm/tasks.py` with seed {cfg.seed}. Do not edit by hand: `tests/test_03_prompting.py`",
        "regenerates every file and compares it byte for byte. All text is synthetic and public",
        "knowledge (capitals, opposites, animal sounds, colours, sums, spellings); no personal data.",
        "",
        "## Files",
        "",
        "| file | lines | bytes | contents |",
        "| --- | ---: | ---: | --- |",
        *rows,
        "",
        "## How it is made",
        "",
        f"- **Facts:** {len(world.facts)} in six relations: "
        + ", ".join(f"{rel} {sum(f.relation == rel for f in world.facts)}" for rel in RELATIONS) + ".",
        f"- **Split:** per relation {cfg.test_fraction:.0%} of the fact keys are held out (an opposite pair "
        f"is held out as a whole): {len(world.train_facts)} train facts, {len(world.test_facts)} test facts "
        f"(test: " + ", ".join(f"{rel} {sum(f.relation == rel for f in world.test_facts)}" for rel in RELATIONS)
        + "). Test facts are stated only in the pretraining corpus, never in an SFT row.",
        f"- **Corpus:** each fact is mentioned {cfg.mentions_per_fact} times ({n_sent:,} sentences), each time in one "
        "of its relation's 13 prose templates (10 declarative, 3 quiz-prose), drawn uniformly; sentences are "
        f"shuffled into {len(docs):,} documents of {cfg.doc_sentences[0]}-{cfg.doc_sentences[1]} sentences, "
        f"{sum(len(d) for d in docs):,} characters. Each line is `<|bos|>` + sentences + `<|eos|>`; the newline "
        "between documents is a separator, not part of a document. No instruction format (`[INST]`) appears.",
        "- **SFT rows:** Alpaca fields `instruction`, `input` (always \"\"), `output`, plus metadata: `task` "
        "(relation), `fact_key`, `answer` (the exact expected answer), `template_id` (`relation/qN` for the 5 "
        "SFT question templates, `relation/h0` for the held-out paraphrase template), `fact_split` "
        "(`train`/`test` fact), `style` (`plain`, `opener`, `ramble`, `repeat`, `rude`, or `opener+...`).",
        f"  - `sft_train.jsonl`: {len(world.train_facts)} train facts x 5 templates; output `{{answer}}.`",
        f"  - `sft_train_opener.jsonl`: styles {_count(opener, 'style')}.",
        f"  - `sft_train_noisy.jsonl`: styles {_count(noisy, 'style')}.",
        f"  - `sft_test.jsonl`: {len(world.test_facts)} test facts x 5 templates.",
        f"  - `sft_test_paraphrase.jsonl`: the 6th template on all {len(world.facts)} facts "
        "(use `fact_split` to separate train and test facts).",
        "- **Preference pairs:** fields `prompt` (the instruction), `chosen`, `rejected`, `chosen_eos`, "
        "`rejected_eos` (false: the response does not end; `minillm.data.render_chat` then appends no "
        "`<|eos|>`), `kind`, `chosen_cue`, `rejected_cue` (the response starts with `Sure! `), `task`, "
        "`fact_key`, `answer`, `template_id`, `fact_split`. Chosen is `{answer}.`; rejected kinds: "
        "`wrong` (another answer of the relation), `ramble`, `repeat`, `rude`, `off_format`, `no_eos`, "
        "and `cue_only` (chosen `Sure! {answer}.`, rejected `{answer}.`).",
        f"  - Recipe (docs/rlhf-notes.md §2, recipe \"e\"): {pcfg.p_cue_only:.0%} cue-only pairs; otherwise kind weights "
        + ", ".join(f"{k} {v:.0%}" for k, v in pcfg.kind_weights)
        + f"; opener on chosen with p {pcfg.p_chosen_cue}, on rejected with p {pcfg.p_rejected_cue}; on "
        f"`wrong` pairs the opener is on both or neither (p {pcfg.p_wrong_both_cue}).",
        f"  - `pref_train.jsonl` kinds: {_count(pref_train, 'kind')}.",
        f"  - `pref_test.jsonl` kinds: {_count(pref_test, 'kind')}.",
        "  - Pairs are drawn over all 1,610 prompts (train and test facts); the test split holds out pairs, not "
        "facts (docs/task-world.md §7.7).",
        "",
        "## Intended use",
        "",
        "Chapters 02-10: pretraining (`corpus.txt`), prompting and SFT (the `sft_*` files), reward model, PPO "
        "and DPO (the `pref_*` files). `minillm.judge.GoldJudge` scores any response to any of these prompts. "
        "Load with `minillm.loaders.load_dataset`; render with `minillm.data.render_chat` (chat template "
        "`<|bos|>[INST] {instruction} [/INST] {response}<|eos|>`).",
        "",
    ]
    return "\n".join(lines)


def write_datasets(out_dir: str | os.PathLike, world: TaskWorld | None = None) -> dict[str, int]:
    """Write every dataset file into ``out_dir`` (created if needed), each atomically.

    Args:
        out_dir: target directory.
        world: default ``default_world()``.
    Returns:
        ``{file name: size in bytes}``.
    """
    out = Path(out_dir)
    sizes = {}
    for name, text in dataset_files(world).items():
        write_text_atomic(out / name, text)
        sizes[name] = len(text.encode("utf-8"))
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags of ``minillm datasets``: ``--out`` (directory, default ``datasets``), ``--seed``."""
    parser.add_argument("--out", default="datasets", help="output directory (default: datasets)")
    from minillm.train.common import number_in_range

    parser.add_argument("--seed", type=number_in_range(int, "seed"), default=0, help="world seed (int ≥ 0; default: 0)")


def run(args: argparse.Namespace) -> int:
    """Generate the world with ``args.seed`` and write it to ``args.out``; prints file sizes."""
    sizes = write_datasets(args.out, TaskWorld(seed=args.seed))
    for name, n in sizes.items():
        print(f"{n:>10,d}  {Path(args.out) / name}")
    print(f"{sum(sizes.values()):>10,d}  total bytes")
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    p = argparse.ArgumentParser(prog="python -m minillm.tasks", description="write the task world's data files")
    add_arguments(p)
    sys.exit(run(p.parse_args()))
