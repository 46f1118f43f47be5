"""Sparse retrieval from first principles: BM25 and TF-IDF cosine in NumPy, with recall@k.

Scope
    ``analyze`` turns text into terms (lower-case words; hyphenated spellings such as ``t-i-g-e-r``
    are one term; a short English stop-word list removed). ``BM25Index`` scores every passage of a
    knowledge base for a query with Okapi BM25; ``TfidfIndex`` with the cosine of TF-IDF vectors (the
    simplest baseline). Both keep a dense term-count matrix (N passages x V terms, float64): the
    knowledge bases of this book have a few hundred passages. ``search`` returns the top k
    ``(index, score)`` pairs; ``recall_at_k`` is the fraction of queries whose relevant passage is
    among the first k. ``DenseIndex`` ranks by the cosine of embeddings from any encoder (chapter 13 uses
    the language model's own mean-pooled hidden states, to show why an encoder not trained for retrieval
    is weak).

    BM25 (docs/reference.md §11; Robertson & Zaragoza 2009, Eq. 3.15 with k3 = inf)::

        score(q, d) = sum over query terms t (with repetition) of
                      IDF(t) * f(t,d) * (k1 + 1) / (f(t,d) + k1 * (1 - b + b * |d| / avgdl))

    f(t, d): count of t in passage d; |d|: number of terms of d; avgdl: mean |d| over the
    knowledge base; N: number of passages; df(t): passages containing t. Defaults k1 = 1.5,
    b = 0.75 (rank-bm25's and the common choice; k1 in [1.2, 2.0] is the usual range).
    Two IDF forms, chosen by ``idf=``:

    * ``"lucene"`` (default): IDF(t) = ln(1 + (N - df + 0.5) / (df + 0.5)), always > 0, so a term
      in every passage still counts a little and a score is never negative;
    * ``"okapi"``: IDF(t) = ln((N - df + 0.5) / (df + 0.5)) with every negative value (df > N/2)
      replaced by ``epsilon`` x the mean IDF over the vocabulary -- rank-bm25's ``BM25Okapi``
      (the crosscheck test compares against it).

    A query term absent from the knowledge base adds 0.

    TF-IDF: w(t, d) = f(t, d) * (ln((1 + N) / (1 + df)) + 1) (scikit-learn's ``smooth_idf``), each
    vector L2-normalised; the score is the cosine between query and passage vectors, in [0, 1].

Sources
    S. Robertson, H. Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond" (2009), §3;
    Lucene ``BM25Similarity`` (the IDF form); rank-bm25 0.2.2 ``BM25Okapi`` (the okapi IDF floor);
    scikit-learn ``TfidfVectorizer`` (the smoothed IDF); C. Manning et al., Introduction to
    Information Retrieval (2008), §6.3 (cosine) and §8.3 (recall).

Deviations
    * Lucene's ``BM25Similarity`` leaves out the constant factor (k1 + 1) and stores document
      lengths lossily; here the factor is kept (it does not change the ranking) and lengths are exact.
    * Ties in score are broken by passage index (lower first), so rankings are deterministic.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

#: Words removed by ``analyze`` (short function words that carry no topic).
STOPWORDS = frozenset("""a an and are as at be by do does for from has have i in is it its me of on or so
that the their then there these this to was we what which who will with you your""".split())

_TERM = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def analyze(text: str, stopwords: frozenset | set = STOPWORDS) -> list[str]:
    """Terms of ``text``: lower-case words (letters/digits, joined by ``-`` or ``'``), stop words removed.

    Args:
        text: any str.
        stopwords: words to drop (``frozenset()`` keeps every word).
    Returns:
        list of str, in order, with repetitions.
    Raises:
        TypeError: text is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"analyze: expected str, got {type(text).__name__}")
    return [w for w in _TERM.findall(text.lower()) if w not in stopwords]


