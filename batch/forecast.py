"""Demand forecasts per (sku, store): an ensemble for regular series, per-series choice for
sparse ones; coherent forecasts of the sku, store and total levels (``forecast_levels``).

The pure part (``forecast_series``) takes daily units of many series and
returns the 28-day forecasts and the backtest accuracy; Spark runs it inside a
grouped pandas UDF (``spark_forecast``), one group per bucket of series, so
series spread over the executors, each call amortises the models' setup over
many series, and the global model (LightGBM) learns from the bucket's series.
The decisions and their measurements: ``docs/forecasting.md``.

Method (the decisions, in order):

* **Series.** Daily units from the series' first sale to its end (one date for
  all series, or one per series), missing days filled with 0, returns netted
  and negative days clipped to 0 (demand is not negative).
* **Tiers.** On the recent window (the intermittent tier's), a series whose
  share of zero days is at least ``intermittent_zero_share`` is *intermittent*,
  the rest *smooth*. A series too short to backtest, or with no demand in the
  window, gets ``Mean`` (the mean daily demand, intervals from the empirical
  quantiles of its days) and no accuracy figures.
* **Smooth series** (``combine="mean"``, the default): up to ``train_days``
  (3 years) of history; the mean of ``smooth_models`` (default ``FourierETS``:
  yearly Fourier season + US retail holidays by least squares, then ETS with a
  weekly season; and ``LightGBM`` across the bucket's series). A smooth series
  with less than ``yearly_min_days`` of history has no yearly season to learn
  and too little data for trees: it gets the mean of ``short_models`` (default
  ``FourierETS``, whose calendar part is then holiday effects pooled in groups,
  ``HOLIDAY_GROUPS``, and ``SARIMA``, a fixed-order seasonal ARIMA on the same
  holiday-adjusted series). Backtest:
  ``backtest_windows`` windows of ``backtest_horizon`` days, origins
  ``backtest_step`` days apart, each model fitted once at the first origin and
  rolled forward. Bounds are conformal: the quantiles of the ensemble's
  absolute backtest errors, one width per week of the horizon (from that
  week's and the next week's errors; never narrower than the week before). SeasonalNaive
  is backtested alongside as the reference (a candidate row, not a member).
  ``combine="select"`` is the earlier default (``PREVIOUS_DEFAULT``): one
  native-interval model per series by backtest MASE.
* **Intermittent series**: ``SeasonalNaive``, ``CrostonOptimized``, ``TSB``
  and ``ADIDA`` on the last ``intermittent_train_days``, one per series by the
  lowest RMSSE over 3 windows of 14 days: on a series that is mostly zeros the
  median is 0, so MAE-type errors reward forecasting nothing, while stocking
  needs the mean rate (the M5 competition scored RMSSE for the same reason).
  Their forecast is a *rate* (say 0.3 a day) while a day's demand is 0 or a
  few units: their bounds are the empirical quantiles of the series' daily
  demand over its training window (10 %/90 % and 2.5 %/97.5 %, rounded
  outwards), so "80 %" means 80 % of days. (Symmetric conformal bands around a
  rate cut through the zero days; they covered ~60 %.)
* Finally every bound is clipped at 0 and the ordering
  ``lower_95 <= lower_80 <= forecast <= upper_80 <= upper_95`` enforced.
* **Accuracy.** ``mase`` (scale: the mean absolute weekly difference before the
  first origin), ``smape`` (percent, 0-200; a day where both actual and
  forecast are 0 counts as 0) and the backtest coverage of each interval.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from batch.forecast_models import (
    BY_NAME,
    DEFAULT_INTERMITTENT,
    DEFAULT_SHORT,
    DEFAULT_SMOOTH,
    check_names,
    statsforecast_model,
)
from lambdalake.calendar import nth_weekday
from lambdalake.contract.views import ALL, forecast_level

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
MODEL_FOURIER_ETS = "FourierETS"
MODEL_LIGHTGBM = "LightGBM"
MODEL_SARIMA = "SARIMA"
SMOOTH_MODELS = DEFAULT_SMOOTH
INTERMITTENT_MODELS = DEFAULT_INTERMITTENT
RECONCILERS = ("BottomUp", "MinTrace_wls_struct")
NATIVE_INTERVALS = {name for name, spec in BY_NAME.items() if spec.native_intervals}

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
    """What the forecast stage does; model names come from ``batch.forecast_models``.

    ``combine``: ``mean`` (the default) forecasts a smooth series by the mean of
    ``smooth_models`` with conformal intervals from the backtest residuals;
    ``select`` picks one of them per series by backtest MASE, with native
    intervals (the earlier default, ``PREVIOUS_DEFAULT``). ``short_models`` take
    the place of ``smooth_models`` on smooth series with less than
    ``yearly_min_days`` of history; ``None`` means ``DEFAULT_SHORT`` when
    ``smooth_models`` is the default, else ``smooth_models`` (a chosen list
    serves every smooth series). Intermittent series
    always choose one of ``intermittent_models`` by RMSSE, on their own window
    (``intermittent_train_days``, ``intermittent_backtest_*``).
    """

    horizon: int = 28
    season_length: int = 7
    backtest_windows: int = 4
    backtest_horizon: int = 28
    backtest_step: int = 14
    train_days: int = 3 * 365
    intermittent_zero_share: float = 0.5
    intermittent_train_days: int = 182
    intermittent_backtest_windows: int = 3
    intermittent_backtest_horizon: int = 14
    tsb_alpha_d: float = 0.2
    tsb_alpha_p: float = 0.2
    smooth_models: tuple[str, ...] = DEFAULT_SMOOTH
    short_models: tuple[str, ...] | None = None  # resolved in __post_init__
    intermittent_models: tuple[str, ...] = DEFAULT_INTERMITTENT
    combine: str = "mean"
    yearly_terms: int = 6  # Fourier pairs of the yearly season (FourierETS)
    yearly_min_days: int = 400  # shorter histories get no yearly season
    # FourierETS on a series with a yearly season: its forecast is moved by the (shrunk) mean
    # of its one-step errors over the series' last ``recent_level_days`` ordinary days, for as
    # many days ahead, fading out over as many more (0: not moved).
    recent_level_days: int = 14
    lgb_trees: int = 200
    lgb_lags: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 14, 21, 28, 364)
    # How the levels are made coherent: one of RECONCILERS, or "auto" (chosen on a holdout
    # of the last ``horizon`` days, which costs a second, points-only forecast of every node).
    reconcile: str = "auto"

    def __post_init__(self) -> None:
        if self.reconcile != "auto" and self.reconcile not in RECONCILERS:
            raise ValueError(
                f"reconcile must be 'auto' or one of {', '.join(RECONCILERS)}, "
                f"not {self.reconcile!r}"
            )
        if self.short_models is None:
            short = DEFAULT_SHORT if self.smooth_models == DEFAULT_SMOOTH else self.smooth_models
            object.__setattr__(self, "short_models", tuple(short))
        check_names(self.smooth_models, "smooth")
        check_names(self.short_models or (), "smooth")
        check_names(self.intermittent_models, "intermittent")
        if not self.smooth_models or not self.short_models or not self.intermittent_models:
            raise ValueError("each tier needs at least one forecast model")
        if self.combine not in ("mean", "select"):
            raise ValueError(f"combine must be 'mean' or 'select', not {self.combine!r}")
        if self.combine == "select":
            members = (*self.smooth_models, *(self.short_models or ()))
            no_native = [n for n in members if not BY_NAME[n].native_intervals]
            if no_native:
                raise ValueError(f"combine='select' needs native intervals: {', '.join(no_native)}")

    @property
    def backtest_days(self) -> int:
        return self.backtest_horizon + (self.backtest_windows - 1) * self.backtest_step

    @property
    def min_backtest_days(self) -> int:
        # The first origin needs four weeks of history to fit a weekly season.
        return self.backtest_days + 4 * self.season_length

    def for_short(self) -> ForecastConfig:
        """The settings of smooth series without a year of history: ``short_models``."""
        return replace(self, smooth_models=self.short_models or ())

    def for_young(self) -> ForecastConfig:
        """The same settings with a shorter backtest, for smooth series with a few months of history.

        Their bounds come from 14-day windows; weeks past the second reuse its width.
        They have no year of history either: ``short_models``.
        """
        return replace(
            self,
            smooth_models=self.short_models or (),
            backtest_windows=self.intermittent_backtest_windows,
            backtest_horizon=self.intermittent_backtest_horizon,
            backtest_step=self.intermittent_backtest_horizon,
        )

    def for_intermittent(self) -> ForecastConfig:
        """The same settings with the intermittent tier's window and backtest."""
        return replace(
            self,
            train_days=self.intermittent_train_days,
            backtest_windows=self.intermittent_backtest_windows,
            backtest_horizon=self.intermittent_backtest_horizon,
            backtest_step=self.intermittent_backtest_horizon,
        )

    @property
    def ensemble_name(self) -> str:
        return "+".join(self.smooth_models)


