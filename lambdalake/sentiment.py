"""The sentiment model artifact and its scorer, shared by the batch and speed layers.

The batch layer trains a model (``batch.sentiment_train``) and saves it under the
lake as ``models/sentiment/<version>/``; the run record names the version; the
speed layer loads that same artifact and scores new reviews with the same code,
so a review gets the same score from both layers.

Two kinds of model share one interface:

``lexicon``
    VADER alone (its lexicon ships inside the ``vaderSentiment`` wheel).
    ``sentiment`` = the VADER compound score; label ``positive`` when it is
    >= 0.05, ``negative`` when <= -0.05, else ``neutral`` (VADER's own cut-offs).
``tfidf-lr``
    TF-IDF over word unigrams and bigrams (so "not good" is a feature of its
    own) plus the VADER compound as one extra column, into a multinomial
    logistic regression over the classes negative / neutral / positive.
    ``sentiment`` = P(positive) - P(negative); label = the most probable class
    (a tie between positive and negative is ``neutral``).

Either way ``sentiment`` is in [-1, 1], below 0 for every ``negative`` label
and above 0 for every ``positive`` one, and scoring is deterministic.

Artifact layout (no pickle, readable with any JSON/NumPy reader)::

    models/sentiment/<version>/model.json    kind, version, classes, vectorizer settings,
                                             vocabulary (terms in column order)
    models/sentiment/<version>/weights.npz   idf, coef, intercept   (tfidf-lr only)
    models/sentiment/<version>/metrics.json  held-out metrics of the training run

>>> m = lexicon_model()
>>> s, labels = m.score(["Great product, works well"], ["Love it"])
>>> bool(s[0] > 0), str(labels[0])
(True, 'positive')
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lambdalake.contract.lake import Lake

LABELS = ("negative", "neutral", "positive")
KIND_LEXICON = "lexicon"
KIND_TFIDF_LR = "tfidf-lr"
LEXICON_VERSION = "vader-lexicon-3.3.2"
# VADER's documented cut-offs for a neutral compound score.
VADER_POS = 0.05
VADER_NEG = -0.05
# The token pattern and n-grams the vectorizer uses (scikit-learn's default token pattern).
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
NGRAM_RANGE = (1, 2)

_analyzer: Any = None


def _vader() -> Any:
    """One VADER analyzer per process (loading its lexicon takes ~0.1 s)."""
    global _analyzer
    if _analyzer is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _analyzer = SentimentIntensityAnalyzer()
    return _analyzer


def review_documents(texts: Sequence[str], titles: Sequence[str | None]) -> list[str]:
    """The document scored for each review: the title (when present) then the text."""
    if len(texts) != len(titles):
        raise ValueError(f"{len(texts)} texts but {len(titles)} titles")
    out = []
    for text, title in zip(texts, titles, strict=True):
        text = "" if text is None else str(text)
        if title is None or (isinstance(title, float) and np.isnan(title)) or not str(title):
            out.append(text)
        else:
            out.append(f"{title}. {text}")
    return out


def vader_compound(docs: Sequence[str]) -> np.ndarray:
    """VADER compound score in [-1, 1] of each document."""
    analyzer = _vader()
    return np.fromiter(
        (analyzer.polarity_scores(d)["compound"] for d in docs), dtype=np.float64, count=len(docs)
    )


def lexicon_labels(compound: np.ndarray) -> np.ndarray:
    labels = np.full(compound.shape, "neutral", dtype=object)
    labels[compound >= VADER_POS] = "positive"
    labels[compound <= VADER_NEG] = "negative"
    return labels


def labels_from_proba(proba: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sentiment, label) from class probabilities (columns in ``classes`` order)."""
    idx = {c: i for i, c in enumerate(classes)}
    p_pos = proba[:, idx["positive"]]
    p_neg = proba[:, idx["negative"]]
    sentiment = np.clip(p_pos - p_neg, -1.0, 1.0)
    best = np.asarray(classes, dtype=object)[np.argmax(proba, axis=1)]
    # A label must agree with the sign of the score: a positive/negative tie is neutral.
    best[(best == "positive") & (sentiment <= 0)] = "neutral"
    best[(best == "negative") & (sentiment >= 0)] = "neutral"
    return sentiment.astype(np.float64), best


