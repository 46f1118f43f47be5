"""New knowledge for the task world (chapter 13): facts the base model never saw, facts that changed,
entities that exist nowhere, and a knowledge base of short passages to retrieve them from.

Scope
    * **New facts** (``NEW_FACTS``, 22): new entities in three existing relations -- 10 invented
      countries with invented capitals, 6 invented things with one of the world's 10 colours,
      6 invented animals with new sounds. No string of them occurs in the pretraining corpus or
      the SFT data (``tests/test_13_rag.py`` checks it).
    * **Updated facts** (``UPDATED_CAPITALS``, 8): capitals of the world's *train-split* countries
      moved to an invented city. The base model saw the old value 30 times and SFT asked about it,
      so the closed-book model answers the old value with confidence.
    * **Absent entities** (``ABSENT_FACTS``, 8): countries, things and animals that exist nowhere;
      the right answer is ``"I don't know."`` (``ABSTAIN``).
    * ``KnowledgeWorld`` -- a ``tasks.TaskWorld`` whose ``facts`` are the world's facts with the
      updates applied plus the new and absent facts, so that ``judge.GoldJudge`` and
      ``evaluate.evaluate_world`` score questions about them unchanged. ``split_of`` tells
      ``train``/``test`` (old facts as in the world), ``new``, ``updated`` and ``absent``.
    * ``KnowledgeWorld.passages()`` -- the knowledge base: one short passage (one sentence in the
      relation's first declarative template) per fact of the current world, new and updated ones
      included and the old value of an updated fact left out; every old fact is a distractor.
    * ``paraphrases(fact, n, seed)`` -- n mentions of a fact in distinct prose templates (the
      relation's 10 declarative + 3 quiz templates; cycled when n > 13): the continued-pretraining
      data of the paraphrase curve.
    * Question phrasings: ``TRAIN_TEMPLATES`` (q0-q2) are the phrasings fine-tuning arms may train
      on; ``EVAL_TEMPLATES`` (q3, q4 and the held-out h0) are the phrasings every arm is scored on.

Sources
    * Ovadia et al. 2023, "Fine-Tuning or Retrieval?" (arXiv 2312.05934) §3-§4: knowledge the model
      could not have seen, scored against unsupervised fine-tuning with paraphrases and RAG.
    * Allen-Zhu & Li 2023, Physics of Language Models 3.1 (arXiv 2309.14316) §4-§5: paraphrased
      mentions make stored facts extractable.
    * Gekhman et al. 2024 (arXiv 2405.05904): fine-tuning on facts new to the model.
    * docs/reference.md §11 (the numbers above and the retriever's formulas).

Deviations
    * Invented names stand in for "news": what matters is that the base model never saw them; the
      knowledge is as simple as the world's (one relation, one answer).
    * Only capitals are updated (a changed colour or animal sound would read as nonsense).
"""
from __future__ import annotations

import re

import numpy as np

from minillm.facts import RELATIONS, TEMPLATES, Fact, _article, _cap
from minillm.tasks import TaskWorld, WorldConfig

#: The answer that is right for an entity that exists nowhere (the judge strips the final ".").
ABSTAIN = "I don't know"

#: Question templates fine-tuning arms may train on, and those every arm is scored on (held out).
TRAIN_TEMPLATES = ("q0", "q1", "q2")
EVAL_TEMPLATES = ("q3", "q4", "h0")

_NEW_CAPITALS = [
    ("Veldoria", "Castrel"), ("Zarnia", "Pellow"), ("Quintar", "Osmir"), ("Brevia", "Tallon"),
    ("Moravel", "Dunrick"), ("Ostrania", "Felbury"), ("Kelmark", "Ravisse"), ("Lumeria", "Sorvik"),
    ("Drakonia", "Melbrook"), ("Tessaly", "Vantor"),
]
_NEW_COLOURS = [  # (thing, noun phrase, colour): colours are the world's 10
    ("glimberry", "a glimberry", "purple"), ("snorkfruit", "a snorkfruit", "orange"),
    ("quillstone", "a quillstone", "green"), ("marrowleaf", "a marrowleaf", "red"),
    ("dunefish", "a dunefish", "yellow"), ("fennick", "a fennick", "pink"),
]
_NEW_SOUNDS = [
    ("zibbet", "chitter"), ("grollock", "rumble"), ("pemmet", "whistle"), ("vorran", "snort"),
    ("tullet", "trill"), ("quorm", "gurgle"),
]
#: New capitals for the first 8 train-split countries of the world (in the world's order).
_UPDATED_CITIES = ("Tarvo", "Linwick", "Brask", "Corvale", "Hesperon", "Nolwick", "Ardentis", "Selmouth")
_ABSENT = [
    ("capital", "Norvaland"), ("capital", "Questria"), ("capital", "Baltimar"), ("capital", "Sundeval"),
    ("colour", "wobbleroot"), ("colour", "flinchberry"), ("sound", "grimlet"), ("sound", "yarrowbuck"),
]

