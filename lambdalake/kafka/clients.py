"""Kafka client helpers shared by every process: connect, create topics, find ends.

No consumer groups anywhere: consumers use manual partition assignment and keep
their positions in their own state (the lake or DuckDB), committed with the data.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import (
    AuthorizationError,
    KafkaError,
    SaslAuthenticationFailedError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from kafka.net.compat import KafkaNetClient

from lambdalake.errors import OperationFailed, Unreachable
from lambdalake.ops.net import accepts_connections

CLIENT_DEFAULTS: dict[str, object] = {
    "request_timeout_ms": 30_000,
}

# kafka-python arguments for TLS and SASL (``Settings.kafka_security``); every function here
# that opens a client takes them as ``security``. Empty: PLAINTEXT.
Security = Mapping[str, object]


# The broker refused who we are (credentials) or what we asked (ACLs): retrying cannot help.
REFUSED_ERRORS: tuple[type[KafkaError], ...] = (SaslAuthenticationFailedError, AuthorizationError)
SECURITY_SETTINGS_HINT = (
    "check LAMBDALAKE_KAFKA_SECURITY_PROTOCOL, LAMBDALAKE_KAFKA_SASL_MECHANISM, "
    "LAMBDALAKE_KAFKA_SASL_USERNAME and LAMBDALAKE_KAFKA_SASL_PASSWORD (and the broker's ACLs)"
)


class BrokerRefused(OperationFailed):
    """The broker answered but refused our credentials or a request (one-line reason)."""

    def __init__(self, bootstrap: str, action: str, exc: BaseException) -> None:
        kind = "authentication" if isinstance(exc, SaslAuthenticationFailedError) else "access"
        # kafka-python's text repeats the class name: "[Error 58] X: X: Authentication failed".
        detail = re.sub(r"^(\[Error \d+\] )?(\w+: )*", "", str(exc)) or type(exc).__name__
        super().__init__(
            f"Kafka broker {bootstrap} refused {kind} while trying to {action} ({detail}); "
            f"{SECURITY_SETTINGS_HINT}"
        )


class _RefusalLog(logging.Handler):
    """The last refusal kafka-python's connection manager logged.

    A refused bootstrap connection (wrong SASL credentials) is retried inside kafka-python
    until its timeout, which is all it raises; the refusal itself is only logged, with the
    exception as the record's argument. This handler keeps it, so a caller can tell
    "refused" from "unreachable" (:func:`refusal_since`).
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: tuple[float, BaseException] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        for arg in args:
            if isinstance(arg, REFUSED_ERRORS):
                self.last = (time.monotonic(), arg)


_REFUSALS = _RefusalLog()
logging.getLogger("kafka").addHandler(_REFUSALS)


def refusal_since(started: float) -> BaseException | None:
    """The refusal (credentials or ACLs) a broker answered since ``started`` (monotonic)."""
    last = _REFUSALS.last
    return last[1] if last is not None and last[0] >= started else None


def refusal(
    exc: BaseException, bootstrap: str, action: str, started: float
) -> BrokerRefused | None:
    """The :class:`BrokerRefused` that ``exc`` (a failed attempt begun at ``started``) was,
    raised or only logged by kafka-python; None if it was not a refusal."""
    refused = exc if isinstance(exc, REFUSED_ERRORS) else refusal_since(started)
    return None if refused is None else BrokerRefused(bootstrap, action, refused)


def raise_if_refused(exc: BaseException, bootstrap: str, action: str, started: float) -> None:
    """Raise :class:`BrokerRefused` if ``exc`` (a failed attempt begun at ``started``) was a
    refusal, raised or only logged by kafka-python; return otherwise (a retry may help)."""
    refused = refusal(exc, bootstrap, action, started)
    if refused is not None:
        raise refused from exc


