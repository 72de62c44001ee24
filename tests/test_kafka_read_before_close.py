"""kafka-python hands over what a broker sent before it closed the connection.

A broker that answers and closes in one step (Kafka does so with its answer to wrong SASL
credentials) left kafka-python 3.0.12 with the answer read but never delivered when both
reached the socket before the client read it: the client saw "socket disconnected", not
the refusal. ``lambdalake.kafka.read_before_close`` fixes the read loop; these tests drive
kafka-python's own transport and event loop over a real socket pair. The refusal end to end,
against a real SASL broker, is in ``test_kafka_security.py``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import kafka
import pytest
from kafka.errors import KafkaConnectionError
from kafka.net.selector import NetworkSelector
from kafka.net.transport import KafkaTCPTransport

from lambdalake.kafka import read_before_close
from lambdalake.kafka.columnar import TESTED_KAFKA_PYTHON


class Recorder:
    """The protocol side of a connection: what the transport delivered, and how it ended.

    Like kafka-python's connection, it acts on an answer in a task of its own (there, the
    initialisation awaiting the answer's future): ``acted`` is what that task saw, and
    ``lost`` records whether it ran before the connection was lost."""

    _sensors = None

    def __init__(self, net: NetworkSelector) -> None:
        self.net = net
        self.data = b""
        self.acted = b""
        self.lost: list[tuple[BaseException | None, bytes]] = []

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.net.call_soon(self._act)

    async def _act(self) -> None:
        self.acted = self.data

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.append((exc, self.acted))


def read_after_peer_closed(payload: bytes) -> Recorder:
    """The peer writes ``payload`` and closes before the client reads anything: the client
    finds the bytes and the end of the stream in one read."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.sendall(payload)
    theirs.close()
    net = NetworkSelector()
    try:
        transport = KafkaTCPTransport(net, ours)
        recorder = Recorder(net)
        transport.set_protocol(recorder)
        transport.resume_reading()
        for _ in range(20):
            if recorder.lost:
                break
            net.poll(timeout_ms=50)
        return recorder
    finally:
        net.close()
        ours.close()


@pytest.fixture
def original_read_loop() -> Iterator[None]:
    read_before_close.uninstall()
    try:
        yield
    finally:
        assert read_before_close.install()


def test_the_fix_is_installed_on_the_pinned_kafka_python() -> None:
    assert kafka.__version__ == TESTED_KAFKA_PYTHON
    assert read_before_close.installed()
    assert KafkaTCPTransport._read_from_sock is read_before_close._read_from_sock


@pytest.mark.parametrize("size", [73, 4096, 50_000])
def test_the_last_answer_before_a_close_is_acted_on_then_the_connection_ends(size) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    recorder = read_after_peer_closed(payload)
    assert recorder.data == payload
    assert len(recorder.lost) == 1
    error, acted_before_the_end = recorder.lost[0]
    assert isinstance(error, KafkaConnectionError)
    # The protocol's own task ran on the answer before the close ended the connection (a
    # refusal's answer then ends it with the refusal, not with "socket disconnected").
    assert acted_before_the_end == payload


def test_kafka_pythons_own_read_loop_loses_that_answer(original_read_loop) -> None:
    """What the fix changes (and why it exists): without it the bytes never arrive."""
    recorder = read_after_peer_closed(b"\x00\x00\x00\x45 an answer")
    assert recorder.data == b""
    assert len(recorder.lost) == 1
    assert recorder.lost[0][1] == b""
