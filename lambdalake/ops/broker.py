"""The embedded broker: Apache Kafka in KRaft mode, one node (controller and broker in one JVM).

The jars come from Maven Central at install time (``make install`` copies them into
``{sys.prefix}/share/lambdalake/jars/kafka``; ``LAMBDALAKE_KAFKA_JARS`` points elsewhere);
nothing is fetched at run time. Java 17 or newer runs them (``JAVA_HOME``, else ``java``
on the ``PATH``).

Everything of one broker lives in its directory (``log_dir``):

- ``data/``: Kafka's log (the topics and the KRaft metadata log). Formatted on the first
  start, reused by every later one: stopping the broker loses nothing.
- ``config/``: ``server.properties`` and ``log4j2.xml``, written by us on every start.
- ``server.log``: the JVM's output and Kafka's own log (warnings and errors only).

The JVM runs in a session of its own (Ctrl-C reaches the Python parent, which stops it in
order) and is watched: a small watchdog process ends it when the parent dies without calling
:meth:`EmbeddedBroker.stop` (a SIGKILL, a crash), so no broker outlives its owner.

>>> with EmbeddedBroker.start(port=0, log_dir=Path("/tmp/b")) as broker:  # doctest: +SKIP
...     print(broker.bootstrap)
127.0.0.1:41234
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lambdalake.errors import OperationFailed
from lambdalake.kafka.clients import ensure_topics, wait_for_broker
from lambdalake.logs import get_logger
from lambdalake.ops.net import free_port, port_is_free
from lambdalake.settings import TOPICS

log = get_logger(__name__)

JAVA_MIN_VERSION = 17
DEFAULT_HEAP = "512m"
NODE_ID = 1


class BrokerError(OperationFailed):
    """The embedded broker could not be started; the message says what to do."""


# --- finding Java and the jars ------------------------------------------------------------


def default_jars_dir() -> Path:
    """Where ``make install`` puts the Kafka broker's jars: inside the virtual environment."""
    return Path(sys.prefix) / "share" / "lambdalake" / "jars" / "kafka"


def kafka_jars(jars_dir: Path | None = None) -> Path:
    """The folder of the Kafka jars, or a :class:`BrokerError` saying how to get them.

    ``jars_dir`` is the ``kafka_jars`` setting where the caller has settings; callers of
    the API without settings (tests, benchmarks) get ``LAMBDALAKE_KAFKA_JARS`` too."""
    env = os.environ.get("LAMBDALAKE_KAFKA_JARS")
    folder = Path(jars_dir or env or default_jars_dir())
    if not any(folder.glob("kafka_2.13-*.jar")):
        raise BrokerError(
            f"the Apache Kafka jars are not in {folder}: run `make install` (it fetches them "
            "with Maven), set LAMBDALAKE_KAFKA_JARS to a folder holding them, or set "
            "LAMBDALAKE_KAFKA_BOOTSTRAP=HOST:PORT to use a running Kafka"
        )
    return folder


def java_binary() -> str:
    """The ``java`` to run the broker with (``JAVA_HOME`` first), checked to be 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    candidate = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not candidate or not Path(candidate).exists():
        raise BrokerError(
            f"Java {JAVA_MIN_VERSION}+ not found (the embedded Kafka broker runs on it): install "
            "a JDK or JRE 17 (e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME; "
            "or set LAMBDALAKE_KAFKA_BOOTSTRAP=HOST:PORT to use a running Kafka"
        )
    return candidate


def java_major_version(java: str) -> int:
    """The major version of ``java`` (``java -version`` prints e.g. ``"17.0.15"`` or ``"1.8.0"``)."""
    out = subprocess.run(
        [java, "-version"], capture_output=True, text=True, timeout=30, check=False
    ).stderr
    for line in out.splitlines():
        if '"' in line:
            parts = line.split('"')[1].split(".")
            major = parts[1] if parts[0] == "1" and len(parts) > 1 else parts[0]
            digits = "".join(ch for ch in major if ch.isdigit())
            return int(digits or 0)
    return 0


# --- configuration written for the broker ----------------------------------------------------


def server_properties(
    host: str,
    port: int,
    controller_port: int,
    data_dir: Path,
    partitions: int,
    sasl_users: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Kafka's configuration for one node that is both controller and broker.

    A static voter set (``controller.quorum.voters``) rather than a dynamic one: the
    controller's port is picked free on every start, which a single static voter allows
    (a dynamic quorum records the voter's endpoint in the metadata log). With
    ``sasl_users`` (user -> password) the client listener is SASL_PLAINTEXT with the PLAIN
    mechanism and those users (the first is also the broker's own identity).
    """
    props = _plaintext_properties(host, port, controller_port, data_dir, partitions)
    if sasl_users:
        user, password = next(iter(sasl_users.items()))
        users = " ".join(f'user_{u}="{p}"' for u, p in sasl_users.items())
        props.update(
            {
                "listeners": f"SASL_PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
                "advertised.listeners": f"SASL_PLAINTEXT://{host}:{port}",
                "inter.broker.listener.name": "SASL_PLAINTEXT",
                "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
                "sasl.enabled.mechanisms": "PLAIN",
                "sasl.mechanism.inter.broker.protocol": "PLAIN",
                "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                    "org.apache.kafka.common.security.plain.PlainLoginModule required "
                    f'username="{user}" password="{password}" {users};'
                ),
            }
        )
    return props