def quiet_client_logs() -> None:
    """Keep kafka-python's own log lines (one per reconnect attempt) out of this process's
    output, for a process that reports connection trouble itself.

    Refusals are still seen by :func:`refusal_since`: kafka-python logs them at ERROR
    ("Connection failed: ..."), so the level stays there (CRITICAL would drop the record
    before the handler that keeps them sees it), and nothing propagates to the root
    logger's handlers."""
    kafka_log = logging.getLogger("kafka")
    kafka_log.setLevel(logging.ERROR)
    kafka_log.propagate = False


def client_args(security: Security | None, **overrides: object) -> dict[str, object]:
    """Arguments of one kafka-python client: the defaults, the security settings, overrides."""
    return {**CLIENT_DEFAULTS, **(security or {}), **overrides}


Client = TypeVar("Client")


def new_client(cls: Callable[..., Client], **config: object) -> Client:
    """``cls(**config)`` (a ``KafkaConsumer``, ``KafkaAdminClient`` or ``KafkaProducer``),
    leaving nothing running when it fails.

    kafka-python 3.0's consumer and admin client start their network layer (an I/O thread, a
    selector, a wakeup socket pair) before they bootstrap, and do not stop it when the
    bootstrap fails: every failed construction left a thread and its sockets behind, and a
    process that reconnects through a broker outage accumulated them. The network client is
    made here, through the constructors' ``kafka_client`` factory, so that it can be closed
    on failure. (The producer does not leak that way; it is made here too, so that no
    constructor is left to check.)"""
    made: list[KafkaNetClient] = []

    def network_client(**kwargs: object) -> KafkaNetClient:
        made.append(KafkaNetClient(**kwargs))
        return made[-1]

    try:
        return cls(kafka_client=network_client, **config)
    except BaseException:
        for client in made:
            with contextlib.suppress(Exception):
                client.close()
        raise


def wait_for_broker(
    bootstrap: str,
    timeout: float = 30.0,
    *,
    security: Security | None = None,
    stop: threading.Event | None = None,
) -> bool:
    """Return ``True`` once a client can talk to ``bootstrap``, ``False`` as soon as ``stop``
    is set (a signal while waiting); :class:`Unreachable` past ``timeout``."""
    stop = stop or threading.Event()
    started = time.monotonic()
    deadline = started + max(timeout, 0.1)
    last: Exception | None = None
    while time.monotonic() < deadline:
        if stop.is_set():
            return False
        # Nothing listens yet: no Kafka client to make (a bootstrap would take its timeout).
        if not accepts_connections(bootstrap):
            last = ConnectionRefusedError("nothing accepts connections there")
            stop.wait(0.2)
            continue
        # Short attempts: kafka-python retries a refused connection until this timeout.
        remaining_ms = max(100, min(2_000, int((deadline - time.monotonic()) * 1000)))
        try:
            admin = new_client(
                KafkaAdminClient,
                bootstrap_servers=bootstrap,
                **client_args(security, bootstrap_timeout_ms=remaining_ms),
            )
            try:
                admin.list_topics()
                return True
            finally:
                admin.close()
        except (KafkaError, OSError, ValueError) as exc:
            raise_if_refused(exc, bootstrap, "connect", started)
            last = exc
            stop.wait(0.2)
    raise Unreachable(f"no Kafka broker answering on {bootstrap} ({last})")