@dataclass
class SentimentModel:
    """A versioned sentiment scorer (see the module docstring for the two kinds)."""

    version: str
    kind: str = KIND_LEXICON
    classes: tuple[str, ...] = LABELS
    vocabulary: list[str] = field(default_factory=list)
    idf: np.ndarray | None = None
    coef: np.ndarray | None = None  # (n_classes, n_terms + 1): the last column weighs VADER
    intercept: np.ndarray | None = None  # (n_classes,)
    sublinear_tf: bool = True
    metrics: dict[str, Any] = field(default_factory=dict)
    _vectorizer: Any = field(default=None, repr=False, compare=False)

    # -- scoring -------------------------------------------------------------------------

    def score(
        self, texts: Sequence[str], titles: Sequence[str | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(sentiment float64 in [-1, 1], label array) for each review."""
        docs = review_documents(texts, titles)
        if not docs:
            return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=object)
        compound = vader_compound(docs)
        if self.kind == KIND_LEXICON:
            return compound, lexicon_labels(compound)
        return labels_from_proba(self.predict_proba(docs, compound), self.classes)

    def predict_proba(self, docs: Sequence[str], compound: np.ndarray) -> np.ndarray:
        """Class probabilities (columns in ``classes`` order) of a ``tfidf-lr`` model."""
        if self.kind != KIND_TFIDF_LR or self.coef is None or self.intercept is None:
            raise ValueError(f"model {self.version} of kind {self.kind} has no probabilities")
        x = self.features(docs, compound)
        logits = np.asarray(x @ self.coef.T) + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def features(self, docs: Sequence[str], compound: np.ndarray) -> Any:
        """The sparse feature matrix: L2-normalised TF-IDF, then the VADER compound."""
        from scipy import sparse
        from sklearn.preprocessing import normalize

        counts = self._count_vectorizer().transform(docs).astype(np.float64)
        if self.sublinear_tf:
            counts.data = 1.0 + np.log(counts.data)
        tfidf = normalize(counts.multiply(self.idf).tocsr(), norm="l2", copy=False)
        return sparse.hstack([tfidf, sparse.csr_matrix(compound.reshape(-1, 1))], format="csr")

    def _count_vectorizer(self) -> Any:
        if self._vectorizer is None:
            from sklearn.feature_extraction.text import CountVectorizer

            # A fixed vocabulary needs no fit; the settings equal the training vectorizer's.
            self._vectorizer = CountVectorizer(
                vocabulary={t: i for i, t in enumerate(self.vocabulary)},
                ngram_range=NGRAM_RANGE,
                token_pattern=TOKEN_PATTERN,
                lowercase=True,
                dtype=np.float64,
            )
        return self._vectorizer

    def __getstate__(self) -> dict[str, Any]:
        # Spark broadcasts the model: ship the weights, rebuild the vectorizer in each worker.
        state = dict(self.__dict__)
        state["_vectorizer"] = None
        return state

    # -- the artifact ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "version": self.version,
            "kind": self.kind,
            "classes": list(self.classes),
            "ngram_range": list(NGRAM_RANGE),
            "token_pattern": TOKEN_PATTERN,
            "sublinear_tf": self.sublinear_tf,
            "features": "tfidf(title. text) + vader_compound" if self.coef is not None else "vader",
            "vocabulary": self.vocabulary,
        }

    def save(self, lake: Lake) -> str:
        """Write ``models/sentiment/<version>/`` under the lake; returns the directory URI.

        Saving the same version twice writes the same bytes (versions name contents).
        """
        from lambdalake.contract.lake import MODELS_SENTIMENT

        fs, base = _filesystem(lake.table(f"{MODELS_SENTIMENT}/{self.version}"))
        fs.create_dir(base, recursive=True)
        if self.kind == KIND_TFIDF_LR:
            if self.idf is None or self.coef is None or self.intercept is None:
                raise ValueError(f"model {self.version}: a {KIND_TFIDF_LR} model needs weights")
            buf = io.BytesIO()
            np.savez(buf, idf=self.idf, coef=self.coef, intercept=self.intercept)
            _write(fs, f"{base}/weights.npz", buf.getvalue())
        _write(fs, f"{base}/metrics.json", json.dumps(self.metrics, indent=2).encode())
        # model.json last: its presence marks a complete artifact.
        _write(fs, f"{base}/model.json", json.dumps(self.to_json()).encode())
        return lake.table(f"{MODELS_SENTIMENT}/{self.version}")

    @classmethod
    def load(cls, lake: Lake, version: str) -> SentimentModel:
        """Load a saved artifact; raises ``FileNotFoundError`` naming the version if absent."""
        from lambdalake.contract.lake import MODELS_SENTIMENT

        uri = lake.table(f"{MODELS_SENTIMENT}/{version}")
        fs, base = _filesystem(uri)
        try:
            meta = json.loads(_read(fs, f"{base}/model.json"))
        except (FileNotFoundError, OSError) as exc:
            raise FileNotFoundError(f"no sentiment model {version!r} at {uri}") from exc
        if meta.get("format") != 1:
            raise ValueError(f"sentiment model {version!r}: unknown format {meta.get('format')}")
        try:
            metrics = json.loads(_read(fs, f"{base}/metrics.json"))
        except (FileNotFoundError, OSError):
            metrics = {}
        model = cls(
            version=meta["version"],
            kind=meta["kind"],
            classes=tuple(meta["classes"]),
            vocabulary=list(meta.get("vocabulary") or []),
            sublinear_tf=bool(meta.get("sublinear_tf", True)),
            metrics=metrics,
        )
        if model.kind == KIND_TFIDF_LR:
            with np.load(io.BytesIO(_read(fs, f"{base}/weights.npz")), allow_pickle=False) as w:
                model.idf, model.coef, model.intercept = w["idf"], w["coef"], w["intercept"]
        elif model.kind != KIND_LEXICON:
            raise ValueError(f"sentiment model {version!r}: unknown kind {model.kind!r}")
        return model


def lexicon_model() -> SentimentModel:
    """The VADER-only model (no training data needed)."""
    return SentimentModel(version=LEXICON_VERSION, kind=KIND_LEXICON)


# --- storage (local paths and object-store URIs alike) --------------------------------------


def _filesystem(uri: str) -> tuple[Any, str]:
    from pyarrow import fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def _write(fs: Any, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as out:
        out.write(data)


def _read(fs: Any, path: str) -> bytes:
    with fs.open_input_stream(path) as src:
        return src.read()
