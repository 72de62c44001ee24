"""Shared, expensive fixtures: one broker and one Spark session per test run.

Tests get real components: Tansu on a free loopback port, Spark in local mode,
Delta tables in a temporary directory. Each test that writes to Kafka uses
topics of its own (see ``fresh_topics``) or a broker of its own when it needs a
clean slate, so tests stay independent while sharing the processes.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Spark's Python workers must run this interpreter (with our packages), not the system one.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("LAMBDALAKE_LOG_LEVEL", "WARNING")

from lambdalake.broker import EmbeddedBroker  # noqa: E402
from lambdalake.settings import Settings  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The session's embedded broker (Tansu, memory storage) on a free port."""
    b = EmbeddedBroker.start(port=0, partitions=4, log_dir=tmp_path_factory.mktemp("broker"))
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture()
def fresh_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of the test's own, for tests that need empty ``orders``/``reviews`` topics."""
    b = EmbeddedBroker.start(port=0, partitions=4, log_dir=tmp_path / "broker")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture()
def settings_for(tmp_path: Path):
    """Build Settings for a broker with a temporary lake and state directory."""

    def make(broker: EmbeddedBroker, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "kafka_bootstrap": broker.bootstrap,
            "lake_uri": str(tmp_path / "lake"),
            "home": tmp_path / "home",
            "partitions": broker.partitions,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture()
def unique() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def spark():
    """The session's Spark (local mode), built by the product's own session factory."""
    from batch.spark import get_spark

    session = get_spark(Settings(_env_file=None, spark_master="local[2]"))  # type: ignore[call-arg]
    try:
        yield session
    finally:
        session.stop()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
