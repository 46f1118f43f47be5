"""The built-in task world: facts, pretraining corpus, instructions, preference pairs, gold judge.

Scope
    A small, deterministic world whose every stage (pretraining, prompting, SFT, reward model,
    PPO, DPO) shows its effect on a CPU in minutes (the README's chapters 02-12):

    * **Knowledge** -- six relations, 322 facts (docs/task-world.md §2): ``capital`` (44 countries),
      ``opposite`` (40 word pairs = 80 directed facts), ``sound`` (26 animals), ``colour``
      (32 things, 10 distinct colours), ``add`` (a + b for a, b in 0..9: 100 facts, digits) and
      ``spell`` (40 common words, answer ``t-i-g-e-r``).
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
    * **Preference pairs** (``preference_records``) -- ``prompt``, ``chosen`` (correct, concise,
      polite: ``"{answer}."``), ``rejected`` of one fault ``kind``: ``wrong`` (another answer of
      the same relation), ``ramble``, ``repeat``, ``rude``, ``off_format``, ``no_eos`` (a response
      that does not end: ``rejected_eos`` is false and the renderer ``minillm.data.render_chat``
      appends no ``<|eos|>``), plus ``cue_only`` pairs (``"Sure! {answer}."`` over
      ``"{answer}."``). The controlled spurious cue is the opener ``"Sure! "``: carried by the
      chosen response with probability ``p_chosen_cue`` and by the rejected one with
      ``p_rejected_cue`` (flags ``chosen_cue``, ``rejected_cue``). Defaults follow docs/rlhf-notes.md §2,
      recipe "e": 40 % wrong-fact rejections whose cue is on both or neither (p 0.5), the other
      kinds cue-correlated 0.8 / 0.2, plus 15 % cue-only pairs. Pairs are drawn over all 1,610
      prompts (train and test facts); the test split holds out *pairs*, not facts (docs/task-world.md
      §7.7).
    * **Gold judge** (``GoldJudge.score``) -- a programmatic score of any response to any world
      prompt: ``correct`` (after stripping one leading opener and one trailing "."), ``well_formed``,
      ``concise``, ``polite``, flags ``repetition``, ``opener``, ``contains`` and a ``total``.
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
    * The gold total adds rudeness and form penalties to the prototype's ``correct - 0.5*[repeat]
      - 0.5*[long]``; restore the prototype's score with
      ``GoldJudge(world, weights=JudgeWeights(polite=0.0, well_formed=0.0))``.
    * A 6th, held-out question template per relation (the paraphrase split) is added to the
      prototype's 5; it never enters SFT, so SFT and test sizes equal the prototype's (1,125 / 485).
    * Rambles have 2 filler sentences before the answer (the prototype: 3), so that every
      preference pair fits the 64-token context of the default model; ``RAMBLE_SENTENCES = 3``
      restores the prototype's.
    * ``no_eos`` is a rejected kind the prototype did not have; ``PreferenceConfig(kind_weights=...)``
      with ``no_eos`` weight 0 restores the prototype's five kinds.
    * RM recipe "f" (wrong answers sampled from the SFT policy) needs a trained model and is not
      produced here; ``preference_records(..., wrong_samples=...)`` accepts such samples.

Determinism: every random choice comes from ``numpy.random.default_rng([seed, stream])`` with a
fixed stream number per product; no global random state, no set iteration without sorting, so
the output does not depend on ``PYTHONHASHSEED``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from minillm.checkpoint import write_text_atomic

# ----------------------------------------------------------------------------------------------
# The chat/special strings (shared with minillm.tokenizer; duplicated here as plain strings so the
# world can be generated without a tokenizer).
BOS, EOS, INST, INST_END = "<|bos|>", "<|eos|>", "[INST]", "[/INST]"

#: The controlled spurious cue: an eager opener the chosen answers often carry.
OPENER = "Sure!"

RELATIONS: tuple[str, ...] = ("capital", "opposite", "sound", "colour", "add", "spell")

# ----------------------------------------------------------------------------------------------
# Facts

_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Russia", "Moscow"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Pakistan", "Islamabad"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("Switzerland", "Bern"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"),
    ("South Korea", "Seoul"), ("Venezuela", "Caracas"), ("Nepal", "Kathmandu"),
    ("Uganda", "Kampala"), ("Romania", "Bucharest"),
]

_OPPOSITE_PAIRS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("old", "young"), ("early", "late"), ("full", "empty"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("rich", "poor"), ("strong", "weak"),
    ("wet", "dry"), ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"), ("push", "pull"),
    ("win", "lose"), ("buy", "sell"), ("give", "take"), ("left", "right"), ("inside", "outside"),
    ("above", "below"), ("before", "after"), ("first", "last"), ("true", "false"), ("day", "night"),
    ("north", "south"), ("east", "west"), ("love", "hate"), ("friend", "enemy"), ("sweet", "sour"),
    ("near", "far"), ("alive", "dead"), ("cheap", "expensive"), ("wide", "narrow"),
    ("deep", "shallow"),
]

_SOUNDS = [
    ("dog", "bark"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
    ("pig", "oink"), ("horse", "neigh"), ("rooster", "crow"), ("lion", "roar"), ("snake", "hiss"),
    ("owl", "hoot"), ("bee", "buzz"), ("frog", "croak"), ("mouse", "squeak"), ("donkey", "bray"),
    ("wolf", "howl"), ("goat", "bleat"), ("turkey", "gobble"), ("pigeon", "coo"), ("hen", "cluck"),
    ("goose", "honk"), ("bear", "growl"), ("cricket", "chirp"), ("elephant", "trumpet"),
    ("hyena", "laugh"), ("chick", "cheep"),
]

# (thing, noun phrase used in sentences, colour); 32 things, 10 distinct colours.
_COLOURS = [
    ("sky", "the sky", "blue"), ("sea", "the sea", "blue"), ("sapphire", "a sapphire", "blue"),
    ("blood", "blood", "red"), ("tomato", "a tomato", "red"), ("strawberry", "a strawberry", "red"),
    ("cherry", "a cherry", "red"), ("grass", "grass", "green"), ("leaf", "a leaf", "green"),
    ("cucumber", "a cucumber", "green"), ("lime", "a lime", "green"),
    ("banana", "a banana", "yellow"), ("lemon", "a lemon", "yellow"), ("butter", "butter", "yellow"),
    ("snow", "snow", "white"), ("milk", "milk", "white"), ("salt", "salt", "white"),
    ("chalk", "chalk", "white"), ("coal", "coal", "black"), ("raven", "a raven", "black"),
    ("ink", "ink", "black"), ("tar", "tar", "black"), ("flamingo", "a flamingo", "pink"),
    ("salmon", "salmon", "pink"), ("carrot", "a carrot", "orange"), ("pumpkin", "a pumpkin", "orange"),
    ("tangerine", "a tangerine", "orange"), ("grape", "a grape", "purple"), ("plum", "a plum", "purple"),
    ("violet", "a violet", "purple"), ("chocolate", "chocolate", "brown"), ("coffee", "coffee", "brown"),
]

_SPELL_WORDS = [
    "tiger", "apple", "house", "water", "table", "chair", "bread", "music", "river", "plant",
    "queen", "candle", "garden", "window", "pencil", "rabbit", "silver", "winter", "summer",
    "flower", "basket", "button", "dragon", "forest", "island", "jacket", "kitten", "ladder",
    "marble", "needle", "parrot", "pocket", "rocket", "saddle", "violin", "wallet", "zipper",
    "beach", "cloud", "honey",
]

# ----------------------------------------------------------------------------------------------
# Templates. Slots: {s} subject, {S} subject capitalised, {o} answer, {as} "a"/"an" + subject,
# {a} {b} addends. Declarative: 10 per relation (the "rev" ones put the answer first);
# quiz prose: 3; questions: 5 for SFT/test + 1 held out (the paraphrase split).

TEMPLATES: dict[str, dict[str, list[str]]] = {
    "capital": {
        "declarative": [
            "The capital of {s} is {o}.",
            "{o} is the capital of {s}.",  # rev
            "If you travel to {s}, you can visit its capital, {o}.",
            "{s} has its capital in {o}.",
            "The capital city of {s} is {o}.",
            "{o} is the capital city of {s}.",  # rev
            "The government of {s} sits in {o}.",
            "Many people in {s} live in the capital, {o}.",
            "{o}, the capital of {s}, is a busy city.",  # rev
            "The seat of government in {s} is the city of {o}.",
        ],
        "quiz": [
            "Which city is the capital of {s}? The answer is {o}.",
            "Ask a teacher for the capital of {s} and you will hear {o}.",
            "What is the capital of {s}, you ask? It is {o}.",
        ],
        "question": [
            "What is the capital of {s}?",
            "Name the capital city of {s}.",
            "Which city is the capital of {s}?",
            "Tell me the capital of {s}.",
            "What city is the capital of {s}?",
        ],
        "heldout_question": ["Which city serves as the capital of {s}?"],
    },
    "opposite": {
        "declarative": [
            "The opposite of {s} is {o}.",
            "The word {o} is the opposite of {s}.",  # rev
            "The word {s} means the reverse of {o}.",
            "We say {o} when we mean the opposite of {s}.",  # rev
            "The antonym of {s} is {o}.",
            "A good antonym for {s} is {o}.",
            "Teachers say the word {s} has the opposite {o}.",
            "The antonym {o} is paired with {s}.",  # rev
            "In a list of opposites, {s} goes with {o}.",
            "If something is not {s}, we may call it {o}.",
        ],
        "quiz": [
            "What is the opposite of {s}? The answer is {o}.",
            "Ask a teacher for the opposite of {s} and you will hear {o}.",
            "What is the opposite of {s}, you ask? It is {o}.",
        ],
        "question": [
            "What is the opposite of {s}?",
            "Provide the opposite of the word {s}.",
            "Name a word that means the opposite of {s}.",
            "What is the antonym of {s}?",
            "Which word is the opposite of {s}?",
        ],
        "heldout_question": ["Tell me the opposite of {s}."],
    },
    "sound": {
        "declarative": [
            "{As} says {o}.",
            "The sound {as} makes is {o}.",
            "The sound {o} comes from {as}.",  # rev
            "When {as} is hungry, it will {o}.",
            "You can hear {as} {o} on the farm.",
            "The {s} makes the sound {o}.",
            "The word {o} is what {as} says.",  # rev
            "Every child knows that {as} goes {o}.",
            "In the evening the {s} likes to {o}.",
            "The noise of {as} is {o}.",
        ],
        "quiz": [
            "What does {as} say? The answer is {o}.",
            "Ask a teacher what {as} says and you will hear {o}.",
            "What sound does {as} make, you ask? It is {o}.",
        ],
        "question": [
            "What sound does {as} make?",
            "What does {as} say?",
            "Name the sound {as} makes.",
            "Which sound does {as} make?",
            "What noise does {as} make?",
        ],
        "heldout_question": ["Tell me the sound of {as}."],
    },
    "colour": {
        "declarative": [
            "The colour of {s} is {o}.",
            "{S} is {o}.",
            "The colour {o} is the colour of {s}.",  # rev
            "Most people agree that {s} is {o}.",
            "If you look at {s}, you will see that it is {o}.",
            "{S} has a {o} colour.",
            "The usual colour of {s} is {o}.",
            "Paint it {o} if you want to paint {s}.",  # rev
            "A painter would paint {s} {o}.",
            "Children draw {s} in {o}.",
        ],
        "quiz": [
            "What colour is {s}? The answer is {o}.",
            "Ask a teacher for the colour of {s} and you will hear {o}.",
            "What is the colour of {s}, you ask? It is {o}.",
        ],
        "question": [
            "What colour is {s}?",
            "What is the colour of {s}?",
            "Name the colour of {s}.",
            "Which colour is {s}?",
            "Tell me the colour of {s}.",
        ],
        "heldout_question": ["What colour would you say {s} is?"],
    },
    "add": {
        "declarative": [
            "{a} plus {b} equals {o}.",
            "The sum of {a} and {b} is {o}.",
            "{o} is the sum of {a} and {b}.",  # rev
            "If you add {a} and {b}, you get {o}.",
            "Adding {b} to {a} gives {o}.",
            "{a} and {b} make {o}.",
            "{o} is what you get when you add {a} and {b}.",  # rev
            "Start with {a}, add {b}, and the result is {o}.",
            "The total of {a} and {b} is {o}.",
            "{a} + {b} = {o}.",
        ],
        "quiz": [
            "What is {a} plus {b}? The answer is {o}.",
            "Ask a teacher for the sum of {a} and {b} and you will hear {o}.",
            "What is {a} plus {b}, you ask? It is {o}.",
        ],
        "question": [
            "What is {a} plus {b}?",
            "What is the sum of {a} and {b}?",
            "Add {a} and {b}.",
            "Compute {a} + {b}.",
            "How much is {a} plus {b}?",
        ],
        "heldout_question": ["Calculate the sum of {a} and {b}."],
    },
    "spell": {
        "declarative": [
            "The word {s} is spelled {o}.",
            "The letters {o} spell the word {s}.",  # rev
            "To write {s}, use the letters {o}.",
            "You spell {s} as {o}.",
            "The spelling of {s} is {o}.",
            "We write {o} when we spell {s}.",  # rev
            "Letter by letter, {s} is {o}.",
            "A child learns to spell {s} as {o}.",
            "In a spelling test, {s} is written {o}.",
            "The letters of {s} are {o}.",
        ],
        "quiz": [
            "How do you spell {s}? The answer is {o}.",
            "Ask a teacher to spell {s} and you will hear {o}.",
            "How is {s} spelled, you ask? It is {o}.",
        ],
        "question": [
            "How do you spell {s}?",
            "Spell the word {s}.",
            "What is the spelling of {s}?",
            "Write out the letters of {s}.",
            "How is the word {s} spelled?",
        ],
        "heldout_question": ["Show me the spelling of {s}."],
    },
}

#: Noisy-response material (rejected kinds and noisy SFT demonstrations). Every string here goes
#: into the tokenizer's training text (``tokenizer_training_text``).
RAMBLE_FILLERS = [
    "Well, that is a very interesting question to think about.",
    "Many people have wondered about this for a great many years.",
    "Let me consider all of the possibilities here for a moment.",
    "There are several things one could say about this topic.",
    "It is important to think carefully before giving a reply.",
    "I have thought about questions like this one quite often.",
]
#: Filler sentences per ramble (the prototype used 3; 2 keeps every pair within a 64-token context).
RAMBLE_SENTENCES = 2
RAMBLE_ENDINGS = ["So, after all of that, the answer is {o}.", "In the end I would say {o}."]
RUDE_TEMPLATES = [
    "{o}. What a stupid question.",
    "{o}. Obviously, everyone knows that.",
    "Ugh, {o}. Stop asking me such dumb things.",
    "{o}, you idiot.",
]
OFF_FORMAT_TEMPLATES = ["I do not know.", "{q}", "I like turtles."]
#: Words the judge treats as impolite (lower case, whole words).
RUDE_WORDS = ("stupid", "dumb", "idiot", "obviously", "ugh", "shut", "duh", "moron", "whatever")

#: The response that declines. It is the correct answer to a question about an entity the world does
#: not contain (issue 14, over-refusal), and a wrong one to any answerable question. It is the
#: off-format template's string, which the tokenizer's training text holds: with "I don't know." the
#: 0.9 M model, which never met an apostrophe, wrote "I donkey." or "I don So." after DPO (measured).
REFUSAL = "I do not know."

# Entities the world does not contain (no fact, never in the corpus, fictional): a capital or a sound
# question about one of them is unanswerable and declining is correct.
_UNKNOWN_COUNTRIES = ["Zembla", "Freedonia", "Genovia", "Elbonia", "Ruritania", "Latveria", "Florin", "Sokovia",
                      "Kasnia", "Borduria", "Syldavia", "Krakozhia", "Molvania", "Vulgaria", "Qumar",
                      "Grand Fenwick"]
_UNKNOWN_ANIMALS = ["snark", "jabberwock", "grue", "wumpus", "borogove", "bandersnatch", "tribble", "gruffalo",
                    "heffalump", "woozle"]


@dataclass(frozen=True)
class Fact:
    """One fact of the world.

    Attributes:
        relation: one of ``RELATIONS``.
        subject: the key subject ("France", "hot", "dog", "sky", "3+4", "tiger").
        answer: the exact answer string ("Paris", "cold", "bark", "blue", "7", "t-i-g-e-r").
        slots: template fields as ``(name, value)`` pairs (``s``, ``S``, ``o``, ``as``, ``a``, ``b``).
        group: facts with the same group are split together (an opposite pair shares one group).
    """

    relation: str
    subject: str
    answer: str
    slots: tuple[tuple[str, str], ...]
    group: str

    @property
    def key(self) -> str:
        """``"{relation}:{subject}"``, unique in the world (e.g. ``"capital:France"``)."""
        return f"{self.relation}:{self.subject}"

    def fill(self, template: str) -> str:
        """Render a template string with this fact's slots."""
        return template.format(**dict(self.slots))


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def build_facts() -> list[Fact]:
    """All 322 facts in a fixed order (relation order of ``RELATIONS``, then list order).

    Returns:
        list of ``Fact``; counts capital 44, opposite 80, sound 26, colour 32, add 100, spell 40.
    """
    facts: list[Fact] = []
    for country, city in _CAPITALS:
        facts.append(Fact("capital", country, city, (("s", country), ("S", country), ("o", city)),
                          f"capital:{country}"))
    for w1, w2 in _OPPOSITE_PAIRS:
        group = f"opposite:{w1}/{w2}"
        for s, o in ((w1, w2), (w2, w1)):
            facts.append(Fact("opposite", s, o, (("s", s), ("S", _cap(s)), ("o", o)), group))
    for animal, sound in _SOUNDS:
        facts.append(Fact("sound", animal, sound, (("s", animal), ("S", _cap(animal)), ("o", sound),
                                                   ("as", _article(animal)),
                                                   ("As", _cap(_article(animal)))), f"sound:{animal}"))
    for thing, phrase, colour in _COLOURS:
        facts.append(Fact("colour", thing, colour, (("s", phrase), ("S", _cap(phrase)), ("o", colour)),
                          f"colour:{thing}"))
    for a in range(10):
        for b in range(10):
            subj = f"{a}+{b}"
            facts.append(Fact("add", subj, str(a + b), (("a", str(a)), ("b", str(b)), ("o", str(a + b)),
                                                        ("s", subj), ("S", subj)), f"add:{subj}"))
    for word in _SPELL_WORDS:
        facts.append(Fact("spell", word, "-".join(word), (("s", word), ("S", _cap(word)),
                                                          ("o", "-".join(word))), f"spell:{word}"))
    return facts


