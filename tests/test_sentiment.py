"""The sentiment model: training from star ratings, the shared artifact, and its scorer."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from batch.sentiment_train import TrainConfig, rating_labels, train_sentiment
from lambdalake.contract.lake import Lake
from lambdalake.sentiment import (
    KIND_LEXICON,
    KIND_TFIDF_LR,
    LEXICON_VERSION,
    SentimentModel,
    lexicon_model,
)


def generated_reviews(n: int, seed: int) -> pd.DataFrame:
    """Reviews written by the product's own generator (negations, mixed sentences, sarcasm)."""
    from generator.text import CATEGORIES, review_text

    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    ratings = rng.choice([1, 2, 3, 4, 5], p=[0.12, 0.08, 0.12, 0.28, 0.40], size=n)
    rows = []
    for r in ratings.tolist():
        category = rnd.randrange(len(CATEGORIES))
        product = rnd.choice(CATEGORIES[category].products)
        title, text = review_text(int(r), category, product, rnd)
        rows.append((text, title, int(r)))
    return pd.DataFrame(rows, columns=["text", "title", "rating"])


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro"))


@pytest.fixture(scope="module")
def trained():
    outcome = train_sentiment(generated_reviews(2000, seed=11))
    assert outcome.note is None, outcome.note
    return outcome


def test_trained_model_scores_held_out_reviews_better_than_the_lexicon(trained):
    held_out = generated_reviews(1200, seed=99)  # a different seed: reviews never seen
    truth = rating_labels(held_out["rating"].to_numpy())
    texts, titles = held_out["text"].tolist(), held_out["title"].tolist()
    _, trained_labels = trained.model.score(texts, titles)
    _, lexicon_labels = lexicon_model().score(texts, titles)
    f1_trained = macro_f1(truth, trained_labels)
    f1_lexicon = macro_f1(truth, lexicon_labels)
    assert f1_trained > f1_lexicon + 0.1, (f1_trained, f1_lexicon)
    # The metrics saved with the model say the same on its own held-out split.
    m = trained.metrics
    assert m["trained"]["macro_f1"] > m["lexicon"]["macro_f1"]
    assert m["test_reviews"] == 400 and m["train_reviews"] == 1600


def test_reviews_with_negations_are_scored_better_than_by_the_lexicon(trained):
    """Bigrams such as "not worth" carry the negation the lexicon misreads."""
    held_out = generated_reviews(1500, seed=77)
    negated = held_out[held_out["text"].str.contains(r"\b(?:not|never|no)\b|n't\b", case=False)]
    assert len(negated) > 200
    truth = rating_labels(negated["rating"].to_numpy())
    texts, titles = negated["text"].tolist(), negated["title"].tolist()
    accuracy_trained = float(np.mean(trained.model.score(texts, titles)[1] == truth))
    accuracy_lexicon = float(np.mean(lexicon_model().score(texts, titles)[1] == truth))
    assert accuracy_trained > accuracy_lexicon + 0.1, (accuracy_trained, accuracy_lexicon)
    sentiment, labels = trained.model.score(["Not worth the money."], [None])
    assert labels[0] == "negative" and sentiment[0] < 0


def test_scores_are_bounded_and_labels_agree_with_the_sign(trained):
    reviews = generated_reviews(300, seed=5)
    for model in (trained.model, lexicon_model()):
        s, labels = model.score(reviews["text"].tolist(), reviews["title"].tolist())
        assert s.dtype == np.float64 and len(s) == len(labels) == 300
        assert np.all((s >= -1) & (s <= 1))
        assert np.all(s[labels == "positive"] > 0)
        assert np.all(s[labels == "negative"] < 0)
        assert set(labels) <= {"positive", "neutral", "negative"}


def test_artifact_round_trips_through_the_lake_with_identical_scores(trained, tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    uri = trained.model.save(lake)
    assert uri.endswith(f"models/sentiment/{trained.model.version}")
    files = sorted(p.name for p in (tmp_path / "lake" / "models" / "sentiment").glob("*/*"))
    assert files == ["metrics.json", "model.json", "weights.npz"]
    loaded = SentimentModel.load(lake, trained.model.version)
    assert loaded.kind == KIND_TFIDF_LR
    assert loaded.metrics["trained"] == trained.metrics["trained"]
    reviews = generated_reviews(200, seed=8)
    a = trained.model.score(reviews["text"].tolist(), reviews["title"].tolist())
    b = loaded.score(reviews["text"].tolist(), reviews["title"].tolist())
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])

    lexicon_model().save(lake)
    assert SentimentModel.load(lake, LEXICON_VERSION).kind == KIND_LEXICON


def test_training_is_deterministic_and_the_version_names_the_contents(trained):
    again = train_sentiment(generated_reviews(2000, seed=11))
    assert again.model.version == trained.model.version
    other = train_sentiment(generated_reviews(2000, seed=12))
    assert other.model.version != trained.model.version


def test_too_few_labelled_reviews_fall_back_to_the_lexicon_with_a_note():
    outcome = train_sentiment(generated_reviews(120, seed=3), TrainConfig(min_reviews=300))
    assert outcome.model.kind == KIND_LEXICON
    assert outcome.model.version == LEXICON_VERSION
    assert outcome.note is not None and "too few labelled reviews" in outcome.note
    assert outcome.metrics["labelled_reviews"] == 120


def test_loading_a_missing_version_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-version"):
        SentimentModel.load(Lake(str(tmp_path)), "no-such-version")


def test_mismatched_texts_and_titles_are_rejected():
    with pytest.raises(ValueError, match="2 texts but 1 titles"):
        lexicon_model().score(["a", "b"], [None])
