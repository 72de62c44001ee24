"""``bench/forecast_headroom.py``'s references, on series whose truth is known: the noise floor
is what a forecast of the true mean scores, and the oracle levels remove exactly the part of
the error they name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests import bench_script


@pytest.fixture(scope="module")
def headroom():
    return bench_script.load("forecast_headroom")


def _mean(days: pd.DatetimeIndex) -> np.ndarray:
    """A births-like daily mean: weekly profile, yearly season, slow growth."""
    weekday = np.array([1.05, 1.08, 1.06, 1.05, 1.07, 0.86, 0.83])[days.dayofweek]
    yearly = 1 + 0.05 * np.sin(2 * np.pi * days.dayofyear / 365.25)
    return 400 * weekday * yearly * (1 + 0.03 * np.arange(len(days)) / 365.25)


@pytest.mark.parametrize("phi", [1.0, 2.5])
def test_the_noise_floor_is_what_a_forecast_of_the_true_mean_scores(headroom, phi):
    """Poisson (phi 1) and over-dispersed (negative binomial, phi 2.5) counts: the floor the
    bench computes from the training days alone matches the MASE a perfect mean forecast
    actually gets on the test days, over many draws."""
    rng = np.random.default_rng(7)
    days = pd.date_range("1985-01-01", periods=3 * 365 + 28, freq="D")
    lam = _mean(days)
    codes = headroom.holiday(days[:-28])
    floors, realised = [], []
    for _ in range(40):
        if phi == 1.0:
            y = rng.poisson(lam).astype(float)
        else:  # variance phi x mean
            p = 1 / phi
            y = rng.negative_binomial(lam * p / (1 - p), p).astype(float)
        scale = headroom.accuracy._scales(y[:-28])[0]
        floors.append(np.mean(headroom._floor(y[:-28], codes, y[-28:])) / scale)
        realised.append(np.mean(np.abs(y[-28:] - lam[-28:])) / scale)
    assert np.mean(floors) == pytest.approx(np.mean(realised), rel=0.06)


def test_the_oracle_levels_remove_the_shared_and_the_own_bias(headroom):
    """A default off by a level its window's series share, one of each series' own (centred
    within the window) and zero-mean daily noise: knowing the shared level leaves the own
    level and the noise, knowing the own level leaves the noise alone."""
    rng = np.random.default_rng(3)
    ws, own_and_noise, noise_only = [], {}, {}
    for k in range(6):
        shared = rng.normal(0, 20)
        own = rng.normal(0, 20, 5)
        own -= own.mean()
        for uid, o in zip("abcde", own, strict=True):
            y = 500.0 + rng.normal(0, 10, 28)
            noise = rng.normal(0, 10, 28)
            noise -= noise.mean()
            ws.append(
                headroom.Window(
                    uid,
                    k,
                    y,
                    y + 50.0,
                    y - noise - shared - o,
                    10.0,
                    np.zeros(28),
                    dict.fromkeys(headroom.PREDICTORS, 0.0),
                )
            )
            own_and_noise.setdefault(uid, []).append(np.mean(np.abs(noise + o)) / 10.0)
            noise_only.setdefault(uid, []).append(np.mean(np.abs(noise)) / 10.0)

    def median_of_means(per: dict[str, list[float]]) -> float:
        return float(np.median([np.mean(v) for v in per.values()]))

    table = headroom.summarise(ws)["h28"]
    assert table["AutoETS"] == pytest.approx(5.0)
    assert table["target (0.85 x AutoETS)"] == pytest.approx(4.25)
    assert table["default, shared level known"] == pytest.approx(median_of_means(own_and_noise))
    assert table["default, own level known"] == pytest.approx(median_of_means(noise_only))
    assert (
        table["default"] > table["default, shared level known"] > table["default, own level known"]
    )
    assert table["noise floor"] == 0.0