class _Ranker:
    """``search`` over ``scores``: what every retriever here shares."""

    def scores(self, query: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def search(self, query: str, k: int = 1) -> list[tuple[int, float]]:
        """The k best passages: list of ``(passage index, score)``, best first (ties: lower index first).

        Raises:
            ValueError: k < 1.
        """
        if k < 1:
            raise ValueError(f"search: k={k} must be >= 1")
        s = self.scores(query)
        order = np.lexsort((np.arange(len(s)), -s))[:k]
        return [(int(i), float(s[i])) for i in order]


class _Index(_Ranker):
    """Vocabulary and term-count matrix shared by BM25 and TF-IDF."""

    def __init__(self, passages: Sequence[str], analyzer: Callable[[str], list[str]] = analyze):
        passages = list(passages)
        if not passages:
            raise ValueError("the knowledge base is empty: no passages to index")
        for i, p in enumerate(passages):
            if not isinstance(p, str):
                raise TypeError(f"passage {i} is {type(p).__name__}, expected str")
        self.passages = passages
        self.analyzer = analyzer
        docs = [analyzer(p) for p in passages]
        if not any(docs):
            raise ValueError(f"the knowledge base has {len(passages)} passages but no indexable word in any")
        self.vocab: dict[str, int] = {}
        for d in docs:
            for t in d:
                self.vocab.setdefault(t, len(self.vocab))
        tf = np.zeros((len(docs), len(self.vocab)), dtype=np.float64)
        for i, d in enumerate(docs):
            for t in d:
                tf[i, self.vocab[t]] += 1.0
        self.tf = tf                                   # (N, V) counts f(t, d)
        self.doc_len = tf.sum(axis=1)                  # (N,) |d|
        self.df = (tf > 0).sum(axis=0).astype(np.float64)  # (V,)
        self.N = len(docs)

    def query_counts(self, query: str) -> np.ndarray:
        """(V,) float64 counts of the query's terms that are in the vocabulary (others are dropped)."""
        q = np.zeros(len(self.vocab), dtype=np.float64)
        for t in self.analyzer(query):
            j = self.vocab.get(t)
            if j is not None:
                q[j] += 1.0
        return q


class BM25Index(_Index):
    """Okapi BM25 over a list of passages (formula and IDF forms in the module docstring).

    Args:
        passages: the knowledge base, list of str (N >= 1).
        k1: term-frequency saturation (>= 0; 0 = presence only). Default 1.5.
        b: length normalisation in [0, 1] (0 = none, 1 = full). Default 0.75.
        idf: ``"lucene"`` (ln(1 + (N - df + 0.5)/(df + 0.5))) or ``"okapi"`` (rank-bm25's BM25Okapi).
        epsilon: the okapi floor, as a fraction of the mean IDF (0.25 as rank-bm25).
        analyzer: text -> terms (default ``analyze``).
    Attributes:
        idf: (V,) float64 per-term IDF; avgdl: mean passage length in terms.
    Raises:
        ValueError: an empty knowledge base (or one without any word), k1 < 0, b outside [0, 1],
            unknown idf.
    Source: Robertson & Zaragoza 2009, §3; Lucene BM25Similarity; rank-bm25 0.2.2.
    """

    def __init__(self, passages: Sequence[str], k1: float = 1.5, b: float = 0.75, idf: str = "lucene",
                 epsilon: float = 0.25, analyzer: Callable[[str], list[str]] = analyze):
        if not k1 >= 0:
            raise ValueError(f"BM25: k1={k1} must be >= 0")
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"BM25: b={b} must be in [0, 1]")
        if idf not in ("lucene", "okapi"):
            raise ValueError(f"BM25: idf={idf!r}: use 'lucene' or 'okapi'")
        super().__init__(passages, analyzer)
        self.k1, self.b, self.idf_form, self.epsilon = float(k1), float(b), idf, float(epsilon)
        self.avgdl = float(self.doc_len.mean())
        ratio = (self.N - self.df + 0.5) / (self.df + 0.5)
        if idf == "lucene":
            self.idf = np.log1p(ratio)
        else:
            raw = np.log(ratio)
            self.idf = np.where(raw < 0, self.epsilon * raw.mean(), raw)
        norm = self.k1 * (1.0 - self.b + self.b * self.doc_len / self.avgdl)  # (N,)
        # (N, V) per-term contributions, precomputed: score = weights @ query_counts; 0 where f(t, d) = 0
        # (with k1 = 0 the ratio would be 0/0 there)
        denom = self.tf + norm[:, None]
        self.weights = np.where(self.tf > 0, self.idf[None, :] * self.tf * (self.k1 + 1.0)
                                / np.where(denom > 0, denom, 1.0), 0.0)

    def scores(self, query: str) -> np.ndarray:
        """(N,) float64 BM25 score of every passage for ``query`` (0 where no query term occurs)."""
        return self.weights @ self.query_counts(query)