def _plaintext_properties(
    host: str, port: int, controller_port: int, data_dir: Path, partitions: int
) -> dict[str, str]:
    return {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        "controller.quorum.voters": f"{NODE_ID}@{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        # Topics created on first use (by a producer's metadata request) get the
        # configured partitions, like the ones created at start.
        "num.partitions": str(partitions),
        "auto.create.topics.enable": "true",
        # One node: every replication factor is 1, and one in-sync replica is enough.
        "default.replication.factor": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Internal topics of 50 partitions each cost seconds to create on a small machine.
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.num.partitions": "4",
        "group.initial.rebalance.delay.ms": "0",
        # The embedded broker is the source of the lake: it keeps every message.
        "log.retention.ms": "-1",
        # A small footprint: two cores are common for the embedded default.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "background.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "broker.heartbeat.interval.ms": "500",
    }


LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by lambdalake.ops.broker on every start: Kafka's warnings and errors, to server.log. -->
<Configuration status="warn">
  <Appenders>
    <File name="file" fileName="{path}" append="true">
      <PatternLayout pattern="[%d{{ISO8601}}] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.server.KafkaRaftServer" level="info"/>
    <Logger name="kafka.server.BrokerServer" level="info"/>
    <Root level="warn"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


def _write_properties(path: Path, props: dict[str, str]) -> None:
    lines = ["# Written by lambdalake.ops.broker on every start; edits are overwritten."]
    lines += [f"{k}={v}" for k, v in props.items()]
    path.write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class Jvm:
    """How the broker's JVMs are run: which ``java``, which jars, how much heap, and the
    class-data-sharing archive that makes them start faster (see :func:`class_data_archive`)."""

    java: str
    jars: Path
    heap: str = DEFAULT_HEAP
    archive: Path | None = None

    def command(
        self,
        config_dir: Path,
        main: str,
        *args: str,
        dump_to: Path | None = None,
        server: bool = False,
    ) -> list[str]:
        """The ``java`` command line. For the broker itself (``server``) the heap is fixed at
        its bound and touched at start (``-Xms`` = ``-Xmx``, as Kafka's own start script
        sets them, and ``-XX:+AlwaysPreTouch``): its memory is what it will be after hours
        of load from the first minute, instead of growing towards the bound for hours. A
        tool (formatting the storage) starts small."""
        heap = [f"-Xms{self.heap}", "-XX:+AlwaysPreTouch"] if server else ["-Xms64m"]
        cds: list[str] = []
        if dump_to is not None:
            cds = [f"-XX:ArchiveClassesAtExit={dump_to}"]
        elif self.archive is not None and self.archive.exists():
            cds = [f"-XX:SharedArchiveFile={self.archive}"]
        return [
            self.java,
            f"-Xmx{self.heap}",
            *heap,
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Xlog:cds=off,cds+dynamic=off",  # a stale archive is ignored, silently
            *cds,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={config_dir / 'log4j2.xml'}",
            "-cp",
            str(self.jars / "*"),
            main,
            *args,
        ]