def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    partitions: int,
    *,
    security: Security | None = None,
) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are)."""
    admin = new_client(KafkaAdminClient, bootstrap_servers=bootstrap, **client_args(security))
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(name=t, num_partitions=partitions, replication_factor=1)
            for t in topics
            if t not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()
    # Metadata propagates asynchronously; wait until every topic shows its partitions.
    consumer = new_client(KafkaConsumer, bootstrap_servers=bootstrap, **client_args(security))
    try:
        deadline = time.monotonic() + 15
        for t in topics:
            while not consumer.partitions_for_topic(t):
                if time.monotonic() > deadline:
                    raise Unreachable(f"topic {t} did not appear on {bootstrap}")
                time.sleep(0.1)
                consumer.topics()
    finally:
        consumer.close()


def list_topics(bootstrap: str, *, security: Security | None = None) -> list[str]:
    """The names of every topic on ``bootstrap`` (internal ones such as
    ``__consumer_offsets`` included)."""
    admin = new_client(KafkaAdminClient, bootstrap_servers=bootstrap, **client_args(security))
    try:
        return sorted(admin.list_topics())
    finally:
        admin.close()


def delete_topics(
    bootstrap: str,
    topics: Iterable[str],
    timeout: float = 30.0,
    *,
    security: Security | None = None,
) -> None:
    """Delete ``topics`` (missing ones are ignored) and return once the broker no longer
    lists them, so they can be created again at once."""
    names = set(topics)
    admin = new_client(KafkaAdminClient, bootstrap_servers=bootstrap, **client_args(security))
    try:
        names &= set(admin.list_topics())
        if not names:
            return
        with contextlib.suppress(UnknownTopicOrPartitionError):
            admin.delete_topics(sorted(names), timeout_ms=int(timeout * 1000))
        deadline = time.monotonic() + timeout
        while names & set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise Unreachable(f"topics {sorted(names)} still listed on {bootstrap}")
            time.sleep(0.05)
    finally:
        admin.close()


def topic_partitions(consumer: KafkaConsumer, topic: str, timeout: float = 15.0) -> list[int]:
    """The partition ids of ``topic`` (waiting briefly for metadata)."""
    deadline = time.monotonic() + timeout
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if time.monotonic() > deadline:
            raise Unreachable(f"topic {topic!r} not found")
        consumer.topics()
        time.sleep(0.1)


def end_offsets(
    bootstrap: str,
    partitions: Iterable[TopicPartition],
    timeout: float = 30.0,
    *,
    security: Security | None = None,
) -> dict[TopicPartition, int]:
    """One past the last offset of each partition: the broker's high watermark.

    ListOffsets(latest) with ``read_uncommitted``, so the end counts every record the
    log holds, transaction markers and records of open or aborted transactions
    included. A ``read_committed`` consumer never receives the markers or aborted
    records but its position moves past them, so a consumer that has read everything
    committed stands exactly at this end (after the last transaction completes).
    One client for one read: callers that ask every second keep an :class:`EndOffsetsReader`.
    """
    tps = list(partitions)
    reader = EndOffsetsReader(bootstrap, timeout, security=security)
    try:
        found = reader.read(tps)
    finally:
        reader.close()
    return {tp: found[(tp.topic, tp.partition)] for tp in tps}


class EndOffsetsReader:
    """:func:`end_offsets` through one client kept open between reads, for callers that ask
    every second or so (a speed worker's lag, the API's status): a new client per read costs
    a connection, an API-version probe and a metadata round trip (126 ms median measured,
    against 1 ms for a kept one). A read that fails closes the client; the next read makes a
    new one. Partitions are ``(topic, partition)`` pairs. Not thread-safe."""

    def __init__(
        self, bootstrap: str, timeout: float = 5.0, *, security: Security | None = None
    ) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout
        self.security = security
        self._consumer: KafkaConsumer | None = None
        self.clients_made = 0

    def read(self, partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        wanted = [TopicPartition(t, p) for t, p in partitions]
        if not wanted:
            return {}
        if self._consumer is None:
            timeout_ms = max(1_000, int(self.timeout * 1000))
            self._consumer = new_client(
                KafkaConsumer,
                bootstrap_servers=self.bootstrap,
                enable_auto_commit=False,
                group_id=None,
                # Ends of the log: markers and open transactions' records included; a
                # read_committed consumer that read everything stands there too.
                isolation_level="read_uncommitted",
                **client_args(
                    self.security, request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms
                ),
            )
            self.clients_made += 1
        try:
            found = self._consumer.end_offsets(wanted)
        except Exception:
            self.close()  # start over next time
            raise
        return {(tp.topic, tp.partition): int(found[tp]) for tp in wanted}

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close()
            except Exception as exc:  # closing a broken connection
                logging.getLogger(__name__).debug("end offsets client close failed: %s", exc)