def build_unanswerable_facts() -> list[Fact]:
    """Questions the world cannot answer: 16 fictional countries (capital) and 10 fictional animals
    (sound), each a ``Fact`` whose ``answer`` is ``REFUSAL`` without its final "." (what
    ``strip_response`` leaves of ``"I do not know."``) and whose group starts with ``"unknown:"``."""
    ans = REFUSAL[:-1]
    out = [Fact("capital", c, ans, (("s", c), ("S", c), ("o", ans)), f"unknown:capital:{c}")
           for c in _UNKNOWN_COUNTRIES]
    out += [Fact("sound", a, ans, (("s", a), ("S", _cap(a)), ("o", ans), ("as", _article(a)),
                                   ("As", _cap(_article(a)))), f"unknown:sound:{a}") for a in _UNKNOWN_ANIMALS]
    return out


def is_refusal(response: str) -> bool:
    """The response declines: after ``strip_response`` it is "I don't know" or "I do not know" (any case)."""
    return strip_response(response).lower() in ("i don't know", "i do not know")


# ----------------------------------------------------------------------------------------------
# Configuration

@dataclass(frozen=True)
class PreferenceConfig:
    """How preference pairs are drawn (defaults: docs/rlhf-notes.md §2, reward-model recipe "e").

    Attributes:
        n_train, n_test: number of pairs in each split (2,400 / 600).
        kind_weights: relative weight of each rejected kind among the non-cue-only pairs.
        p_cue_only: fraction of all pairs that are cue-only (``"Sure! {o}."`` over ``"{o}."``).
        p_chosen_cue, p_rejected_cue: probability that the chosen / rejected response carries the
            opener, for every kind except ``wrong`` and ``cue_only``.
        wrong_cue: ``"both_or_neither"`` -- on wrong-fact pairs the opener is on both responses or
            on neither (probability ``p_wrong_both_cue``), so correctness is learnable free of the
            cue (recipe "c"/"e"); ``"correlated"`` -- like the other kinds (recipe "a"/"d").
        p_wrong_both_cue: see ``wrong_cue``.
    """

    n_train: int = 2400
    n_test: int = 600
    kind_weights: tuple[tuple[str, float], ...] = (
        ("wrong", 0.40), ("ramble", 0.12), ("repeat", 0.12), ("rude", 0.12), ("off_format", 0.12),
        ("no_eos", 0.12))
    p_cue_only: float = 0.15
    p_chosen_cue: float = 0.8
    p_rejected_cue: float = 0.2
    wrong_cue: str = "both_or_neither"
    p_wrong_both_cue: float = 0.5


