"""The forecast default against the strong baselines on real daily series (a slice of
``bench/forecast_accuracy.py``: a few series, one origin), scored by the bench's own code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "forecast_accuracy_bench", ROOT / "bench" / "forecast_accuracy.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
        scores = bench.run_dataset(data, fns, origins=1, step=91, history=3 * 365)
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
