"""The gold judge: a programmatic score of any response to any prompt of the task world.

Scope
    ``GoldJudge.score`` (chapter 03 onward): ``correct`` (after ``facts.strip_response``: one
    leading opener and one trailing "." removed), ``well_formed``, ``concise``, ``polite``, flags
    ``repetition``, ``opener``, ``contains`` and a ``total``. It is the "gold" reward the
    reward-model, PPO and DPO chapters compare a learned reward against.

Sources
    * docs/task-world.md and docs/rlhf-notes.md §2 (this project's prototype): the prototype's
      score ``correct - 0.5*[repeat] - 0.5*[long]``.
    * Gold vs proxy reward: L. Gao, J. Schulman, J. Hilton, "Scaling Laws for Reward Model
      Overoptimization" (2022), §3.

Deviations
    * The gold total adds rudeness and form penalties to the prototype's score; restore the
      prototype's with ``GoldJudge(world, weights=JudgeWeights(polite=0.0, well_formed=0.0))``.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from minillm.facts import (BOS, EOS, INST, INST_END, OPENER, RUDE_WORDS, Fact, build_unanswerable_facts,
                           strip_response)
from minillm.tasks import TaskWorld, default_world


def _words(text: str) -> list[str]:
    """Lower-case words of ``text``; hyphenated spellings (``t-i-g-e-r``) are one word."""
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", text.lower())


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


def score(prompt: str, response: str, ended: bool = True, world: TaskWorld | None = None
          ) -> JudgeResult:
    """``GoldJudge(world).score(prompt, response, ended)`` with the default world and weights."""
    return GoldJudge(world).score(prompt, response, ended)
