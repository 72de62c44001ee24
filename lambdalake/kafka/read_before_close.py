"""kafka-python delivers the bytes a broker sent before it closed the connection.

kafka-python 3.0.12's ``KafkaTCPTransport._read_from_sock`` reads everything the socket
holds in one go (``_sock_recv``) and, when that read ends at the peer's close, aborts the
connection with "socket disconnected" *without* handing the bytes it did read to the
protocol. A broker that answers and then closes at once therefore loses its last answer
whenever both arrive before the client reads, which is a race: more often on a busy
machine. The one that matters here is the broker's answer to wrong SASL credentials: Kafka
sends ``SaslAuthenticate`` with ``SASL_AUTHENTICATION_FAILED`` and closes the connection in
the same step, so the client saw an unreachable broker instead of a refusal, and ingest
retried for minutes and then said "unreachable" instead of naming the credentials settings.

:func:`install` replaces that method with one that hands the bytes over first and gives
the protocol its turn to act on them before the close ends the connection, as asyncio's
own transports do (``data_received``, then ``eof_received``/``connection_lost`` later).
Handing them over is not enough alone: kafka-python's connection reads an answer in a
separate task (its initialisation awaits a future the bytes resolve), and a close in the
same step fails that initialisation with "socket disconnected" before the task runs. It
is installed when :mod:`lambdalake.kafka` is imported, and only on the kafka-python version
whose internals this package was written against (``TESTED_KAFKA_PYTHON``, the columnar
decoder's too); on another version it logs that the fix is not in place (the refusal tests
then show whether that version still needs it).
"""

from __future__ import annotations

import time
from typing import Any

import kafka
import kafka.errors as kafka_errors
from kafka.net.transport import KafkaTCPTransport

from lambdalake.kafka.columnar import TESTED_KAFKA_PYTHON
from lambdalake.logs import get_logger

log = get_logger(__name__)

_original = KafkaTCPTransport._read_from_sock


async def _read_from_sock(self: Any) -> Any:
    """kafka-python's read loop, with the bytes read before a close delivered first."""
    while self._read and not self._closed:
        await self._net.wait_read(self._sock)
        recvd_data, err = self._sock_recv()
        if recvd_data:
            self.last_read = time.monotonic()
            if self._protocol and self._protocol._sensors:
                self._protocol._sensors.bytes_received.record(len(recvd_data))
            try:
                self._protocol.data_received(recvd_data)
            except kafka_errors.KafkaProtocolError as e:
                return self.abort(error=e)
            if err:
                # Not yet: the protocol acts on an answer in a task of its own (the
                # connection's initialisation awaits it), which runs before this loop's
                # next turn. A closed socket stays readable, so that turn reads the close
                # again and ends the connection, unless the answer (a refusal) already has.
                continue
        if err:
            return self.abort(error=err)
    return None


def installed() -> bool:
    return KafkaTCPTransport._read_from_sock is _read_from_sock


def install() -> bool:
    """Install the fixed read loop (idempotent); False if this kafka-python is not the
    version it was written for."""
    if kafka.__version__ != TESTED_KAFKA_PYTHON:
        log.info(
            "kafka.read_before_close_not_installed",
            kafka_python=kafka.__version__,
            written_for=TESTED_KAFKA_PYTHON,
        )
        return False
    KafkaTCPTransport._read_from_sock = _read_from_sock
    return True


def uninstall() -> None:
    """kafka-python's own read loop again (for the test that shows what the fix changes)."""
    KafkaTCPTransport._read_from_sock = _original
