"""Demand forecasting on series of known structure (pure pandas + statsforecast, and Spark)."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from batch.forecast import (
    INTERMITTENT_MODELS,
    MODEL_MEAN,
    MODEL_SN,
    PREVIOUS_DEFAULT,
    ForecastConfig,
    build_series,
    forecast_series,
    order_bounds,
    spark_forecast,
)

LAST = date(2026, 6, 30)
HORIZON = 28


def _frame(values: dict[tuple[str, str], np.ndarray], last: date) -> pd.DataFrame:
    rows = []
    for (sku, store), y in values.items():
        start = last - timedelta(days=len(y) - 1)
        dates = [start + timedelta(days=i) for i in range(len(y))]
        rows.append(pd.DataFrame({"sku": sku, "store_id": store, "date": dates, "units": y}))
    out = pd.concat(rows, ignore_index=True)
    return out[out["units"] != 0].reset_index(drop=True)  # days without sales have no row


def _trend_seasonal(rng: np.random.Generator, n: int, base: float) -> np.ndarray:
    t = np.arange(n)
    weekly = np.array([0.6, 0.8, 1.0, 1.0, 1.2, 1.6, 1.4])
    mean = (base + 0.05 * t) * weekly[t % 7]
    return rng.poisson(mean).astype(np.int64)


def _intermittent(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.random(n) < 0.12) * (1 + rng.poisson(1.5, n))


@pytest.fixture(scope="module")
def structured():
    """12 trend + weekly-season series and 8 intermittent ones, 300 days each (+28 held out)."""
    rng = np.random.default_rng(20260630)
    n = 300 + HORIZON
    values: dict[tuple[str, str], np.ndarray] = {}
    for i in range(12):
        values[(f"T{i:02d}", "S1")] = _trend_seasonal(rng, n, base=8 + 2 * i)
    for i in range(8):
        y = _intermittent(rng, n)
        y[0] = 1  # every series starts with a sale
        values[(f"I{i:02d}", "S1")] = y
    cut = LAST - timedelta(days=HORIZON)
    train = {k: v[:-HORIZON] for k, v in values.items()}
    held = {k: v[-HORIZON:] for k, v in values.items()}
    result = forecast_series(_frame(train, cut), cut)
    return result, held, cut


def test_trend_seasonal_series_get_the_ensemble_and_it_beats_seasonal_naive(structured):
    """Regular series get the mean of the default members (those for series without a year
    of history: these have 300 days); its backtest beats seasonal naive."""
    result, _, _ = structured
    cand = result.candidates
    chosen = result.accuracy.set_index("sku")
    cfg = ForecastConfig()
    assert cfg.yearly_min_days > 300
    for sku in [f"T{i:02d}" for i in range(12)]:
        mine = cand[cand["sku"] == sku].set_index("model")
        model = chosen.loc[sku, "model"]
        assert model == cfg.for_short().ensemble_name
        assert set(cfg.short_models or ()) | {MODEL_SN} <= set(mine.index)
        assert mine.loc[model, "mase"] < mine.loc[MODEL_SN, "mase"]
        assert chosen.loc[sku, "mase"] == pytest.approx(mine.loc[model, "mase"])
        assert chosen.loc[sku, "n_train_days"] == min(300, cfg.train_days)


def test_the_previous_default_still_chooses_one_model_per_series(structured):
    """``combine='select'`` (the earlier default) picks per series among native-interval models."""
    _, _, cut = structured
    rng = np.random.default_rng(20260630)
    values = {(f"T{i:02d}", "S1"): _trend_seasonal(rng, 300, base=8 + 2 * i) for i in range(4)}
    result = forecast_series(_frame(values, cut), cut, PREVIOUS_DEFAULT)
    cand = result.candidates
    for sku, model in result.accuracy.set_index("sku")["model"].items():
        mine = cand[cand["sku"] == sku].set_index("model")
        assert model in PREVIOUS_DEFAULT.smooth_models and model != MODEL_SN
        assert mine.loc[model, "mase"] == mine["mase"].min()


def test_intermittent_series_use_intermittent_methods_that_beat_seasonal_naive(structured):
    """Sparse series are chosen by RMSSE: on mostly-zero days MAE rewards forecasting 0."""
    result, _, _ = structured
    cand = result.candidates
    chosen = result.accuracy.set_index("sku")
    for sku in [f"I{i:02d}" for i in range(8)]:
        mine = cand[cand["sku"] == sku].set_index("model")
        assert set(mine.index) == set(INTERMITTENT_MODELS)
        model = chosen.loc[sku, "model"]
        assert model in INTERMITTENT_MODELS[1:]
        assert mine.loc[model, "rmsse"] < mine.loc[MODEL_SN, "rmsse"]


def test_forecasts_cover_the_next_28_days_with_ordered_non_negative_bounds(structured):
    result, _, cut = structured
    fc = result.forecasts
    assert len(result.accuracy) == 20
    assert fc.groupby(["sku", "store_id"]).size().eq(HORIZON).all()
    expected = {cut + timedelta(days=i) for i in range(1, HORIZON + 1)}
    assert set(fc["date"]) == expected
    assert (fc["lower_95"] >= 0).all()
    assert (fc["lower_95"] <= fc["lower_80"]).all()
    assert (fc["lower_80"] <= fc["forecast"]).all()
    assert (fc["forecast"] <= fc["upper_80"]).all()
    assert (fc["upper_80"] <= fc["upper_95"]).all()
    assert np.isfinite(fc[["forecast", "lower_80", "upper_80", "lower_95", "upper_95"]]).all().all()


def test_interval_coverage_on_held_out_days_is_near_nominal(structured):
    result, held, _cut = structured
    fc = result.forecasts.sort_values(["sku", "date"])
    hits80, hits95 = [], []
    for (sku, store), actual in held.items():
        mine = fc[(fc["sku"] == sku) & (fc["store_id"] == store)]
        hits80 += list((actual >= mine["lower_80"]) & (actual <= mine["upper_80"]))
        hits95 += list((actual >= mine["lower_95"]) & (actual <= mine["upper_95"]))
    cov80, cov95 = float(np.mean(hits80)), float(np.mean(hits95))
    assert 0.65 <= cov80 <= 0.97, cov80
    assert cov95 >= 0.85, cov95
    assert cov95 >= cov80
    # The backtest's own coverage estimates are in the same range.
    acc = result.accuracy
    assert 0.6 <= acc["coverage_80"].mean() <= 0.97


def test_point_forecasts_track_the_held_out_level(structured):
    result, held, _ = structured
    fc = result.forecasts
    for i in range(12):
        sku = f"T{i:02d}"
        predicted = fc[fc["sku"] == sku]["forecast"].sum()
        actual = held[(sku, "S1")].sum()
        assert abs(predicted - actual) / actual < 0.25, (sku, predicted, actual)


def test_short_and_all_zero_series_fall_back_to_the_mean():
    short = np.array([3, 0, 5, 4, 0, 2, 6, 3, 1, 4], dtype=np.int64)
    values = {("NEW", "S1"): short}
    df = _frame(values, LAST)
    # A series whose only sale was long ago and that sold nothing in its training window.
    old = pd.DataFrame(
        {"sku": ["GONE"], "store_id": ["S1"], "date": [LAST - timedelta(days=400)], "units": [2]}
    )
    result = forecast_series(pd.concat([df, old], ignore_index=True), LAST)
    acc = result.accuracy.set_index("sku")
    assert acc.loc["NEW", "model"] == MODEL_MEAN
    assert np.isnan(acc.loc["NEW", "mase"])
    assert acc.loc["NEW", "n_train_days"] == len(short)
    new = result.forecasts[result.forecasts["sku"] == "NEW"]
    assert new["forecast"].iloc[0] == pytest.approx(short.mean())
    gone = result.forecasts[result.forecasts["sku"] == "GONE"]
    assert len(gone) == HORIZON and (gone["upper_95"] == 0).all()


def test_build_series_fills_missing_days_with_zero_and_clips_returns():
    daily = pd.DataFrame(
        {
            "sku": ["A", "A", "A", "A"],
            "store_id": ["S", "S", "S", "S"],
            "date": [date(2026, 1, 2), date(2026, 1, 2), date(2026, 1, 4), date(2026, 1, 5)],
            "units": [3, 1, -2, 5],
        }
    )
    s = build_series(daily, date(2026, 1, 7))
    assert list(s["ds"].dt.date) == [date(2026, 1, d) for d in range(2, 8)]
    assert list(s["y"]) == [4.0, 0.0, 0.0, 5.0, 0.0, 0.0]


def test_order_bounds_repairs_crossed_and_negative_bounds():
    raw = pd.DataFrame(
        {
            "forecast": [-1.0, 5.0],
            "lower_80": [-3.0, 6.0],
            "upper_80": [2.0, 4.0],
            "lower_95": [-4.0, 7.0],
            "upper_95": [1.0, 3.0],
        }
    )
    out = order_bounds(raw)
    assert list(out["forecast"]) == [0.0, 5.0]
    cols = ["lower_95", "lower_80", "forecast", "upper_80", "upper_95"]
    assert (out[cols].diff(axis=1).iloc[:, 1:] >= 0).all().all()
    assert (out[cols] >= 0).all().all()


def test_spark_grouped_udf_gives_the_same_forecasts_as_the_pure_function(spark):
    """Each Spark task runs ``forecast_series`` on its bucket (the global model learns from the
    bucket's series): the same numbers as the pure function on the same buckets."""
    from pyspark.sql import functions as F

    rng = np.random.default_rng(5)
    # Over a year of history, so the smooth series get the global model (LightGBM).
    n = ForecastConfig().yearly_min_days + 30
    values = {(f"P{i}", f"S{i % 2}"): _trend_seasonal(rng, n, base=5 + i) for i in range(6)}
    values[("Q0", "S0")] = _intermittent(rng, n) + np.eye(1, n, 0, dtype=np.int64)[0]
    df = _frame(values, LAST)
    sdf = spark.createDataFrame(df)
    buckets = 3
    assignment = (
        sdf.select("sku", "store_id")
        .distinct()
        .withColumn("bucket", F.pmod(F.xxhash64("sku", "store_id"), F.lit(buckets)))
        .toPandas()
    )
    assert assignment["bucket"].nunique() > 1  # the check spans several tasks
    parts = []
    for _, keys in assignment.groupby("bucket"):
        mine = df.merge(keys[["sku", "store_id"]], on=["sku", "store_id"])
        parts.append(forecast_series(mine, LAST))
    exp_fc = pd.concat([p.forecasts for p in parts]).sort_values(["sku", "store_id", "date"])
    exp_acc = pd.concat([p.accuracy for p in parts]).set_index(["sku", "store_id"]).sort_index()
    out = spark_forecast(sdf, LAST, ForecastConfig(reconcile="BottomUp"), buckets=buckets)
    out = out.toPandas()
    fc = out[out["kind"] == "forecast"].sort_values(["sku", "store_id", "date"])
    assert len(fc) == len(exp_fc) == 7 * HORIZON
    np.testing.assert_allclose(fc["forecast"].to_numpy(), exp_fc["forecast"].to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(fc["upper_95"].to_numpy(), exp_fc["upper_95"].to_numpy(), rtol=1e-9)
    acc = out[out["kind"] == "accuracy"].set_index(["sku", "store_id"]).sort_index()
    assert list(acc["model"]) == list(exp_acc["model"])
    assert (acc["model"] == ForecastConfig().ensemble_name).sum() == 6


def test_each_series_is_forecast_from_its_own_end_date():
    """Per-series ends: a series that ends earlier is forecast from its own last day."""
    rng = np.random.default_rng(11)
    early = LAST - timedelta(days=40)
    values = {("A", "S1"): _trend_seasonal(rng, 200, base=10)}
    df = pd.concat([_frame(values, LAST), _frame({("B", "S1"): values[("A", "S1")]}, early)])
    # A far-future order of B beyond its end is ignored, not padded with zeros.
    future = pd.DataFrame(
        {"sku": ["B"], "store_id": ["S1"], "date": [date(2099, 12, 31)], "units": [5]}
    )
    df = pd.concat([df, future], ignore_index=True)
    ends = {("A", "S1"): LAST, ("B", "S1"): early}
    result = forecast_series(df, ends)
    fc = result.forecasts
    for (sku, _), end in ends.items():
        mine = fc[fc["sku"] == sku]
        assert mine["date"].min() == end + timedelta(days=1)
        assert mine["date"].max() == end + timedelta(days=HORIZON)
    acc = result.accuracy.set_index("sku")
    assert acc.loc["B", "n_train_days"] == 200
    # The same series, shifted in time, gets the same forecasts.
    a = fc[fc["sku"] == "A"]["forecast"].to_numpy()
    b = fc[fc["sku"] == "B"]["forecast"].to_numpy()
    assert np.abs(a - b).max() < 0.35 * a.mean()


def test_the_batch_forecast_origin_ignores_days_after_the_run_clock(spark):
    """One order dated 2099 must not pad every series to 2099 (issue 17, item 4)."""
    from batch.run import forecast_frames

    rng = np.random.default_rng(3)
    end = date.today() - timedelta(days=1)
    values = {(f"P{i}", "S1"): _trend_seasonal(rng, 120, base=6 + i) for i in range(3)}
    df = _frame(values, end)
    far = pd.DataFrame(
        {"sku": ["P0"], "store_id": ["S1"], "date": [date(2099, 12, 31)], "units": [3]}
    )
    sdf = spark.createDataFrame(pd.concat([df, far], ignore_index=True))
    cfg = ForecastConfig(smooth_models=("SeasonalNaive",), intermittent_models=("SeasonalNaive",))
    info: dict = {}
    fc, _, _ = forecast_frames(spark, sdf, cfg, "test-run", info, lambda d: d)
    dates = fc.select("date").distinct().toPandas()["date"]
    assert dates.min() == end + timedelta(days=1)
    assert dates.max() == end + timedelta(days=HORIZON)
    assert info["series"] == 3
    assert info["nodes"] == 3 + 3 + 1 + 1  # the series, each SKU, the one store, the total


def test_spark_levels_equal_the_one_process_levels(spark):
    """The batch run forecasts every level in Spark and reconciles on the driver: the same
    reconciliation choice, holdout scores and coherent numbers as ``forecast_levels`` on the
    same data (per-series members, so the split into buckets cannot change them)."""
    from batch.forecast import forecast_levels
    from batch.run import forecast_frames

    rng = np.random.default_rng(21)
    end = date.today() - timedelta(days=1)
    values = {
        (f"P{i}", f"S{j}"): _trend_seasonal(rng, 150, base=2 + 3 * i + j)
        for i in range(3)
        for j in range(2)
    }
    values[("Q0", "S0")] = _intermittent(rng, 150) + np.eye(1, 150, 0, dtype=np.int64)[0]
    df = _frame(values, end)
    cfg = ForecastConfig(smooth_models=("SeasonalNaive", "ETS_ANA"))
    info: dict = {}
    fc, acc, method = forecast_frames(spark, spark.createDataFrame(df), cfg, "t", info, lambda d: d)
    pure = forecast_levels(df, end, cfg)
    assert method == pure.method == info["reconcile"]
    for name, score in pure.holdout_mase.items():
        assert info[f"holdout_mase_{name}"] == pytest.approx(score, abs=1e-4)
    keys = ["level", "sku", "store_id", "date"]
    got = fc.toPandas().sort_values(keys).reset_index(drop=True)
    want = pure.forecasts.sort_values(keys).reset_index(drop=True)
    assert got[keys].astype(str).equals(want[keys].astype(str))
    for col in ("forecast", "lower_80", "upper_80", "lower_95", "upper_95"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-9, atol=1e-9)
    assert info["nodes"] == 7 + 4 + 2 + 1
    levels = acc.groupBy("level").count().toPandas().set_index("level")["count"].to_dict()
    assert levels == {"sku_store": 7, "sku": 4, "store": 2, "total": 1}


def test_points_only_gives_the_same_points_without_the_backtest():
    """The reconciliation holdout asks for points only: the ensemble's points are the same,
    its bounds collapse onto them and nothing is scored."""
    rng = np.random.default_rng(8)
    values = {(f"P{i}", "S1"): _trend_seasonal(rng, 200, base=4 + i) for i in range(4)}
    df = _frame(values, LAST)
    cfg = ForecastConfig(smooth_models=("SeasonalNaive", "ETS_ANA"))
    full = forecast_series(df, LAST, cfg)
    points = forecast_series(df, LAST, cfg, points_only=True)
    keys = ["sku", "store_id", "date"]
    merged = full.forecasts.merge(points.forecasts, on=keys, suffixes=("", "_p"))
    assert len(merged) == len(full.forecasts) == 4 * HORIZON
    np.testing.assert_allclose(merged["forecast_p"], merged["forecast"], rtol=1e-12)
    assert (merged["upper_95_p"] == merged["forecast_p"]).all()
    assert (merged["upper_95"] > merged["forecast"]).any()
    assert points.accuracy["mase"].isna().all() and points.candidates.empty


def test_weekend_holidays_are_observed_and_the_year_end_break_is_one_holiday():
    """Christmas 1988 was a Sunday (observed Monday 26th), New Year 2011 a Saturday (observed
    Friday 31 December 2010): the observed day shares the holiday's code. The working days
    between Boxing Day and New Year's Eve, and 2 January, are one holiday."""
    from batch.forecast import HOLIDAY_NAMES, holiday

    def name(d: date) -> str:
        code = int(holiday([d])[0])
        return HOLIDAY_NAMES[code - 1] if code else ""

    assert name(date(1988, 12, 26)) == "christmas"
    assert name(date(2010, 12, 31)) == "new_year"  # only the next year knows it
    assert name(date(2011, 12, 31)) == "new_years_eve"  # a Saturday, New Year 2012 a Sunday
    assert name(date(2012, 1, 2)) == "new_year"
    assert name(date(2015, 7, 3)) == "independence_day"
    assert name(date(2016, 12, 26)) == "christmas"
    assert name(date(2014, 12, 26)) == "boxing_day"  # Christmas on a Thursday
    assert {name(date(2014, 12, d)) for d in range(27, 31)} == {"year_end_break"}
    assert name(date(2015, 1, 2)) == "year_end_break"
    assert name(date(2015, 1, 5)) == ""


def test_series_without_a_year_learn_holidays_as_a_group():
    """Under a year of history each holiday was seen once at most, so holidays are pooled in
    groups: a business closed on Memorial Day and Independence Day is forecast closed on Labor
    Day; one for which those days were ordinary is forecast as on any Monday."""
    rng = np.random.default_rng(3)
    start, cut = date(2025, 3, 3), date(2025, 8, 29)
    days = [start + timedelta(days=i) for i in range((cut - start).days + 1)]
    weekday = np.array([d.weekday() < 5 for d in days])
    open_days = rng.poisson(300, len(days)) * weekday
    closed = {date(2025, 5, 26), date(2025, 7, 4)}
    shut = open_days * np.array([d not in closed for d in days])
    daily = pd.concat(
        [
            pd.DataFrame({"sku": sku, "store_id": "S1", "date": days, "units": y})
            for sku, y in (("CLOSES", shut), ("OPEN", open_days))
        ]
    )
    result = forecast_series(daily, cut)
    fc = result.forecasts.set_index(["sku", "date"])["forecast"]
    labor_day, next_monday = date(2025, 9, 1), date(2025, 9, 8)
    assert fc[("CLOSES", labor_day)] < 0.1 * fc[("CLOSES", next_monday)]
    assert fc[("OPEN", labor_day)] == pytest.approx(fc[("OPEN", next_monday)], rel=0.15)
    assert fc[("CLOSES", next_monday)] == pytest.approx(300, rel=0.15)
    model = result.accuracy.set_index("sku")["model"]
    assert set(model) == {ForecastConfig().for_short().ensemble_name}


def test_series_with_a_year_of_history_keep_the_yearly_ensemble():
    rng = np.random.default_rng(4)
    cfg = ForecastConfig()
    values = {
        (f"L{i}", "S1"): _trend_seasonal(rng, cfg.yearly_min_days + 30, 6 + i) for i in (0, 1)
    }
    result = forecast_series(_frame(values, LAST), LAST)
    assert set(result.accuracy["model"]) == {cfg.ensemble_name}


def test_a_member_failing_on_a_series_leaves_it_the_other_members(monkeypatch):
    """The calendar members run in one statsforecast call; a series where one of them fails
    is not dropped to the mean: it gets the members that work on it."""
    from statsforecast.models import ARIMA

    import batch.forecast as forecast

    class Flaky(ARIMA):
        """Fails on the series whose demand is in the thousands."""

        def _check(self, y):
            if np.max(y) > 1000:
                raise ValueError("flaky")

        def fit(self, y, *args, **kwargs):
            self._check(y)
            return super().fit(y, *args, **kwargs)

        def forecast(self, y, *args, **kwargs):
            self._check(y)
            return super().forecast(y, *args, **kwargs)

        def forward(self, y, *args, **kwargs):
            self._check(y)
            return super().forward(y, *args, **kwargs)

    original = forecast._model

    def model(name, cfg):
        if name != forecast.MODEL_SARIMA:
            return original(name, cfg)
        return Flaky(order=(2, 0, 0), seasonal_order=(0, 1, 1), season_length=7, alias=name)

    monkeypatch.setattr(forecast, "_model", model)
    rng = np.random.default_rng(9)
    values = {
        ("SMALL", "S1"): _trend_seasonal(rng, 200, 10),
        ("BIG", "S1"): _trend_seasonal(rng, 200, 3000),
    }
    result = forecast_series(_frame(values, LAST), LAST)
    cfg = ForecastConfig()
    acc = result.accuracy.set_index("sku")["model"]
    assert acc["SMALL"] == acc["BIG"] == cfg.for_short().ensemble_name
    cand = result.candidates
    assert set(cand[cand["sku"] == "SMALL"]["model"]) >= {"FourierETS", "SARIMA"}
    big = set(cand[cand["sku"] == "BIG"]["model"])
    assert "FourierETS" in big and "SARIMA" not in big
    assert result.forecasts.groupby("sku").size().eq(HORIZON).all()


def test_a_series_running_above_its_season_is_forecast_at_its_recent_level():
    """Three years of the same yearly and weekly pattern, then the last three weeks 25 % above
    it (a year running above its season): FourierETS follows the recent level for the next
    two weeks (recent_level_days) instead of waiting for ETS' slow level, and fades back by
    day 28; with recent_level_days=0 it does not (measured: mean error 3.8 against 16.3)."""
    rng = np.random.default_rng(12)
    n = 3 * 365
    t = np.arange(n)
    weekly = np.array([0.9, 1.0, 1.05, 1.05, 1.1, 0.95, 0.95])
    mean = 200 * (1 + 0.2 * np.sin(2 * np.pi * t / 365.25)) * weekly[t % 7]
    mean[-21:] *= 1.25
    values = {("B1", "S1"): rng.poisson(mean).astype(np.int64)}
    df = _frame(values, LAST)

    def first_weeks(days: int) -> np.ndarray:
        cfg = ForecastConfig(smooth_models=("FourierETS",), recent_level_days=days)
        fc = forecast_series(df, LAST, cfg).forecasts.sort_values("date")
        return fc["forecast"].to_numpy()

    moved, plain = first_weeks(14), first_weeks(0)
    ahead = np.arange(1, HORIZON + 1)
    expected = 200 * (1 + 0.2 * np.sin(2 * np.pi * (n - 1 + ahead) / 365.25)) * 1.25
    expected *= weekly[(n - 1 + ahead) % 7]
    err_moved = np.abs(moved[:14] - expected[:14]).mean()
    err_plain = np.abs(plain[:14] - expected[:14]).mean()
    assert err_moved < 0.5 * err_plain, (err_moved, err_plain)
    assert moved[:14].mean() > plain[:14].mean()
    # Faded out by the end of the horizon: the last day is moved less than the first two weeks.
    assert abs(moved[-1] - plain[-1]) < np.abs(moved[:14] - plain[:14]).mean()