#: Relations that have new knowledge.
KNOWLEDGE_RELATIONS = ("capital", "colour", "sound")


def make_fact(relation: str, subject: str, answer: str, phrase: str | None = None) -> Fact:
    """A ``facts.Fact`` with the template slots ``facts.build_facts`` gives the relation.

    Args:
        relation: ``"capital"``, ``"colour"`` or ``"sound"``.
        subject: the entity (``"Veldoria"``, ``"glimberry"``, ``"zibbet"``).
        answer: the answer string.
        phrase: for colours, the noun phrase used in sentences (default ``"a " + subject``).
    Raises:
        ValueError: a relation without new knowledge.
    """
    if relation == "capital":
        slots = (("s", subject), ("S", subject), ("o", answer))
    elif relation == "colour":
        p = phrase or _article(subject)
        slots = (("s", p), ("S", _cap(p)), ("o", answer))
    elif relation == "sound":
        slots = (("s", subject), ("S", _cap(subject)), ("o", answer), ("as", _article(subject)),
                 ("As", _cap(_article(subject))))
    else:
        raise ValueError(f"relation={relation!r}: new knowledge exists for {KNOWLEDGE_RELATIONS} only")
    return Fact(relation, subject, answer, slots, f"{relation}:{subject}")


def _new_facts() -> list[Fact]:
    return ([make_fact("capital", c, city) for c, city in _NEW_CAPITALS]
            + [make_fact("colour", t, col, phrase) for t, phrase, col in _NEW_COLOURS]
            + [make_fact("sound", a, s) for a, s in _NEW_SOUNDS])


#: The 22 new facts (10 capitals, 6 colours, 6 sounds).
NEW_FACTS: tuple[Fact, ...] = tuple(_new_facts())
#: The 8 absent entities, answer ``ABSTAIN``.
ABSENT_FACTS: tuple[Fact, ...] = tuple(make_fact(r, s, ABSTAIN) for r, s in _ABSENT)


_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def invented_names(n: int, seed: int = 0, exclude=()) -> list[str]:
    """n distinct capitalised invented names of 4-9 letters alternating consonants and vowels, with an
    occasional doubled consonant or final consonant (``"Tovaril"``, ``"Mekkasu"``), none equal to a name
    of the world's new, updated or absent facts or to ``exclude``; drawn with ``default_rng([seed, 29])``.
    Letter-level randomness makes the BPE split them into many different pieces, so a reader trained on
    them must copy token sequences in general, not a few memorised syllables."""
    taken = {f.subject for f in NEW_FACTS + ABSENT_FACTS} | {f.answer for f in NEW_FACTS} | set(_UPDATED_CITIES)
    taken |= set(exclude)
    rng = np.random.default_rng([seed, 29])
    out: list[str] = []
    seen = set(out)
    while len(out) < n:
        length = int(rng.integers(4, 10))
        vowel = bool(rng.random() < 0.3)
        letters = []
        while len(letters) < length:
            pool = _VOWELS if vowel else _CONSONANTS
            c = pool[int(rng.integers(0, len(pool)))]
            letters.append(c)
            if not vowel and rng.random() < 0.1 and len(letters) < length:
                letters.append(c)
            vowel = not vowel
        name = "".join(letters).capitalize()
        if name not in taken and name not in seen:
            out.append(name)
            seen.add(name)
    return out


def paraphrases(fact: Fact, n: int, seed: int = 0) -> list[str]:
    """n mentions of ``fact`` in distinct prose templates (declarative + quiz of its relation).

    The relation's 13 templates are permuted with ``default_rng([seed, index of the fact's subject
    hash-free key])``; the first n are used, cycling through the permutation again when n > 13
    (so 30 mentions use every template 2-3 times).

    Args:
        fact: the fact.
        n: mentions (>= 1).
        seed: picks the permutation.
    Returns:
        list of n sentences (str).
    Raises:
        ValueError: n < 1.
    """
    if n < 1:
        raise ValueError(f"paraphrases: n={n} must be >= 1")
    t = TEMPLATES[fact.relation]
    pool = t["declarative"] + t["quiz"]
    key = sum(ord(c) * (i + 1) for i, c in enumerate(fact.key))  # deterministic, independent of PYTHONHASHSEED
    order = np.random.default_rng([seed, key]).permutation(len(pool))
    return [fact.fill(pool[int(order[i % len(pool)])]) for i in range(n)]


