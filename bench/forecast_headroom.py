"""Benchmark: how much of the default's error a forecast from the series' past could still remove.

    .venv/bin/python bench/forecast_headroom.py                       # births_states, 3 window sets
    .venv/bin/python bench/forecast_headroom.py --windows 4x91        # the accuracy bench's windows

The accuracy bench (``bench/forecast_accuracy.py``) scores a few rolling windows. This one asks
what is left to gain in them, and whether a target is a property of the forecaster or of the
windows. Per window set (``NxS``: N origins S days apart, the accuracy bench's windows, its
loader, history and MASE scale), at h=14 and h=28, the median over series of the mean MASE of:

* ``AutoETS`` and ``0.85 x AutoETS`` (issue 12's target);
* ``default``: the product (``batch.forecast.forecast_series``, default ``ForecastConfig``);
* ``default, past``: the default moved by a regression of its mean error over the horizon on
  what is known at the origin (each series' residuals from a yearly regression over its last
  14 and 28 ordinary days, the same dates a year before, its fitted trend, and the mean of each
  over the series), fitted on the other windows and applied to the held-out one: the part of
  the window's level that the past tells;
* ``default, shared level known``: each window's mean error over all its series (in scales)
  removed: an oracle of the level the series share (for births, the national level);
* ``default, own level known``: each series-window's own mean error removed;
* ``noise floor``: the expected MASE of a forecast equal to each day's true mean, with the
  series' over-dispersed Poisson noise (0.798 sqrt(phi y) a day; phi per series and origin
  from its last two years' ordinary days, by the robust variance of y_t - (y_t-7 + y_t+7)/2
  over 1.5 times the mean).

Prints one table per window set, then one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location(
    "forecast_accuracy", ROOT / "bench" / "forecast_accuracy.py"
)
accuracy = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["forecast_accuracy"] = accuracy
_spec.loader.exec_module(accuracy)  # type: ignore[union-attr]

from batch.forecast import ForecastConfig, _fourier, holiday  # noqa: E402

HORIZONS = accuracy.HORIZONS
PREDICTORS = ("r14", "r28", "last_year", "trend")
MIN_WINDOWS_PAST = 8


@dataclass
class Window:
    """One (series, origin): actuals, both models' forecasts, scale and predictors."""

    uid: str
    k: int
    y: np.ndarray
    ets: np.ndarray
    default: np.ndarray
    scale: float
    floor: np.ndarray  # expected absolute error of a perfect mean forecast, per day (units)
    past: dict[str, float]


def _predictors(
    ds: pd.DatetimeIndex, y: np.ndarray, h: np.ndarray, scale: float
) -> dict[str, float]:
    """Mean residuals of a yearly regression (level, trend, the default's yearly Fourier pairs,
    weekday, holiday dummies; ``h``: the days' holiday codes) over the series' last 14 and 28
    ordinary days and over the 14 days ahead a year earlier, and the fitted trend a year, all
    in scales."""
    codes = [c for c in np.unique(h[h > 0]) if (h == c).sum() >= 2]
    x = np.column_stack(
        [
            np.ones(len(y)),
            np.arange(len(y)) / 365.25,
            _fourier(ds, ForecastConfig().yearly_terms),
            (ds.dayofweek.to_numpy()[:, None] == np.arange(6)[None, :]),
            (h[:, None] == np.array(codes, dtype=h.dtype)[None, :]),
        ]
    ).astype(np.float64)
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    e = (y - x @ beta) / scale
    ordinary = h == 0

    def mean(first: int, last: int) -> float:
        part = slice(len(e) - first, len(e) - last if last else None)
        sel = e[part][ordinary[part]]
        return float(np.mean(sel)) if len(sel) else np.nan

    return {
        "r14": mean(14, 0),
        "r28": mean(28, 0),
        "last_year": mean(365, 351) if len(e) > 379 else np.nan,
        "trend": float(beta[1]) / scale,
    }


def _floor(y: np.ndarray, h: np.ndarray, test_y: np.ndarray) -> np.ndarray:
    """Per test day, E|y - mean| under over-dispersed Poisson noise (the day's count standing
    for its mean), phi from the training's (``y``, holiday codes ``h``) last two years of
    ordinary days."""
    y = y[-730:]
    d = y[7:-7] - (y[:-14] + y[14:]) / 2
    hol = h[-730:] > 0
    ok = ~(hol[7:-7] | hol[:-14] | hol[14:])
    mad = 1.4826 * np.median(np.abs(d[ok] - np.median(d[ok])))
    phi = mad**2 / (1.5 * np.mean(y[7:-7][ok]))
    return 0.798 * np.sqrt(phi * np.clip(test_y, 0, None))


