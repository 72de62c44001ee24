"""A Kafka client that cannot bootstrap leaves nothing running.

kafka-python 3.0 starts a client's I/O thread, selector and wakeup sockets before it
bootstraps and does not stop them when the bootstrap fails. Every process here makes clients
again after a failure (the speed worker reconnecting through an outage, the end-offset reader
of ``lambdalake status`` and the API, ingest's retries), so a long outage used to pile up one
thread and several sockets per attempt. These tests count both, against an address where
nothing listens and against a listener that accepts and never answers (a port taken by
something other than Kafka, or a broker that hangs)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from lambdalake.kafka.clients import EndOffsetsReader, new_client
from lambdalake.ops.net import free_port
from lambdalake.settings import Settings


@pytest.fixture(autouse=True)
def _kafka_logs_not_captured() -> Iterator[None]:
    """pytest keeps every log record it captures, and kafka-python's records of a failed
    connection hold the exception, whose traceback holds the connection's socket: kept, it
    would count as leaked here. The processes keep no record; here none is made.

    Through ``setLevel`` both ways: it clears the loggers' cached levels (setting the
    attribute does not, and kafka-python's loggers then stayed silent for later tests,
    which read refusals from those records)."""
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        kafka_log.setLevel(level)


def kafka_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("kafka-io"))


def open_sockets() -> int:
    """Sockets this process holds (the selector's epoll and wakeup pairs among them)."""
    gc.collect()  # a client dropped but not closed is only released by the collector
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            count += target.startswith(("socket:", "anon_inode:[eventpoll]"))
    return count


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """An address that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@contextlib.contextmanager
def nobody() -> Iterator[str]:
    yield f"127.0.0.1:{free_port()}"


ENDPOINTS = {"nothing listens": nobody, "a listener that never answers": silent_listener}
CLIENTS: dict[str, Callable[..., object]] = {
    "consumer": KafkaConsumer,
    "admin": KafkaAdminClient,
    "producer": KafkaProducer,
}


def assert_leaves_nothing(attempt: Callable[[str], object], endpoint: str, times: int) -> None:
    threads, sockets = kafka_threads(), open_sockets()
    with ENDPOINTS[endpoint]() as bootstrap:
        for _ in range(times):
            with pytest.raises((KafkaError, OSError)):
                attempt(bootstrap)
    assert kafka_threads() == threads
    assert open_sockets() <= sockets


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("kind", CLIENTS)
def test_a_client_that_cannot_bootstrap_leaves_no_thread_or_socket(kind, endpoint) -> None:
    cls = CLIENTS[kind]

    def attempt(bootstrap: str) -> object:
        return new_client(
            cls, bootstrap_servers=bootstrap, bootstrap_timeout_ms=400, request_timeout_ms=1_000
        )

    assert_leaves_nothing(attempt, endpoint, times=2)


def test_the_speed_workers_reconnects_leave_no_thread_or_socket() -> None:
    """The speed worker makes its client again after every failed connect."""
    from speed.kafka_clients import KafkaPythonClient

    def attempt(bootstrap: str) -> object:
        settings = Settings(_env_file=None, kafka_bootstrap=bootstrap)  # type: ignore[call-arg]
        return KafkaPythonClient(settings)

    assert_leaves_nothing(attempt, "nothing listens", times=1)


def test_the_end_offset_readers_retries_leave_no_thread_or_socket() -> None:
    """``lambdalake status``, the API and each speed worker keep a reader that makes a new
    client after every failed read."""
    for endpoint in ENDPOINTS:
        with ENDPOINTS[endpoint]() as bootstrap:
            reader = EndOffsetsReader(bootstrap, timeout=0.5)
            threads, sockets = kafka_threads(), open_sockets()
            for _ in range(2):
                with pytest.raises((KafkaError, OSError)):
                    reader.read([("orders", 0)])
            reader.close()
        assert kafka_threads() == threads
        assert open_sockets() <= sockets
        assert reader.clients_made == 0  # no client was ever made whole
