"""The demo and the broker's log: a second run reuses the log, only a wiped broker is refilled.

The demo keeps the embedded Kafka's log in ``HOME/broker``; before going on it compares the
broker's ends with the lake's ingest positions (:func:`lambdalake.ops.demo.broker_holds`). These
tests build a lake from a real broker, then check what the demo would see after a restart
on the same log (everything: no replay), on a wiped broker (empty: the lake is replayed, and
every message gets its offset back) and on a broker holding less than the lake read.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from batch.ingest import run_ingest
from lambdalake.contract.lake import Lake
from lambdalake.kafka.clients import delete_topics, end_offsets, ensure_topics
from lambdalake.ops.broker import EmbeddedBroker, free_port
from lambdalake.ops.demo import _master_positions, broker_holds, replay_lake
from lambdalake.settings import TOPICS
from tests.ingest_stream import ID_FIELD, assert_exactly_once, produce_stream


def _all_messages(bootstrap: str) -> dict[tuple[str, int, int], bytes | None]:
    tps = [TopicPartition(t, p) for t in TOPICS for p in range(4)]
    ends = end_offsets(bootstrap, tps)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        consumer.assign(tps)
        consumer.seek_to_beginning()
        got: dict[tuple[str, int, int], bytes | None] = {}
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    got[(tp.topic, tp.partition, r.offset)] = r.value
        return got
    finally:
        consumer.close()


def test_a_second_demo_reuses_the_log_and_only_a_wiped_broker_is_replayed(
    tmp_path: Path, fresh_broker: EmbeddedBroker, settings_for
) -> None:
    log_dir, port = tmp_path / "broker", free_port()
    broker = EmbeddedBroker.start(port=port, log_dir=log_dir)
    try:
        settings = settings_for(broker, max_event_bytes=2048)
        stream = produce_stream(broker.bootstrap, 2_000, seed=31)
        run_ingest(settings, until_end=True, stop=threading.Event())
        positions = _master_positions(settings)
        assert sum(sum(p.values()) for p in positions.values()) == 2_000
        assert broker_holds(settings, positions) == "all"

        # A second demo: the broker restarts on its log and holds everything; no replay.
        broker.stop()
        broker = EmbeddedBroker.start(port=port, log_dir=log_dir)
        assert broker_holds(settings, positions) == "all"

        # A broker that lost part of the log the lake read cannot be refilled.
        delete_topics(broker.bootstrap, TOPICS)
        ensure_topics(broker.bootstrap, TOPICS, 4)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        producer.send("orders", value=b"{}", partition=0).get(timeout=30)
        producer.close()
        assert broker_holds(settings, positions) == "less"
    finally:
        broker.stop()

    # A wiped broker (empty topics): the lake is replayed, each message at its own offset.
    wiped = settings_for(fresh_broker, max_event_bytes=2048)
    assert broker_holds(wiped, positions) == "empty"
    assert replay_lake(wiped) == 2_000
    assert broker_holds(wiped, positions) == "all"
    replayed = _all_messages(fresh_broker.bootstrap)
    assert set(replayed) == set(stream.valid) | set(stream.invalid)
    for key, raw in stream.invalid.items():
        assert replayed[key] == raw
    id_field = ID_FIELD
    for key, raw in stream.valid.items():
        value = replayed[key]
        assert value is not None
        assert json.loads(value)[id_field[key[0]]] == json.loads(raw)[id_field[key[0]]]
    # Ingest finds nothing new: the lake's positions are the replayed broker's ends.
    summary = run_ingest(wiped, until_end=True, stop=threading.Event())
    assert sum(s["written"] + s["quarantined"] for s in summary.values()) == 0
    assert_exactly_once(Lake(wiped.lake_uri), stream)
