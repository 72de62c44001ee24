"""Shared, expensive fixtures: one broker and one Spark session per test run.

Tests get real components: Apache Kafka (KRaft, one node, the product's own
embedded broker) on a free loopback port, Spark in local mode, Delta tables in a
temporary directory.

Two brokers serve the session, each started once (a JVM broker takes seconds to
start, far too long to pay ~60 times):

- ``broker``: shared as it is; tests on it measure what they add (end offsets
  before and after) and never assume empty topics.
- ``fresh_broker``: empty ``orders``/``reviews`` topics for each test. Between
  tests every topic on it is deleted and the product's topics recreated, which
  isolates tests as a broker of their own would (new topic ids, offsets from 0).
  A test may stop it (to see the broker go away); the next test gets a new one.
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

from lambdalake.kafka.clients import delete_topics, ensure_topics, list_topics  # noqa: E402
from lambdalake.ops.broker import EmbeddedBroker  # noqa: E402
from lambdalake.settings import TOPICS, Settings  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """The session's embedded broker (Apache Kafka, KRaft) on a free port."""
    b = EmbeddedBroker.start(port=0, partitions=4, log_dir=tmp_path_factory.mktemp("broker"))
    try:
        yield b
    finally:
        b.stop()


class FreshBrokers:
    """One Kafka broker reset to empty product topics for each test that asks for it."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.current: EmbeddedBroker | None = None

    def get(self) -> EmbeddedBroker:
        b = self.current
        if b is None or b.process.poll() is not None:
            if b is not None:
                b.stop()
            b = EmbeddedBroker.start(
                port=0, partitions=4, log_dir=self.factory.mktemp("fresh-broker")
            )
            self.current = b
        else:
            # Every topic a test made goes too (auto-created or its own), not only ours.
            delete_topics(
                b.bootstrap, [t for t in list_topics(b.bootstrap) if not t.startswith("__")]
            )
            ensure_topics(b.bootstrap, TOPICS, b.partitions)
        return b

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()


@pytest.fixture(scope="session")
def _fresh_brokers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreshBrokers]:
    pool = FreshBrokers(tmp_path_factory)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture()
def fresh_broker(_fresh_brokers: FreshBrokers) -> EmbeddedBroker:
    """A broker whose ``orders``/``reviews`` topics are empty (and no other topic exists)."""
    return _fresh_brokers.get()


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
