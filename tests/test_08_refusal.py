"""Chapter 08: over-refusal data of the task world (issue 14): unanswerable questions about entities
the world does not contain, the cautious rater's pairs, the helpfulness pairs, and the gold judge
on them (minillm.tasks)."""
from __future__ import annotations

import pytest

from minillm.facts import REFUSAL, build_facts, build_unanswerable_facts, is_refusal
from minillm.judge import GoldJudge
from minillm.tasks import TaskWorld, default_world

pytestmark = pytest.mark.ch08


def test_unanswerable_entities_are_absent_from_the_world_and_its_corpus():
    world = default_world()
    known = {f.subject for f in build_facts()}
    corpus = world.corpus_text()
    for f in build_unanswerable_facts():
        assert f.subject not in known
        assert f.subject not in corpus
    prompts = world.prompt_index()
    assert not any(r["instruction"] in prompts for s in ("train", "test") for r in world.unanswerable_records(s))


def test_unanswerable_split_holds_out_whole_entities_and_is_seeded():
    w = default_world()
    tr, te = w.unanswerable_records("train"), w.unanswerable_records("test")
    assert (len(tr), len(te)) == (90, 40)  # 26 entities x 5 templates; 8 entities held out
    assert not {r["fact_key"] for r in tr} & {r["fact_key"] for r in te}
    assert TaskWorld(seed=0).unanswerable_records("test") == te
    with pytest.raises(ValueError, match="split"):
        w.unanswerable_records("dev")


def test_gold_judge_scores_declining_correct_only_where_the_world_has_no_answer():
    j = GoldJudge(default_world())
    q = default_world().unanswerable_records("test")[0]["instruction"]
    assert j.score(q, REFUSAL).total == 1.0 and j.score(q, REFUSAL).correct == 1.0
    assert j.score(q, "Paris.").correct == 0.0
    assert j.score("What is the capital of France?", REFUSAL).correct == 0.0
    assert j.score("What is the capital of France?", "Paris.").total == 1.0
    with pytest.raises(KeyError, match="not a question"):
        j.score("What is the capital of Atlantis and Mars?", REFUSAL)


def test_is_refusal():
    assert is_refusal("I don't know.") and is_refusal(" Sure! I do not know.") and is_refusal("i don't know")
    assert not is_refusal("Paris.") and not is_refusal("I don't know Paris.")


def test_refusal_pairs_carry_each_rater_label():
    w = default_world()
    recs = w.refusal_pair_records(20, 30, 40)
    kinds = {k: [r for r in recs if r["kind"] == k] for k in ("unanswerable", "overcautious", "helpful")}
    assert [len(v) for v in kinds.values()] == [20, 30, 40]
    train_unknown = {r["fact_key"] for r in w.unanswerable_records("train")}
    for r in kinds["unanswerable"]:
        assert r["chosen"] == REFUSAL and r["fact_key"] in train_unknown and not is_refusal(r["rejected"])
    for r in kinds["overcautious"]:
        assert r["chosen"] == REFUSAL and r["rejected"] == f"{r['answer']}."
    for r in kinds["helpful"]:
        assert r["rejected"] == REFUSAL and r["chosen"] == f"{r['answer']}."
    assert w.refusal_pair_records(20, 30, 40) == recs  # seeded


def test_refusal_ppo_prompts_mix_in_a_quarter_of_train_entity_unanswerable_questions(tmp_path):
    from minillm.alignment import refusal_ppo_prompts
    from minillm.train.ppo import read_prompts, world_prompts

    w = default_world()
    lines = read_prompts(refusal_ppo_prompts(tmp_path))
    answerable, _ = world_prompts()
    train_unknown = {r["instruction"] for r in w.unanswerable_records("train")}
    test_unknown = {r["instruction"] for r in w.unanswerable_records("test")}
    unknown = [q for q in lines if q in train_unknown]
    assert lines[:len(answerable)] == answerable and len(lines) == len(answerable) + len(unknown)
    assert set(unknown) == train_unknown and not test_unknown & set(lines)  # held-out entities stay out
    assert abs(len(unknown) / len(lines) - 0.25) < 0.02
    assert len(read_prompts(refusal_ppo_prompts(tmp_path, 0.5))) > 2 * len(answerable) - 100
    with pytest.raises(ValueError, match="unanswerable_fraction"):
        refusal_ppo_prompts(tmp_path, 1.0)