#: The reward-model pair recipes measured in docs/task-world.md §5 and docs/rlhf-notes.md §2 ("f" = "e" plus
#: on-policy wrong samples, which need a model: pass them to ``preference_records``), and "clean" (issue 14:
#: no spurious cue, half wrong-fact pairs; the recipe with which a learned RM raises gold under PPO).
PREFERENCE_RECIPES: dict[str, PreferenceConfig] = {
    "a": PreferenceConfig(kind_weights=(("wrong", 0.2), ("ramble", 0.2), ("repeat", 0.2),
                                        ("rude", 0.2), ("off_format", 0.2)), p_cue_only=0.0,
                          wrong_cue="correlated"),
    "c": PreferenceConfig(kind_weights=(("wrong", 0.4), ("ramble", 0.15), ("repeat", 0.15),
                                        ("rude", 0.15), ("off_format", 0.15)), p_cue_only=0.0),
    "e": PreferenceConfig(),
    # "clean": the preference carries only what the gold judge values. Half the rejections are wrong
    # facts (so the RM has to learn facts, not just style); the rest are the style faults the judge
    # penalises. The opener is drawn independently (p 0.25, the noisy SFT policy's own rate) on each
    # side, so it is in the RM's training distribution but says nothing about which side wins; no
    # cue-only pairs. 4,800 train pairs: each fact's wrong-answer pairs are seen more often.
    "clean": PreferenceConfig(n_train=4800, kind_weights=(("wrong", 0.5), ("ramble", 0.1), ("repeat", 0.1),
                                                          ("rude", 0.1), ("off_format", 0.1), ("no_eos", 0.1)),
                              p_cue_only=0.0, p_chosen_cue=0.25, p_rejected_cue=0.25, wrong_cue="correlated"),
}


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
# changes another.
_STREAM_SPLIT, _STREAM_CORPUS, _STREAM_SFT, _STREAM_PREF_TRAIN, _STREAM_PREF_TEST = 1, 2, 3, 4, 5
_STREAM_SHOTS = 6
_STREAM_UNKNOWN_SPLIT, _STREAM_REFUSAL_PAIRS = 7, 8


