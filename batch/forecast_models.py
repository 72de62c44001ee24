"""The forecast model registry: one entry per model the batch can run.

Everything else derives from this table: ``batch.forecast`` builds models from
it, ``ForecastConfig`` validates its model names against it, the CLI's
``--forecast-models`` help text and validation come from ``describe`` and
``config_from_names``, and ``docs/forecasting.md`` lists the same entries.
Adding a model is one ``ModelSpec`` here (plus, for a model that is not a
statsforecast model, its fit/forecast functions in ``batch.forecast``).

Tiers: ``smooth`` series (regular demand) combine their models: the default
forecast is the mean of its members (an ensemble), one set of members for series
with a year of history (``DEFAULT_SMOOTH``) and one for shorter ones
(``DEFAULT_SHORT``); ``intermittent`` series
(at least half the days without demand) choose one model each by backtest
RMSSE.

>>> [m.name for m in MODELS if "intermittent" in m.tiers]
['SeasonalNaive', 'CrostonOptimized', 'TSB', 'ADIDA']
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from lambdalake.errors import InvalidInput

Tier = Literal["smooth", "intermittent"]
Kind = Literal["statsforecast", "fourier_ets", "sarima", "lightgbm"]


@dataclass(frozen=True)
class ModelSpec:
    """One model: its name (as published in the ``model`` column), how to build it, and where.

    ``kind``: ``statsforecast`` models are built by ``statsforecast_model``; the
    others have their own fit/forecast functions in ``batch.forecast``.
    ``native_intervals``: the model has its own prediction intervals (used when
    series choose one model; ensembles always calibrate theirs on backtest
    residuals). ``global_model``: one model is trained across all the series of
    a Spark task rather than one per series.
    """

    name: str
    kind: Kind
    tiers: frozenset[Tier]
    native_intervals: bool
    global_model: bool
    summary: str


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "SeasonalNaive",
        "statsforecast",
        frozenset({"smooth", "intermittent"}),
        native_intervals=True,
        global_model=False,
        summary="the same weekday last week",
    ),
    ModelSpec(
        "ETS_ANA",
        "statsforecast",
        frozenset({"smooth"}),
        native_intervals=True,
        global_model=False,
        summary="exponential smoothing, additive weekly season, no trend",
    ),
    ModelSpec(
        "Theta",
        "statsforecast",
        frozenset({"smooth"}),
        native_intervals=True,
        global_model=False,
        summary="Theta method, weekly seasonal decomposition with drift",
    ),
    ModelSpec(
        "FourierETS",
        "fourier_ets",
        frozenset({"smooth"}),
        native_intervals=False,
        global_model=False,
        summary="yearly season as Fourier terms, then exponential smoothing with weekly season",
    ),
    ModelSpec(
        "SARIMA",
        "sarima",
        frozenset({"smooth"}),
        native_intervals=False,
        global_model=False,
        summary="ARIMA(2,0,0)(0,1,1) with a weekly season, on the holiday-adjusted series",
    ),
    ModelSpec(
        "LightGBM",
        "lightgbm",
        frozenset({"smooth"}),
        native_intervals=False,
        global_model=True,
        summary="gradient-boosted trees across series: lags, rolling means, weekday, day of year",
    ),
    ModelSpec(
        "CrostonOptimized",
        "statsforecast",
        frozenset({"intermittent"}),
        native_intervals=False,
        global_model=False,
        summary="Croston's method with optimised smoothing",
    ),
    ModelSpec(
        "TSB",
        "statsforecast",
        frozenset({"intermittent"}),
        native_intervals=False,
        global_model=False,
        summary="Teunter-Syntetos-Babai: demand probability and size smoothed apart",
    ),
    ModelSpec(
        "ADIDA",
        "statsforecast",
        frozenset({"intermittent"}),
        native_intervals=False,
        global_model=False,
        summary="temporal aggregation, then exponential smoothing",
    ),
)

BY_NAME: dict[str, ModelSpec] = {m.name: m for m in MODELS}

# The defaults: smooth series get the mean of these (DEFAULT_SHORT where a series has less
# than a year of history), intermittent ones the best of these.
DEFAULT_SMOOTH: tuple[str, ...] = ("FourierETS", "LightGBM")
DEFAULT_SHORT: tuple[str, ...] = ("FourierETS", "SARIMA")
DEFAULT_INTERMITTENT: tuple[str, ...] = ("SeasonalNaive", "CrostonOptimized", "TSB", "ADIDA")


class UnknownModelError(InvalidInput):
    """A model name that is not in the registry (or not for that tier)."""


def names(tier: Tier | None = None) -> tuple[str, ...]:
    """Registered model names, in registry order (of one tier if given)."""
    return tuple(m.name for m in MODELS if tier is None or tier in m.tiers)


def check_names(wanted: Iterable[str], tier: Tier) -> tuple[str, ...]:
    """``wanted`` as a tuple, or ``UnknownModelError`` naming what is not a ``tier`` model."""
    wanted = tuple(wanted)
    bad = [n for n in wanted if n not in BY_NAME or tier not in BY_NAME[n].tiers]
    if bad:
        raise UnknownModelError(
            f"unknown {tier} forecast model(s) {', '.join(bad)}; choose from {', '.join(names(tier))}"
        )
    return wanted


def describe() -> str:
    """One line per tier, for ``--help``: the models and the defaults."""
    smooth = ", ".join(names("smooth"))
    inter = ", ".join(names("intermittent"))
    return (
        f"regular series average the listed ones ({smooth}; default "
        f"{'+'.join(DEFAULT_SMOOTH)}, and {'+'.join(DEFAULT_SHORT)} for series with less "
        f"than a year of history); intermittent series pick one per series by backtest "
        f"({inter}; default all)"
    )


def config_from_names(spec: str) -> Any:
    """The ``ForecastConfig`` for a comma-separated model list (``--forecast-models``).

    Smooth models listed become the ensemble of every smooth series (the default list,
    ``FourierETS,LightGBM``, keeps ``DEFAULT_SHORT`` for series without a year of history);
    intermittent ones the candidates.
    A tier none of whose models is listed keeps SeasonalNaive. Raises
    ``UnknownModelError`` with a one-line message on an unknown name.
    """
    from batch.forecast import ForecastConfig

    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown or not wanted:
        raise UnknownModelError(
            f"unknown forecast model(s) {', '.join(unknown) or repr(spec)}; "
            f"choose from {', '.join(names())}"
        )
    smooth = tuple(n for n in names("smooth") if n in wanted) or ("SeasonalNaive",)
    intermittent = tuple(n for n in names("intermittent") if n in wanted) or ("SeasonalNaive",)
    return ForecastConfig(smooth_models=smooth, intermittent_models=intermittent)


def statsforecast_model(name: str, cfg: Any) -> Any:
    """A statsforecast model instance for a registry entry of kind ``statsforecast``."""
    from statsforecast.models import (
        ADIDA,
        ARIMA,
        TSB,
        AutoETS,
        CrostonOptimized,
        SeasonalNaive,
        Theta,
    )

    s = cfg.season_length
    builders = {
        "SeasonalNaive": lambda: SeasonalNaive(season_length=s, alias=name),
        "ETS_ANA": lambda: AutoETS(season_length=s, model="ANA", alias=name),
        "Theta": lambda: Theta(season_length=s, alias=name),
        # A fixed order, not AutoARIMA's search (which costs ~30 fits): AR(2) for the
        # short-term persistence, a seasonal difference and seasonal MA(1) for the weekday
        # profile and its slow drift.
        "SARIMA": lambda: ARIMA(
            order=(2, 0, 0), seasonal_order=(0, 1, 1), season_length=s, alias=name
        ),
        "CrostonOptimized": lambda: CrostonOptimized(alias=name),
        "TSB": lambda: TSB(alpha_d=cfg.tsb_alpha_d, alpha_p=cfg.tsb_alpha_p, alias=name),
        "ADIDA": lambda: ADIDA(alias=name),
    }
    if name not in builders:
        raise UnknownModelError(f"{name} is not a statsforecast model of the registry")
    return builders[name]()