class KnowledgeWorld(TaskWorld):
    """The task world after the news: updates applied, new and absent facts added.

    Args:
        config: ``tasks.WorldConfig`` (or ``seed=``); the old facts and their split are the world's.
    Attributes:
        facts: old facts (updated ones carry the new value) + ``NEW_FACTS`` + ``ABSENT_FACTS``.
        old_facts: the world's facts as pretraining and SFT saw them.
        new_facts, updated_facts, absent_facts: lists of ``Fact``.
        previous: ``{fact key: old answer}`` of the updated facts.
    Do not call ``sft_records`` / ``corpus_documents`` on it: those are the world's products
    (use a plain ``TaskWorld``); this class serves questions, judging and the knowledge base.
    """

    def __init__(self, config: WorldConfig | None = None, *, seed: int | None = None):
        super().__init__(config, seed=seed)
        self.old_facts = list(self.facts)
        capitals = [f for f in self.train_facts if f.relation == "capital"][:len(_UPDATED_CITIES)]
        self.updated_facts = [make_fact("capital", f.subject, city) for f, city in zip(capitals, _UPDATED_CITIES)]
        self.previous = {f.key: f.answer for f in capitals}
        upd = {f.key: f for f in self.updated_facts}
        self.new_facts = list(NEW_FACTS)
        self.absent_facts = list(ABSENT_FACTS)
        self.facts = [upd.get(f.key, f) for f in self.old_facts] + self.new_facts + self.absent_facts
        self._by_key = {f.key: f for f in self.facts}
        for f in self.new_facts:
            self._split[f.key] = "new"
        for f in self.updated_facts:
            self._split[f.key] = "updated"
        for f in self.absent_facts:
            self._split[f.key] = "absent"
        self._prompt_index = None

    def facts_of(self, kind: str) -> list[Fact]:
        """Facts of one kind: ``"new"``, ``"updated"``, ``"absent"``, ``"old"`` (old facts not updated),
        ``"old_test"`` (old facts held out of SFT, known from pretraining only) or ``"old_train"``.

        Raises:
            ValueError: unknown kind.
        """
        if kind == "new":
            return list(self.new_facts)
        if kind == "updated":
            return list(self.updated_facts)
        if kind == "absent":
            return list(self.absent_facts)
        if kind in ("old", "old_test", "old_train"):
            keep = {"old": ("train", "test"), "old_test": ("test",), "old_train": ("train",)}[kind]
            return [f for f in self.facts if self._split[f.key] in keep]
        raise ValueError(f"kind={kind!r}: use new, updated, absent, old, old_test or old_train")

    def question_records(self, kind: str, templates=EVAL_TEMPLATES, max_facts: int | None = None) -> list[dict]:
        """Question rows (the fields of ``TaskWorld.sft_test_records`` plus ``kind``) about facts of ``kind``.

        Args:
            kind: see ``facts_of``.
            templates: template ids to ask with (``"q0"``..``"q4"``, ``"h0"``); default the held-out
                phrasings ``EVAL_TEMPLATES``.
            max_facts: an evenly spaced subset of the facts (deterministic); None = all.
        Returns:
            list of dict: instruction, input "", output "{answer}.", task, fact_key, answer,
            template_id, fact_split, style "plain", kind.
        """
        facts = self.facts_of(kind)
        if max_facts is not None and max_facts < len(facts):
            facts = [facts[int(i)] for i in np.linspace(0, len(facts) - 1, max_facts).round().astype(int)]
        rows = []
        for f in facts:
            for tid, q in self.questions(f) + self.questions(f, heldout=True):
                if tid.split("/")[1] in templates:
                    rows.append({**self._sft_record(f, tid, q, f"{f.answer}.", "plain"), "kind": kind})
        return rows

    def passage(self, fact: Fact) -> str:
        """The knowledge-base passage of a fact: its relation's first (shortest) declarative template,
        e.g. "The capital of Veldoria is Castrel." (about 10 tokens, so that the question and three
        passages fit the 64-token context)."""
        return fact.fill(TEMPLATES[fact.relation]["declarative"][0])

    def passages(self, relations=RELATIONS) -> list[dict]:
        """The knowledge base: ``{"id", "text", "fact_key", "kind"}`` for every present fact (no absent ones).

        Ids are ``"p0000"``.. in the order old facts (updated ones with their new value), new facts.
        Args:
            relations: keep passages of these relations only (default all six).
        """
        out = []
        for f in self.facts:
            kind = self._split[f.key]
            if kind == "absent" or f.relation not in relations:
                continue
            out.append({"id": f"p{len(out):04d}", "text": self.passage(f), "fact_key": f.key,
                        "kind": "old" if kind in ("train", "test") else kind})
        return out


def mentions(text: str, words) -> bool:
    """Whether any of ``words`` occurs in ``text`` as a whole word (case-sensitive)."""
    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in words)
