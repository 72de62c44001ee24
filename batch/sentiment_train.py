"""Train the review sentiment model from star ratings (weak labels).

Ratings label the reviews: 4-5 positive, 3 neutral, 1-2 negative. The model is
TF-IDF over word unigrams + bigrams plus the VADER compound score, into a
class-balanced multinomial logistic regression (``lambdalake.sentiment``
describes the artifact and how it scores). A stratified held-out split
measures accuracy and macro-F1 of the trained model *and* of the lexicon alone
on the same reviews; the run keeps the trained model only when there are
enough labelled reviews and it beats the lexicon on held-out macro-F1, else it
falls back to the lexicon and says why.

>>> import pandas as pd
>>> outcome = train_sentiment(pd.DataFrame({"text": ["ok"], "title": [None], "rating": [5]}))
>>> outcome.model.kind, outcome.note is not None
('lexicon', True)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from lambdalake.sentiment import (
    KIND_TFIDF_LR,
    LABELS,
    NGRAM_RANGE,
    TOKEN_PATTERN,
    SentimentModel,
    lexicon_labels,
    lexicon_model,
    review_documents,
    vader_compound,
)


@dataclass(frozen=True)
class TrainConfig:
    """How the sentiment model is trained (defaults suit a few hundred to 10^6 reviews)."""

    min_reviews: int = 300  # below this many labelled reviews, use the lexicon
    min_per_class: int = 10  # ... or when a class has fewer examples than this
    max_train_reviews: int = 100_000  # a deterministic sample caps the driver's work
    test_fraction: float = 0.2
    min_df: int = 2
    max_features: int = 50_000
    c: float = 4.0
    seed: int = 7


@dataclass
class TrainOutcome:
    model: SentimentModel
    metrics: dict[str, object] = field(default_factory=dict)
    note: str | None = None  # why the lexicon was chosen, when it was


def rating_labels(ratings: np.ndarray) -> np.ndarray:
    """Weak labels from stars: 4-5 positive, 3 neutral, 1-2 negative."""
    r = np.asarray(ratings)
    return np.where(r >= 4, "positive", np.where(r <= 2, "negative", "neutral")).astype(object)


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=list(LABELS), average="macro", zero_division=0)
        ),
    }


def train_sentiment(reviews: pd.DataFrame, config: TrainConfig | None = None) -> TrainOutcome:
    """Train on a frame with columns ``text``, ``title`` (nullable) and ``rating``.

    Returns the model to publish (trained, or the lexicon with a ``note``) and
    the held-out metrics of both. Pure: no I/O; deterministic for a given input.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    cfg = config or TrainConfig()
    df = reviews.dropna(subset=["text", "rating"])
    if len(df) > cfg.max_train_reviews:
        df = df.sample(n=cfg.max_train_reviews, random_state=cfg.seed)
    y = rating_labels(df["rating"].to_numpy())
    counts = {c: int((y == c).sum()) for c in LABELS}
    base_metrics: dict[str, object] = {"labelled_reviews": len(df), "class_counts": counts}

    if len(df) < cfg.min_reviews or min(counts.values()) < cfg.min_per_class:
        note = (
            f"sentiment: lexicon fallback, too few labelled reviews "
            f"({len(df)} < {cfg.min_reviews} or a class below {cfg.min_per_class}: {counts})"
        )
        model = lexicon_model()
        model.metrics = {**base_metrics, "chosen": "lexicon", "reason": note}
        return TrainOutcome(model, model.metrics, note)

    docs = np.asarray(review_documents(df["text"].tolist(), df["title"].tolist()), dtype=object)
    compound = vader_compound(docs.tolist())
    idx_train, idx_test = train_test_split(
        np.arange(len(df)), test_size=cfg.test_fraction, random_state=cfg.seed, stratify=y
    )

    vectorizer = TfidfVectorizer(
        ngram_range=NGRAM_RANGE,
        token_pattern=TOKEN_PATTERN,
        lowercase=True,
        min_df=cfg.min_df,
        max_features=cfg.max_features,
        sublinear_tf=True,
        dtype=np.float64,
    )
    vectorizer.fit(docs[idx_train])
    vocabulary = [""] * len(vectorizer.vocabulary_)
    for term, i in vectorizer.vocabulary_.items():
        vocabulary[i] = term
    draft = SentimentModel(
        version="draft",
        kind=KIND_TFIDF_LR,
        vocabulary=vocabulary,
        idf=vectorizer.idf_.astype(np.float64),
        sublinear_tf=True,
    )
    x = draft.features(docs.tolist(), compound)
    clf = LogisticRegression(C=cfg.c, class_weight="balanced", max_iter=2000)
    clf.fit(x[idx_train], y[idx_train])
    # Store the coefficients in LABELS order, whatever order scikit-learn chose.
    order = [list(clf.classes_).index(c) for c in LABELS]
    draft.coef = clf.coef_[order].astype(np.float64)
    draft.intercept = clf.intercept_[order].astype(np.float64)

    _, trained_pred = draft.score(
        df["text"].to_numpy()[idx_test].tolist(), df["title"].to_numpy()[idx_test].tolist()
    )
    trained = _scores(y[idx_test], trained_pred)
    lexicon = _scores(y[idx_test], lexicon_labels(compound[idx_test]))
    metrics: dict[str, object] = {
        **base_metrics,
        "train_reviews": len(idx_train),
        "test_reviews": len(idx_test),
        "vocabulary": len(vocabulary),
        "trained": trained,
        "lexicon": lexicon,
    }

    if trained["macro_f1"] <= lexicon["macro_f1"]:
        note = (
            f"sentiment: lexicon kept, the trained model did not beat it on held-out macro-F1 "
            f"({trained['macro_f1']:.3f} <= {lexicon['macro_f1']:.3f})"
        )
        model = lexicon_model()
        model.metrics = {**metrics, "chosen": "lexicon", "reason": note}
        return TrainOutcome(model, model.metrics, note)

    digest = hashlib.sha256()
    digest.update("\n".join(vocabulary).encode())
    for arr in (draft.idf, draft.coef, draft.intercept):
        digest.update(np.ascontiguousarray(arr).tobytes())
    draft.version = f"{KIND_TFIDF_LR}-{digest.hexdigest()[:12]}"
    draft.metrics = {**metrics, "chosen": KIND_TFIDF_LR}
    return TrainOutcome(draft, draft.metrics, None)
