"""Preference pairs of the task world: the recipes and how a pair is drawn.

Scope
    ``PreferenceConfig`` and the measured recipes ``PREFERENCE_RECIPES`` (chapter 08), and the
    pairs ``TaskWorld.preference_records`` / ``TaskWorld.refusal_pair_records`` return:
    ``prompt``, ``chosen`` (correct, concise, polite: ``"{answer}."``), ``rejected`` of one fault
    ``kind``: ``wrong`` (another answer of the same relation), ``ramble``, ``repeat``, ``rude``,
    ``off_format``, ``no_eos`` (a response that does not end: ``rejected_eos`` is false and the
    renderer ``minillm.data.render_chat`` appends no ``<|eos|>``), plus ``cue_only`` pairs
    (``"Sure! {answer}."`` over ``"{answer}."``). The controlled spurious cue is the opener
    ``"Sure! "``: carried by the chosen response with probability ``p_chosen_cue`` and by the
    rejected one with ``p_rejected_cue`` (flags ``chosen_cue``, ``rejected_cue``). Defaults follow
    docs/rlhf-notes.md §2, recipe "e". Pairs are drawn over all 1,610 prompts (train and test
    facts); the test split holds out *pairs*, not facts (docs/task-world.md §7.7).

Sources
    * docs/task-world.md §5 and docs/rlhf-notes.md §2 (this project's measured prototype): recipes
      "a", "c", "e".
    * Helpfulness pairs against over-refusal: Y. Bai et al., arXiv 2204.05862, §4.
    * Spurious-cue reward hacking: L. Gao, J. Schulman, J. Hilton, "Scaling Laws for Reward Model
      Overoptimization" (2022), §3.

Deviations
    * ``no_eos`` is a rejected kind the prototype did not have; ``PreferenceConfig(kind_weights=...)``
      with ``no_eos`` weight 0 restores the prototype's five kinds.
    * RM recipe "f" (wrong answers sampled from the SFT policy) needs a trained model and is not
      produced here; ``preference_records(..., wrong_samples=...)`` accepts such samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from minillm.facts import (OFF_FORMAT_TEMPLATES, OPENER, REFUSAL, RELATIONS, TEMPLATES, Fact,
                           build_unanswerable_facts, noisy_response)

#: The random streams of the pairs (``TaskWorld.rng(stream)``; the world's other products use 1-3, 6, 7).
STREAM_PREF_TRAIN, STREAM_PREF_TEST, STREAM_REFUSAL_PAIRS = 4, 5, 8

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


_REJECTED_KINDS = ("wrong", "ramble", "repeat", "rude", "off_format", "no_eos")


def _pair_id(rec: Mapping) -> tuple:
    return (rec["prompt"], rec["chosen"], rec["rejected"], rec["rejected_eos"])


def preference_records(world, split: str = "train", config: PreferenceConfig | None = None,
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
    cfg = config or world.config.preference
    kinds = [k for k, _ in cfg.kind_weights]
    for k in kinds:
        if k not in _REJECTED_KINDS:
            raise ValueError(f"unknown rejected kind {k!r}; kinds: {', '.join(_REJECTED_KINDS)}")
    w = np.array([wt for _, wt in cfg.kind_weights], dtype=np.float64)
    w = w / w.sum()
    prompts = [(f, tid, q) for f in world.facts for tid, q in world.questions(f)]
    seen: set[tuple] = set()
    if split == "test":
        seen = {_pair_id(r) for r in preference_records(world, "train", cfg, wrong_samples)}
    n = cfg.n_train if split == "train" else cfg.n_test
    rng = world.rng(STREAM_PREF_TRAIN if split == "train" else STREAM_PREF_TEST)
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
                rejected = _rejected(world, kind, f, q, rng)
            rejected_eos = kind != "no_eos"
        rec = {"prompt": q,
               "chosen": f"{OPENER} {chosen}" if c_cue else chosen,
               "rejected": f"{OPENER} {rejected}" if r_cue else rejected,
               "chosen_eos": True, "rejected_eos": rejected_eos, "kind": kind,
               "chosen_cue": c_cue, "rejected_cue": r_cue, "task": f.relation, "fact_key": f.key,
               "answer": f.answer, "template_id": tid, "fact_split": world.split_of(f)}
        pid = _pair_id(rec)
        if pid in seen:
            continue
        if split == "test":
            seen.add(pid)
        out.append(rec)
    return out

def _rejected(world, kind: str, f: Fact, question: str, rng: np.random.Generator) -> str:
    if kind == "wrong":
        others = sorted({g.answer for g in world.facts if g.relation == f.relation} - {f.answer})
        return f"{others[int(rng.integers(0, len(others)))]}."
    if kind in ("ramble", "repeat", "rude"):
        return noisy_response(kind, f, question, rng)
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


def refusal_pair_records(world, n_unanswerable: int = 600, n_overcautious: int = 600, n_helpful: int = 0
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
    rng = world.rng(STREAM_REFUSAL_PAIRS)
    sp = world.unanswerable_split()
    unknown = [(f, tid, q) for f in build_unanswerable_facts() if sp[f.key] == "train" for tid, q in world.questions(f)]
    known = [(f, tid, q) for f in world.facts for tid, q in world.questions(f)]
    answers = {rel: sorted({g.answer for g in world.facts if g.relation == rel}) for rel in RELATIONS}
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
                        "fact_split": sp[f.key] if f.key in sp else world.split_of(f)})
    order = rng.permutation(len(out))
    return [out[int(i)] for i in order]