# The default before the ensemble: per-series choice among three models on the last 182 days.
PREVIOUS_DEFAULT = ForecastConfig(
    smooth_models=(MODEL_SN, MODEL_ETS, MODEL_THETA),
    combine="select",
    backtest_windows=3,
    train_days=182,
    backtest_horizon=14,
    backtest_step=14,
)

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


SeriesEnd = date | Mapping[tuple[str, str], date]


def build_series(daily: pd.DataFrame, last_date: SeriesEnd) -> pd.DataFrame:
    """Dense daily series: ``uid, sku, store_id, ds, y`` from first sale to the series' end.

    ``daily`` has ``sku, store_id, date, units`` (several rows per day are summed).
    ``last_date``: the common end of every series, or each series' own end as a
    mapping ``{(sku, store_id): date}`` (a series missing from it is dropped).
    Days after a series' end are ignored.
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
    if isinstance(last_date, Mapping):
        ends = pd.DataFrame(
            [(k[0], k[1], pd.Timestamp(v)) for k, v in last_date.items()],
            columns=["sku", "store_id", "end"],
        )
        d = d.merge(ends, on=["sku", "store_id"])
    else:
        d["end"] = pd.Timestamp(last_date)
    d = d[d["ds"] <= d["end"]]
    d = d.groupby(["sku", "store_id", "ds"], as_index=False, sort=True).agg(
        units=("units", "sum"), end=("end", "first")
    )
    keys = d[["sku", "store_id"]].drop_duplicates().reset_index(drop=True)
    keys["uid"] = np.arange(len(keys), dtype=np.int64)
    d = d.merge(keys, on=["sku", "store_id"])
    first = d.groupby("uid")["ds"].min().sort_index()
    end = d.groupby("uid")["end"].first().reindex(first.index)
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
    return statsforecast_model(name, cfg)


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
    df: pd.DataFrame,
    names: tuple[str, ...],
    cfg: ForecastConfig,
    *,
    native: bool,
    refit: bool | None = None,
    shift: Any = None,
) -> pd.DataFrame:
    """Backtest of ``names``; ``shift(cv, fitted)``, if given, adjusts the backtest
    forecasts with the in-sample fitted values of each window."""
    models = [_model(n, cfg) for n in names]
    if refit is None:
        # Fit once and roll forward where forward() exists (the native-interval models).
        refit = not all(n in NATIVE_INTERVALS for n in names)

    def run(part: pd.DataFrame) -> pd.DataFrame:
        sf = _sf(models)
        cv = sf.cross_validation(
            df=part,
            h=cfg.backtest_horizon,
            n_windows=cfg.backtest_windows,
            step_size=cfg.backtest_step,
            level=list(LEVELS) if native else None,
            refit=refit,
            fitted=shift is not None,
        )
        return cv if shift is None else shift(cv, sf.cross_validation_fitted_values())

    return _run_isolating_failures(run, df)


def _final_forecast(
    df: pd.DataFrame, name: str, cfg: ForecastConfig, *, native: bool | None = None
) -> pd.DataFrame:
    model = _model(name, cfg)
    native = name in NATIVE_INTERVALS if native is None else native

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


# --- ensemble members: point forecasts at the backtest origins and after the last date ---------

_CV_KEYS = ["unique_id", "ds", "cutoff"]


def _fourier(ds: pd.Series | pd.DatetimeIndex, terms: int) -> np.ndarray:
    """Yearly Fourier terms of absolute dates (so every window shares the phase)."""
    days = (pd.DatetimeIndex(ds) - pd.Timestamp("1970-01-01")).days.to_numpy(np.float64)
    w = 2.0 * np.pi * days[:, None] * np.arange(1, terms + 1)[None, :] / 365.25
    return np.concatenate([np.sin(w), np.cos(w)], axis=1)


# US retail calendar: holidays and the shopping days around them (code 0: an ordinary day).
HOLIDAY_NAMES = (
    "new_year",
    "mlk_day",
    "presidents_day",
    "valentines",
    "memorial_day",
    "independence_day",
    "labor_day",
    "columbus_day",
    "veterans_day",
    "thanksgiving",
    "black_friday",
    "thanksgiving_saturday",
    "thanksgiving_sunday",
    "cyber_monday",
    "christmas_eve",
    "christmas",
    "boxing_day",
    "new_years_eve",
    "year_end_break",
)


def _holidays_of(year: int) -> dict[date, int]:
    thanksgiving = nth_weekday(year, 11, 3, 4)
    days = (
        date(year, 1, 1),
        nth_weekday(year, 1, 0, 3),
        nth_weekday(year, 2, 0, 3),
        date(year, 2, 14),
        nth_weekday(year, 5, 0, -1),
        date(year, 7, 4),
        nth_weekday(year, 9, 0, 1),
        nth_weekday(year, 10, 0, 2),
        date(year, 11, 11),
        thanksgiving,
        thanksgiving + timedelta(days=1),
        thanksgiving + timedelta(days=2),
        thanksgiving + timedelta(days=3),
        thanksgiving + timedelta(days=4),
        date(year, 12, 24),
        date(year, 12, 25),
        date(year, 12, 26),
        date(year, 12, 31),
    )
    out = {d: code for code, d in enumerate(days, start=1)}
    # The working days of the year-end break, between Boxing Day and the first days of January.
    brk = HOLIDAY_NAMES.index("year_end_break") + 1
    for d in (*(date(year, 12, day) for day in range(27, 31)), date(year, 1, 2)):
        out[d] = brk
    # A fixed-date major holiday on a weekend is observed (offices closed) on the Friday
    # before or the Monday after, which shares its code; New Year on a Saturday is
    # observed in the year before.
    for d in (date(year, 1, 1), date(year, 7, 4), date(year, 12, 25)):
        if d.weekday() >= 5:
            out[d + timedelta(days=-1 if d.weekday() == 5 else 1)] = out[d]
    return out


def holiday(dates: Any) -> np.ndarray:
    """Holiday code of each date (index into ``HOLIDAY_NAMES`` + 1; 0 = none)."""
    idx = pd.DatetimeIndex(dates)
    table: dict[date, int] = {}
    # Year by year (a later year's observed New Year may fall on the Dec 31 before it).
    for year in np.unique(np.concatenate([idx.year, idx.year + 1])):
        table.update(_holidays_of(int(year)))
    return np.array([table.get(d, 0) for d in idx.date], dtype=np.int64)


def _calendar(ds: Any, terms: int, codes: tuple[int, ...]) -> np.ndarray:
    """Regressors of the yearly season: Fourier terms and one dummy per holiday code."""
    f = _fourier(ds, terms)
    if not codes:
        return f
    h = holiday(ds)
    return np.concatenate([f, (h[:, None] == np.array(codes)[None, :]).astype(np.float64)], axis=1)


def _weekday_drift(ds: Any, end: pd.Timestamp, n: float) -> tuple[np.ndarray, np.ndarray]:
    """Weekday dummies (Monday-Saturday) and the same times the days to ``end`` / ``n``
    (negative before ``end``, 0 from it on: the drift's term is nil at the fit's end)."""
    idx = pd.DatetimeIndex(ds)
    dummies = (idx.dayofweek.to_numpy()[:, None] == np.arange(6)[None, :]).astype(np.float64)
    to_end = np.minimum((idx - end).days.to_numpy(np.float64), 0.0) / n
    return dummies, dummies * to_end[:, None]


YearlyFit = tuple[tuple[int, ...], np.ndarray, np.ndarray, pd.Timestamp, float]


def _yearly_coefficients(
    data: pd.DataFrame, cfg: ForecastConfig, until: pd.Series | None = None
) -> dict[Any, YearlyFit]:
    """Per series, the yearly season and holiday effects (level and trend fitted alongside).

    Fitted on each series' days up to ``until[uid]`` (all days if None); a series
    with fewer than ``yearly_min_days`` such days gets none (no yearly season).
    The weekday profile is fitted alongside with a linear drift over the history; only
    the drift is kept (nil at the last day fitted, each coefficient shrunk by its noise),
    so what is left for ETS' weekly season is the profile of the series' end, not its
    average over three years.
    Returns ``{uid: (holiday codes seen, coefficients, drift coefficients, last day, days)}``.
    """
    out: dict[Any, YearlyFit] = {}
    for uid, g in data.groupby("unique_id", sort=False):
        if until is not None:
            g = g[g["ds"] <= until[uid]]
        if len(g) < cfg.yearly_min_days:
            continue
        y = g["y"].to_numpy(np.float64)
        h = holiday(g["ds"])
        # A holiday's effect needs two occurrences to be told apart from noise.
        codes = tuple(int(c) for c in np.unique(h[h > 0]) if (h == c).sum() >= 2)
        cal = _calendar(g["ds"], cfg.yearly_terms, codes)
        end, n = pd.Timestamp(g["ds"].max()), float(len(y))
        dummies, drift = _weekday_drift(g["ds"], end, n)
        x = np.column_stack([np.ones(len(y)), np.arange(len(y)) / len(y), cal, dummies, drift])
        # Normal equations: a small square system, far cheaper than lstsq's SVD.
        xtx_inv = np.linalg.inv(x.T @ x + 1e-6 * np.eye(x.shape[1]))
        beta = xtx_inv @ (x.T @ y)
        k = 2 + cal.shape[1]
        drift_at = slice(k + dummies.shape[1], None)
        # Each drift coefficient shrunk towards 0 by its noise (positive-part James-Stein):
        # a profile that does not move keeps its average.
        sigma2 = float(np.sum((y - x @ beta) ** 2)) / max(len(y) - x.shape[1], 1)
        noise = sigma2 * np.diag(xtx_inv)[drift_at]
        b = beta[drift_at]
        with np.errstate(divide="ignore", invalid="ignore"):
            kept = np.nan_to_num(np.clip(1.0 - noise / b**2, 0.0, 1.0))
        out[uid] = (codes, beta[2:k], b * kept, end, n)
    return out


def _yearly(frame: pd.DataFrame, coefs: dict[Any, YearlyFit], cfg: ForecastConfig) -> np.ndarray:
    """The yearly season, holiday effects and weekday drift on ``frame``'s rows
    (``unique_id``, ``ds``)."""
    out = np.zeros(len(frame))
    if not coefs:
        return out
    uids = frame["unique_id"].to_numpy()
    ds = pd.DatetimeIndex(frame["ds"])
    for uid, (codes, beta, beta_drift, end, n) in coefs.items():
        mask = uids == uid
        if mask.any():
            _, drift = _weekday_drift(ds[mask], end, n)
            out[mask] = _calendar(ds[mask], cfg.yearly_terms, codes) @ beta + drift @ beta_drift
    return out


# Holidays pooled into groups that tend to move demand alike, for series without a year of
# history (where each holiday has been seen at most once): the six holidays most businesses
# close on, the other federal holidays (closed banks and offices, open shops), the shopping
# days around holidays.
HOLIDAY_GROUPS: dict[str, tuple[str, ...]] = {
    "major": (
        "new_year",
        "memorial_day",
        "independence_day",
        "labor_day",
        "thanksgiving",
        "christmas",
    ),
    "federal": ("mlk_day", "presidents_day", "columbus_day", "veterans_day"),
    "shopping": (
        "valentines",
        "black_friday",
        "thanksgiving_saturday",
        "thanksgiving_sunday",
        "cyber_monday",
    ),
    # The days around Christmas and New Year, holidays or not for a given business.
    "year_end": ("christmas_eve", "boxing_day", "year_end_break", "new_years_eve"),
}
# Holiday code -> group number (1, 2, ... in HOLIDAY_GROUPS' order; 0 = an ordinary day).
_GROUP_OF_CODE = np.zeros(len(HOLIDAY_NAMES) + 1, dtype=np.int64)
for _g, _names in enumerate(HOLIDAY_GROUPS.values(), start=1):
    for _n in _names:
        _GROUP_OF_CODE[HOLIDAY_NAMES.index(_n) + 1] = _g

HolidayEffects = dict[Any, dict[int, float]]  # uid -> {group: demand ratio}


def holiday_group(dates: Any) -> np.ndarray:
    """Holiday group of each date (1, 2, ... in ``HOLIDAY_GROUPS``' order; 0 = none)."""
    return _GROUP_OF_CODE[holiday(dates)]


def _same_weekday_before(groups: np.ndarray) -> np.ndarray:
    """For each day, the index of the nearest ordinary day 1-3 weeks earlier (-1: none)."""
    n = len(groups)
    out = np.full(n, -1, dtype=np.int64)
    for back in (21, 14, 7):  # the nearest wins: written last
        idx = np.arange(back, n)
        ok = groups[idx - back] == 0
        out[idx[ok]] = idx[ok] - back
    return out


def _pooled_holiday_effects(
    data: pd.DataFrame, cfg: ForecastConfig, until: pd.Series | None, skip: Any = ()
) -> HolidayEffects:
    """Per series, the demand ratio of each holiday group, where the history shows one.

    A group's ratio is the median over its days (up to ``until[uid]``) of the day's
    demand over the same weekday's 1-3 weeks before. It is kept only if at least two
    days were seen, all on the same side of 1, and the median lies outside the middle
    80 % of ordinary days' week-on-week ratios (a holiday that looks like any day is
    noise). Series in ``skip`` (those with a yearly season) get none.
    """
    out: HolidayEffects = {}
    for uid, g in data.groupby("unique_id", sort=False):
        if uid in skip:
            continue
        y = g["y"].to_numpy(np.float64)
        n_fit = len(y) if until is None else int((g["ds"] <= until[uid]).sum())
        groups = _GROUP_OF_CODE[holiday(g["ds"])]
        before = _same_weekday_before(groups)
        t = np.arange(len(y))
        usable = (t < n_fit) & (before >= 0)
        base = np.where(before >= 0, y[np.maximum(before, 0)], 0.0)
        usable &= base > 0
        ordinary = usable & (groups == 0)
        if ordinary.sum() < 20:
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = y / base
        lo, hi = np.quantile(ratio[ordinary], [0.1, 0.9])
        mine: dict[int, float] = {}
        for k in range(1, len(HOLIDAY_GROUPS) + 1):
            r = ratio[usable & (groups == k)]
            if len(r) < 2 or not ((r < 1).all() or (r > 1).all()):
                continue
            m = float(np.median(r))
            if m < lo or m > hi:
                mine[k] = m
        if mine:
            out[uid] = mine
    return out


def _without_holidays(data: pd.DataFrame, effects: HolidayEffects) -> pd.DataFrame:
    """``data`` with each holiday of a group that has an effect replaced by the same
    weekday's demand 1-3 weeks before (only earlier days: no look-ahead in a backtest)."""
    if not effects:
        return data
    y = data["y"].to_numpy(np.float64).copy()
    uids = data["unique_id"].to_numpy()
    for uid, eff in effects.items():
        rows = np.flatnonzero(uids == uid)
        groups = _GROUP_OF_CODE[holiday(data["ds"].iloc[rows])]
        before = _same_weekday_before(groups)
        hit = np.isin(groups, list(eff)) & (before >= 0)
        y[rows[hit]] = y[rows[before[hit]]]
    return data.assign(y=y)


def _holiday_factor(frame: pd.DataFrame, effects: HolidayEffects) -> np.ndarray:
    """The multiplier of each row of ``frame`` (``unique_id``, ``ds``): 1 on ordinary days."""
    out = np.ones(len(frame))
    if not effects:
        return out
    uids = frame["unique_id"].to_numpy()
    groups = _GROUP_OF_CODE[holiday(frame["ds"])]
    for uid, eff in effects.items():
        mask = uids == uid
        for k, r in eff.items():
            out[mask & (groups == k)] = r
    return out


CALENDAR_KINDS = ("fourier_ets", "sarima")  # members fitted on the calendar-adjusted series


def _calendar_base(name: str) -> str:
    """The statsforecast model a calendar member fits: FourierETS is ETS on the adjusted series."""
    return MODEL_ETS if BY_NAME[name].kind == "fourier_ets" else name


def _recent_level(
    members: tuple[str, ...],
    bases: tuple[str, ...],
    coefs: dict,
    cfg: ForecastConfig,
    by: list[str],
) -> Any:
    """``shift(out, fitted)`` moving FourierETS' forecasts in ``out`` by the mean of its one-step
    errors (``fitted``: in-sample values, per ``by``) over the last ``cfg.recent_level_days``
    ordinary days (holidays left out) of each series with a yearly season (in ``coefs``),
    that mean shrunk by its own noise; held for as many days ahead, then fading to nothing
    over as many. None when nothing would move.

    With a yearly season fitted over three years, a year that runs above or below that
    season shows as errors of the same sign for weeks, which ETS' level (alpha ~0.02-0.06
    by likelihood on noisy daily counts) follows too slowly; on births such a deviation
    tells the next two weeks, not the two after (docs/forecasting.md).
    """
    days = cfg.recent_level_days
    cols = tuple(b for m, b in zip(members, bases, strict=True) if BY_NAME[m].kind == "fourier_ets")
    if days <= 0 or not cols or not coefs:
        return None
    uids = list(coefs)

    def shift(out: pd.DataFrame, fitted: pd.DataFrame) -> pd.DataFrame:
        f = fitted[fitted["unique_id"].isin(uids)].sort_values([*by, "ds"])
        # The year-end has up to ten holidays in five weeks: 2 x days + 14 leave enough.
        f = f.groupby(by, sort=False).tail(2 * days + 14)
        f = f[holiday(f["ds"]) == 0].groupby(by, sort=False).tail(days)
        if f.empty:
            return out
        err = f[by].assign(**{c: f["y"].to_numpy() - f[c].to_numpy() for c in cols})
        grouped = err.groupby(by)
        mean = grouped.mean()
        # Shrunk towards 0 by the noise of a mean of so few errors (positive-part
        # James-Stein): a mean within its standard error is not moved, a clear one nearly all.
        noise = grouped.var() / grouped.count()
        with np.errstate(divide="ignore", invalid="ignore"):
            kept = (1.0 - noise / mean**2).clip(lower=0.0).fillna(0.0)
        key = pd.MultiIndex.from_frame(out[by]) if len(by) > 1 else pd.Index(out[by[0]])
        moved = (mean * kept).reindex(key).fillna(0.0)
        # Held for as many days ahead as it was measured over, then fading out over as many.
        if "cutoff" in out.columns:
            origin = pd.DatetimeIndex(out["cutoff"])
        else:
            origin = pd.DatetimeIndex(out["unique_id"].map(fitted.groupby("unique_id")["ds"].max()))
        ahead = (pd.DatetimeIndex(out["ds"]) - origin).days.to_numpy(np.float64)
        weight = np.clip((2 * days - ahead) / days, 0.0, 1.0)
        return out.assign(**{c: out[c].to_numpy() + weight * moved[c].to_numpy() for c in cols})

    return shift


def _calendar_cv(data: pd.DataFrame, cfg: ForecastConfig, members: tuple[str, ...]) -> pd.DataFrame:
    """Backtest of calendar ``members`` (one statsforecast call) on the adjusted series.

    Series with ``yearly_min_days`` before the first origin lose their yearly season and
    holiday effects (``_yearly_coefficients``); shorter ones their pooled holiday effects.
    Both are fitted on the days before the first origin and added back to the forecasts.
    """
    first_cut = data.groupby("unique_id")["ds"].max() - pd.Timedelta(days=cfg.backtest_days)
    coefs = _yearly_coefficients(data, cfg, until=first_cut)
    pooled = _pooled_holiday_effects(data, cfg, first_cut, skip=coefs)
    adjusted = _without_holidays(data.assign(y=data["y"] - _yearly(data, coefs, cfg)), pooled)
    bases = tuple(_calendar_base(m) for m in members)
    shift = _recent_level(members, bases, coefs, cfg, ["unique_id", "cutoff"])
    cv = _cross_validate(adjusted, bases, cfg, native=False, refit=False, shift=shift)
    if cv.empty:
        return cv
    actual = data.set_index(["unique_id", "ds"])["y"]
    y = actual.reindex(pd.MultiIndex.from_frame(cv[["unique_id", "ds"]])).to_numpy()
    season, factor = _yearly(cv, coefs, cfg), _holiday_factor(cv, pooled)
    f = {
        m: (cv[b].to_numpy(np.float64) + season) * factor
        for m, b in zip(members, bases, strict=True)
    }
    return cv.assign(y=y, **f)[[*_CV_KEYS, "y", *members]]


def _calendar_forecast(
    data: pd.DataFrame, cfg: ForecastConfig, members: tuple[str, ...]
) -> pd.DataFrame:
    """Forecasts of calendar ``members`` on the adjusted series, the calendar added back."""
    coefs = _yearly_coefficients(data, cfg)
    pooled = _pooled_holiday_effects(data, cfg, None, skip=coefs)
    adjusted = _without_holidays(data.assign(y=data["y"] - _yearly(data, coefs, cfg)), pooled)
    bases = tuple(_calendar_base(m) for m in members)
    models = [_model(b, cfg) for b in bases]
    shift = _recent_level(members, bases, coefs, cfg, ["unique_id"])

    def run(part: pd.DataFrame) -> pd.DataFrame:
        sf = _sf(models)
        fc = sf.forecast(df=part, h=cfg.horizon, fitted=shift is not None)
        return fc if shift is None else shift(fc, sf.forecast_fitted_values())

    fc = _run_isolating_failures(run, adjusted)
    if fc.empty:
        return fc
    season, factor = _yearly(fc, coefs, cfg), _holiday_factor(fc, pooled)
    f = {
        m: (fc[b].to_numpy(np.float64) + season) * factor
        for m, b in zip(members, bases, strict=True)
    }
    return fc.assign(**f)[["unique_id", "ds", *members]]


def _calendar_jointly(
    fn: Any, members: tuple[str, ...], data: pd.DataFrame, cfg: ForecastConfig, keys: list[str]
) -> pd.DataFrame:
    """``fn`` (``_calendar_cv`` or ``_calendar_forecast``) on all ``members`` in one call (they
    share the adjustment, and one statsforecast call costs less than several); series that
    call could not do get each member alone, so one failing member does not drop the other."""
    try:
        out = fn(data, cfg, members)
    except Exception:
        out = pd.DataFrame()
    if len(members) == 1:
        return out
    rest = data if out.empty else data[~data["unique_id"].isin(set(out["unique_id"]))]
    if rest.empty:
        return out
    alone = []
    for m in members:
        try:
            alone.append(fn(rest, cfg, (m,)))
        except Exception:
            continue
    extra = _combine(alone, keys, members)
    if extra.empty:
        return out
    extra = extra.drop(columns="mean")
    return extra if out.empty else pd.concat([out, extra], ignore_index=True)


def _mlforecast(cfg: ForecastConfig) -> Any:
    import lightgbm as lgb
    from mlforecast import MLForecast
    from mlforecast.lag_transforms import RollingMean
    from mlforecast.target_transforms import LocalStandardScaler

    model = lgb.LGBMRegressor(
        n_estimators=cfg.lgb_trees,
        learning_rate=0.05,
        num_leaves=31,
        min_child_samples=20,
        n_jobs=1,  # Spark runs one task per core
        deterministic=True,
        random_state=0,
        verbose=-1,
    )
    return MLForecast(
        models={MODEL_LIGHTGBM: model},
        freq="D",
        lags=list(cfg.lgb_lags),
        lag_transforms={1: [RollingMean(7), RollingMean(28)], 7: [RollingMean(28)]},
        date_features=["dayofweek", "dayofyear", "month", holiday, holiday_group],
        # One model across series of very different volumes: each series is standardised.
        target_transforms=[LocalStandardScaler()],
    )


def _scalable(data: pd.DataFrame) -> pd.DataFrame:
    """Series LightGBM can take: not constant (the standard scaler divides by the std)."""
    std = data.groupby("unique_id")["y"].transform("std")
    return data[std > 0]


def _lightgbm_cv(data: pd.DataFrame, cfg: ForecastConfig) -> pd.DataFrame:
    data = _scalable(data)
    if data.empty:
        return pd.DataFrame()
    cv = _mlforecast(cfg).cross_validation(
        df=data,
        n_windows=cfg.backtest_windows,
        h=cfg.backtest_horizon,
        step_size=cfg.backtest_step,
        refit=False,
        dropna=False,
        static_features=[],
    )
    return cv[[*_CV_KEYS, "y", MODEL_LIGHTGBM]]


def _lightgbm_forecast(data: pd.DataFrame, cfg: ForecastConfig) -> pd.DataFrame:
    data = _scalable(data)
    if data.empty:
        return pd.DataFrame()
    mf = _mlforecast(cfg).fit(data, dropna=False, static_features=[])
    return mf.predict(cfg.horizon)[["unique_id", "ds", MODEL_LIGHTGBM]]


def _member_cv(name: str, data: pd.DataFrame, cfg: ForecastConfig) -> pd.DataFrame:
    """Backtest forecasts of one member: ``unique_id, ds, cutoff, y, <name>`` (may be empty)."""
    kind = BY_NAME[name].kind
    if kind in CALENDAR_KINDS:
        return _calendar_cv(data, cfg, (name,))
    if kind == "lightgbm":
        return _lightgbm_cv(data, cfg)
    cv = _cross_validate(data, (name,), cfg, native=False, refit=False)
    return cv[[*_CV_KEYS, "y", name]] if not cv.empty else cv


def _member_forecast(name: str, data: pd.DataFrame, cfg: ForecastConfig) -> pd.DataFrame:
    """Forecasts of one member after each series' last day: ``unique_id, ds, <name>``."""
    kind = BY_NAME[name].kind
    if kind in CALENDAR_KINDS:
        return _calendar_forecast(data, cfg, (name,))
    if kind == "lightgbm":
        return _lightgbm_forecast(data, cfg)
    fc = _final_forecast(data, name, cfg, native=False)
    return fc[["unique_id", "ds", name]] if not fc.empty else fc


def _guarded(fn: Any, name: str, data: pd.DataFrame, cfg: ForecastConfig) -> pd.DataFrame:
    """A member that fails on a whole group leaves the ensemble to the other members."""
    try:
        out = fn(name, data, cfg)
    except Exception:
        return pd.DataFrame()
    return out if out is not None else pd.DataFrame()


def _member_frames(
    stage: str, names: tuple[str, ...], data: pd.DataFrame, cfg: ForecastConfig
) -> list[pd.DataFrame]:
    """Each member's backtest (``stage="cv"``) or forecast frame; the calendar members
    together (``_calendar_jointly``), the others one by one."""
    cv = stage == "cv"
    joint = tuple(n for n in names if BY_NAME[n].kind in CALENDAR_KINDS)
    frames = []
    if joint:
        fn, keys = (_calendar_cv, [*_CV_KEYS]) if cv else (_calendar_forecast, ["unique_id", "ds"])
        frames.append(_calendar_jointly(fn, joint, data, cfg, keys))
    member = _member_cv if cv else _member_forecast
    frames += [_guarded(member, n, data, cfg) for n in names if n not in joint]
    return frames


def _combine(frames: list[pd.DataFrame], keys: list[str], names: tuple[str, ...]) -> pd.DataFrame:
    """Outer-join the members' frames on ``keys``; ``mean`` is their mean (clipped at 0)."""
    merged: pd.DataFrame | None = None
    for frame in frames:
        if frame.empty:
            continue
        if merged is None:
            merged = frame
            continue
        extra = [c for c in frame.columns if c not in keys and c not in merged.columns]
        merged = merged.merge(frame[[*keys, *extra]], on=keys, how="outer")
        if "y" in frame.columns and merged["y"].isna().any():
            y = frame.set_index(keys)["y"]
            merged["y"] = merged["y"].fillna(
                pd.Series(merged.set_index(keys).index.map(y), index=merged.index)
            )
    if merged is None:
        return pd.DataFrame()
    present = [n for n in names if n in merged.columns]
    for n in present:
        merged[n] = merged[n].astype(np.float64).clip(lower=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row with no member: NaN
        merged["mean"] = np.nanmean(merged[present].to_numpy(np.float64), axis=1)
    return merged


def conformal_width(abs_residuals: np.ndarray, level: int) -> float:
    """Half-width of a split-conformal interval: the ceil((n+1) level)-th smallest |residual|."""
    r = np.sort(np.asarray(abs_residuals, dtype=np.float64)[np.isfinite(abs_residuals)])
    if len(r) == 0:
        return math.nan
    k = math.ceil((len(r) + 1) * level / 100.0)
    return float(r[min(k, len(r)) - 1])


def _week_of_horizon(cv: pd.DataFrame) -> np.ndarray:
    """0 for days 1-7 after the window's origin, 1 for days 8-14, ... (errors grow with it)."""
    days = (pd.DatetimeIndex(cv["ds"]) - pd.DatetimeIndex(cv["cutoff"])).days.to_numpy()
    return (days - 1) // 7


def _widths(resid: np.ndarray, weeks: np.ndarray, level: int, horizon: int) -> np.ndarray:
    """Conformal half-width per day ahead (1..horizon), one per week of the horizon.

    A week's width comes from the errors of that week and the next one: with 4
    backtest windows a week alone has 28 errors, so its 95 % quantile would be the
    largest error seen, the noisiest of statistics. Widths never shrink with the
    horizon (uncertainty does not fall further ahead). A week beyond the
    backtest's reuses the last week's width.
    """
    out = np.empty(horizon)
    last = conformal_width(resid, level)
    for d in range(horizon):
        week = d // 7
        mine = resid[(weeks == week) | (weeks == week + 1)]
        if len(mine):
            last = conformal_width(mine, level)
        out[d] = last
    return np.maximum.accumulate(out)


def _ensemble_score(
    cv: pd.DataFrame, names: tuple[str, ...], scales: tuple[float, float], horizon: int
) -> tuple[dict[str, _Score], dict[int, np.ndarray]]:
    """Backtest scores of each member and of the mean, and the conformal half-widths.

    Coverage is estimated leaving one window out: the widths checked on a window
    come from the residuals of the other windows only.
    """
    y = cv["y"].to_numpy(np.float64)
    scale, sq_scale = scales
    scores: dict[str, _Score] = {}
    for name in (*names, "mean"):
        if name not in cv.columns:
            continue
        f = cv[name].to_numpy(np.float64)
        ok = np.isfinite(f)
        if not ok.any():
            continue
        err = np.abs(y[ok] - f[ok])
        scores[name] = _Score(
            mase=float(np.mean(err)) / scale,
            rmsse=math.sqrt(float(np.mean(err**2)) / sq_scale),
            smape=_smape(y[ok], f[ok]),
            coverage_80=math.nan,
            coverage_95=math.nan,
        )
    f = cv["mean"].to_numpy(np.float64)
    resid = np.abs(y - f)
    weeks = _week_of_horizon(cv)
    widths = {level: _widths(resid, weeks, level, horizon) for level in LEVELS}
    cutoffs = cv["cutoff"].to_numpy()
    if "mean" in scores and len(np.unique(cutoffs)) > 1:
        for level in LEVELS:
            hits = []
            for c in np.unique(cutoffs):
                mine = cutoffs == c
                w = _widths(resid[~mine], weeks[~mine], level, horizon)
                d = np.clip(weeks[mine] * 7, 0, horizon - 1)
                lo, hi = np.maximum(f[mine] - w[d], 0.0), f[mine] + w[d]
                hits.append((y[mine] >= lo) & (y[mine] <= hi))
            setattr(scores["mean"], f"coverage_{level}", float(np.mean(np.concatenate(hits))))
    return scores, widths


def _ensemble_points(
    data: pd.DataFrame, cfg: ForecastConfig
) -> tuple[dict[int, tuple[str, _Score]], list[tuple], list[pd.DataFrame]]:
    """The smooth tier's point forecasts alone (the members' mean), without the backtest:
    no bounds (left to ``order_bounds``) and no scores."""
    names = cfg.smooth_models
    fc = _combine(_member_frames("forecast", names, data, cfg), ["unique_id", "ds"], names)
    if fc.empty:
        return {}, [], []
    fc = fc[np.isfinite(fc["mean"])]
    fc = fc[fc.groupby("unique_id")["mean"].transform("size") == cfg.horizon]
    fc = fc.sort_values(["unique_id", "ds"])
    out = pd.DataFrame({"uid": fc["unique_id"].to_numpy(), "ds": fc["ds"].to_numpy()})
    out["forecast"] = fc["mean"].to_numpy()
    for level in LEVELS:
        out[f"lower_{level}"] = np.nan
        out[f"upper_{level}"] = np.nan
    out["model"] = cfg.ensemble_name
    unscored = _Score(math.nan, math.nan, math.nan, math.nan, math.nan)
    return {int(u): (cfg.ensemble_name, unscored) for u in out["uid"].unique()}, [], [out]


def _ensemble(
    data: pd.DataFrame, cfg: ForecastConfig, *, points_only: bool = False
) -> tuple[dict[int, tuple[str, _Score]], list[tuple], list[pd.DataFrame]]:
    """The smooth tier: the mean of ``cfg.smooth_models``, conformal bounds from its backtest.

    Returns ``{uid: (model, score)}``, candidate rows (each member and the
    mean) and the forecast rows. ``points_only``: see ``_ensemble_points``.
    """
    if points_only:
        return _ensemble_points(data, cfg)
    names = cfg.smooth_models
    # Seasonal naive is backtested alongside as the reference every forecast must beat.
    scored = names if MODEL_SN in names else (*names, MODEL_SN)
    cv = _combine(_member_frames("cv", scored, data, cfg), [*_CV_KEYS], scored)
    if MODEL_SN not in names and MODEL_SN in cv.columns:
        # The reference is not a member: recompute the mean without it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            present = [n for n in names if n in cv.columns]
            cv["mean"] = np.nanmean(cv[present].to_numpy(np.float64), axis=1)
    fc = _combine(_member_frames("forecast", names, data, cfg), ["unique_id", "ds"], names)
    if cv.empty or fc.empty:
        return {}, [], []
    first_cut = data.groupby("unique_id")["ds"].max() - pd.Timedelta(days=cfg.backtest_days)
    cv_by_uid = {u: g for u, g in cv.groupby("unique_id", sort=False)}
    chosen: dict[int, tuple[str, _Score]] = {}
    candidates: list[tuple] = []
    widths: dict[int, dict[int, np.ndarray]] = {}
    for uid, hist in data.groupby("unique_id", sort=False):
        mine = cv_by_uid.get(uid)
        if mine is None or not np.isfinite(mine["mean"]).any():
            continue
        train = hist[hist["ds"] <= first_cut[uid]]["y"].to_numpy()
        scales = (
            _seasonal_scale(train, cfg.season_length),
            _seasonal_scale(train, cfg.season_length, power=2),
        )
        scores, w = _ensemble_score(mine, scored, scales, cfg.horizon)
        if "mean" not in scores or not all(np.isfinite(v).all() for v in w.values()):
            continue
        shown_mean = cfg.ensemble_name
        for name, sc in scores.items():
            shown = shown_mean if name == "mean" else name
            candidates.append(
                (uid, shown, sc.mase, sc.rmsse, sc.smape, sc.coverage_80, sc.coverage_95)
            )
        chosen[int(uid)] = (shown_mean, scores["mean"])
        widths[int(uid)] = w
    fc = fc[fc["unique_id"].isin(list(chosen)) & np.isfinite(fc["mean"])]
    if fc.empty:
        return {}, candidates, []
    # A series whose final forecast failed for some days is left to the fallback.
    complete = fc.groupby("unique_id")["mean"].transform("size") == cfg.horizon
    fc = fc[complete]
    fc = fc.sort_values(["unique_id", "ds"])
    out = pd.DataFrame({"uid": fc["unique_id"].to_numpy(), "ds": fc["ds"].to_numpy()})
    out["forecast"] = fc["mean"].to_numpy()
    step = fc.groupby("unique_id").cumcount().to_numpy()  # days ahead - 1
    uids = fc["unique_id"].to_numpy()
    for level in LEVELS:
        half = np.empty(len(out))
        for uid in np.unique(uids):
            mask = uids == uid
            half[mask] = widths[int(uid)][level][step[mask]]
        out[f"lower_{level}"] = out["forecast"] - half
        out[f"upper_{level}"] = out["forecast"] + half
    out["model"] = out["uid"].map({u: v[0] for u, v in chosen.items()})
    chosen = {u: v for u, v in chosen.items() if u in set(out["uid"])}
    return chosen, candidates, [out]


# --- the whole procedure -----------------------------------------------------------------------


def order_bounds(out: pd.DataFrame) -> pd.DataFrame:
    """Clip at 0 and enforce lower_95 <= lower_80 <= forecast <= upper_80 <= upper_95."""
    f = out["forecast"].clip(lower=0.0)
    lo80 = np.minimum(out["lower_80"].fillna(f).clip(lower=0.0), f)
    lo95 = np.minimum(out["lower_95"].fillna(lo80).clip(lower=0.0), lo80)
    hi80 = np.maximum(out["upper_80"].fillna(f), f)
    hi95 = np.maximum(out["upper_95"].fillna(hi80), hi80)
    return out.assign(forecast=f, lower_80=lo80, lower_95=lo95, upper_80=hi80, upper_95=hi95)


def _mean_forecast(series: pd.DataFrame, cfg: ForecastConfig, horizon: int) -> tuple:
    """Forecast rows and an accuracy row for a series too short to backtest."""
    y = series["y"].to_numpy(dtype=np.float64)[-cfg.intermittent_train_days :]
    mean = float(y.mean()) if len(y) else 0.0
    dates = pd.date_range(series["ds"].max() + pd.Timedelta(days=1), periods=horizon)
    fc = pd.DataFrame({"ds": dates, "forecast": mean, **demand_quantiles(y), "model": MODEL_MEAN})
    return fc, (MODEL_MEAN, math.nan, math.nan, math.nan, math.nan, len(y))


@dataclass
class _Tiers:
    """Which series get which treatment (ids are ``build_series`` uids)."""

    short: list[int]  # too short to backtest, or no demand in the window: Mean
    smooth: list[int]  # with a year of history: smooth_models
    intermittent: list[int]
    young: list[int] = field(default_factory=list)  # smooth, backtested on shorter windows
    no_year: list[int] = field(default_factory=list)  # smooth, less than a year: short_models


def _classify(series: pd.DataFrame, cfg: ForecastConfig) -> _Tiers:
    """Tiers from the recent window (the intermittent tier's: its training days and backtest)."""
    icfg = cfg.for_intermittent()
    recent = series.groupby("uid", sort=False).tail(icfg.train_days + icfg.backtest_days)
    lengths = series.groupby("uid").size()
    recent_lengths = recent.groupby("uid").size().reindex(lengths.index)
    zero_share = recent.groupby("uid")["y"].apply(lambda s: float((s == 0).mean()))
    zero_share = zero_share.reindex(lengths.index)
    sparse = zero_share >= cfg.intermittent_zero_share
    # A smooth series too short for the full backtest, but long enough for the shorter one.
    young = (~sparse & (zero_share < 1.0)) & (lengths < cfg.min_backtest_days)
    young &= lengths >= cfg.for_young().min_backtest_days
    short = (
        (zero_share >= 1.0)
        | (sparse & (recent_lengths < icfg.min_backtest_days))
        | (~sparse & (lengths < cfg.min_backtest_days) & ~young)
    )
    smooth = ~short & ~sparse & ~young
    no_year = smooth & (lengths < cfg.yearly_min_days)
    return _Tiers(
        short=[int(u) for u in lengths.index[short]],
        smooth=[int(u) for u in lengths.index[smooth & ~no_year]],
        intermittent=[int(u) for u in lengths.index[~short & sparse]],
        young=[int(u) for u in lengths.index[young]],
        no_year=[int(u) for u in lengths.index[no_year]],
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


def _select(
    sf_input: pd.DataFrame, ids: list[int], names: tuple[str, ...], metric: str, cfg: ForecastConfig
) -> tuple[dict[int, tuple[str, _Score]], list[tuple], list[pd.DataFrame]]:
    """One model per series, chosen by backtest ``metric``, refitted on ``train_days``."""
    data = sf_input[sf_input["unique_id"].isin(ids)]
    data = data.groupby("unique_id", sort=False).tail(cfg.train_days + cfg.backtest_days)
    picked, cand = _backtest(data, names, metric, cfg)
    final_input = data.groupby("unique_id", sort=False).tail(cfg.train_days)
    return picked, cand, _refit_chosen(final_input, picked, cfg)


def forecast_series(
    daily: pd.DataFrame,
    last_date: SeriesEnd,
    cfg: ForecastConfig | None = None,
    *,
    points_only: bool = False,
) -> ForecastResult:
    """Forecast every (sku, store_id) in ``daily`` (``sku, store_id, date, units``).

    Returns ``horizon`` days after each series' end (``last_date``: one date for
    all, or a mapping per series, see ``build_series``) per series
    (``FORECAST_COLUMNS``), one accuracy row per series (``ACCURACY_COLUMNS``)
    and the backtest score of every candidate (``CANDIDATE_COLUMNS``). Pure and
    deterministic; a global model (LightGBM) learns from all of ``daily``'s series.

    ``points_only``: the same point forecasts of the ensemble tier without its backtest
    (which only sets its bounds and scores): bounds collapse onto the forecast and scores
    are NaN. The per-series choice of the other tiers still backtests, to choose.
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
    # Models see at most train_days (+ the backtest windows while backtesting).
    series = series.groupby("uid", sort=False).tail(cfg.train_days + cfg.backtest_days)
    lengths = series.groupby("uid").size()
    keys = series.drop_duplicates("uid").set_index("uid")[["sku", "store_id"]]
    tiers = _classify(series, cfg)
    sf_input = series.rename(columns={"uid": "unique_id"})[["unique_id", "ds", "y"]]
    icfg = cfg.for_intermittent()

    chosen: dict[int, tuple[str, _Score]] = {}
    candidates: list[tuple] = []
    forecasts: list[pd.DataFrame] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smooth_tiers = (
            (tiers.smooth, cfg),
            (tiers.no_year, cfg.for_short()),
            (tiers.young, cfg.for_young()),
        )
        for uids, tcfg in smooth_tiers:
            if not uids:
                continue
            if cfg.combine == "mean":
                data = sf_input[sf_input["unique_id"].isin(uids)]
                picked, cand, fcs = _ensemble(data, tcfg, points_only=points_only)
            else:
                picked, cand, fcs = _select(sf_input, uids, tcfg.smooth_models, "mase", tcfg)
            chosen.update(picked)
            candidates += cand
            forecasts += fcs
        if tiers.intermittent:
            # MAE-type errors reward forecasting 0 on sparse series (their median is 0), so
            # intermittent series are chosen by squared error (RMSSE, as the M5 competition).
            picked, cand, fcs = _select(
                sf_input, tiers.intermittent, cfg.intermittent_models, "rmsse", icfg
            )
            chosen.update(picked)
            candidates += cand
            forecasts += fcs

    accuracy: list[tuple] = []
    done: set[int] = set()
    intermittent = set(tiers.intermittent)
    for fc in forecasts:
        for uid in fc["uid"].unique():
            name, sc = chosen[int(uid)]
            days = icfg.train_days if uid in intermittent else cfg.train_days
            n_train = int(min(lengths[uid], days))
            accuracy.append(
                (int(uid), name, sc.mase, sc.smape, sc.coverage_80, sc.coverage_95, n_train)
            )
            done.add(int(uid))
    # Short series, and any series the models could not handle: the mean.
    tried = tiers.smooth + tiers.no_year + tiers.young + tiers.intermittent
    for uid in [*tiers.short, *(u for u in tried if u not in done)]:
        fc, acc = _mean_forecast(series[series["uid"] == uid], cfg, cfg.horizon)
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


# --- forecast levels: sku x store, sku, store, total; reconciled ------------------------------


@dataclass
class LevelForecast:
    forecasts: pd.DataFrame  # FORECAST_COLUMNS + level: every node of every level, coherent
    method: str  # the reconciliation chosen by the holdout backtest
    holdout_mase: dict[str, float]  # each method's mean MASE over all nodes on the holdout


def with_level(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the ``level`` of each row, from its ``sku`` and ``store_id``."""
    keys = zip(frame["sku"], frame["store_id"], strict=True)
    return frame.assign(level=[forecast_level(s, t) for s, t in keys])


def _nodes(bottom: pd.DataFrame) -> pd.DataFrame:
    """Daily units of every node: bottom series plus their sums per sku, per store, in total."""
    b = bottom[["sku", "store_id", "ds", "y"]]
    parts = [
        b,
        b.groupby(["sku", "ds"], as_index=False)["y"].sum().assign(store_id=ALL),
        b.groupby(["store_id", "ds"], as_index=False)["y"].sum().assign(sku=ALL),
        b.groupby("ds", as_index=False)["y"].sum().assign(sku=ALL, store_id=ALL),
    ]
    out = pd.concat(parts, ignore_index=True)[["sku", "store_id", "ds", "y"]]
    return out.rename(columns={"ds": "date", "y": "units"})


def _summing(keys: pd.DataFrame) -> tuple[np.ndarray, list[tuple[str, str]], list[tuple[str, str]]]:
    """The summing matrix S (nodes x bottom series), the node keys and the bottom keys."""
    bottom = [(s, t) for s, t in keys.itertuples(index=False) if s != ALL and t != ALL]
    bottom.sort()
    skus = sorted({s for s, _ in bottom})
    stores = sorted({t for _, t in bottom})
    nodes = [(ALL, ALL)] + [(s, ALL) for s in skus] + [(ALL, t) for t in stores] + bottom
    bs = np.array([k[0] for k in bottom], dtype=object)
    bt = np.array([k[1] for k in bottom], dtype=object)
    ns = np.array([k[0] for k in nodes], dtype=object)[:, None]
    nt = np.array([k[1] for k in nodes], dtype=object)[:, None]
    s_mat = (((ns == ALL) | (ns == bs[None, :])) & ((nt == ALL) | (nt == bt[None, :]))).astype(
        np.float64
    )
    return s_mat, nodes, bottom


def reconcile(base: pd.DataFrame, method: str) -> pd.DataFrame:
    """Coherent point forecasts of every node from ``base`` (``sku, store_id, ds, forecast``).

    ``BottomUp`` sums the bottom forecasts; ``MinTrace_wls_struct``
    (hierarchicalforecast) projects all levels' forecasts onto coherent ones, weighting
    each node by how many bottom series it sums. Negative reconciled bottom
    forecasts are clipped at 0 and every level re-summed from them, so the result
    is coherent and non-negative either way. Returns ``base`` with ``forecast``
    replaced.
    """
    from hierarchicalforecast.core import HierarchicalReconciliation
    from hierarchicalforecast.methods import BottomUp, MinTrace

    keys = base[["sku", "store_id"]].drop_duplicates()
    s_mat, nodes, bottom = _summing(keys)
    ids = {k: f"n{i}" for i, k in enumerate(nodes)}
    s_df = pd.DataFrame(s_mat, columns=[ids[k] for k in bottom])
    s_df.insert(0, "unique_id", [ids[k] for k in nodes])
    tags = {
        name: np.array([ids[k] for k in nodes if forecast_level(*k) == name], dtype=object)
        for name in ("total", "sku", "store", "sku_store")
    }
    uid = pd.Series([ids[(s, t)] for s, t in zip(base["sku"], base["store_id"], strict=True)])
    y_hat = pd.DataFrame(
        {
            "unique_id": uid.to_numpy(),
            "ds": base["ds"].to_numpy(),
            "base": base["forecast"].to_numpy(),
        }
    )
    reconciler = BottomUp() if method == "BottomUp" else MinTrace(method="wls_struct")
    rec = HierarchicalReconciliation(reconcilers=[reconciler]).reconcile(
        Y_hat_df=y_hat, S_df=s_df, tags=tags
    )
    col = next(c for c in rec.columns if c.startswith("base/"))
    # Clip the reconciled bottom level and sum it up again: coherent and non-negative.
    wide = rec.pivot(index="ds", columns="unique_id", values=col)
    bottom_ids = [ids[k] for k in bottom]
    b = np.clip(wide[bottom_ids].to_numpy(np.float64), 0.0, None)
    total = b @ s_mat.T  # (days, nodes)
    coherent = pd.DataFrame(total, index=wide.index, columns=[ids[k] for k in nodes])
    lookup = coherent.stack()
    values = lookup.reindex(pd.MultiIndex.from_arrays([base["ds"], uid])).to_numpy()
    return base.assign(forecast=values)


def _reconciled_with_bounds(base: pd.DataFrame, method: str) -> pd.DataFrame:
    """Reconciled forecasts; each node keeps its own interval widths around its new forecast."""
    rec = reconcile(base[["sku", "store_id", "ds", "forecast"]], method)
    shift = rec["forecast"].to_numpy() - base["forecast"].to_numpy()
    out = base.copy()
    out["forecast"] = rec["forecast"].to_numpy()
    for b in _BOUNDS:
        out[b] = base[b].to_numpy() + shift
    return order_bounds(out)


def holdout_parts(
    nodes: pd.DataFrame, cut: date, cfg: ForecastConfig
) -> tuple[pd.DataFrame, pd.Series]:
    """What choosing a reconciliation needs of some nodes, computed where they are.

    ``nodes``: daily units (``sku, store_id, date, units``). Returns the base forecasts made
    at ``cut`` (``sku, store_id, ds, forecast``: the ``horizon`` days after it) and each
    node's MASE scale (its history up to ``cut``), both per node, so buckets of nodes can
    compute them apart and the driver join them.
    """
    past = nodes[pd.to_datetime(nodes["date"]) <= pd.Timestamp(cut)]
    if past.empty:
        return pd.DataFrame(columns=["sku", "store_id", "ds", "forecast"]), pd.Series(
            dtype=np.float64
        )
    # Points only: the holdout scores point forecasts, and the ensemble's backtest (most of
    # its cost) would only make bounds.
    base = forecast_series(past, cut, cfg, points_only=True).forecasts
    base = base.assign(ds=pd.to_datetime(base["date"]))[["sku", "store_id", "ds", "forecast"]]
    dense = build_series(past, cut)
    scales = {
        (sku, store): _seasonal_scale(g["y"].to_numpy(np.float64), cfg.season_length)
        for (sku, store), g in dense.groupby(["sku", "store_id"], sort=False)
    }
    return base, pd.Series(scales, dtype=np.float64)


def choose_reconciler(
    holdout: pd.DataFrame, held: pd.DataFrame, scales: pd.Series
) -> tuple[str, dict[str, float]]:
    """The reconciliation (of ``RECONCILERS``) with the lowest mean MASE over all nodes.

    ``holdout``: every node's base forecasts made ``horizon`` days before the last date
    (``sku, store_id, ds, forecast``); ``held``: the units sold on those days
    (``sku, store_id, ds, units``; a missing day sold 0); ``scales``: each node's MASE
    scale, indexed by ``(sku, store_id)``. Returns the method and every method's score.
    """
    if holdout.empty:
        return "BottomUp", {}
    actual = held.assign(ds=pd.to_datetime(held["ds"])).set_index(["sku", "store_id", "ds"])
    base = holdout.assign(ds=pd.to_datetime(holdout["ds"]))
    scores: dict[str, float] = {}
    for method in RECONCILERS:
        rec = reconcile(base, method)
        y = actual["units"].reindex(pd.MultiIndex.from_frame(rec[["sku", "store_id", "ds"]]))
        err = np.abs(y.fillna(0.0).to_numpy(np.float64) - rec["forecast"].to_numpy())
        per = pd.Series(err).groupby([rec["sku"].to_numpy(), rec["store_id"].to_numpy()]).mean()
        scores[method] = float((per / scales.reindex(per.index).fillna(1.0)).mean())
    return min(scores, key=lambda m: scores[m]), scores


def reconcile_levels(base: pd.DataFrame, method: str) -> pd.DataFrame:
    """Every node's forecasts (``FORECAST_COLUMNS``), reconciled by ``method``, with ``level``."""
    base = base.assign(ds=pd.to_datetime(base["date"]))
    out = _reconciled_with_bounds(base, method)
    return with_level(out)[[*FORECAST_COLUMNS, "level"]].reset_index(drop=True)


def forecast_levels(
    daily: pd.DataFrame, last_date: date, cfg: ForecastConfig | None = None
) -> LevelForecast:
    """Coherent forecasts of every level: each (sku, store), each sku, each store, the total.

    Every node is forecast by ``forecast_series`` (so aggregates get their own
    seasonality), then reconciled. With ``cfg.reconcile == "auto"`` the reconciliation
    (``RECONCILERS``) is chosen on a holdout: the same procedure run ``horizon`` days
    earlier, scored by the mean MASE over all nodes. Rows of an aggregate level carry
    ``ALL`` (``"*"``) as their ``sku`` and/or ``store_id``; ``level`` names the level.
    The one-process form of what ``spark_forecast`` and ``reconcile_collected`` do in Spark.
    """
    cfg = cfg or ForecastConfig()
    bottom = build_series(daily, last_date)
    if bottom.empty:
        return LevelForecast(pd.DataFrame(columns=[*FORECAST_COLUMNS, "level"]), "BottomUp", {})
    nodes = _nodes(bottom)
    method, scores = cfg.reconcile, dict[str, float]()
    if cfg.reconcile == "auto":
        cut = last_date - timedelta(days=cfg.horizon)
        holdout, scales = holdout_parts(nodes, cut, cfg)
        held = nodes[pd.to_datetime(nodes["date"]) > pd.Timestamp(cut)]
        method, scores = choose_reconciler(holdout, held.rename(columns={"date": "ds"}), scales)
    base = forecast_series(nodes, last_date, cfg).forecasts
    return LevelForecast(reconcile_levels(base, method), method, scores)


# --- Spark ---------------------------------------------------------------------------------

_SPARK_OUT = (
    "kind string, sku string, store_id string, date date, forecast double, lower_80 double, "
    "upper_80 double, lower_95 double, upper_95 double, model string, mase double, "
    "smape double, coverage_80 double, coverage_95 double, n_train_days int, level string"
)


def _spark_rows(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """``frame``'s rows in the UDF's one output schema (``_SPARK_OUT``), tagged ``kind``."""
    out = frame.assign(kind=kind)
    dtypes = {"string": object, "date": object, "double": np.float64, "int": "Int32"}
    cols = []
    for column in _SPARK_OUT.split(", "):
        name, kind_of = column.split()
        cols.append(name)
        if name not in out.columns:
            out[name] = None
        # One dtype per column in every part, so concatenating the parts keeps it.
        out[name] = out[name].astype(dtypes[kind_of])
    return out[cols]


def spark_nodes(daily_sales: DataFrame, last_date: date) -> DataFrame:
    """Daily units of every node of the hierarchy (``sku, store_id, date, units``): each
    (sku, store) series up to ``last_date``, and their sums per sku (``store_id = ALL``),
    per store (``sku = ALL``) and in total. Days without sales are absent, as in the view."""
    from pyspark.sql import functions as F

    d = daily_sales.where(F.col("date") <= F.lit(last_date)).select(
        "sku", "store_id", "date", F.greatest(F.col("units"), F.lit(0)).alias("units")
    )
    total = F.sum("units").alias("units")
    cols = ["sku", "store_id", "date", "units"]
    return (
        d.unionByName(
            d.groupBy("sku", "date").agg(total).withColumn("store_id", F.lit(ALL)).select(*cols)
        )
        .unionByName(
            d.groupBy("store_id", "date").agg(total).withColumn("sku", F.lit(ALL)).select(*cols)
        )
        .unionByName(
            d.groupBy("date")
            .agg(total)
            .select(F.lit(ALL).alias("sku"), F.lit(ALL).alias("store_id"), "date", "units")
        )
    )


def spark_forecast(
    nodes: DataFrame,
    last_date: date,
    cfg: ForecastConfig | None = None,
    *,
    buckets: int,
) -> DataFrame:
    """Forecast every node of ``nodes`` (``spark_nodes``) in Spark.

    Nodes are hashed into ``buckets`` groups; each group runs ``forecast_series`` in a
    Python worker. Returns one frame with a ``kind`` column: ``forecast`` rows
    (FORECAST_COLUMNS), ``accuracy`` rows (ACCURACY_COLUMNS) and, when the reconciliation
    is chosen on a holdout (``cfg.reconcile == "auto"``), ``holdout`` rows (the forecasts
    made ``horizon`` days earlier) and ``scale`` rows (each node's MASE scale, in
    ``forecast``): the driver reconciles them with ``reconcile_collected``.
    """
    from pyspark.sql import functions as F

    cfg = cfg or ForecastConfig()
    cut = last_date - timedelta(days=cfg.horizon) if cfg.reconcile == "auto" else None

    def run(pdf: pd.DataFrame) -> pd.DataFrame:
        series = pdf.drop(columns="bucket")
        result = forecast_series(series, last_date, cfg)
        parts = [
            _spark_rows(result.forecasts, "forecast"),
            _spark_rows(result.accuracy, "accuracy"),
        ]
        if cut is not None:
            base, scales = holdout_parts(series, cut, cfg)
            parts.append(_spark_rows(base.assign(date=base["ds"].dt.date), "holdout"))
            keys = pd.DataFrame(list(scales.index), columns=["sku", "store_id"])
            parts.append(_spark_rows(keys.assign(forecast=scales.to_numpy()), "scale"))
        out = pd.concat([p for p in parts if not p.empty] or parts[:1], ignore_index=True)
        return with_level(out)

    return (
        nodes.select("sku", "store_id", "date", "units")
        .withColumn("bucket", F.pmod(F.xxhash64("sku", "store_id"), F.lit(buckets)))
        .repartition(buckets, "bucket")
        .groupBy("bucket")
        .applyInPandas(run, schema=_SPARK_OUT)
    )


def reconcile_collected(
    collected: pd.DataFrame, held: pd.DataFrame | None, cfg: ForecastConfig
) -> LevelForecast:
    """The driver's half of ``spark_forecast``: choose the reconciliation and apply it.

    ``collected``: its ``forecast`` rows (and ``holdout`` and ``scale`` rows with
    ``cfg.reconcile == "auto"``); ``held``: the nodes' units after the holdout's cut
    (``sku, store_id, date, units``), needed with ``auto`` only.
    """
    kind = collected["kind"]
    method, scores = cfg.reconcile, dict[str, float]()
    if cfg.reconcile == "auto":
        holdout = collected[kind == "holdout"]
        holdout = holdout.assign(ds=pd.to_datetime(holdout["date"]))
        sc = collected[kind == "scale"]
        scales = pd.Series(
            sc["forecast"].to_numpy(np.float64),
            index=pd.MultiIndex.from_frame(sc[["sku", "store_id"]]),
        )
        held = (
            held if held is not None else pd.DataFrame(columns=["sku", "store_id", "date", "units"])
        )
        method, scores = choose_reconciler(
            holdout[["sku", "store_id", "ds", "forecast"]],
            held.rename(columns={"date": "ds"}),
            scales,
        )
    base = collected[kind == "forecast"][FORECAST_COLUMNS]
    if base.empty:
        return LevelForecast(pd.DataFrame(columns=[*FORECAST_COLUMNS, "level"]), method, scores)
    return LevelForecast(reconcile_levels(base, method), method, scores)
