"""Spark's Python daemon, with the batch layer's heavy libraries imported before it forks.

Spark forks every Python worker from one daemon process per executor. Workers
reuse what the daemon has already imported, so importing statsforecast (which
pulls in statsmodels and scipy), scikit-learn and VADER here once saves each
worker several seconds of imports. Enabled by ``spark.python.daemon.module``
(``batch.spark``). An import that fails here only costs the saving: the worker
imports what it needs itself.
"""

from __future__ import annotations

import importlib

PRELOAD = (
    "numpy",
    "pandas",
    "pyarrow",
    "scipy.sparse",
    "sklearn.feature_extraction.text",
    "sklearn.preprocessing",
    "statsforecast.models",
    "vaderSentiment.vaderSentiment",
    "lambdalake.sentiment",
    "batch.forecast",
)


def preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # never stop the daemon over an optional speed-up
            continue


if __name__ == "__main__":
    preload()
    from pyspark import daemon

    daemon.manager()
