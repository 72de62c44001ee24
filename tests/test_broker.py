"""The embedded broker: starts on a free port, creates the topics, round-trips messages."""

from __future__ import annotations

import subprocess
import sys
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from lambdalake.broker import EmbeddedBroker, free_port
from lambdalake.kafka import end_offsets, topic_partitions


def test_topics_exist_with_configured_partitions(broker: EmbeddedBroker) -> None:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        assert topic_partitions(consumer, "orders") == [0, 1, 2, 3]
        assert topic_partitions(consumer, "reviews") == [0, 1, 2, 3]
    finally:
        consumer.close()


def test_produce_consume_round_trip_and_true_end_offsets(fresh_broker: EmbeddedBroker) -> None:
    producer = KafkaProducer(bootstrap_servers=fresh_broker.bootstrap, linger_ms=5)
    sent = [f"message-{i}".encode() for i in range(5000)]
    for i, value in enumerate(sent):
        producer.send("orders", key=f"sku-{i % 7}".encode(), value=value)
    producer.flush()
    producer.close()

    tps = [TopicPartition("orders", p) for p in range(4)]
    ends = end_offsets(fresh_broker.bootstrap, tps)
    # The broker's ends (ListOffsets) sum to what was sent.
    assert sum(ends.values()) == len(sent)

    consumer = KafkaConsumer(bootstrap_servers=fresh_broker.bootstrap, enable_auto_commit=False)
    consumer.assign(tps)
    consumer.seek_to_beginning()
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < len(sent) and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            got.extend(r.value for r in records)
    consumer.close()
    assert sorted(got) == sorted(sent)


def test_broker_command_prints_ready_and_stops_on_sigterm(tmp_path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lambdalake.cli", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "LAMBDALAKE_HOME": str(tmp_path)},
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"broker ready on 127.0.0.1:{port}"
        consumer = KafkaConsumer(bootstrap_servers=f"127.0.0.1:{port}")
        assert topic_partitions(consumer, "orders") == [0, 1, 2, 3]
        consumer.close()
    finally:
        proc.terminate()
        rc = proc.wait(timeout=20)
    assert rc == 0


def test_port_in_use_is_a_clear_error(broker: EmbeddedBroker) -> None:
    try:
        EmbeddedBroker.start(port=broker.port, timeout=5)
    except Exception as exc:
        assert "broker" in str(exc).lower()
    else:  # pragma: no cover
        raise AssertionError("starting a second broker on a used port must fail")
