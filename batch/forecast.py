"""Demand forecasts per (sku, store): per-series model choice by rolling-origin backtest.

The pure part (``forecast_series``) takes daily units of many series and
returns the 28-day forecasts and the backtest accuracy; Spark runs it inside a
grouped pandas UDF (``spark_forecast``), one group per bucket of series, so
series spread over the executors and each call amortises statsforecast's setup
over many series.

Method (the decisions, in order):

* **Series.** Daily units from the series' first sale to the snapshot's last
  date, missing days filled with 0, returns netted and negative days clipped to
  0 (demand is not negative). Models see at most the last ``train_days`` days.
* **Tiers.** A series with fewer than ``min_backtest_days`` days cannot be
  backtested: it gets ``Mean`` (the mean daily demand, intervals from the
  empirical quantiles of its days) and no accuracy figures. Longer series whose
  share of zero days is at least ``intermittent_zero_share`` are
  *intermittent*; the rest are *smooth*.
* **Candidates.** Smooth: ``SeasonalNaive`` (7), ``ETS_ANA`` (exponential
  smoothing of a fixed form: additive error, no trend, additive weekly
  season; the full AutoETS search is ~10x slower) and ``Theta`` (7, seasonal
  decomposition + drift, which covers trends). Intermittent:
  ``SeasonalNaive``, ``CrostonOptimized``, ``TSB`` and ``ADIDA``.
* **Backtest.** Rolling origin, ``backtest_windows`` windows of
  ``backtest_horizon`` days ending at the last date. Smooth models are fitted
  once at the first origin and rolled forward (statsforecast ``refit=False``),
  intermittent ones are refitted per window (they are cheap). The series'
  choice is the candidate with the lowest MASE (scale: the in-sample mean
  absolute weekly difference before the first origin) for smooth series, and
  the lowest RMSSE (squared errors, same scale squared) for intermittent ones:
  on a series that is mostly zeros the median is 0, so MAE-type errors reward
  forecasting nothing, while stocking needs the mean rate (the M5 competition
  scored RMSSE for the same reason). Ties go to the simpler model listed
  first. Only the chosen model is refitted on the full window.
* **Intervals.** Models with native prediction intervals (SeasonalNaive, ETS,
  Theta) use statsforecast's 80 % and 95 % levels. Croston/TSB/ADIDA have none,
  and their forecast is a *rate* (say 0.3 a day) while a day's demand is 0 or a
  few units: their bounds are the empirical quantiles of the series' daily
  demand over its training window (10 %/90 % and 2.5 %/97.5 %, rounded
  outwards), so "80 %" means 80 % of days, as for the other models. (Symmetric
  conformal bands around a rate cut through the zero days; they covered ~60 %.)
  ``Mean`` uses the same empirical bounds. Backtest coverage is measured on the
  bounds as published, each window's bounds computed from its own past only.
  Finally every bound is clipped at 0 and the ordering
  ``lower_95 <= lower_80 <= forecast <= upper_80 <= upper_95`` enforced.
* **Accuracy.** ``mase``, ``smape`` (percent, 0-200; a day where both actual
  and forecast are 0 counts as 0) and the backtest coverage of each interval.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

LEVELS = (80, 95)
MODEL_MEAN = "Mean"
MODEL_SN = "SeasonalNaive"
MODEL_ETS = "ETS_ANA"
MODEL_THETA = "Theta"
MODEL_CROSTON = "CrostonOptimized"
MODEL_TSB = "TSB"
MODEL_ADIDA = "ADIDA"
SMOOTH_MODELS = (MODEL_SN, MODEL_ETS, MODEL_THETA)
INTERMITTENT_MODELS = (MODEL_SN, MODEL_CROSTON, MODEL_TSB, MODEL_ADIDA)
NATIVE_INTERVALS = {MODEL_SN, MODEL_ETS, MODEL_THETA}

FORECAST_COLUMNS = [
    "sku",
    "store_id",
    "date",
    "forecast",
    "lower_80",
    "upper_80",
    "lower_95",
    "upper_95",
    "model",
]
ACCURACY_COLUMNS = [
    "sku",
    "store_id",
    "model",
    "mase",
    "smape",
    "coverage_80",
    "coverage_95",
    "n_train_days",
]


@dataclass(frozen=True)
class ForecastConfig:
    horizon: int = 28
    season_length: int = 7
    backtest_windows: int = 3
    backtest_horizon: int = 14
    train_days: int = 182
    intermittent_zero_share: float = 0.5
    tsb_alpha_d: float = 0.2
    tsb_alpha_p: float = 0.2
    smooth_models: tuple[str, ...] = SMOOTH_MODELS
    intermittent_models: tuple[str, ...] = INTERMITTENT_MODELS

    @property
    def backtest_days(self) -> int:
        return self.backtest_windows * self.backtest_horizon

    @property
    def min_backtest_days(self) -> int:
        # The first origin needs four weeks of history to fit a weekly season.
        return self.backtest_days + 4 * self.season_length


CANDIDATE_COLUMNS = [
    "sku",
    "store_id",
    "model",
    "mase",
    "rmsse",
    "smape",
    "coverage_80",
    "coverage_95",
]


@dataclass
class ForecastResult:
    forecasts: pd.DataFrame  # FORECAST_COLUMNS
    accuracy: pd.DataFrame  # ACCURACY_COLUMNS: the chosen model of each series
    candidates: pd.DataFrame | None = None  # CANDIDATE_COLUMNS: every backtested model


# --- series preparation --------------------------------------------------------------------


def build_series(daily: pd.DataFrame, last_date: date) -> pd.DataFrame:
    """Dense daily series: ``uid, sku, store_id, ds, y`` from first sale to ``last_date``.

    ``daily`` has ``sku, store_id, date, units`` (several rows per day are summed).
    """
    if daily.empty:
        return pd.DataFrame(
            {
                "uid": pd.Series(dtype=np.int64),
                "sku": pd.Series(dtype=object),
                "store_id": pd.Series(dtype=object),
                "ds": pd.Series(dtype="datetime64[ns]"),
                "y": pd.Series(dtype=np.float64),
            }
        )
    d = daily.copy()
    d["ds"] = pd.to_datetime(d["date"])
    d = d[d["ds"] <= pd.Timestamp(last_date)]
    d = d.groupby(["sku", "store_id", "ds"], as_index=False, sort=True)["units"].sum()
    keys = d[["sku", "store_id"]].drop_duplicates().reset_index(drop=True)
    keys["uid"] = np.arange(len(keys), dtype=np.int64)
    d = d.merge(keys, on=["sku", "store_id"])
    first = d.groupby("uid")["ds"].min().sort_index()
    end = pd.Timestamp(last_date)
    lengths = ((end - first).dt.days + 1).to_numpy()
    uid = np.repeat(first.index.to_numpy(), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    ds = np.repeat(first.to_numpy(), lengths) + offsets.astype("timedelta64[D]")
    dense = pd.DataFrame({"uid": uid, "ds": ds})
    dense = dense.merge(d[["uid", "ds", "units"]], on=["uid", "ds"], how="left")
    dense["y"] = dense["units"].fillna(0).clip(lower=0).astype(np.float64)
    dense = dense.drop(columns="units").merge(keys, on="uid")
    return dense.sort_values(["uid", "ds"]).reset_index(drop=True)[
        ["uid", "sku", "store_id", "ds", "y"]
    ]


# --- statsforecast ------------------------------------------------------------------------


def _model(name: str, cfg: ForecastConfig) -> Any:
    from statsforecast.models import (
        ADIDA,
        TSB,
        AutoETS,
        CrostonOptimized,
        SeasonalNaive,
        Theta,
    )

    s = cfg.season_length
    return {
        MODEL_SN: lambda: SeasonalNaive(season_length=s, alias=MODEL_SN),
        MODEL_ETS: lambda: AutoETS(season_length=s, model="ANA", alias=MODEL_ETS),
        MODEL_THETA: lambda: Theta(season_length=s, alias=MODEL_THETA),
        MODEL_CROSTON: lambda: CrostonOptimized(alias=MODEL_CROSTON),
        MODEL_TSB: lambda: TSB(alpha_d=cfg.tsb_alpha_d, alpha_p=cfg.tsb_alpha_p, alias=MODEL_TSB),
        MODEL_ADIDA: lambda: ADIDA(alias=MODEL_ADIDA),
    }[name]()


def _split_native(names: tuple[str, ...]) -> list[tuple[tuple[str, ...], bool]]:
    """Candidates in two statsforecast calls: with native intervals, and without."""
    native = tuple(n for n in names if n in NATIVE_INTERVALS)
    other = tuple(n for n in names if n not in NATIVE_INTERVALS)
    return [(group, nat) for group, nat in ((native, True), (other, False)) if group]


_quantiles_patched = False


def _cache_interval_quantiles() -> None:
    """Cache statsforecast's normal quantiles for the interval levels.

    statsforecast 2.1.1 builds a frozen scipy distribution on every interval it
    computes (~7 ms each, a third of the backtest's time); the quantiles depend
    only on the levels, so a cache returns identical numbers.
    """
    global _quantiles_patched
    if _quantiles_patched:
        return
    import functools

    from statsforecast import utils as sf_utils

    original = sf_utils._quantiles

    @functools.lru_cache(maxsize=32)
    def cached(levels: tuple[float, ...], distribution: str) -> np.ndarray:
        return np.asarray(original(np.asarray(levels), distribution))

    def quantiles(level: Any, distribution: str = "normal", dist_params: Any = None) -> Any:
        if dist_params is not None:
            return original(level, distribution, dist_params)
        levels = tuple(float(x) for x in np.atleast_1d(np.asarray(level)))
        return cached(levels, distribution).copy()

    sf_utils._quantiles = quantiles
    _quantiles_patched = True


def _sf(models: list[Any]) -> Any:
    from statsforecast import StatsForecast

    return StatsForecast(models=models, freq="D", n_jobs=1)


def _run_isolating_failures(fn: Any, df: pd.DataFrame) -> pd.DataFrame:
    """Run ``fn(df)``; if statsforecast fails on the batch, run series one by one and skip
    the ones that fail (they fall back to a simpler model downstream)."""
    try:
        return fn(df)
    except Exception:
        parts = []
        for _, one in df.groupby("unique_id", sort=False):
            try:
                parts.append(fn(one))
            except Exception:
                continue
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _cross_validate(
    df: pd.DataFrame, names: tuple[str, ...], cfg: ForecastConfig, *, native: bool
) -> pd.DataFrame:
    models = [_model(n, cfg) for n in names]
    refit = not all(n in NATIVE_INTERVALS for n in names)  # forward() exists for native ones

    def run(part: pd.DataFrame) -> pd.DataFrame:
        return _sf(models).cross_validation(
            df=part,
            h=cfg.backtest_horizon,
            n_windows=cfg.backtest_windows,
            step_size=cfg.backtest_horizon,
            level=list(LEVELS) if native else None,
            refit=refit,
        )

    return _run_isolating_failures(run, df)


def _final_forecast(df: pd.DataFrame, name: str, cfg: ForecastConfig) -> pd.DataFrame:
    model = _model(name, cfg)
    native = name in NATIVE_INTERVALS

    def run(part: pd.DataFrame) -> pd.DataFrame:
        return _sf([model]).forecast(df=part, h=cfg.horizon, level=list(LEVELS) if native else None)

    return _run_isolating_failures(run, df)


# --- metrics ---------------------------------------------------------------------------------


def demand_quantiles(y: np.ndarray) -> dict[str, float]:
    """Interval bounds from the empirical distribution of daily demand ``y``.

    Used by the intermittent methods (whose forecast is a rate, not a day's
    demand) and the ``Mean`` fallback. Lower bounds round down and upper bounds
    up, so integer demand on a bound counts as covered.
    """
    y = np.asarray(y, dtype=np.float64)
    y = y[np.isfinite(y)]
    if len(y) == 0:
        return dict.fromkeys(("lower_80", "upper_80", "lower_95", "upper_95"), 0.0)
    return {
        "lower_80": float(np.quantile(y, 0.10, method="lower")),
        "upper_80": float(np.quantile(y, 0.90, method="higher")),
        "lower_95": float(np.quantile(y, 0.025, method="lower")),
        "upper_95": float(np.quantile(y, 0.975, method="higher")),
    }


def _smape(y: np.ndarray, f: np.ndarray) -> float:
    den = np.abs(y) + np.abs(f)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(den == 0, 0.0, 2.0 * np.abs(y - f) / den)
    return float(100.0 * np.mean(terms)) if len(terms) else math.nan


def _seasonal_scale(y: np.ndarray, season: int, power: int = 1) -> float:
    """Mean |weekly difference|**power of the history (MASE: 1, RMSSE: 2)."""
    if len(y) > season:
        scale = float(np.mean(np.abs(y[season:] - y[:-season]) ** power))
        if scale > 0:
            return scale
    if len(y) > 1:
        scale = float(np.mean(np.abs(np.diff(y)) ** power))
        if scale > 0:
            return scale
    return 1.0  # a constant history: the scaled error degrades to the raw one


@dataclass
class _Score:
    mase: float
    rmsse: float
    smape: float
    coverage_80: float
    coverage_95: float


def _ordered(f: np.ndarray, bounds: dict[str, np.ndarray]) -> pd.DataFrame:
    return order_bounds(pd.DataFrame({"forecast": f, **bounds}))


def _score_model(
    cv: pd.DataFrame,
    name: str,
    history: pd.DataFrame,
    scales: tuple[float, float],
    cfg: ForecastConfig,
) -> _Score:
    """Backtest errors and interval coverage of one model on one series.

    Coverage is measured on the intervals as published (clipped and ordered);
    for models without native intervals the bounds of each window come from
    the demand of the ``train_days`` before its origin.
    """
    y = cv["y"].to_numpy(dtype=np.float64)
    f = np.clip(cv[name].to_numpy(dtype=np.float64), 0.0, None)
    if not np.all(np.isfinite(f)):
        return _Score(math.inf, math.inf, math.nan, math.nan, math.nan)
    if name in NATIVE_INTERVALS:
        bounds = {
            f"{side}_{level}": cv[f"{name}-{'lo' if side == 'lower' else 'hi'}-{level}"].to_numpy(
                dtype=np.float64
            )
            for level in LEVELS
            for side in ("lower", "upper")
        }
    else:
        bounds = {k: np.empty(len(cv)) for k in ("lower_80", "upper_80", "lower_95", "upper_95")}
        cutoffs = cv["cutoff"].to_numpy()
        hist_ds = history["ds"].to_numpy()
        hist_y = history["y"].to_numpy(dtype=np.float64)
        for c in np.unique(cutoffs):
            past = hist_y[hist_ds <= c][-cfg.train_days :]
            for key, value in demand_quantiles(past).items():
                bounds[key][cutoffs == c] = value
    iv = _ordered(f, bounds)
    err = np.abs(y - f)
    cov = {
        level: float(
            np.mean((y >= iv[f"lower_{level}"].to_numpy()) & (y <= iv[f"upper_{level}"].to_numpy()))
        )
        for level in LEVELS
    }
    scale, sq_scale = scales
    return _Score(
        mase=float(np.mean(err)) / scale,
        rmsse=math.sqrt(float(np.mean(err**2)) / sq_scale),
        smape=_smape(y, f),
        coverage_80=cov[80],
        coverage_95=cov[95],
    )


# --- the whole procedure -----------------------------------------------------------------------


def order_bounds(out: pd.DataFrame) -> pd.DataFrame:
    """Clip at 0 and enforce lower_95 <= lower_80 <= forecast <= upper_80 <= upper_95."""
    f = out["forecast"].clip(lower=0.0)
    lo80 = np.minimum(out["lower_80"].fillna(f).clip(lower=0.0), f)
    lo95 = np.minimum(out["lower_95"].fillna(lo80).clip(lower=0.0), lo80)
    hi80 = np.maximum(out["upper_80"].fillna(f), f)
    hi95 = np.maximum(out["upper_95"].fillna(hi80), hi80)
    return out.assign(forecast=f, lower_80=lo80, lower_95=lo95, upper_80=hi80, upper_95=hi95)


def _mean_forecast(series: pd.DataFrame, cfg: ForecastConfig, dates: pd.DatetimeIndex) -> tuple:
    """Forecast rows and an accuracy row for a series too short to backtest."""
    y = series["y"].to_numpy(dtype=np.float64)[-cfg.train_days :]
    mean = float(y.mean()) if len(y) else 0.0
    fc = pd.DataFrame({"ds": dates, "forecast": mean, **demand_quantiles(y), "model": MODEL_MEAN})
    return fc, (MODEL_MEAN, math.nan, math.nan, math.nan, math.nan, len(y))


@dataclass
class _Tiers:
    """Which series get which treatment (ids are ``build_series`` uids)."""

    short: list[int]  # too short to backtest, or no demand in the window: Mean
    smooth: list[int]
    intermittent: list[int]


def _classify(series: pd.DataFrame, cfg: ForecastConfig) -> _Tiers:
    lengths = series.groupby("uid").size()
    zero_share = series.groupby("uid")["y"].apply(lambda s: float((s == 0).mean()))
    short = (lengths < cfg.min_backtest_days) | (zero_share >= 1.0)
    sparse = ~short & (zero_share >= cfg.intermittent_zero_share)
    return _Tiers(
        short=[int(u) for u in lengths.index[short]],
        smooth=[int(u) for u in lengths.index[~short & ~sparse]],
        intermittent=[int(u) for u in lengths.index[sparse]],
    )


def _backtest(
    data: pd.DataFrame, names: tuple[str, ...], metric: str, cfg: ForecastConfig
) -> tuple[dict[int, tuple[str, _Score]], list[tuple]]:
    """Score every candidate on every series of ``data``; pick each series' best.

    Returns ``{uid: (model, score)}`` and one candidate row per (series, model).
    """
    cvs = []
    for group, native in _split_native(names):
        cv = _cross_validate(data, group, cfg, native=native)
        by_uid = {u: g for u, g in cv.groupby("unique_id", sort=False)} if len(cv) else {}
        cvs.append((by_uid, group))
    first_cut = data.groupby("unique_id")["ds"].max() - pd.Timedelta(days=cfg.backtest_days)
    chosen: dict[int, tuple[str, _Score]] = {}
    candidates: list[tuple] = []
    for uid, hist in data.groupby("unique_id", sort=False):
        train = hist[hist["ds"] <= first_cut[uid]]["y"].to_numpy()
        scales = (
            _seasonal_scale(train, cfg.season_length),
            _seasonal_scale(train, cfg.season_length, power=2),
        )
        best: tuple[str, _Score] | None = None
        for by_uid, group in cvs:
            mine = by_uid.get(uid)
            if mine is None or mine.empty:
                continue
            for name in group:
                sc = _score_model(mine, name, hist, scales, cfg)
                candidates.append(
                    (uid, name, sc.mase, sc.rmsse, sc.smape, sc.coverage_80, sc.coverage_95)
                )
                if best is None or getattr(sc, metric) < getattr(best[1], metric):
                    best = (name, sc)
        if best is not None and math.isfinite(getattr(best[1], metric)):
            chosen[int(uid)] = best
    return chosen, candidates


_BOUNDS = ("lower_80", "upper_80", "lower_95", "upper_95")


def _refit_chosen(
    data: pd.DataFrame, chosen: dict[int, tuple[str, _Score]], cfg: ForecastConfig
) -> list[pd.DataFrame]:
    """Forecast rows (uid, ds, forecast, bounds, model) of each series' chosen model."""
    by_model: dict[str, list[int]] = {}
    for uid, (name, _) in chosen.items():
        by_model.setdefault(name, []).append(uid)
    out = []
    for name, uids in by_model.items():
        part = data[data["unique_id"].isin(uids)]
        fc = _final_forecast(part, name, cfg)
        if fc.empty:
            continue
        fc = fc.rename(columns={name: "forecast"})
        if name in NATIVE_INTERVALS:
            fc = fc.rename(
                columns={
                    f"{name}-{'lo' if b.startswith('lower') else 'hi'}-{b[-2:]}": b for b in _BOUNDS
                }
            )
        else:
            q = {u: demand_quantiles(g["y"].to_numpy()) for u, g in part.groupby("unique_id")}
            for b in _BOUNDS:
                fc[b] = fc["unique_id"].map({u: bounds[b] for u, bounds in q.items()})
        fc = fc.rename(columns={"unique_id": "uid"}).assign(model=name)
        out.append(fc[["uid", "ds", "forecast", *_BOUNDS, "model"]])
    return out


def forecast_series(
    daily: pd.DataFrame, last_date: date, cfg: ForecastConfig | None = None
) -> ForecastResult:
    """Forecast every (sku, store_id) in ``daily`` (``sku, store_id, date, units``).

    Returns ``horizon`` days after ``last_date`` per series (``FORECAST_COLUMNS``),
    one accuracy row per series (``ACCURACY_COLUMNS``) and the backtest score of
    every candidate (``CANDIDATE_COLUMNS``). Pure and deterministic.
    """
    cfg = cfg or ForecastConfig()
    os.environ.setdefault("NIXTLA_ID_AS_COL", "1")
    _cache_interval_quantiles()
    series = build_series(daily, last_date)
    if series.empty:
        return ForecastResult(
            pd.DataFrame(columns=FORECAST_COLUMNS),
            pd.DataFrame(columns=ACCURACY_COLUMNS),
            pd.DataFrame(columns=CANDIDATE_COLUMNS),
        )
    future = pd.date_range(pd.Timestamp(last_date) + timedelta(days=1), periods=cfg.horizon)
    # Models see the most recent train_days (+ the backtest windows while backtesting).
    series = series.groupby("uid", sort=False).tail(cfg.train_days + cfg.backtest_days)
    lengths = series.groupby("uid").size()
    keys = series.drop_duplicates("uid").set_index("uid")[["sku", "store_id"]]
    tiers = _classify(series, cfg)
    sf_input = series.rename(columns={"uid": "unique_id"})[["unique_id", "ds", "y"]]

    chosen: dict[int, tuple[str, _Score]] = {}
    candidates: list[tuple] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # MAE-type errors reward forecasting 0 on sparse series (their median is 0), so
        # intermittent series are chosen by squared error (RMSSE, as the M5 competition).
        for ids, names, metric in (
            (tiers.smooth, cfg.smooth_models, "mase"),
            (tiers.intermittent, cfg.intermittent_models, "rmsse"),
        ):
            if ids:
                picked, cand = _backtest(
                    sf_input[sf_input["unique_id"].isin(ids)], names, metric, cfg
                )
                chosen.update(picked)
                candidates += cand
        final_input = sf_input.groupby("unique_id", sort=False).tail(cfg.train_days)
        forecasts = _refit_chosen(final_input, chosen, cfg)

    accuracy: list[tuple] = []
    done: set[int] = set()
    for fc in forecasts:
        for uid in fc["uid"].unique():
            name, sc = chosen[int(uid)]
            n_train = int(min(lengths[uid], cfg.train_days))
            accuracy.append(
                (int(uid), name, sc.mase, sc.smape, sc.coverage_80, sc.coverage_95, n_train)
            )
            done.add(int(uid))
    # Short series, and any series statsforecast could not handle: the mean.
    for uid in [*tiers.short, *(u for u in tiers.smooth + tiers.intermittent if u not in done)]:
        fc, acc = _mean_forecast(series[series["uid"] == uid], cfg, future)
        forecasts.append(fc.assign(uid=uid))
        accuracy.append((uid, *acc))

    fc_all = order_bounds(pd.concat(forecasts, ignore_index=True)).join(keys, on="uid")
    fc_all["date"] = pd.to_datetime(fc_all["ds"]).dt.date
    acc_all = pd.DataFrame(
        accuracy,
        columns=["uid", "model", "mase", "smape", "coverage_80", "coverage_95", "n_train_days"],
    ).join(keys, on="uid")
    cand = pd.DataFrame(
        candidates,
        columns=["uid", "model", "mase", "rmsse", "smape", "coverage_80", "coverage_95"],
    ).join(keys, on="uid")
    return ForecastResult(
        fc_all[FORECAST_COLUMNS].reset_index(drop=True),
        acc_all[ACCURACY_COLUMNS].reset_index(drop=True),
        cand[CANDIDATE_COLUMNS].reset_index(drop=True),
    )


# --- Spark ---------------------------------------------------------------------------------

_SPARK_OUT = (
    "kind string, sku string, store_id string, date date, forecast double, lower_80 double, "
    "upper_80 double, lower_95 double, upper_95 double, model string, mase double, "
    "smape double, coverage_80 double, coverage_95 double, n_train_days int"
)


def _udf_output(result: ForecastResult) -> pd.DataFrame:
    fc = result.forecasts.assign(kind="forecast")
    acc = result.accuracy.assign(kind="accuracy")
    out = pd.concat([fc, acc], ignore_index=True)
    cols = [c.split()[0] for c in _SPARK_OUT.split(", ")]
    for c in cols:
        if c not in out.columns:
            out[c] = None
    out["n_train_days"] = out["n_train_days"].astype("Int32")
    return out[cols]


def spark_forecast(
    daily_sales: DataFrame,
    last_date: date,
    cfg: ForecastConfig | None = None,
    *,
    buckets: int,
) -> DataFrame:
    """Forecast every series of ``daily_sales`` (the view) in Spark.

    Series are hashed into ``buckets`` groups; each group runs ``forecast_series``
    in a Python worker. Returns one frame with a ``kind`` column: ``forecast``
    rows (FORECAST_COLUMNS) and ``accuracy`` rows (ACCURACY_COLUMNS).
    """
    from pyspark.sql import functions as F

    cfg = cfg or ForecastConfig()

    def run(pdf: pd.DataFrame) -> pd.DataFrame:
        return _udf_output(forecast_series(pdf.drop(columns="bucket"), last_date, cfg))

    return (
        daily_sales.select("sku", "store_id", "date", "units")
        .withColumn("bucket", F.pmod(F.xxhash64("sku", "store_id"), F.lit(buckets)))
        .repartition(buckets, "bucket")
        .groupBy("bucket")
        .applyInPandas(run, schema=_SPARK_OUT)
    )
