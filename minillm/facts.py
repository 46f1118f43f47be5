"""The task world's content: its facts, the prose and question templates, and the response phrasings.

Scope
    The data the built-in task world (``minillm.tasks``) is made of, with no randomness and no
    model: six relations, 322 facts (docs/task-world.md §2): ``capital`` (44 countries),
    ``opposite`` (40 word pairs = 80 directed facts), ``sound`` (26 animals), ``colour``
    (32 things, 10 distinct colours), ``add`` (a + b for a, b in 0..9: 100 facts, digits) and
    ``spell`` (40 common words, answer ``t-i-g-e-r``); the templates that mention them (10
    declarative + 3 quiz-prose per relation, 5 SFT questions + 1 held-out paraphrase question);
    the faulty phrasings (ramble, repeat, rude, off-format) of noisy demonstrations and rejected
    responses; the entities the world does not contain (over-refusal, issue 14); the chat strings;
    and the answer convention ``strip_response`` ("Sure! Paris." and "Paris" both answer "Paris").

Sources
    * docs/task-world.md and docs/rlhf-notes.md (this project's measured PyTorch prototype):
      relations, sizes, templates, the noisy styles of SFT recipe "g".
    * Knowledge storage vs extraction and the role of paraphrased mentions: Z. Allen-Zhu, Y. Li,
      "Physics of Language Models: Part 3.1, Knowledge Storage and Extraction" (2023), §4-§5.

Deviations
    * A 6th, held-out question template per relation (the paraphrase split) is added to the
      prototype's 5.
    * Rambles have 2 filler sentences before the answer (the prototype: 3), so that every
      preference pair fits the 64-token context of the default model; ``RAMBLE_SENTENCES = 3``
      restores the prototype's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def strip_response(response: str) -> str:
    """Whitespace, one leading ``"Sure!"`` and one trailing "." removed: the judge's correctness view."""
    r = response.strip()
    if r.startswith(OPENER):
        r = r[len(OPENER):].strip()
    if r.endswith("."):
        r = r[:-1]
    return r.strip()



def is_refusal(response: str) -> bool:
    """The response declines: after ``strip_response`` it is "I don't know" or "I do not know" (any case)."""
    return strip_response(response).lower() in ("i don't know", "i do not know")


def noisy_response(style: str, f: Fact, question: str, rng: np.random.Generator) -> str:
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