def class_data_archive(java: str, jars: Path) -> Path:
    """Where the class-data-sharing archive of this ``java`` and these jars lives.

    Loading Kafka's ~6,000 classes dominates its start on a small machine; an archive of
    them (written by the JVM at the exit of the first broker run, Java's AppCDS) roughly
    halves the start. It sits beside the jars, named for the JVM and the jar set, so a
    new JDK or new jars get their own; a JVM that cannot use an archive ignores it.
    """
    import hashlib

    key = "\n".join([str(Path(java).resolve()), *sorted(p.name for p in jars.glob("*.jar"))])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return jars / "cds" / f"kafka-{digest}.jsa"


def _format_storage(jvm: Jvm, config_dir: Path, server_log: Path, timeout: float) -> None:
    """Format an empty data directory (a new cluster id); Kafka's own StorageTool does it."""
    cmd = jvm.command(
        config_dir,
        "kafka.tools.StorageTool",
        "format",
        f"--cluster-id={new_cluster_id()}",
        "--config",
        str(config_dir / "server.properties"),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    with open(server_log, "a") as out:
        out.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        raise BrokerError(
            f"formatting the broker's storage in {config_dir.parent / 'data'} failed: "
            f"{reason[-1] if reason else f'exit code {proc.returncode}'} (log: {server_log})"
        )


def uuid_to_kafka_id(value: uuid.UUID) -> str:
    """A Kafka cluster id: the UUID's 16 bytes in URL-safe base64 without padding."""
    import base64

    return base64.urlsafe_b64encode(value.bytes).decode().rstrip("=")


def new_cluster_id() -> str:
    """A random cluster id that no command line mistakes for an option.

    One UUID in 64 encodes to a string starting with ``-``, which Kafka's tools parse as a
    flag ("argument --cluster-id: expected one argument"); Kafka's own ``Uuid.randomUuid()``
    draws again in that case, and so does this.
    """
    while True:
        cluster_id = uuid_to_kafka_id(uuid.uuid4())
        if not cluster_id.startswith("-"):
            return cluster_id


# --- the watchdog ----------------------------------------------------------------------------

# Reads its standard input until end of file, which comes when the owner closes the pipe or
# dies (however it dies); then ends the broker's process group: TERM, and KILL after 15 s.
_WATCHDOG = (
    'while read -r _; do :; done; kill -TERM "-$1" 2>/dev/null || exit 0; i=0; '
    'while kill -0 "-$1" 2>/dev/null && [ "$i" -lt 150 ]; do sleep 0.1; i=$((i+1)); done; '
    'kill -KILL "-$1" 2>/dev/null; exit 0'
)


def _start_watchdog(pgid: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["/bin/sh", "-c", _WATCHDOG, "lambdalake-broker-watchdog", str(pgid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the terminal must not end the watchdog first
    )


# --- the broker ------------------------------------------------------------------------------


@dataclass
class EmbeddedBroker:
    """A running Kafka broker process; ``stop()`` (or leaving the ``with`` block) ends it."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    partitions: int
    log_dir: Path
    # kafka-python arguments a client needs here (empty: PLAINTEXT); see ``start(sasl_users=)``.
    security: dict[str, object] = field(default_factory=dict)
    watchdog: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _archive_dump: tuple[Path, Path] | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.log_dir / "data"

    @classmethod
    def start(
        cls,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        partitions: int = 4,
        topics: tuple[str, ...] = TOPICS,
        timeout: float = 90.0,
        log_dir: Path | None = None,
        jars_dir: Path | None = None,
        heap: str = DEFAULT_HEAP,
        sasl_users: Mapping[str, str] | None = None,
    ) -> EmbeddedBroker:
        """Start Kafka on ``host:port`` (0 = a free port) with its data in ``log_dir``
        (formatted on first use; default a new temporary directory), wait until clients
        can connect, and create the missing ``topics`` with ``partitions`` partitions.

        ``sasl_users`` (user -> password): clients must authenticate (SASL_PLAINTEXT,
        PLAIN); ``security`` then holds the first user's client arguments."""
        jars = kafka_jars(jars_dir)
        java = java_binary()
        jvm = Jvm(java, jars, heap, class_data_archive(java, jars))
        if port and not port_is_free(host, port):
            raise BrokerError(
                f"port {host}:{port} is already in use; stop what listens there, pick another "
                "port (--port, LAMBDALAKE_BROKER_PORT), or point LAMBDALAKE_KAFKA_BOOTSTRAP "
                "at the Kafka already running there"
            )
        port = port or free_port(host)
        controller_port = free_port(host)
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="lambdalake-broker-")).resolve()
        config_dir, data_dir = log_dir / "config", log_dir / "data"
        config_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "server.log"
        _write_properties(
            config_dir / "server.properties",
            server_properties(host, port, controller_port, data_dir, partitions, sasl_users),
        )
        (config_dir / "log4j2.xml").write_text(LOG4J2_XML.format(path=log_path))
        if not (data_dir / "meta.properties").exists():
            if data_dir.exists() and any(data_dir.iterdir()):
                raise BrokerError(
                    f"{data_dir} holds files but no Kafka meta.properties: not a broker's data "
                    "directory; move it away or pick another directory"
                )
            major = java_major_version(java)
            if major < JAVA_MIN_VERSION:
                raise BrokerError(
                    f"{java} is Java {major or 'of an unknown version'}; the embedded Kafka "
                    f"broker needs Java {JAVA_MIN_VERSION}+ (set JAVA_HOME to one)"
                )
            _format_storage(jvm, config_dir, log_path, timeout)
            log.info("broker.formatted", data=str(data_dir))
        dump_to = None
        if jvm.archive is not None and not jvm.archive.exists():
            # This run writes the archive when it exits; later starts load it.
            with contextlib.suppress(OSError):
                jvm.archive.parent.mkdir(exist_ok=True)
                if os.access(jvm.archive.parent, os.W_OK):
                    dump_to = jvm.archive.with_name(f"{jvm.archive.name}.{os.getpid()}.tmp")
        cmd = jvm.command(
            config_dir,
            "kafka.Kafka",
            str(config_dir / "server.properties"),
            dump_to=dump_to,
            server=True,
        )
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        broker = cls(host, port, proc, log_path, partitions, log_dir)
        if sasl_users:
            user, password = next(iter(sasl_users.items()))
            broker.security = {
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_plain_username": user,
                "sasl_plain_password": password,
            }
        broker._archive_dump = (dump_to, jvm.archive) if dump_to and jvm.archive else None
        try:
            broker.watchdog = _start_watchdog(proc.pid)
            broker._wait_until_ready(timeout)
            ensure_topics(broker.bootstrap, topics, partitions, security=broker.security)
        except BaseException:
            broker.stop()
            raise
        log.info(
            "broker.ready", bootstrap=broker.bootstrap, partitions=partitions, dir=str(log_dir)
        )
        return broker

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"the embedded Kafka broker exited with code {self.process.returncode} on "
                    f"{self.bootstrap}: {self._last_error()} (log: {self.log_path})"
                )
            try:
                wait_for_broker(
                    self.bootstrap,
                    timeout=min(2.0, deadline - time.monotonic()),
                    security=self.security,
                )
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise BrokerError(
                        f"the embedded Kafka broker did not accept connections on "
                        f"{self.bootstrap} within {timeout:.0f} s (log: {self.log_path})"
                    ) from None

    def _last_error(self) -> str:
        """The most telling line of the server log: the last ERROR (else the last line)."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        errors = [ln for ln in lines if " ERROR " in ln or "Exception" in ln]
        line = (errors or lines or ["no output"])[-1].strip()
        return line[:500]

    def stop(self, timeout: float = 20.0) -> None:
        """End the broker: SIGTERM (Kafka's controlled shutdown, which flushes the log), then
        SIGKILL after ``timeout`` seconds. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("broker.kill", bootstrap=self.bootstrap, after_s=timeout)
                self._signal_group(signal.SIGKILL)
                self.process.wait()
        if self.watchdog is not None:
            # The broker is gone; end of file tells the watchdog there is nothing left to do.
            if self.watchdog.stdin is not None:
                self.watchdog.stdin.close()
            try:
                self.watchdog.wait(5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
        self._keep_archive()
        log.info("broker.stopped", bootstrap=self.bootstrap, code=self.process.returncode)

    def _keep_archive(self) -> None:
        """Move the class-data archive this run wrote (at its exit) into place."""
        if self._archive_dump is None:
            return
        written, archive = self._archive_dump
        if written.exists() and written.stat().st_size > 0 and self.process.returncode != -9:
            os.replace(written, archive)
            log.info("broker.class_data_archived", archive=str(archive))
        written.unlink(missing_ok=True)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
