"""lambdalake's Kafka clients against a broker that requires authentication (SASL).

A second embedded broker (Apache Kafka, KRaft) whose only client listener is SASL_PLAINTEXT
with the PLAIN mechanism: ingest, the speed worker and ``status`` connect with the
``LAMBDALAKE_KAFKA_SECURITY_PROTOCOL`` / ``_SASL_*`` settings and see exactly what was
produced; wrong credentials end ingest with one line that names the settings to check, and
a client without credentials gets nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from batch.ingest_kafka import probe_broker
from lambdalake.contract.lake import Lake
from lambdalake.kafka.clients import end_offsets, refusal
from lambdalake.ops.broker import EmbeddedBroker, free_port
from lambdalake.settings import TOPICS
from tests.ingest_stream import ROOT, assert_exactly_once, ingest_cmd, ingest_env, produce_stream

USER, PASSWORD = "lambdalake", "lambdalake-secret-0123456789"
PRODUCER, PRODUCER_PASSWORD = "shop", "shop-secret-0123456789abcd"


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    broker = EmbeddedBroker.start(
        port=0,
        partitions=4,
        log_dir=tmp_path_factory.mktemp("sasl-broker"),
        sasl_users={USER: PASSWORD, PRODUCER: PRODUCER_PASSWORD},
        heap="384m",
    )
    try:
        yield broker
    finally:
        broker.stop()


def _env(broker: EmbeddedBroker, tmp: Path, password: str = PASSWORD) -> dict[str, str]:
    return ingest_env(
        LAMBDALAKE_KAFKA_BOOTSTRAP=broker.bootstrap,
        LAMBDALAKE_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        LAMBDALAKE_KAFKA_SASL_MECHANISM="PLAIN",
        LAMBDALAKE_KAFKA_SASL_USERNAME=USER,
        LAMBDALAKE_KAFKA_SASL_PASSWORD=password,
        LAMBDALAKE_HOME=str(tmp / "home"),
        LAMBDALAKE_LAKE_URI=str(tmp / "lake"),
        LAMBDALAKE_BROKER_WAIT_SECONDS="20",
    )


def _producer_security() -> dict[str, object]:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": PRODUCER,
        "sasl_plain_password": PRODUCER_PASSWORD,
    }


def test_ingest_speed_and_status_authenticate_and_see_exactly_what_was_produced(
    sasl_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    stream = produce_stream(sasl_broker.bootstrap, 600, seed=5, security=_producer_security())
    env = _env(sasl_broker, tmp_path)
    lake = str(tmp_path / "lake")
    done = subprocess.run(
        [*ingest_cmd(sasl_broker.bootstrap, lake), "--until-end"],
        capture_output=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert_exactly_once(Lake(lake), stream)

    ends = end_offsets(
        sasl_broker.bootstrap,
        [TopicPartition(t, p) for t in TOPICS for p in range(4)],
        security=sasl_broker.security,
    )
    port = free_port()
    speed = subprocess.Popen(
        [sys.executable, "-m", "lambdalake.cli", "speed", "run", "--query-port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            status = subprocess.run(
                [sys.executable, "-m", "lambdalake.cli", "status", "--json"],
                capture_output=True,
                env=env,
                cwd=ROOT,
                timeout=60,
                check=False,
            )
            assert status.returncode == 0, status.stderr.decode()[-2000:]
            workers = json.loads(status.stdout)["speed"]["workers"]
            offsets = workers[0].get("offsets", {}) if workers else {}
            if workers and all(
                int(offsets.get(tp.topic, {}).get(str(tp.partition), -1)) >= end
                for tp, end in ends.items()
            ):
                break
            assert speed.poll() is None, speed.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"speed worker did not catch up: {workers}"
            time.sleep(0.5)
        # The lag comes from the broker's end offsets, read with the same credentials.
        worker = workers[0]
        assert worker["lag_source"] == "broker", worker
        assert all(n == 0 for parts in worker["lag"].values() for n in parts.values()), worker
    finally:
        speed.terminate()
        speed.wait(timeout=30)


def test_wrong_credentials_end_ingest_with_one_line_naming_the_settings(
    sasl_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = _env(sasl_broker, tmp_path, password="not-the-password-0123456789")
    started = time.monotonic()
    done = subprocess.run(
        [*ingest_cmd(sasl_broker.bootstrap, str(tmp_path / "lake")), "--until-end"],
        capture_output=True,
        env={**env, "LAMBDALAKE_LOG_LEVEL": "ERROR"},
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "LAMBDALAKE_KAFKA_SASL_PASSWORD" in lines[0], lines[0]
    assert "authentication" in lines[0].lower(), lines[0]
    # Refused credentials are not an unreachable broker: no minutes of retries.
    assert time.monotonic() - started < 30


def test_every_connection_with_wrong_credentials_is_told_so(sasl_broker: EmbeddedBroker) -> None:
    """Kafka answers wrong credentials and closes the connection in one step; each attempt
    must read that answer as a refusal, not as an unreachable broker (kafka-python dropped
    the answer when it arrived with the close: ``lambdalake.kafka.read_before_close``)."""
    wrong = {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": USER,
        "sasl_plain_password": "not-the-password-0123456789",
    }
    for attempt in range(3):
        started = time.monotonic()
        with pytest.raises(Exception) as failed:
            probe_broker(sasl_broker.bootstrap, 2.0, security=wrong)
        refused = refusal(failed.value, sasl_broker.bootstrap, "probe", started)
        assert refused is not None, f"attempt {attempt}: {failed.value!r}"
        assert "refused authentication" in str(refused)


def test_a_speed_worker_with_wrong_credentials_says_why_in_its_status_and_keeps_trying(
    sasl_broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The refusal reaches the operator (status and one log line per attempt) while the
    worker retries with backoff: it neither exits nor spins."""
    env = _env(sasl_broker, tmp_path, password="not-the-password-0123456789")
    log_path = tmp_path / "speed.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        speed = subprocess.Popen(
            [sys.executable, "-m", "lambdalake.cli", "speed", "run", "--query-port", "0"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        worker: dict[str, Any] = {}
        while not worker.get("broker_refused"):
            assert speed.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() - started < 60, (worker, log_path.read_text()[-3000:])
            time.sleep(0.5)
            status = subprocess.run(
                [sys.executable, "-m", "lambdalake.cli", "status", "--json"],
                capture_output=True,
                env=env,
                cwd=ROOT,
                timeout=60,
                check=False,
            )
            assert status.returncode == 0, status.stderr.decode()[-2000:]
            workers = json.loads(status.stdout)["speed"]["workers"]
            worker = workers[0] if workers else {}
        refused = worker["broker_refused"]
        assert "refused authentication" in refused, refused
        assert "LAMBDALAKE_KAFKA_SASL_PASSWORD" in refused, refused
        assert worker["alive"] and worker["connected"] is False, worker
        watched_from = time.monotonic()
        time.sleep(15)
        assert speed.poll() is None, log_path.read_text()[-3000:]  # still trying
        watched_s = time.monotonic() - watched_from
    finally:
        speed.terminate()
        speed.wait(timeout=30)
    lines = [line for line in log_path.read_text().splitlines() if "speed.broker_refused" in line]
    assert lines and all("refused authentication" in line for line in lines), lines
    # One line per attempt, attempts backing off: a handful, not a loop.
    assert len(lines) <= 2 + watched_s / 5, lines


def test_a_client_without_credentials_reads_nothing(sasl_broker: EmbeddedBroker) -> None:
    from lambdalake.kafka.clients import wait_for_broker

    with pytest.raises(TimeoutError):
        wait_for_broker(sasl_broker.bootstrap, timeout=3)


def test_security_settings_need_their_credentials(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "LAMBDALAKE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "LAMBDALAKE_HOME": str(tmp_path / "home"),
    }
    env.pop("LAMBDALAKE_KAFKA_SASL_USERNAME", None)
    env.pop("LAMBDALAKE_KAFKA_SASL_PASSWORD", None)
    done = subprocess.run(
        [sys.executable, "-m", "lambdalake.cli", "status"],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    err = done.stderr.decode().strip()
    assert "LAMBDALAKE_KAFKA_SASL_USERNAME" in err and len(err.splitlines()) == 1, err
