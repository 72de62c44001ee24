"""The forecast default against the strong baselines on real daily series (a slice of
``bench/forecast_accuracy.py``: a few series, two origins), scored by the bench's own code.

Two origins, not one: every series here ends on 31 December, so a single origin scores only
the Christmas weeks."""

from __future__ import annotations

import pytest

from tests import bench_script


@pytest.fixture(scope="module")
def bench():
    return bench_script.load("forecast_accuracy")


SLICES = {
    # Daily births of three states (1969-1988) and of the US from three sources.
    "births_states": ["CA", "NY", "TX"],
    "us_births": None,
}


@pytest.fixture(scope="module")
def scored(bench):
    fns = bench.models()
    fns = {name: fns[name] for name in ("SeasonalNaive", "AutoETS", "default")}
    out = {}
    for dataset, keep in SLICES.items():
        data = bench.LOADERS[dataset]()
        if keep:
            data = data[data["unique_id"].isin(keep)]
        scores = bench.run_dataset(data, fns, origins=2, step=91, history=3 * 365)
        out[dataset] = bench.summarise(dataset, scores)
    return out


@pytest.mark.parametrize("dataset", list(SLICES))
@pytest.mark.parametrize("horizon", ["h14", "h28"])
def test_the_default_beats_seasonal_naive_and_autoets_on_real_daily_series(
    scored, dataset, horizon
):
    rows = scored[dataset][horizon]
    default = rows["default"]
    assert default["failures"] == 0
    assert default["mase"] < rows["SeasonalNaive"]["mase"], rows
    assert default["mase"] < rows["AutoETS"]["mase"], rows


def test_the_default_intervals_are_calibrated_on_real_series(scored):
    """95 % bounds from the backtest residuals cover most held-out days, without being vacuous."""
    for dataset in SLICES:
        rows = scored[dataset]["h28"]
        assert 0.80 <= rows["default"]["coverage_95"] <= 1.0, (dataset, rows["default"])
        assert rows["default"]["coverage_80"] <= rows["default"]["coverage_95"]


# --- levels: sku x store, sku, store, total -------------------------------------------------


@pytest.fixture(scope="module")
def levels():
    from datetime import date, timedelta

    import numpy as np
    import pandas as pd

    from batch.forecast import ForecastConfig, forecast_levels

    rng = np.random.default_rng(12)
    last = date(2026, 6, 30)
    rows = []
    for i in range(4):
        for j in range(3):
            t = np.arange(150)
            lam = (2 + i + j) * (1 + 0.4 * np.sin(2 * np.pi * t / 7))
            if (i + j) % 3 == 0:
                lam = lam * 0.08  # some sparse series: their own tier below the aggregates
            y = rng.poisson(lam)
            rows += [
                (f"K{i}", f"S{j}", last - timedelta(days=149 - k), int(v))
                for k, v in enumerate(y)
                if v
            ]
    daily = pd.DataFrame(rows, columns=["sku", "store_id", "date", "units"])
    # Cheap members keep the test quick; the reconciliation is what is checked.
    cfg = ForecastConfig(smooth_models=("SeasonalNaive", "ETS_ANA"))
    return forecast_levels(daily, last, cfg), cfg


def test_forecast_levels_add_up_at_every_level(levels):
    import numpy as np

    from batch.forecast import ALL, RECONCILERS

    result, cfg = levels
    fc = result.forecasts
    assert result.method in RECONCILERS
    assert set(result.holdout_mase) == set(RECONCILERS)
    counts = fc.groupby("level").size().to_dict()
    h = cfg.horizon
    assert counts == {"sku_store": 12 * h, "sku": 4 * h, "store": 3 * h, "total": h}
    bottom = fc[fc["level"] == "sku_store"]
    for level, by in (("sku", ["sku", "date"]), ("store", ["store_id", "date"])):
        summed = bottom.groupby(by)["forecast"].sum()
        mine = fc[fc["level"] == level].set_index(by)["forecast"]
        np.testing.assert_allclose(mine.sort_index(), summed.reindex(mine.sort_index().index))
    total = fc[fc["level"] == "total"].set_index("date")["forecast"].sort_index()
    np.testing.assert_allclose(total, bottom.groupby("date")["forecast"].sum().sort_index())
    assert (fc.loc[fc["level"] == "sku", "store_id"] == ALL).all()
    assert (fc.loc[fc["level"] == "store", "sku"] == ALL).all()


def test_forecast_levels_intervals_are_ordered_and_non_negative(levels):
    result, _ = levels
    fc = result.forecasts
    cols = ["lower_95", "lower_80", "forecast", "upper_80", "upper_95"]
    assert (fc[cols] >= 0).all().all()
    assert (fc[cols].diff(axis=1).iloc[:, 1:] >= -1e-9).all().all()
    # The total has an interval of its own (not collapsed onto its forecast).
    total = fc[fc["level"] == "total"]["upper_95"] - fc[fc["level"] == "total"]["lower_95"]
    assert (total > 0).all()
