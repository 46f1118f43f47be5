"""Chapter 13: retrieval (BM25, TF-IDF, recall@k), the new-knowledge world, the reader prompt, RAG with
"no matching passage", the ``minillm rag`` command, and a small end-to-end run (RAG answers new facts the
closed-book model cannot). Formulas and reference values: docs/reference.md §11."""
from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest

from conftest import require
from minillm import rag, rag_experiments
from minillm.judge import GoldJudge
from minillm.knowledge import (ABSENT_FACTS, ABSTAIN, EVAL_TEMPLATES, NEW_FACTS, TRAIN_TEMPLATES, KnowledgeWorld,
                               paraphrases)
from minillm.retrieval import BM25Index, DenseIndex, TfidfIndex, analyze, recall_at_k

HAND = ["cat sat", "cat cat dog", "bird"]  # N = 3, lengths 2, 3, 1, avgdl = 2


@pytest.fixture(scope="module")
def tiny_reader():
    """A 2-layer, 32-wide GPT trained from scratch (~25 s on 2 busy cores) to read: 1,500 questions about
    random pairings of invented countries and cities, each with the passage that states the pairing, so
    copying from the passage is the only way to answer. The pairings of the chapter's new capitals never
    occur in training; their names do (as parts of other pairings), so the tokenizer knows them.
    Returns (model, tokenizer, seconds)."""
    from minillm.knowledge import make_fact
    from minillm.model import GPT, GPTConfig
    from minillm.tokenizer import Tokenizer

    t0 = time.perf_counter()
    world = KnowledgeWorld()
    rng = np.random.default_rng(0)
    new = [f for f in NEW_FACTS if f.relation == "capital"]
    syllables = ("ka", "lo", "ver", "mi", "dra", "sen", "tor", "pa", "lu", "nek", "ri", "bo", "sta", "fen", "gor",
                 "li", "mar", "qui", "zen", "tha", "wel", "dun", "cas", "pol", "vik", "rem", "sal", "ost")
    names = [f.subject for f in new] + [f.answer for f in new]
    while len(names) < 60:
        name = "".join(syllables[int(i)] for i in rng.integers(0, len(syllables), size=2)).capitalize()
        if name not in names:
            names.append(name)
    test_pairs = {(f.subject, f.answer) for f in new}
    rows = []
    while len(rows) < 1500:
        a, b = (names[int(i)] for i in rng.choice(len(names), 2, replace=False))
        if (a, b) in test_pairs:
            continue
        f = make_fact("capital", a, b)
        _, q = world.questions(f)[int(rng.integers(0, 5))]
        rows.append({"instruction": rag.reader_content(q, [world.passage(f)]), "output": f"{b}."})
    tok = Tokenizer.train("\n".join(r["instruction"] + " " + r["output"] for r in rows), 420)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32), seed=0)
    model, _ = rag_experiments.finetune(model, tok, rows, steps=300, lr=1e-2, batch_size=16)
    return model, tok, time.perf_counter() - t0


# ------------------------------------------------------------------------------------ retrieval

def test_bm25_equals_hand_computed_scores():
    ix = BM25Index(HAND, k1=1.5, b=0.75, analyzer=lambda t: analyze(t, frozenset()))
    idf_cat = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # ln 1.6, Lucene form
    idf_sat = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))  # ln (8/3)
    # doc 0: f=1, |d|=2 -> 1*2.5/(1 + 1.5*(0.25 + 0.75*1)) = 1; doc 1: f=2, |d|=3 -> 5/(2 + 1.5*1.375)
    assert ix.avgdl == 2.0
    s = ix.scores("cat")
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, [idf_cat * 1.0, idf_cat * 5 / 4.0625, 0.0], rtol=1e-12)
    np.testing.assert_allclose(ix.scores("cat sat")[0], idf_cat + idf_sat, rtol=1e-12)
    assert ix.search("cat", k=2) == [(1, pytest.approx(0.578466, abs=1e-6)), (0, pytest.approx(0.470004, abs=1e-6))]
    np.testing.assert_allclose(ix.scores("cat cat"), 2 * ix.scores("cat"))  # query terms count with repetition
    assert not ix.scores("unicorn").any()  # a word of no passage adds 0


def test_okapi_idf_floors_terms_in_most_passages():
    docs = ["cat a", "cat b", "cat c", "dog d"]  # cat: df 3 of N 4 -> ln(1.5/3.5) < 0
    ix = BM25Index(docs, idf="okapi", epsilon=0.25, analyzer=lambda t: analyze(t, frozenset()))
    raw = np.log((4 - ix.df + 0.5) / (ix.df + 0.5))
    j = ix.vocab["cat"]
    assert raw[j] < 0 and ix.idf[j] == pytest.approx(0.25 * raw.mean())
    lucene = BM25Index(docs, analyzer=lambda t: analyze(t, frozenset()))
    assert (lucene.idf > 0).all()  # the Lucene form never goes negative


