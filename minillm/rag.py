"""Retrieval-augmented generation (chapter 13): the reader prompt, RAG answers that show their passage,
"no matching passage" handling, and the arms that compare prompting, retrieval and fine-tuning.

Scope
    * ``reader_content`` / ``reader_prompt_ids`` -- the reader prompt: the retrieved passages and the
      question as one user turn of the chat template::

          <|bos|>[INST] Context: {passage 1} {passage 2}\\nQuestion: {question} [/INST]

      With no passage it is the plain question (the closed-book prompt of chapter 04). Passages that
      do not fit the context (``block_size - max_new_tokens``) are dropped from the lowest ranked;
      a question that does not fit alone is an error naming its length.
    * ``KnowledgeBase`` -- passages (from a list or a UTF-8 file, one passage per line) indexed with
      ``retrieval.BM25Index``; ``retrieve`` keeps passages scoring at least ``min_score``; ``upsert``
      adds or replaces one passage (the cost of "changing one fact" for RAG).
    * ``rag_answer`` -- retrieve, read, and answer with the passage shown; when no passage reaches
      ``min_score`` the answer is ``"I don't know."`` and says no passage matched, instead of letting
      the model invent one.
    * ``evaluate_arm`` -- one arm answered and scored, with ``mode`` closed (the question alone),
      oracle (the fact's own passage in the prompt) or rag (retrieved passages). How the other arms
      are built and what chapter 13 measures with them (QA fine-tuning, the RAFT-style reader,
      continued pretraining, the decision table) is ``rag_experiments.py``.

Sources
    * P. Lewis et al., "Retrieval-Augmented Generation for Knowledge-Intensive NLP Tasks" (2020) §2:
      retrieve passages, condition the generator on them.
    * T. Zhang et al. 2024, "RAFT: Adapting Language Model to Domain Specific RAG" (arXiv 2403.10131)
      §3: train the reader on question + oracle + distractor passages, the oracle present with
      probability P (0.8 here), the answer otherwise from memory.
    * O. Ovadia et al. 2023 (arXiv 2312.05934): continued pretraining with paraphrases vs RAG on new
      knowledge; Z. Gekhman et al. 2024 (arXiv 2405.05904); A. Balaguer et al. 2024 (arXiv 2401.08406).
      Their numbers, and the BM25 formula, are in docs/reference.md §11.

Deviations
    * RAFT's answers are chain-of-thought quoting the passage; here the answer is the world's short
      ``"{answer}."`` (the 64-token context leaves no room), and the citation is the passage the
      system retrieved and showed, not text the model wrote.
    * The book's model has a 64-token context. Passages are one short sentence (about 10 tokens), so
      the question and three passages fit (with 12 tokens left for the answer); passages that do not
      fit are dropped, lowest ranked first, and counted. The chapter keeps the base model rather than
      pretraining a longer-context one: a 128-token base would cost a new pretraining run (about twice
      the 64-token run's compute per step) plus every SFT stage after it.
    * The RAFT-style reader is trained on old facts *and* on invented facts and counterfactual
      passages (``raft_records``): on old facts alone a small model answers from memory and ignores
      the passage.
    * The "no matching passage" rule is a threshold on the best BM25 score, calibrated on
      training phrasings (``calibrate_min_score``); it is not a learned abstention.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from minillm.data import render_prompt
from minillm.evaluate import Generation, generate_responses, score_generations
from minillm.knowledge import ABSTAIN, KnowledgeWorld
from minillm.facts import strip_response
from minillm.judge import GoldJudge
from minillm.retrieval import BM25Index

#: What RAG answers when no passage reaches the score threshold.
NO_MATCH_ANSWER = f"{ABSTAIN}."
#: Default BM25 threshold (Lucene IDF, k1 1.5, b 0.75): calibrate_min_score on the built-in knowledge base gives
#: 5.95 (it keeps every present-fact question of the training phrasings and rejects 67 % of the absent-entity
#: ones), rounded down. Another knowledge base needs its own (scores grow with ln N).
DEFAULT_MIN_SCORE = 5.9
#: The threshold "shares at least one word with the question" (Lucene IDF > 0, so any shared term scores > 0).
MIN_POSITIVE_SCORE = 1e-9


# ----------------------------------------------------------------------------------------------
# The reader prompt

def reader_content(question: str, passages: Sequence[str] = ()) -> str:
    """The user turn of the reader prompt: ``"Context: p1 p2\\nQuestion: q"``, or ``q`` without passages."""
    if not passages:
        return question
    return f"Context: {' '.join(passages)}\nQuestion: {question}"


def reader_prompt_ids(tokenizer, question: str, passages: Sequence[str], max_len: int) -> tuple[list[int], int]:
    """Token ids of the reader prompt, dropping the lowest-ranked passages until it fits ``max_len``.

    Args:
        tokenizer: the model's tokenizer (chat specials).
        question: the question (str).
        passages: passage texts, best first.
        max_len: tokens available for the prompt (``block_size - max_new_tokens``).
    Returns:
        (ids: list of int, number of passages kept).
    Raises:
        ValueError: the question alone does not fit (names its length, the limit and the question).
    """
    ps = list(passages)
    while True:
        ids = render_prompt([{"role": "user", "content": reader_content(question, ps)}], tokenizer)
        if len(ids) <= max_len:
            return ids, len(ps)
        if not ps:
            raise ValueError(f"the question is {len(ids)} tokens in the chat template, longer than the "
                             f"{max_len} tokens the context leaves for a prompt: {question[:80]!r}")
        ps = ps[:-1]


# ----------------------------------------------------------------------------------------------
# The knowledge base

@dataclass
class Passage:
    """One passage: ``id`` (str), ``text`` (str) and ``meta`` (fact_key, kind, line of the source file...)."""

    id: str
    text: str
    meta: dict = field(default_factory=dict)


class KnowledgeBase:
    """Passages and their BM25 index.

    Args:
        passages: list of ``Passage``, dicts with ``text`` (and optional ``id``), or str.
        k1, b, idf: ``retrieval.BM25Index`` settings (1.5, 0.75, "lucene").
        source: where the passages came from (named in errors).
    Raises:
        ValueError: no passages, or none with an indexable word (names the source).
    """

    def __init__(self, passages: Sequence, k1: float = 1.5, b: float = 0.75, idf: str = "lucene",
                 source: str = "<list>"):
        items = []
        for i, p in enumerate(passages):
            if isinstance(p, Passage):
                items.append(p)
            elif isinstance(p, str):
                items.append(Passage(f"p{i:04d}", p))
            else:
                items.append(Passage(str(p.get("id", f"p{i:04d}")), p["text"],
                                     {k: v for k, v in p.items() if k not in ("id", "text")}))
        if not items:
            raise ValueError(f"the knowledge base {source} is empty: add at least one passage")
        self.source = source
        self.settings = {"k1": k1, "b": b, "idf": idf}
        self.passages = items
        self._build()

    def _build(self) -> None:
        try:
            self.index = BM25Index([p.text for p in self.passages], **self.settings)
        except ValueError as e:
            raise ValueError(f"knowledge base {self.source}: {e}") from None
        self._pos = {p.id: i for i, p in enumerate(self.passages)}

    @classmethod
    def from_file(cls, path, **kw) -> "KnowledgeBase":
        """One passage per non-empty line of a UTF-8 text file (ids ``"<file name>:<line>"``).

        Raises:
            FileNotFoundError: no such file (named).
            ValueError: the file is not UTF-8 (file, line and byte offset), or has no passage.
        """
        from minillm.train.common import read_text

        path = Path(path)
        try:
            text = read_text(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"knowledge-base file not found: {path}") from None
        except ValueError as e:
            if "empty" in str(e):
                raise ValueError(f"{path}: the knowledge base is empty (no passage lines)") from None
            raise ValueError(f"knowledge base {e}") from None
        items = [Passage(f"{path.name}:{n}", line.strip(), {"line": n})
                 for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        return cls(items, source=str(path), **kw)

    def __len__(self) -> int:
        return len(self.passages)

    def retrieve(self, question: str, k: int = 1, min_score: float | None = None) -> list[tuple[Passage, float]]:
        """The k best passages for ``question`` as ``(Passage, BM25 score)``, best first, keeping only those
        scoring >= ``min_score`` (None: keep all k). An empty list means no passage matches."""
        hits = self.index.search(question, k=min(k, len(self.passages)))
        return [(self.passages[i], s) for i, s in hits if min_score is None or s >= min_score]

    def upsert(self, passage_id: str, text: str, **meta) -> float:
        """Replace the passage with this id (or append a new one) and rebuild the index.

        Returns:
            seconds the update took (re-indexing the whole knowledge base).
        """
        t0 = time.perf_counter()
        if passage_id in self._pos:
            old = self.passages[self._pos[passage_id]]
            self.passages[self._pos[passage_id]] = Passage(passage_id, text, {**old.meta, **meta})
        else:
            self.passages.append(Passage(passage_id, text, dict(meta)))
        self._build()
        return time.perf_counter() - t0

    def by_fact(self) -> dict[str, Passage]:
        """``{fact_key: Passage}`` for passages carrying a ``fact_key`` (the built-in knowledge base)."""
        return {p.meta["fact_key"]: p for p in self.passages if "fact_key" in p.meta}


def builtin_knowledge_base(world: KnowledgeWorld | None = None, **kw) -> KnowledgeBase:
    """The built-in knowledge base: ``KnowledgeWorld.passages()`` (344 passages with the defaults)."""
    world = world or KnowledgeWorld()
    return KnowledgeBase([Passage(p["id"], p["text"], {"fact_key": p["fact_key"], "kind": p["kind"]})
                          for p in world.passages()], source="<built-in>", **kw)


# ----------------------------------------------------------------------------------------------
# Answering

@dataclass
class RAGAnswer:
    """One answer: the text (without ``<|eos|>``), whether the model stopped, the passages shown as
    ``(id, text, score)``, whether RAG abstained for lack of a matching passage, the best score, the
    prompt length in tokens and the number of retrieved passages dropped to fit the context."""

    question: str
    text: str
    ended: bool
    cited: list
    abstained: bool
    best_score: float
    prompt_tokens: int
    dropped: int = 0


def rag_answer(model, tokenizer, kb: KnowledgeBase, questions: Sequence[str], k: int = 1,
               min_score: float | None = DEFAULT_MIN_SCORE, max_new_tokens: int = 12,
               batch_size: int = 64) -> list[RAGAnswer]:
    """Answer each question from the knowledge base (greedy decoding, batched).

    Args:
        model, tokenizer: the reader (a ``model.GPT`` and its tokenizer).
        kb: the ``KnowledgeBase``.
        questions: list of str.
        k: passages shown (best first; those not fitting the context are dropped and counted).
        min_score: a passage must score at least this (BM25) to be shown; when none does, the answer is
            ``NO_MATCH_ANSWER`` without running the model. None: always show the top k.
        max_new_tokens: answer length limit.
    Returns:
        list of ``RAGAnswer`` in order.
    Raises:
        ValueError: a question longer than the context (``reader_prompt_ids``).
    """
    limit = model.config.block_size - max_new_tokens
    prompts, plan = [], []
    for q in questions:
        best = kb.retrieve(q, k=1)
        best_score = best[0][1] if best else 0.0
        hits = kb.retrieve(q, k=k, min_score=min_score)
        ids, kept = reader_prompt_ids(tokenizer, q, [p.text for p, _ in hits], limit)
        if not hits:
            plan.append((q, None, best_score, len(ids), 0))
            continue
        plan.append((q, [(p.id, p.text, s) for p, s in hits[:kept]], best_score, len(ids), len(hits) - kept))
        prompts.append(ids)
    gens = iter(generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size) if prompts else [])
    out = []
    for q, cited, best_score, n_tok, dropped in plan:
        if cited is None:
            out.append(RAGAnswer(q, NO_MATCH_ANSWER, True, [], True, best_score, n_tok))
        else:
            g = next(gens)
            out.append(RAGAnswer(q, g.text, g.ended, cited, False, best_score, n_tok, dropped))
    return out


def format_answer(a: RAGAnswer, min_score: float | None = DEFAULT_MIN_SCORE) -> str:
    """Human-readable answer with its source: the passage(s) shown, or why there was none."""
    if a.abstained:
        return (f"{a.text}\n  (no passage in the knowledge base matches: best BM25 score {a.best_score:.2f} "
                f"< threshold {min_score})")
    lines = [a.text.strip()] + [f"  [{pid}] (BM25 {s:.2f}) {text}" for pid, text, s in a.cited]
    if a.dropped:
        lines.append(f"  ({a.dropped} more passage(s) did not fit the context)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Arms: contexts, evaluation, fine-tuning

def contexts_for(records: Sequence[dict], mode: str, kb: KnowledgeBase, k: int = 1, n_distractors: int = 0,
                 min_score: float | None = DEFAULT_MIN_SCORE, seed: int = 0) -> tuple[list[list[str]], list[bool], list[list[str]]]:
    """The passages each question is shown under an arm.

    Args:
        records: question rows (``KnowledgeWorld.question_records``).
        mode: ``"closed"`` (none), ``"oracle"`` (the fact's own passage plus ``n_distractors`` passages
            of other facts of the same relation, in random order; none for an absent entity) or
            ``"rag"`` (BM25 top k above ``min_score``; none = abstain).
        kb: the built-in knowledge base (passages carry ``fact_key``).
    Returns:
        (passage texts per record, abstain flag per record, cited passage ids per record).
    Raises:
        ValueError: unknown mode.
    """
    if mode not in ("closed", "oracle", "rag"):
        raise ValueError(f"mode={mode!r}: use closed, oracle or rag")
    rng = np.random.default_rng([seed, 13])
    by_fact = kb.by_fact()
    texts, abstain, cited = [], [], []
    for r in records:
        if mode == "closed":
            texts.append([]), abstain.append(False), cited.append([])
        elif mode == "oracle":
            gold = by_fact.get(r["fact_key"])
            rel = r["task"]
            pool = [p for key, p in by_fact.items() if key.split(":")[0] == rel and key != r["fact_key"]]
            dis = [pool[int(i)] for i in rng.choice(len(pool), size=min(n_distractors, len(pool)), replace=False)]
            ps = dis + ([gold] if gold is not None else [])
            order = rng.permutation(len(ps)) if ps else []
            ps = [ps[int(i)] for i in order]
            texts.append([p.text for p in ps]), abstain.append(False), cited.append([p.id for p in ps])
        else:
            hits = kb.retrieve(r["instruction"], k=k, min_score=min_score)
            texts.append([p.text for p, _ in hits]), abstain.append(not hits), cited.append([p.id for p, _ in hits])
    return texts, abstain, cited


def evaluate_arm(model, tokenizer, records: Sequence[dict], judge: GoldJudge, mode: str = "closed",
                 kb: KnowledgeBase | None = None, k: int = 1, n_distractors: int = 0,
                 min_score: float | None = DEFAULT_MIN_SCORE, max_new_tokens: int = 12, seed: int = 0) -> dict:
    """Ask ``records`` under one arm and score the answers with the gold judge.

    Returns:
        dict with exact_match, format_compliance, contains (fractions), abstain_rate (answers "I don't
        know."), retrieval_abstain_rate (no passage matched), citation_support (answers whose text
        appears in a passage shown, among answered questions; 0 when nothing is shown), prompt_tokens
        (mean per query), seconds_per_query (retrieval + generation, wall), dropped_passages, n.
    """
    kb = kb or builtin_knowledge_base(judge.world)
    t0 = time.perf_counter()
    texts, abstain, _ = contexts_for(records, mode, kb, k, n_distractors, min_score, seed)
    limit = model.config.block_size - max_new_tokens
    prompts, lens, dropped = [], [], 0
    for r, ps, ab in zip(records, texts, abstain):
        ids, kept = reader_prompt_ids(tokenizer, r["instruction"], ps, limit)
        dropped += len(ps) - kept
        del ps[kept:]
        lens.append(len(ids))
        if not ab:
            prompts.append(ids)
    gens_iter = iter(generate_responses(model, tokenizer, prompts, max_new_tokens) if prompts else [])
    gens = [Generation(NO_MATCH_ANSWER, True, []) if ab else next(gens_iter) for ab in abstain]
    seconds = time.perf_counter() - t0
    res = score_generations(records, gens, judge)
    shown = [(g, ps) for g, ps, ab in zip(gens, texts, abstain) if not ab]
    support = [float(bool(strip_response(g.text)) and any(strip_response(g.text) in p for p in ps)) for g, ps in shown]
    m = res.metrics
    return {"exact_match": m["exact_match"], "format_compliance": m["format_compliance"], "contains": m["contains"],
            "abstain_rate": float(np.mean([strip_response(g.text) == ABSTAIN for g in gens])) if gens else 0.0,
            "retrieval_abstain_rate": float(np.mean(abstain)) if abstain else 0.0,
            "citation_support": float(np.mean(support)) if support and mode != "closed" else 0.0,
            "prompt_tokens": float(np.mean(lens)) if lens else 0.0,
            "seconds_per_query": seconds / max(len(records), 1), "dropped_passages": dropped, "n": len(records),
            "samples": [(r["instruction"], g.text) for r, g in list(zip(records, gens))[:3]]}


# ----------------------------------------------------------------------------------------------
# minillm rag

def add_arguments(parser) -> None:
    """Options of ``minillm rag``: a passage file (or the built-in knowledge base), a reader checkpoint,
    questions, k and the score threshold."""
    parser.add_argument("--passages", default="builtin",
                        help="UTF-8 text file, one passage per line, or 'builtin' (the chapter-13 knowledge base)")
    parser.add_argument("--model", default=None,
                        help="reader checkpoint (.safetensors); without it only the retrieved passages are shown")
    parser.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    parser.add_argument("-k", "--k", type=int, default=1, help="passages shown to the reader (default: 1)")
    parser.add_argument("--min-score", type=float, default=None,
                        help=f"BM25 score a passage needs to count as matching; below it the answer is \"I don't "
                             f"know.\" (default: {DEFAULT_MIN_SCORE} for the built-in knowledge base, calibrated on it; "
                             f"for a file, any passage sharing a word with the question)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="answer length limit (default: 12)")


def run(args) -> int:
    """Index the passages, then answer each ``--question`` with the passage(s) shown (or list the retrieved
    passages when no ``--model`` is given). Errors name the file or value at fault."""
    import sys

    if args.k < 1:
        raise SystemExit(f"minillm rag: --k must be >= 1, got {args.k}")
    try:
        kb = builtin_knowledge_base() if args.passages == "builtin" else KnowledgeBase.from_file(args.passages)
    except (OSError, ValueError) as e:
        print(f"minillm rag: {e}", file=sys.stderr)
        return 2
    if args.min_score is None:
        args.min_score = DEFAULT_MIN_SCORE if args.passages == "builtin" else MIN_POSITIVE_SCORE
    print(f"indexed {len(kb)} passages from {kb.source} (BM25, k1={kb.index.k1}, b={kb.index.b}, "
          f"{kb.index.idf_form} IDF; a passage matches from score {args.min_score:g})")
    if not args.question:
        print("no --question given; nothing to answer")
        return 0
    if args.model is None:
        for q in args.question:
            hits = kb.retrieve(q, k=args.k, min_score=args.min_score)
            print(f"Q: {q}")
            if not hits:
                print(f"  no passage matches (threshold {args.min_score})")
            for p, s in hits:
                print(f"  [{p.id}] (BM25 {s:.2f}) {p.text}")
        return 0
    from minillm.checkpoint import load_model

    model, tok, _ = load_model(args.model)
    if tok is None:
        print(f"minillm rag: {args.model}: the checkpoint has no tokenizer", file=sys.stderr)
        return 2
    model.eval()
    try:
        answers = rag_answer(model, tok, kb, args.question, k=args.k, min_score=args.min_score,
                             max_new_tokens=args.max_new_tokens)
    except ValueError as e:
        print(f"minillm rag: {e}", file=sys.stderr)
        return 2
    for a in answers:
        print(f"Q: {a.question}\nA: {format_answer(a, args.min_score)}")
    return 0