class TfidfIndex(_Index):
    """TF-IDF cosine retrieval: the simplest sparse baseline.

    Args:
        passages: the knowledge base, list of str.
        analyzer: text -> terms.
    Attributes:
        idf: (V,) float64, ln((1 + N)/(1 + df)) + 1; vectors: (N, V) L2-normalised passage vectors.
    Raises:
        ValueError: an empty knowledge base.
    Source: Manning et al. 2008 §6.3; scikit-learn TfidfVectorizer(smooth_idf=True, norm="l2").
    """

    def __init__(self, passages: Sequence[str], analyzer: Callable[[str], list[str]] = analyze):
        super().__init__(passages, analyzer)
        self.idf = np.log((1.0 + self.N) / (1.0 + self.df)) + 1.0
        v = self.tf * self.idf[None, :]
        n = np.linalg.norm(v, axis=1, keepdims=True)
        self.vectors = v / np.where(n > 0, n, 1.0)

    def scores(self, query: str) -> np.ndarray:
        """(N,) float64 cosine similarity in [0, 1] (0 for a query with no known term)."""
        q = self.query_counts(query) * self.idf
        n = float(np.linalg.norm(q))
        return self.vectors @ (q / n) if n > 0 else np.zeros(self.N, dtype=np.float64)


class DenseIndex(_Ranker):
    """Dense retrieval: the cosine between an embedding of the query and of every passage.

    Args:
        passages: the knowledge base, list of str (N >= 1).
        encode: list of str -> (n, D) array of embeddings, one row per text (e.g.
            ``rag_experiments.hidden_state_encoder``: a language model's mean-pooled last hidden states).
    Attributes:
        vectors: (N, D) float64 L2-normalised passage embeddings (a zero embedding stays zero).
    Raises:
        ValueError: an empty knowledge base; ``encode`` returning other than one finite row per text.
    Source: V. Karpukhin et al. 2020, "Dense Passage Retrieval" (DPR) §3.1 (inner product of a trained
        question and passage encoder); here the encoder is not trained for retrieval.
    """

    def __init__(self, passages: Sequence[str], encode: Callable[[list[str]], np.ndarray]):
        passages = list(passages)
        if not passages:
            raise ValueError("the knowledge base is empty: no passages to index")
        self.passages, self.encode, self.N = passages, encode, len(passages)
        self.vectors = self._embed(passages)

    def _embed(self, texts: list[str]) -> np.ndarray:
        v = np.asarray(self.encode(texts), dtype=np.float64)
        if v.ndim != 2 or v.shape[0] != len(texts) or not np.isfinite(v).all():
            raise ValueError(f"DenseIndex: encode returned shape {v.shape} (finite: {bool(np.isfinite(v).all())}) "
                             f"for {len(texts)} texts; expected (n, D), finite")
        n = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.where(n > 0, n, 1.0)

    def scores(self, query: str) -> np.ndarray:
        """(N,) float64 cosine similarity in [-1, 1]."""
        return self.vectors @ self._embed([query])[0]


def recall_at_k(rankings: Sequence[Sequence[int]], relevant: Sequence[int], k: int) -> float:
    """Recall@k with one relevant passage per query: the fraction of queries whose relevant passage
    index is among the first k of its ranking.

    Args:
        rankings: per query, passage indices best first (at least k each, or all there are).
        relevant: per query, the index of its relevant passage.
        k: cut-off (>= 1).
    Returns:
        float in [0, 1].
    Raises:
        ValueError: k < 1, no queries, or rankings and relevant of different lengths.
    Source: Manning et al. 2008, §8.3 (recall at a cut-off).
    """
    if k < 1:
        raise ValueError(f"recall_at_k: k={k} must be >= 1")
    if len(rankings) != len(relevant):
        raise ValueError(f"recall_at_k: {len(rankings)} rankings but {len(relevant)} relevant passages")
    if not rankings:
        raise ValueError("recall_at_k: no queries")
    return float(np.mean([rel in list(r)[:k] for r, rel in zip(rankings, relevant)]))