def test_k1_and_b_change_saturation_and_length_normalisation():
    docs = ["cat", "cat cat cat cat", "cat dog dog dog dog dog"]
    an = lambda t: analyze(t, frozenset())  # noqa: E731
    presence = BM25Index(docs, k1=0.0, analyzer=an).scores("cat")
    assert np.allclose(presence, presence[0])  # k1 = 0: only presence counts
    no_len = BM25Index(docs, b=0.0, analyzer=an).scores("cat")
    assert no_len[0] == pytest.approx(no_len[2])  # b = 0: a long passage is not penalised
    assert BM25Index(docs, b=1.0, analyzer=an).scores("cat")[2] < no_len[2]


def test_tfidf_cosine_is_one_for_the_same_text_and_zero_without_shared_terms():
    ix = TfidfIndex(HAND + ["dog bird"], analyzer=lambda t: analyze(t, frozenset()))
    s = ix.scores("cat cat dog")
    assert s.dtype == np.float64
    assert s[1] == pytest.approx(1.0) and s[2] == 0.0 and 0 < s[3] < 1
    assert not ix.scores("unicorn").any()


def test_recall_at_k_counts_the_relevant_passage_in_the_first_k():
    rankings = [[3, 1, 2], [0, 2, 1], [2, 0, 1]]
    assert recall_at_k(rankings, [3, 2, 1], 1) == pytest.approx(1 / 3)
    assert recall_at_k(rankings, [3, 2, 1], 2) == pytest.approx(2 / 3)
    assert recall_at_k(rankings, [3, 2, 1], 3) == 1.0
    with pytest.raises(ValueError, match="k=0"):
        recall_at_k(rankings, [3, 2, 1], 0)
    with pytest.raises(ValueError, match="3 rankings but 2"):
        recall_at_k(rankings, [3, 2], 1)


def test_bad_retriever_input_is_a_clear_error():
    with pytest.raises(ValueError, match="knowledge base is empty"):
        BM25Index([])
    with pytest.raises(ValueError, match="no indexable word"):
        BM25Index(["...", "the of a"])
    with pytest.raises(ValueError, match="b=1.5"):
        BM25Index(HAND, b=1.5)
    with pytest.raises(ValueError, match="k1=-1"):
        BM25Index(HAND, k1=-1)
    with pytest.raises(ValueError, match="idf='bm11'"):
        BM25Index(HAND, idf="bm11")
    with pytest.raises(TypeError, match="passage 1"):
        BM25Index(["ok", 3])


def test_dense_index_ranks_by_cosine_and_names_a_bad_encoder():
    def letters(texts):  # a toy encoder: counts of a, b, c
        return np.array([[t.count(ch) for ch in "abc"] for t in texts], dtype=np.float32)

    ix = DenseIndex(["aab", "cc", "abc", "xyz"], letters)
    s = ix.scores("ab")
    assert s.dtype == np.float64 and s.shape == (4,)
    want = np.array([3 / np.sqrt(5 * 2), 0.0, 2 / np.sqrt(3 * 2), 0.0])  # "xyz" embeds to zero: cosine 0
    np.testing.assert_allclose(s, want, atol=1e-12)
    assert [i for i, _ in ix.search("ab", k=2)] == [0, 2]
    with pytest.raises(ValueError, match="knowledge base is empty"):
        DenseIndex([], letters)
    with pytest.raises(ValueError, match=r"shape \(1, 3\).*for 2 texts"):
        DenseIndex(["a", "b"], lambda texts: np.ones((1, 3)))


def test_hidden_state_retriever_embeds_every_text_and_is_weaker_than_bm25(tiny_reader):
    """The reader's own mean-pooled hidden states as a retriever (never trained for it): one finite row per
    text, and on the chapter's questions it finds fewer right passages first than BM25 does."""
    model, tok, _ = tiny_reader
    texts = ["Veldoria", "The capital of Zarnia is Pellow.", "a b c d"]
    encode = rag_experiments.hidden_state_encoder(model, tok)
    v = encode(texts)
    assert v.shape == (3, model.config.n_embd) and v.dtype == np.float64 and np.isfinite(v).all()
    alone = np.concatenate([encode([t]) for t in texts])  # no padding: left padding must not change an embedding
    np.testing.assert_allclose(v, alone, atol=1e-5)
    r = rag_experiments.measure_retrieval(model=model, tokenizer=tok)["recall"]
    assert r["dense_hidden"]["knowledge"]["1"] < r["bm25_lucene"]["knowledge"]["1"] == 1.0