def collect(data: pd.DataFrame, origins: int, step: int, history: int) -> list[Window]:
    fns = accuracy.models()
    h_max = max(HORIZONS)
    out: list[Window] = []
    for k, train, test in accuracy.windows(data, origins=origins, step=step, history=history):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fc = {
                m: fns[m](train, h_max).sort_values(["unique_id", "ds"])
                for m in ("AutoETS", "default")
            }
        for uid, tr in train.groupby("unique_id", sort=False):
            y = test[test["unique_id"] == uid]["y"].to_numpy(np.float64)
            f = {m: fc[m][fc[m]["unique_id"] == uid]["forecast"].to_numpy(np.float64) for m in fc}
            if len(y) < h_max or any(len(v) < h_max for v in f.values()):
                continue
            ds, history_y = pd.DatetimeIndex(tr["ds"]), tr["y"].to_numpy(np.float64)
            h = holiday(ds)
            scale = accuracy._scales(history_y)[0]
            out.append(
                Window(
                    str(uid),
                    k,
                    y,
                    f["AutoETS"][:h_max],
                    f["default"][:h_max],
                    scale,
                    _floor(history_y, h, y),
                    _predictors(ds, history_y, h, scale),
                )
            )
        print(f"  origin {k + 1}/{origins}", file=sys.stderr, flush=True)
    return out


def _median_mase(ws: list[Window], h: int, errors: list[np.ndarray]) -> float:
    per: dict[str, list[float]] = {}
    for w, err in zip(ws, errors, strict=True):
        per.setdefault(w.uid, []).append(float(np.mean(np.abs(err[:h]))) / w.scale)
    return accuracy._median_of_means(per)


def _bias(ws: list[Window], h: int) -> np.ndarray:
    return np.array([np.mean(w.y[:h] - w.default[:h]) / w.scale for w in ws])


def _past_correction(ws: list[Window], bias: np.ndarray) -> np.ndarray | None:
    """Leave-one-window-out linear prediction of each series-window's ``bias`` (in scales);
    None with fewer than ``MIN_WINDOWS_PAST`` windows (the shared predictors take one value a
    window: a regression on three or four points says nothing)."""
    if len({w.k for w in ws}) < MIN_WINDOWS_PAST:
        return None
    frame = pd.DataFrame([{"k": w.k, **w.past} for w in ws])
    for p in PREDICTORS:
        frame[p + "_shared"] = frame.groupby("k")[p].transform("mean")
    cols = [c for c in frame.columns if c != "k"]
    x = np.column_stack([np.ones(len(frame)), frame[cols].to_numpy(np.float64)])
    usable = ~np.isnan(x).any(axis=1)
    pred = np.zeros(len(ws))
    for k in frame["k"].unique():
        held = (frame["k"] == k).to_numpy()
        fit = usable & ~held
        if fit.sum() <= x.shape[1]:
            continue
        coef = np.linalg.lstsq(x[fit], bias[fit], rcond=None)[0]
        pred[held & usable] = x[held & usable] @ coef
    return pred


def summarise(ws: list[Window]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    err = [w.y - w.default for w in ws]

    def moved(by: np.ndarray) -> list[np.ndarray]:
        return [e - c * w.scale for e, c, w in zip(err, by, ws, strict=True)]

    for h in HORIZONS:
        bias = _bias(ws, h)
        shared = pd.Series(bias).groupby([w.k for w in ws]).transform("mean").to_numpy()
        past = _past_correction(ws, bias)
        ets = _median_mase(ws, h, [w.y - w.ets for w in ws])
        table[f"h{h}"] = {
            "AutoETS": ets,
            "target (0.85 x AutoETS)": 0.85 * ets,
            "default": _median_mase(ws, h, err),
            "default, past": np.nan if past is None else _median_mase(ws, h, moved(past)),
            "default, shared level known": _median_mase(ws, h, moved(shared)),
            "default, own level known": _median_mase(ws, h, moved(bias)),
            "noise floor": _median_mase(ws, h, [w.floor for w in ws]),
        }
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dataset", default="births_states", choices=list(accuracy.LOADERS))
    ap.add_argument("--windows", default="4x91,8x37,32x23", help="NxS: N origins S days apart")
    ap.add_argument("--states", type=int, default=10, help="births_states: the N largest")
    ap.add_argument("--history", type=int, default=3 * 365)
    args = ap.parse_args(argv)
    data = accuracy.load(args.dataset, states=args.states)
    results = {}
    for spec in args.windows.split(","):
        origins, step = (int(v) for v in spec.lower().split("x"))
        t0 = time.perf_counter()
        ws = collect(data, origins, step, args.history)
        table = summarise(ws)
        # JSON has no NaN: a reference the window set cannot have is null.
        results[spec] = {
            h: {r: (v if np.isfinite(v) else None) for r, v in rows.items()}
            for h, rows in table.items()
        }
        n = len({w.uid for w in ws})
        print(f"\n{args.dataset} ({n} series), {origins} origins {step} days apart: median MASE")
        print(f"  {'':<30}" + "".join(f"{h:>8}" for h in table))
        for row in table["h14"]:
            cells = (table[h][row] for h in table)
            print(
                f"  {row:<30}"
                + "".join(f"{v:>8.3f}" if np.isfinite(v) else f"{'-':>8}" for v in cells)
            )
        print(f"  ({time.perf_counter() - t0:.0f} s)")
        sys.stdout.flush()
    print(
        json.dumps(
            {
                "date": date.today().isoformat(),
                "machine": f"{os.cpu_count()} vCPU, {platform.machine()}",
                "args": vars(args),
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