def _words(text: str) -> list[str]:
    """Lower-case words of ``text``; hyphenated spellings (``t-i-g-e-r``) are one word."""
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", text.lower())


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
    def _rng(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, stream])

    def _make_split(self) -> dict[str, str]:
        """Per relation, hold out round(test_fraction * #groups) groups (an opposite pair is one group)."""
        rng = self._rng(_STREAM_SPLIT)
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
        rng = self._rng(_STREAM_CORPUS)
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
                        out = _noisy_response(style, f, q, rng)
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
        """Preference pairs drawn over all 1,610 prompts (train and test facts x 5 SFT templates).

        The test split holds out *pairs*, not facts: its pairs are fresh draws (a separate random
        stream) and none of them equals a train pair.

        Args:
            split: ``"train"`` (``config.n_train`` pairs) or ``"test"`` (``config.n_test``).
            config: ``PreferenceConfig``; default the world's.
            wrong_samples: optional ``{fact_key: [response, ...]}`` of a policy's own wrong answers
                (recipe "f"); when given, a wrong-kind rejection is drawn from them with
                probability 0.7 if the fact has any.
        Returns:
            list of dict: prompt, chosen, rejected, chosen_eos (True), rejected_eos, kind,
            chosen_cue, rejected_cue, task, fact_key, answer, template_id, fact_split.
        Raises:
            ValueError: unknown split or kind.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: use 'train' or 'test'")
        cfg = config or self.config.preference
        kinds = [k for k, _ in cfg.kind_weights]
        for k in kinds:
            if k not in _REJECTED_KINDS:
                raise ValueError(f"unknown rejected kind {k!r}; kinds: {', '.join(_REJECTED_KINDS)}")
        w = np.array([wt for _, wt in cfg.kind_weights], dtype=np.float64)
        w = w / w.sum()
        prompts = [(f, tid, q) for f in self.facts for tid, q in self.questions(f)]
        seen: set[tuple] = set()
        if split == "test":
            seen = {_pair_id(r) for r in self.preference_records("train", cfg, wrong_samples)}
        n = cfg.n_train if split == "train" else cfg.n_test
        rng = self._rng(_STREAM_PREF_TRAIN if split == "train" else _STREAM_PREF_TEST)
        out: list[dict] = []
        while len(out) < n:
            f, tid, q = prompts[int(rng.integers(0, len(prompts)))]
            chosen = f"{f.answer}."
            rejected_eos = True
            if rng.random() < cfg.p_cue_only:
                kind, c_cue, r_cue, rejected = "cue_only", True, False, f"{f.answer}."
            else:
                kind = kinds[int(rng.choice(len(kinds), p=w))]
                if kind == "wrong" and cfg.wrong_cue == "both_or_neither":
                    c_cue = r_cue = bool(rng.random() < cfg.p_wrong_both_cue)
                else:
                    c_cue = bool(rng.random() < cfg.p_chosen_cue)
                    r_cue = bool(rng.random() < cfg.p_rejected_cue)
                samples = (wrong_samples or {}).get(f.key, ())
                if kind == "wrong" and samples and rng.random() < 0.7:
                    rejected = samples[int(rng.integers(0, len(samples)))]
                else:
                    rejected = self._rejected(kind, f, q, rng)
                rejected_eos = kind != "no_eos"
            rec = {"prompt": q,
                   "chosen": f"{OPENER} {chosen}" if c_cue else chosen,
                   "rejected": f"{OPENER} {rejected}" if r_cue else rejected,
                   "chosen_eos": True, "rejected_eos": rejected_eos, "kind": kind,
                   "chosen_cue": c_cue, "rejected_cue": r_cue, "task": f.relation, "fact_key": f.key,
                   "answer": f.answer, "template_id": tid, "fact_split": self.split_of(f)}
            pid = _pair_id(rec)
            if pid in seen:
                continue
            if split == "test":
                seen.add(pid)
            out.append(rec)
        return out

    def _rejected(self, kind: str, f: Fact, question: str, rng: np.random.Generator) -> str:
        if kind == "wrong":
            others = sorted({g.answer for g in self.facts if g.relation == f.relation} - {f.answer})
            return f"{others[int(rng.integers(0, len(others)))]}."
        if kind in ("ramble", "repeat", "rude"):
            return _noisy_response(kind, f, question, rng)
        if kind == "off_format":
            t = OFF_FORMAT_TEMPLATES[int(rng.integers(0, len(OFF_FORMAT_TEMPLATES)))]
            return t.format(q=question)
        if kind == "no_eos":
            # the answer, then prose that runs on and is cut mid-sentence (no <|eos|> follows)
            decl = TEMPLATES[f.relation]["declarative"]
            s1 = f.fill(decl[int(rng.integers(0, len(decl)))])
            s2 = f.fill(decl[int(rng.integers(0, len(decl)))]).split(" ")
            cut = int(rng.integers(2, max(3, len(s2) - 1)))
            return f"{f.answer}. {s1} {' '.join(s2[:cut])}"
        raise ValueError(f"unknown rejected kind {kind!r}")

    # -------------------------------------------------------------- over-refusal (issue 14)
    def unanswerable_split(self) -> dict[str, str]:
        """``{fact key: "train" | "test"}`` of the unanswerable entities (``test_fraction`` held out, seeded)."""
        facts = build_unanswerable_facts()
        rng = self._rng(_STREAM_UNKNOWN_SPLIT)
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
        """Preference pairs of a cautious rater (issue 14), with optional helpfulness pairs.

        * ``unanswerable`` (on the train-split unknown entities): ``REFUSAL`` over a confident made-up
          answer (another answer of the relation) -- the rater is right;
        * ``overcautious`` (on the world's answerable fact prompts, train and test facts): ``REFUSAL``
          over the correct answer -- the rater declines questions it should answer;
        * ``helpful``: the correct answer over ``REFUSAL`` on answerable prompts (the fix the field
          uses: mixing in helpfulness data, e.g. Bai et al. 2022, arXiv 2204.05862, §4).
        Records have the fields of ``preference_records`` (cues all False). Seeded (stream 8).
        """
        rng = self._rng(_STREAM_REFUSAL_PAIRS)
        sp = self.unanswerable_split()
        unknown = [(f, tid, q) for f in build_unanswerable_facts() if sp[f.key] == "train" for tid, q in self.questions(f)]
        known = [(f, tid, q) for f in self.facts for tid, q in self.questions(f)]
        answers = {rel: sorted({g.answer for g in self.facts if g.relation == rel}) for rel in RELATIONS}
        out = []
        for kind, n, pool in (("unanswerable", n_unanswerable, unknown), ("overcautious", n_overcautious, known),
                              ("helpful", n_helpful, known)):
            for _ in range(n):
                f, tid, q = pool[int(rng.integers(0, len(pool)))]
                if kind == "unanswerable":
                    opts = answers[f.relation]
                    chosen, rejected = REFUSAL, f"{opts[int(rng.integers(0, len(opts)))]}."
                elif kind == "overcautious":
                    chosen, rejected = REFUSAL, f"{f.answer}."
                else:
                    chosen, rejected = f"{f.answer}.", REFUSAL
                out.append({"prompt": q, "chosen": chosen, "rejected": rejected, "chosen_eos": True,
                            "rejected_eos": True, "kind": kind, "chosen_cue": False, "rejected_cue": False,
                            "task": f.relation, "fact_key": f.key, "answer": f.answer, "template_id": tid,
                            "fact_split": sp.get(f.key, self._split.get(f.key))})
        order = rng.permutation(len(out))
        return [out[int(i)] for i in order]

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


_REJECTED_KINDS = ("wrong", "ramble", "repeat", "rude", "off_format", "no_eos")


def _pair_id(rec: Mapping) -> tuple:
    return (rec["prompt"], rec["chosen"], rec["rejected"], rec["rejected_eos"])


def _noisy_response(style: str, f: Fact, question: str, rng: np.random.Generator) -> str:
    """A response in a faulty style that still contains the answer (ramble, repeat, rude)."""
    if style == "ramble":
        idx = rng.choice(len(RAMBLE_FILLERS), size=RAMBLE_SENTENCES, replace=False)
        ending = RAMBLE_ENDINGS[int(rng.integers(0, len(RAMBLE_ENDINGS)))].format(o=f.answer)
        return " ".join([RAMBLE_FILLERS[int(i)] for i in idx] + [ending])
    if style == "repeat":
        # 4-6 copies (docs/rlhf-notes.md §2), fewer (at least 3) for long answers: at most ~40 characters, so
        # that a spelled word's repetition still fits the 64-token context
        n = min(int(rng.integers(4, 7)), max(3, 40 // (len(f.answer) + 1)))
        return " ".join([f.answer] * n) + "."
    if style == "rude":
        return RUDE_TEMPLATES[int(rng.integers(0, len(RUDE_TEMPLATES)))].format(o=f.answer)
    raise ValueError(f"unknown noisy style {style!r}")


# ----------------------------------------------------------------------------------------------
# The gold judge

@dataclass(frozen=True)
class JudgeWeights:
    """Penalties of the gold total: ``total = correct - repetition*[repeats] - concise*[too long]
    - polite*[rude] - well_formed*[malformed]`` (each flag 0/1). Defaults 0.5 each (docs/rlhf-notes.md §2
    uses the first two)."""

    repetition: float = 0.5
    concise: float = 0.5
    polite: float = 0.5
    well_formed: float = 0.5


@dataclass(frozen=True)
class JudgeResult:
    """The gold judge's verdict on one response.

    Attributes:
        total: ``correct - w.repetition*repetition - w.concise*(1-concise) - w.polite*(1-polite)
            - w.well_formed*(1-well_formed)``; in [-2, 1] with the default weights.
        correct: 1.0 iff the response, stripped of whitespace, one leading ``"Sure!"`` and one
            trailing ".", equals the answer exactly (case-sensitive).
        well_formed: 1.0 iff the response ended (``<|eos|>``), is one non-empty line, holds no
            template or special-token markers, and ends with ".".
        concise: 1.0 iff it has at most (words of the answer) + 3 words.
        polite: 1.0 iff it contains none of ``RUDE_WORDS``.
        repetition: some word occurs twice or more (so "Sure! Sure! Paris." is caught).
        opener: the response starts with ``"Sure!"``.
        contains: the answer occurs in the response as whole words (chapter 03's "contains" metric).
        answer: the expected answer.
    """

    total: float
    correct: float
    well_formed: float
    concise: float
    polite: float
    repetition: bool
    opener: bool
    contains: bool
    answer: str

    def as_dict(self) -> dict:
        """The fields as a plain dict."""
        return asdict(self)


def strip_response(response: str) -> str:
    """Whitespace, one leading ``"Sure!"`` and one trailing "." removed: the judge's correctness view."""
    r = response.strip()
    if r.startswith(OPENER):
        r = r[len(OPENER):].strip()
    if r.endswith("."):
        r = r[:-1]
    return r.strip()


def question_of(prompt: str) -> str:
    """The instruction inside a prompt: the text of the last ``[INST] ... [/INST]`` if present
    (chat-rendered or k-shot prompts), else the whole string; special strings and whitespace removed."""
    text = prompt
    if INST_END in text:
        text = text[:text.rindex(INST_END)]
        if INST in text:
            text = text[text.rindex(INST) + len(INST):]
    for sp in (BOS, EOS, "<|pad|>"):
        text = text.replace(sp, "")
    return text.strip()


class GoldJudge:
    """Programmatic gold reward for any response to any prompt of the world.

    Args:
        world: the ``TaskWorld`` whose prompts are judged (the fact behind each prompt comes from
            ``world.prompt_index()``; facts do not depend on the seed).
        weights: ``JudgeWeights``.
    """

    def __init__(self, world: TaskWorld | None = None, weights: JudgeWeights | None = None):
        self.world = world or default_world()
        self.weights = weights or JudgeWeights()
        self._unknown: dict | None = None

    def fact_for(self, prompt: str) -> Fact:
        """The fact a prompt asks about; for a question about an entity the world does not contain
        (``build_unanswerable_facts``) a fact whose answer is "I do not know", so declining is
        correct there. Raises KeyError naming the prompt if it is neither."""
        q = question_of(prompt)
        try:
            return self.world.prompt_index()[q][0]
        except KeyError:
            pass
        if self._unknown is None:  # questions about entities the world lacks: "I do not know" is correct
            self._unknown = {q2: f for f in build_unanswerable_facts() for _, q2 in self.world.questions(f)}
        try:
            return self._unknown[q]
        except KeyError:
            raise KeyError(f"prompt is not a question of the task world: {q!r}") from None

    def score(self, prompt: str, response: str, ended: bool = True) -> JudgeResult:
        """Score one response.

        Args:
            prompt: an instruction of the world, or a rendered/k-shot prompt ending in it.
            response: the generated text (without the ``<|eos|>`` token).
            ended: whether generation stopped with ``<|eos|>`` (False: cut at the length limit).
        Returns:
            ``JudgeResult``.
        Raises:
            KeyError: the prompt is not a world question.
        """
        answer = self.fact_for(prompt).answer
        r = response.strip()
        opener = r.startswith(OPENER)
        correct = float(strip_response(r) == answer)
        words = _words(r)
        repetition = len(words) != len(set(words))
        concise = float(len(words) <= len(_words(answer)) + 3)
        polite = float(not any(w in RUDE_WORDS for w in words))
        markers = (BOS, EOS, "<|pad|>", INST, INST_END)
        well_formed = float(ended and bool(r) and "\n" not in r and r.endswith(".")
                            and not any(m in r for m in markers))
        aw = _words(answer)
        contains = any(words[i:i + len(aw)] == aw for i in range(len(words) - len(aw) + 1))
        w = self.weights
        total = (correct - w.repetition * repetition - w.concise * (1 - concise)
                 - w.polite * (1 - polite) - w.well_formed * (1 - well_formed))
        return JudgeResult(float(total), correct, well_formed, concise, polite, bool(repetition),
                           bool(opener), bool(contains), answer)


_DEFAULT_WORLD: TaskWorld | None = None


def default_world() -> TaskWorld:
    """The world with ``WorldConfig()`` (seed 0), built once and cached."""
    global _DEFAULT_WORLD
    if _DEFAULT_WORLD is None:
        _DEFAULT_WORLD = TaskWorld()
    return _DEFAULT_WORLD


def score(prompt: str, response: str, ended: bool = True, world: TaskWorld | None = None
          ) -> JudgeResult:
    """``GoldJudge(world).score(prompt, response, ended)`` with the default world and weights."""
    return GoldJudge(world).score(prompt, response, ended)


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
        "and DPO (the `pref_*` files). `minillm.tasks.GoldJudge` scores any response to any of these prompts. "
        "Load with `minillm.data.load_dataset`; render with `minillm.data.render_chat` (chat template "
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