def test_analyzer_keeps_spellings_whole_and_drops_stop_words():
    assert analyze("The word tiger is spelled t-i-g-e-r.") == ["word", "tiger", "spelled", "t-i-g-e-r"]


@pytest.mark.crosscheck
def test_bm25_okapi_matches_rank_bm25_on_the_knowledge_base():
    rank_bm25 = require("rank_bm25")
    world = KnowledgeWorld()
    texts = [p["text"] for p in world.passages()]
    ours = BM25Index(texts, k1=1.5, b=0.75, idf="okapi", epsilon=0.25)
    ref = rank_bm25.BM25Okapi([analyze(t) for t in texts], k1=1.5, b=0.75, epsilon=0.25)
    for r in world.question_records("new")[:20] + world.question_records("old_test", ("h0",))[:20]:
        q = r["instruction"]
        np.testing.assert_allclose(ours.scores(q), ref.get_scores(analyze(q)), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ the world

def test_new_knowledge_never_appears_in_pretraining_or_sft_text():
    from minillm.tasks import tokenizer_training_text

    text = tokenizer_training_text()
    invented = [f.subject for f in NEW_FACTS + ABSENT_FACTS] + [f.answer for f in NEW_FACTS if f.relation != "colour"]
    world = KnowledgeWorld()
    invented += [f.answer for f in world.updated_facts]
    found = [w for w in invented if re.search(rf"\b{re.escape(w)}\b", text, re.I)]
    assert not found, f"these 'new' names are in the pretraining/SFT text: {found}"
    assert len(world.new_facts) == 22 and len(world.updated_facts) == 8 and len(world.absent_facts) == 8


def test_updated_facts_contradict_what_the_model_saw_and_the_kb_holds_only_the_new_value():
    world = KnowledgeWorld()
    kb = {p["fact_key"]: p for p in world.passages()}
    for f in world.updated_facts:
        assert world.previous[f.key] != f.answer
        assert f.answer in kb[f.key]["text"] and world.previous[f.key] not in kb[f.key]["text"]
        assert kb[f.key]["kind"] == "updated"
    assert not any(p["fact_key"].split(":")[1] in {f.subject for f in ABSENT_FACTS} for p in kb.values())


def test_questions_use_held_out_phrasings_and_absent_entities_expect_i_dont_know():
    world = KnowledgeWorld()
    rows = world.question_records("new")
    assert {r["template_id"].split("/")[1] for r in rows} == set(EVAL_TEMPLATES)
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)
    absent = world.question_records("absent")
    assert {r["answer"] for r in absent} == {ABSTAIN}
    judge = GoldJudge(world)
    assert judge.score(absent[0]["instruction"], "I don't know.").correct == 1.0
    assert judge.score(rows[0]["instruction"], f"{rows[0]['answer']}.").correct == 1.0


def test_paraphrases_are_distinct_up_to_thirteen_and_cycle_beyond():
    f = NEW_FACTS[0]
    assert len(set(paraphrases(f, 13))) == 13
    p30 = paraphrases(f, 30)
    assert len(p30) == 30 and len(set(p30)) == 13 and all(f.answer in s for s in p30)
    with pytest.raises(ValueError, match="n=0"):
        paraphrases(f, 0)


def test_bm25_finds_the_new_facts_passage_first():
    res = rag_experiments.measure_retrieval()
    world = KnowledgeWorld()
    kb = rag.builtin_knowledge_base(world)
    rows = world.question_records("new") + world.question_records("updated")
    hits = [kb.retrieve(r["instruction"], 1)[0][0].meta["fact_key"] == r["fact_key"] for r in rows]
    assert np.mean(hits) >= 0.9
    rec = res["recall"]["bm25_lucene"]["knowledge"]
    assert rec["1"] == pytest.approx(np.mean(hits)) and rec["5"] >= rec["1"]
    assert res["threshold"]["present_kept"] >= 0.95


# ------------------------------------------------------------------------------------ bad input

def test_passage_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("The capital of Veldoria is Castrel.\nCaf\xe9 au lait.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not valid UTF-8 at byte \d+ \(line 2\)"):
        rag.KnowledgeBase.from_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.txt: the knowledge base is empty"):
        rag.KnowledgeBase.from_file(empty)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        rag.KnowledgeBase.from_file(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="knowledge base <list> is empty"):
        rag.KnowledgeBase([])


