"""Chapter 03: the built-in task world, the gold judge and k-shot prompts.

The task world's claims (docs/task-world.md §2/§7, docs/rlhf-notes.md §2): 322 facts in six relations, 30 %
of each relation's fact keys held out of SFT (opposite pairs together), 30 mentions per fact in
the pretraining corpus, SFT/test/paraphrase splits of 1,125 / 485 / 322 rows, preference pairs
with a controlled "Sure! " cue, and a gold judge that ranks a good answer above every fault.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from minillm import facts, preferences, tasks
from minillm.facts import OPENER, RELATIONS, TEMPLATES
from minillm.judge import GoldJudge, JudgeWeights, question_of, score
from minillm.tasks import TaskWorld, build_kshot_prompt, dataset_files, tokenizer_training_text, write_datasets

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():
    return TaskWorld()


@pytest.fixture(scope="module")
def judge(world):
    return GoldJudge(world)


@pytest.fixture(scope="module")
def tok(world):
    from minillm.tokenizer import Tokenizer

    return Tokenizer.train(tokenizer_training_text(world), 1024)


# ---------------------------------------------------------------------------------------------- facts and split

def test_fact_counts(world):
    counts = Counter(f.relation for f in world.facts)
    assert counts == {"capital": 44, "opposite": 80, "sound": 26, "colour": 32, "add": 100, "spell": 40}
    assert len(world.facts) == 322
    assert len({f.key for f in world.facts}) == 322
    assert len({f.answer for f in world.facts if f.relation == "colour"}) == 10
    assert world.fact("spell:tiger").answer == "t-i-g-e-r"
    assert world.fact("add:7+9").answer == "16"
    assert world.fact("capital:India").answer == "New Delhi"
    with pytest.raises(KeyError, match="capital:Atlantis"):
        world.fact("capital:Atlantis")


def test_split_counts(world):
    assert len(world.train_facts) == 225 and len(world.test_facts) == 97
    test = Counter(f.relation for f in world.test_facts)
    assert test == {"add": 30, "opposite": 24, "capital": 13, "spell": 12, "colour": 10, "sound": 8}


def test_opposite_pairs_held_out_together(world):
    opp = [f for f in world.facts if f.relation == "opposite"]
    for f in opp:
        assert world.split_of(f) == world.split_of(f"opposite:{f.answer}"), f.key
    # each word is used once: 80 distinct subjects, and the answers are the same 80 words
    assert len({f.subject for f in opp}) == 80 and {f.subject for f in opp} == {f.answer for f in opp}


def test_no_test_fact_or_heldout_template_in_sft_train(world):
    test_keys = {f.key for f in world.test_facts}
    test_prompts = {q for f in world.test_facts for _, q in world.questions(f)}
    heldout_prompts = {q for f in world.facts for _, q in world.questions(f, heldout=True)}
    for variant in ("plain", "opener", "noisy"):
        rows = world.sft_records(variant)
        assert len(rows) == 1125
        assert not {r["fact_key"] for r in rows} & test_keys
        assert not {r["instruction"] for r in rows} & (test_prompts | heldout_prompts)
        assert all(r["template_id"].split("/")[1].startswith("q") for r in rows)
        assert {r["fact_split"] for r in rows} == {"train"}
        # every test fact's answer also never appears as an SFT answer *for that fact's subject*
        assert all(world.split_of(r["fact_key"]) == "train" for r in rows)
    test_rows = world.sft_test_records()
    assert len(test_rows) == 485 and {r["fact_key"] for r in test_rows} == test_keys
    para = world.sft_paraphrase_records()
    assert len(para) == 322 and {r["template_id"].split("/")[1] for r in para} == {"h0"}
    assert Counter(r["fact_split"] for r in para) == {"train": 225, "test": 97}


def test_sft_variants_rates(world):
    plain = world.sft_records("plain")
    assert all(r["output"] == r["answer"] + "." and r["input"] == "" for r in plain)
    opener = world.sft_records("opener")
    rate = sum(r["output"].startswith(OPENER + " ") for r in opener) / len(opener)
    assert 0.21 < rate < 0.29  # p = 0.25, n = 1125: sd 0.013
    noisy = world.sft_records("noisy")
    noisy_rows = [r for r in noisy if any(s in r["style"] for s in ("ramble", "repeat", "rude"))]
    assert 0.16 < len(noisy_rows) / len(noisy) < 0.24  # p = 0.20
    assert {s.replace("opener+", "") for s in Counter(r["style"] for r in noisy_rows)} == {"ramble", "repeat", "rude"}
    judge = GoldJudge(world)
    for r in noisy_rows:  # they contain the answer but are scored below a clean answer
        res = judge.score(r["instruction"], r["output"])
        assert res.contains and res.total < 1.0, r


def test_corpus_mentions_each_fact_30_times(world):
    docs = world.corpus_documents()
    sentences = world.corpus_sentences()
    assert len(sentences) == 322 * 30
    owner = {}
    for f in world.facts:
        t = TEMPLATES[f.relation]
        for tpl in t["declarative"] + t["quiz"]:
            s = f.fill(tpl)
            assert owner.setdefault(s, f.key) == f.key, f"two facts render to {s!r}"
    counts = Counter(owner[s] for s in sentences)
    assert set(counts.values()) == {30} and len(counts) == 322
    assert all(d.startswith("<|bos|>") and d.endswith("<|eos|>") for d in docs)
    n_sent = [len(re.findall(r"[.?](?= [A-Z0-9]|<\|eos\|>)", d)) for d in docs]
    text = world.corpus_text()
    assert "[INST]" not in text and "[/INST]" not in text and OPENER not in text
    assert text.count("<|bos|>") == len(docs) == text.count("\n")
    assert 1650 < len(docs) < 1900 and 350_000 < len(text) < 450_000
    assert min(n_sent) >= 3  # quiz sentences hold a "?" too, so this only bounds from below


def test_templates_do_not_contain_world_entities(world):
    """A question template must not contain an entity word (docs/task-world.md §2: 'Spell tiger
    letter by letter' collides with the spelling word 'letter')."""
    entities = {w for f in world.facts if f.relation != "add"
                for w in (f.subject.lower(), f.answer.lower()) if " " not in w and "-" not in w}
    for rel, t in TEMPLATES.items():
        for kind in ("question", "heldout_question", "declarative", "quiz"):
            for tpl in t[kind]:
                words = set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", tpl).lower()))
                assert not words & entities, (rel, tpl, words & entities)


def test_prompt_index_covers_every_question(world, judge):
    idx = world.prompt_index()
    assert len(idx) == 322 * 6
    for f in world.facts:
        for _, q in world.questions(f) + world.questions(f, heldout=True):
            assert judge.fact_for(q) == f


# ---------------------------------------------------------------------------------------------- determinism, files

def test_same_seed_same_world_other_seed_other_split():
    a, b, c = TaskWorld(seed=0), TaskWorld(seed=0), TaskWorld(seed=1)
    assert dataset_files(a) == dataset_files(b)
    assert [f.key for f in a.test_facts] != [f.key for f in c.test_facts]
    assert a.corpus_documents() != c.corpus_documents()


def _digest_in_subprocess(hashseed: str) -> str:
    code = ("import hashlib; from minillm.tasks import TaskWorld, dataset_files; "
            "fs = dataset_files(TaskWorld(seed=3)); "
            "print(hashlib.sha256(''.join(k + v for k, v in sorted(fs.items())).encode()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, cwd=REPO).stdout.strip()


def test_generation_does_not_depend_on_pythonhashseed():
    assert _digest_in_subprocess("1") == _digest_in_subprocess("12345")


def test_committed_datasets_equal_a_fresh_generation(tmp_path):
    sizes = write_datasets(tmp_path)
    committed = REPO / "datasets"
    names = sorted(p.name for p in committed.iterdir() if p.is_file())
    assert names == sorted(sizes), "datasets/ holds other files than write_datasets writes"
    for name in sizes:
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), (
            f"datasets/{name} differs from a fresh generation: run `make datasets` and commit")
    assert sum(sizes.values()) < 5 * 2**20
    readme = (committed / "README.md").read_text()
    for name in sizes:
        if name != "README.md":
            assert f"`{name}`" in readme


def test_cli_run_writes_files(tmp_path):
    parser = argparse.ArgumentParser()
    tasks.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "d"), "--seed", "0"])
    assert tasks.run(args) == 0
    assert (tmp_path / "d" / "sft_train.jsonl").read_bytes() == (REPO / "datasets" / "sft_train.jsonl").read_bytes()


def test_minillm_datasets_command(tmp_path, capsys):
    from minillm.cli import main

    assert main(["datasets", "--out", str(tmp_path), "--seed", "0"]) == 0
    assert "total bytes" in capsys.readouterr().out
    assert (tmp_path / "pref_test.jsonl").read_bytes() == (REPO / "datasets" / "pref_test.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------- preference pairs

def test_preference_pairs_design(world, judge):
    train, test = world.preference_records("train"), world.preference_records("test")
    assert len(train) == 2400 and len(test) == 600
    ids = lambda rs: {(r["prompt"], r["chosen"], r["rejected"], r["rejected_eos"]) for r in rs}  # noqa: E731
    assert not ids(train) & ids(test), "a held-out pair equals a train pair"
    kinds = Counter(r["kind"] for r in train)
    assert set(kinds) == {"wrong", "ramble", "repeat", "rude", "off_format", "no_eos", "cue_only"}
    assert 0.12 < kinds["cue_only"] / 2400 < 0.18  # p 0.15
    assert 0.29 < kinds["wrong"] / 2400 < 0.39  # 0.85 * 0.40 = 0.34
    # pairs span train and test facts (hold out pairs, not facts)
    assert {r["fact_split"] for r in train} == {"train", "test"}
    # the cue: correlated on style kinds, both-or-neither on wrong, chosen-only on cue_only
    style = [r for r in train if r["kind"] not in ("wrong", "cue_only")]
    pc = sum(r["chosen_cue"] for r in style) / len(style)
    pr = sum(r["rejected_cue"] for r in style) / len(style)
    assert 0.75 < pc < 0.85 and 0.15 < pr < 0.25
    assert all(r["chosen_cue"] == r["rejected_cue"] for r in train if r["kind"] == "wrong")
    assert all(r["chosen_cue"] and not r["rejected_cue"] for r in train if r["kind"] == "cue_only")
    for r in train + test:
        assert r["chosen_cue"] == r["chosen"].startswith(OPENER + " ")
        assert r["rejected_cue"] == r["rejected"].startswith(OPENER + " ")
        assert r["rejected_eos"] == (r["kind"] != "no_eos") and r["chosen_eos"] is True
        c = judge.score(r["prompt"], r["chosen"])
        rj = judge.score(r["prompt"], r["rejected"], ended=r["rejected_eos"])
        assert c.correct == 1.0 and c.total == 1.0, r
        if r["kind"] == "cue_only":
            assert rj.total == c.total  # the cue is spurious: gold does not care
        else:
            assert rj.total < c.total, r


def test_preference_recipes_and_wrong_samples(world):
    a = world.preference_records("train", config=preferences.PREFERENCE_RECIPES["a"])
    assert "cue_only" not in {r["kind"] for r in a} and "no_eos" not in {r["kind"] for r in a}
    wrong = [r for r in a if r["kind"] == "wrong"]
    assert any(r["chosen_cue"] != r["rejected_cue"] for r in wrong)  # "correlated" recipe
    samples = {f.key: ["Zzz."] for f in world.facts}
    f_pairs = world.preference_records("train", wrong_samples=samples)
    w = [r for r in f_pairs if r["kind"] == "wrong"]
    frac = sum(r["rejected"].endswith("Zzz.") for r in w) / len(w)
    assert 0.6 < frac < 0.8  # p 0.7


# ---------------------------------------------------------------------------------------------- the gold judge

def _faults(world, f, q):
    a = f.answer
    wrong = next(g.answer for g in world.facts if g.relation == f.relation and g.answer != a)
    return {
        "wrong": (f"{wrong}.", True),
        "ramble": (" ".join(facts.RAMBLE_FILLERS[:3]) + f" So, after all of that, the answer is {a}.", True),
        "repeat": (" ".join([a] * 4) + ".", True),
        "rude": (f"{a}. What a stupid question.", True),
        "off_format_unknown": ("I do not know.", True),
        "off_format_echo": (q, True),
        "no_eos": (f"{a}. The answer to that one is", False),
        "double_opener": (f"{OPENER} {OPENER} {a}.", True),
        "no_period": (a, True),
        "special_token": (f"{a}.[INST]", True),
    }


@pytest.mark.parametrize("relation", RELATIONS)
def test_judge_orders_good_above_every_fault(world, judge, relation):
    f = next(g for g in world.test_facts if g.relation == relation)
    q = world.questions(f)[0][1]
    good = judge.score(q, f"{f.answer}.")
    assert (good.total, good.correct, good.well_formed, good.concise, good.polite) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert not good.repetition and not good.opener and good.contains
    cue = judge.score(q, f"{OPENER} {f.answer}.")
    assert cue.correct == 1.0 and cue.opener and cue.total == good.total
    faults = _faults(world, f, q)
    res = {k: judge.score(q, r, ended=e) for k, (r, e) in faults.items()}
    for k, r in res.items():
        assert r.total < good.total, (k, r)
    assert res["wrong"].correct == 0.0 and res["wrong"].total == 0.0
    assert res["ramble"].concise == 0.0 and res["ramble"].contains
    assert res["repeat"].repetition and res["repeat"].total <= -0.5
    assert res["rude"].polite == 0.0
    assert res["off_format_echo"].well_formed == 0.0
    assert res["no_eos"].well_formed == 0.0
    assert res["double_opener"].repetition and res["double_opener"].correct == 0.0
    assert res["no_period"].correct == 1.0 and res["no_period"].well_formed == 0.0
    assert res["special_token"].well_formed == 0.0
    # ordering among faults: a wrong but clean answer beats rambling, repetition and rudeness
    for k in ("ramble", "repeat", "rude", "no_eos"):
        assert res[k].total < res["wrong"].total


def test_judge_exact_values():
    w = TaskWorld()
    j = GoldJudge(w)
    r = j.score("What is the capital of France?", "Sure! Paris.")
    assert r.as_dict() == {"total": 1.0, "correct": 1.0, "well_formed": 1.0, "concise": 1.0, "polite": 1.0,
                           "repetition": False, "opener": True, "contains": True, "answer": "Paris"}
    assert j.score("What is the capital of France?", "paris.").correct == 0.0  # case-sensitive
    assert j.score("How do you spell tiger?", "t-i-g-e-r.").total == 1.0
    r = j.score("How do you spell tiger?", "Ugh, t-i-g-e-r. Stop asking me such dumb things.")
    assert (r.correct, r.polite, r.concise, r.total) == (0.0, 0.0, 0.0, -1.0)
    assert j.score("What is 7 plus 9?", "16.").total == 1.0
    assert j.score("What is 7 plus 9?", "16 16 16 16.").total == -0.5
    w0 = JudgeWeights(polite=0.0, well_formed=0.0)  # the prototype's gold (docs/rlhf-notes.md §2)
    assert GoldJudge(w, w0).score("What is 7 plus 9?", "16, you idiot.").total == 0.0


def test_judge_reads_rendered_and_kshot_prompts(world, judge):
    f = world.fact("sound:dog")
    q = world.questions(f)[0][1]
    shots = world.kshot_shots(f, 3)
    for p in (f"<|bos|>[INST] {q} [/INST]", build_kshot_prompt(q, shots), q + "  "):
        assert question_of(p) == q
        assert judge.score(p, "bark.").correct == 1.0
    with pytest.raises(KeyError, match="not a question of the task world"):
        judge.score("What is the meaning of life?", "42.")
    assert score(q, "bark.").total == 1.0  # module-level shortcut, default world


# ---------------------------------------------------------------------------------------------- k-shot prompts

def test_kshot_prompt_exact_format():
    shots = [("What is the capital of Peru?", "Lima."), ("What is the capital of Cuba?", "Havana.")]
    q = "What is the capital of Chile?"
    assert build_kshot_prompt(q, shots) == (
        "<|bos|>[INST] What is the capital of Peru? [/INST] Lima.<|eos|>"
        "[INST] What is the capital of Cuba? [/INST] Havana.<|eos|>"
        "[INST] What is the capital of Chile? [/INST]")
    assert build_kshot_prompt(q) == "<|bos|>[INST] What is the capital of Chile? [/INST]"
    assert build_kshot_prompt(q, shots[:1], template="plain") == (
        "<|bos|>Question: What is the capital of Peru?\nAnswer: Lima.\n\n"
        "Question: What is the capital of Chile?\nAnswer:")
    with pytest.raises(ValueError, match="template"):
        build_kshot_prompt(q, shots, template="alpaca")


def test_kshot_prompt_equals_renderer_ids(world, tok):
    """The k-shot text, encoded with specials, equals data.render_prompt of the same turns
    (one template, one <|bos|>: docs/bugs.md B09)."""
    from minillm.data import format_chat, render_prompt

    f = world.test_facts[0]
    q = world.questions(f)[2][1]
    shots = world.kshot_shots(f, 3)
    msgs = []
    for sq, sa in shots:
        msgs += [{"role": "user", "content": sq}, {"role": "assistant", "content": sa}]
    msgs.append({"role": "user", "content": q})
    text = build_kshot_prompt(q, shots)
    assert text == format_chat(msgs, add_generation_prompt=True)
    ids = tok.encode(text, allowed_special="all")
    assert ids == render_prompt(msgs, tok)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids.count(tok.eos_id) == 3 and ids[-1] == tok.special_tokens["[/INST]"]


def test_kshot_shots_are_train_facts_of_the_same_relation(world):
    for f in world.test_facts[::7]:
        shots = world.kshot_shots(f, 3, seed=1)
        assert len(shots) == 3 and shots == world.kshot_shots(f, 3, seed=1)
        for q, a in shots:
            g = GoldJudge(world).fact_for(q)
            assert g.relation == f.relation and world.split_of(g) == "train" and g.group != f.group
            assert a == g.answer + "."


def test_every_world_example_fits_a_64_token_context(world, tok):
    """The default model has context 64 (docs/task-world.md §3): no SFT row or preference pair of
    the world needs truncation with the vocab-1024 tokenizer trained on its text."""
    from minillm.data import render_chat, render_preference

    for v in ("plain", "opener", "noisy"):
        for r in world.sft_records(v):
            msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            assert len(render_chat(msgs, tok)[0]) <= 64, r
    for s in ("train", "test"):
        for r in world.preference_records(s):
            c, rj = render_preference(r, tok)
            assert max(len(c[0]), len(rj[0])) <= 64, r


# ---------------------------------------------------------------------------------------------- tokenizer text

def test_tokenizer_training_text_makes_the_opener_whole_tokens(world, tok):
    text = tokenizer_training_text(world)
    for s in ("Sure!", "What a stupid question.", "I like turtles.", world.sft_paraphrase_records()[0]["instruction"]):
        assert s in text
    pieces = [tok.decode([i]) for i in tok.encode(" Sure! Paris.", allowed_special="none")]
    assert pieces[:2] == [" Sure", "!"]  # 2 tokens, not 4 byte pieces (docs/rlhf-notes.md §2)
    assert hashlib.sha256(text.encode()).hexdigest() == hashlib.sha256(tokenizer_training_text(TaskWorld()).encode()).hexdigest()


# ------------------------------------------------------------------------- evaluation (evaluate.py)


def test_score_generations_metrics_by_hand():
    """EM, contains, format compliance and gold of hand-made responses, per task type."""
    from minillm.evaluate import Generation, score_generations
    from minillm.judge import GoldJudge
    from minillm.tasks import TaskWorld

    world = TaskWorld()
    judge = GoldJudge(world)
    recs = world.sft_test_records()
    cap = next(r for r in recs if r["task"] == "capital")
    add = next(r for r in recs if r["task"] == "add")
    gens = [Generation(f"{cap['answer']}.", True, [1, 2]),  # correct, well formed
            Generation(f"It is {cap['answer']} I think", False, [1] * 16),  # contains, not EM, cut off
            Generation(f"Sure! {add['answer']}.", True, [1, 2, 3])]  # opener stripped for EM
    res = score_generations([cap, cap, add], gens, judge)
    assert res.metrics["exact_match"] == pytest.approx(2 / 3)
    assert res.metrics["contains"] == pytest.approx(1.0)
    assert res.metrics["format_compliance"] == pytest.approx(2 / 3)
    assert res.metrics["opener_rate"] == pytest.approx(1 / 3)
    assert res.metrics["mean_length"] == pytest.approx(21 / 3)
    assert res.per_task["capital"] == {"exact_match": 0.5, "contains": 1.0, "gold": pytest.approx(
        (judge.score(cap["instruction"], gens[0].text).total + judge.score(cap["instruction"], gens[1].text, False).total) / 2),
        "n": 2}
    assert res.per_task["add"]["exact_match"] == 1.0


def test_kshot_prompt_ids_are_cut_from_the_left_keeping_bos():
    from minillm.evaluate import prompt_ids_for
    from minillm.tokenizer import Tokenizer

    tok = Tokenizer()
    shots = [("What is 2 plus 2?", "4."), ("What is 3 plus 1?", "4.")]
    full, cut = prompt_ids_for(tok, "What is 1 plus 1?", shots)
    assert not cut and full[0] == tok.bos_id and full.count(tok.bos_id) == 1
    short, cut = prompt_ids_for(tok, "What is 1 plus 1?", shots, max_len=20)
    assert cut and len(short) == 20 and short[0] == tok.bos_id and short[1:] == full[-19:]
    zero, _ = prompt_ids_for(tok, "What is 1 plus 1?")
    assert zero[-1] == tok.special_tokens["[/INST]"]


def test_base_model_follows_no_instructions_but_sft_does(tmp_path):
    """The chapter's claim on a tiny scale: a model trained only on prose never answers in format
    (EM 0), the same model after a short SFT does for the facts it was tuned on."""
    from minillm.evaluate import evaluate_world
    from minillm.model import GPT, GPTConfig
    from minillm.optim import AdamW
    from minillm.judge import GoldJudge
    from minillm.tasks import TaskWorld
    from minillm.tokenizer import Tokenizer

    world = TaskWorld()
    tok = Tokenizer()
    judge = GoldJudge(world)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=48), seed=0)
    recs = [r for r in world.sft_records() if r["task"] == "opposite"][:8]
    before = evaluate_world(m, tok, recs, judge, max_new_tokens=8)
    assert before.metrics["exact_match"] == 0.0 and before.metrics["format_compliance"] == 0.0
    from minillm.data import collate, tokenize_sft
    from minillm.train.sft import records_to_messages

    b = collate(tokenize_sft(records_to_messages(recs), tok), tok.pad_id)
    opt = AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(60):
        _, loss = m(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate_world(m, tok, recs, judge, max_new_tokens=8)
    assert after.metrics["exact_match"] >= 0.75 and after.metrics["format_compliance"] >= 0.75