def test_a_question_longer_than_the_context_is_an_error_naming_its_length(tiny_reader):
    model, tok, _ = tiny_reader
    kb = rag.KnowledgeBase(["The capital of Veldoria is Castrel."])
    long_q = "What is the capital of " + "Veldoria and " * 40 + "?"
    with pytest.raises(ValueError, match=r"the question is \d+ tokens .* longer than the \d+ tokens"):
        rag.rag_answer(model, tok, kb, [long_q])


def test_a_question_with_no_matching_passage_says_so_instead_of_answering(tiny_reader):
    model, tok, _ = tiny_reader
    kb = rag.KnowledgeBase(["The capital of Veldoria is Castrel.", "A glimberry is purple."])
    ans = rag.rag_answer(model, tok, kb, ["How do you spell zebra?"], min_score=rag.MIN_POSITIVE_SCORE)[0]
    assert ans.abstained and ans.text == "I don't know." and ans.cited == []
    assert "no passage in the knowledge base matches" in rag.format_answer(ans, rag.MIN_POSITIVE_SCORE)


def test_reader_prompt_drops_the_lowest_ranked_passages_to_fit(tiny_reader):
    _, tok, _ = tiny_reader
    ps = ["The capital of Veldoria is Castrel.", "A glimberry is purple.", "The zibbet makes the sound chitter."]
    ids, kept = rag.reader_prompt_ids(tok, "What is the capital of Veldoria?", ps, 40)
    assert len(ids) <= 40 and 0 < kept < 3
    full, k3 = rag.reader_prompt_ids(tok, "What is the capital of Veldoria?", ps, 200)
    assert k3 == 3 and len(full) > len(ids)
    assert rag.reader_content("Q?", ["A.", "B."]) == "Context: A. B.\nQuestion: Q?"
    assert rag.reader_content("Q?") == "Q?"


def test_cli_rag_shows_the_passage_and_names_bad_files(tmp_path, capsys):
    from minillm.cli import main

    kb = tmp_path / "kb.txt"
    kb.write_text("The capital of Veldoria is Castrel.\nA glimberry is purple.\n")
    assert main(["rag", "--passages", str(kb), "--question", "What colour is a glimberry?",
                 "--question", "Who wrote Hamlet?"]) == 0
    out = capsys.readouterr().out
    assert "[kb.txt:2]" in out and "A glimberry is purple." in out and "no passage matches" in out
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe\n")
    assert main(["rag", "--passages", str(bad), "--question", "x"]) == 2
    assert "bad.txt" in capsys.readouterr().err


def test_upsert_changes_one_fact_without_touching_the_others():
    kb = rag.builtin_knowledge_base()
    fk = "capital:Veldoria"
    pid = kb.by_fact()[fk].id
    before = {p.id: p.text for p in kb.passages}
    seconds = kb.upsert(pid, "The capital of Veldoria is Oltera.", fact_key=fk)
    assert seconds < 1.0
    assert kb.retrieve("What is the capital of Veldoria?", 1)[0][0].text.endswith("Oltera.")
    after = {p.id: p.text for p in kb.passages}
    assert [i for i in before if before[i] != after[i]] == [pid]


# ------------------------------------------------------------------------------------ end to end

def test_rag_answers_new_facts_the_closed_book_model_cannot(tiny_reader):
    model, tok, seconds = tiny_reader
    t0 = time.perf_counter()
    world = KnowledgeWorld()
    kb = rag.builtin_knowledge_base(world)
    judge = GoldJudge(world)
    recs = [r for r in world.question_records("new") if r["task"] == "capital"]  # held-out phrasings
    closed = rag.evaluate_arm(model, tok, recs, judge, "closed", kb, max_new_tokens=8)
    read = rag.evaluate_arm(model, tok, recs, judge, "rag", kb, max_new_tokens=8)
    assert closed["exact_match"] <= 0.1  # the pairing is in no weight: at most a lucky guess
    assert read["exact_match"] >= 0.4, read["samples"]
    assert read["citation_support"] >= read["exact_match"] - 1e-9  # a right answer is in the passage shown
    assert read["prompt_tokens"] > closed["prompt_tokens"] + 5  # what retrieval costs per query
    answers = rag.rag_answer(model, tok, kb, ["Which city serves as the capital of Veldoria?"], max_new_tokens=8)
    assert answers[0].cited[0][1] == "The capital of Veldoria is Castrel."
    assert "The capital of Veldoria is Castrel." in rag.format_answer(answers[0])
    assert seconds + time.perf_counter() - t0 < 60
