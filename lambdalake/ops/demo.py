"""``lambdalake demo``: the whole system live on one machine, started and stopped by one command.

Stages (a line each): broker -> history -> ingest -> batch -> speed worker, API, live
events and continuous ingest as child processes -> wait until ready -> print what to open.
Ctrl-C (or SIGTERM) stops every process the demo started.

State lives under ``LAMBDALAKE_HOME`` (default ``./.lambdalake``): the lake (unless
``LAMBDALAKE_LAKE_URI``/``--lake`` says otherwise), the speed state and the logs of every
child process (``logs/<name>.log``).

The embedded broker (Apache Kafka) keeps its log in ``HOME/broker`` between runs, so a second
``make demo`` finds the topics as the lake left them and goes straight on. Only a wiped broker
(its directory removed, or topics emptied) while the lake still holds the history is refilled:
the demo replays the master and quarantine tables into the empty topics partition by partition
in offset order, so every message gets back its original offset and the lake's ingest
positions, the batch watermark and the broker agree again (checked before going on; if they
cannot agree the demo starts over with a fresh lake). A broker whose log ends before the
lake's positions (neither empty nor whole) cannot be repaired that way: the demo starts over.
The speed layer's state is derived and rebuilt each time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from lambdalake.errors import OperationFailed
from lambdalake.logs import get_logger
from lambdalake.settings import TOPICS, Settings

log = get_logger("demo")

SEED = 42
READY_TIMEOUT_S = 300.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


class Children:
    """The child processes the demo started; ``stop_all`` ends them (TERM, then KILL)."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.items: list[Child] = []

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "LAMBDALAKE_KAFKA_BOOTSTRAP": s.bootstrap,
            "LAMBDALAKE_LAKE_URI": s.lake_uri,
            "LAMBDALAKE_HOME": str(s.home),
            "LAMBDALAKE_SPEED_DIR": str(s.speed_state_dir),
            "PYSPARK_PYTHON": sys.executable,
        }

    def start(self, name: str, *args: str) -> Child:
        path = self.log_dir / f"{name}.log"
        with open(path, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lambdalake.cli", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,  # Ctrl-C reaches the demo, which stops children in order
            )
        child = Child(name, proc, path)
        self.items.append(child)
        log.info("demo.started", process=name, pid=proc.pid, log=str(path))
        return child

    def run(self, name: str, *args: str, timeout: float | None = None) -> str:
        """Run a command to completion, its stderr (progress) shown; returns its stdout."""
        proc = subprocess.run(
            [sys.executable, "-m", "lambdalake.cli", *args],
            stdout=subprocess.PIPE,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        out = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            raise OperationFailed(
                f"`lambdalake {' '.join(args)}` failed with code {proc.returncode}"
            )
        return out

    def dead(self) -> Child | None:
        return next((c for c in self.items if c.process.poll() is not None), None)

    def stop_all(self, timeout: float = 15.0) -> None:
        for c in reversed(self.items):
            if c.process.poll() is None:
                c.process.terminate()
        deadline = time.monotonic() + timeout
        for c in reversed(self.items):
            try:
                c.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.process.kill()
                c.process.wait()
            log.info("demo.stopped", process=c.name, code=c.process.returncode)


def _demo_settings(settings: Settings) -> Settings:
    home = settings.home.resolve()
    update: dict[str, Any] = {"home": home}
    if "lake_uri" not in settings.model_fields_set:
        update["lake_uri"] = str(home / "lake")
    if settings.speed_dir is None:
        update["speed_dir"] = home / "speed"
    return settings.model_copy(update=update)


def _master_positions(settings: Settings) -> dict[str, dict[int, int]]:
    from lambdalake.contract.lake import Lake
    from lambdalake.contract.manifest import ingest_positions

    lake = Lake(settings.lake_uri)
    return {t: ingest_positions(lake.master(t), t) for t in TOPICS}


def _event_json(topic: str, row: dict[str, Any]) -> bytes:
    import orjson

    from lambdalake.contract.events import FIELDS_BY_TOPIC

    event: dict[str, Any] = {}
    for f in FIELDS_BY_TOPIC[topic]:
        v = row[f.name]
        if v is None:
            continue
        if f.name == "event_time":
            v = v.astimezone(UTC).isoformat().replace("+00:00", "Z")
        event[f.name] = v
    return orjson.dumps(event)


def replay_lake(settings: Settings) -> int:
    """Produce the lake's master and quarantine rows back into (empty) topics, in offset order
    per partition, so every message regains its offset. Returns the messages sent; raises
    ``RuntimeError`` if the lake's offsets are not contiguous (then the offsets cannot match)."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable
    from kafka import KafkaProducer, TopicPartition

    from lambdalake.contract.events import MESSAGE_KEY_BY_TOPIC
    from lambdalake.contract.lake import QUARANTINE, Lake
    from lambdalake.kafka.clients import end_offsets, new_client

    lake = Lake(settings.lake_uri)
    positions = _master_positions(settings)
    quarantine = None
    if DeltaTable.is_deltatable(lake.table(QUARANTINE)):
        quarantine = DeltaTable(lake.table(QUARANTINE)).to_pyarrow_table(
            columns=["_topic", "_partition", "_offset", "raw"]
        )
    producer = new_client(
        KafkaProducer,
        bootstrap_servers=settings.bootstrap,
        **settings.kafka_security,
        batch_size=1 << 20,
        linger_ms=30,
        max_request_size=max(1 << 20, 2 * settings.max_event_bytes),
    )
    sent = 0
    try:
        for topic in TOPICS:
            if not positions[topic]:
                continue
            master = DeltaTable(lake.master(topic)).to_pyarrow_table()
            key_field = MESSAGE_KEY_BY_TOPIC[topic]
            for partition, end in sorted(positions[topic].items()):
                rows = master.filter(pc.equal(master["_partition"], partition))
                by_offset: dict[int, tuple[bytes | None, bytes | None]] = {}
                for row in rows.to_pylist():
                    by_offset[row["_offset"]] = (row[key_field].encode(), _event_json(topic, row))
                if quarantine is not None:
                    mask = pc.and_(
                        pc.equal(quarantine["_topic"], topic),
                        pc.equal(quarantine["_partition"], partition),
                    )
                    for q in quarantine.filter(mask).to_pylist():
                        # The key is not kept; a tombstone (no value) needs one to be sent.
                        by_offset[q["_offset"]] = (None if q["raw"] else b"", q["raw"])
                if sorted(by_offset) != list(range(end)):
                    raise OperationFailed(
                        f"{topic}/{partition}: the lake's offsets are not 0..{end - 1}; "
                        "cannot restore them into a new broker"
                    )
                for offset in range(end):
                    key, value = by_offset[offset]
                    producer.send(topic, key=key, value=value, partition=partition)
                sent += end
            log.info("demo.replay", topic=topic, messages=sum(positions[topic].values()))
        producer.flush()
    finally:
        producer.close()
    tps = [TopicPartition(t, p) for t in TOPICS for p in positions[t]]
    ends = end_offsets(settings.bootstrap, tps, security=settings.kafka_security)
    for tp, end in ends.items():
        if end != positions[tp.topic][tp.partition]:
            raise OperationFailed(
                f"replay left {tp.topic}/{tp.partition} at {end}, lake says "
                f"{positions[tp.topic][tp.partition]}"
            )
    return sent


def _generator_args(skus: int, stores: int) -> list[str]:
    """Catalog size, seed and the demo's share of late, duplicate and invalid events."""
    return [
        *("--skus", str(skus), "--stores", str(stores), "--seed", str(SEED)),
        *("--late-fraction", "0.01", "--duplicate-fraction", "0.01", "--bad-fraction", "0.001"),
    ]


def _history_marker(settings: Settings) -> Path:
    return settings.home / "demo-history.json"


def broker_holds(settings: Settings, positions: dict[str, dict[int, int]]) -> str:
    """How the broker's topics compare with the lake's ingest ``positions``: ``"all"`` (every
    partition reaches the lake's position), ``"empty"`` (every partition is empty: a wiped
    broker), or ``"less"`` (some of the log the lake was filled from is missing)."""
    from kafka import TopicPartition

    from lambdalake.kafka.clients import end_offsets

    tps = [TopicPartition(t, p) for t in TOPICS for p in positions[t]]
    ends = end_offsets(settings.bootstrap, tps, security=settings.kafka_security)
    if all(ends[tp] >= positions[tp.topic][tp.partition] for tp in tps):
        return "all"
    if not any(ends.values()):
        return "empty"
    return "less"


def _prepare_history(
    settings: Settings, children: Children, *, days: int, skus: int, stores: int, embedded: bool
) -> None:
    marker = _history_marker(settings)
    wanted = {"days": days, "skus": skus, "stores": stores, "seed": SEED}
    have = json.loads(marker.read_text()) if marker.exists() else None
    positions = _master_positions(settings)
    if have == wanted and any(positions.values()):
        holds = broker_holds(settings, positions) if embedded else "all"
        if holds == "all":
            log.info("demo.history.reused", lake=settings.lake_uri, note="broker kept its log")
            return
        if holds == "empty":
            try:
                t0 = time.monotonic()
                n = replay_lake(settings)
                log.info(
                    "demo.history.replayed", messages=n, seconds=round(time.monotonic() - t0, 1)
                )
                return
            except RuntimeError as exc:
                log.warning("demo.history.replay_failed", reason=str(exc), action="regenerating")
        else:
            log.warning(
                "demo.history.broker_behind",
                note="the broker's log ends before the lake's positions",
                action="regenerating",
            )
    # A new history: start from an empty lake (the old one does not match these topics) and,
    # on the embedded broker, from empty topics (an external cluster's topics are left alone).
    lake_path = Path(settings.lake_uri)
    if lake_path.exists() and "://" not in settings.lake_uri:
        shutil.rmtree(lake_path)
    marker.unlink(missing_ok=True)
    if embedded:
        from lambdalake.kafka.clients import delete_topics, ensure_topics

        delete_topics(settings.bootstrap, TOPICS, security=settings.kafka_security)
        ensure_topics(
            settings.bootstrap, TOPICS, settings.partitions, security=settings.kafka_security
        )
    log.info("demo.history.generate", days=days, skus=skus, stores=stores)
    children.run(
        "generate",
        "generate",
        "history",
        "--days",
        str(days),
        *_generator_args(skus, stores),
    )
    marker.write_text(json.dumps(wanted))


def _latest_run_matches_lake(settings: Settings) -> bool:
    from lambdalake.contract.lake import RUNS, Lake
    from lambdalake.contract.manifest import latest_published_run

    run = latest_published_run(Lake(settings.lake_uri).table(RUNS))
    return run is not None and run.watermark == _master_positions(settings)


def _wait_ready(settings: Settings, children: Children, stop: threading.Event) -> bool:
    """Until the API answers with a published run and the speed lag is near zero."""
    import httpx

    url = f"http://{settings.api_host}:{settings.api_port}/v1/status"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        dead = children.dead()
        if dead:
            raise OperationFailed(f"{dead.name} exited early; see {dead.log_path}")
        try:
            status = httpx.get(url, timeout=2).json()
            workers = status["speed"]["workers"]
            lag = sum(
                int(n) for w in workers for ps in (w.get("lag") or {}).values() for n in ps.values()
            )
            if status["batch"]["run_id"] and workers and lag < 5_000:
                return True
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        stop.wait(1.0)
    return False


def run_demo(
    settings: Settings,
    *,
    days: int,
    skus: int,
    stores: int,
    rate: float | None,
    stop: threading.Event,
) -> None:
    """Start everything, print what to open, and keep running until ``stop`` is set.

    ``rate=None``: live events at the demand model's own rate (the history's), with the
    generator's injected anomalies; a number: that fixed load (events/s); 0: none."""
    from lambdalake.kafka.clients import wait_for_broker
    from lambdalake.ops.broker import EmbeddedBroker, free_port

    settings = _demo_settings(settings)
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    broker = None
    children = Children(settings, log_dir)
    try:
        if settings.kafka_bootstrap is None:
            broker = EmbeddedBroker.start(
                settings.broker_host,
                settings.broker_port,
                partitions=settings.partitions,
                log_dir=settings.home / "broker",
                jars_dir=settings.kafka_jars,
                heap=settings.broker_heap,
            )
        else:
            if not wait_for_broker(
                settings.bootstrap,
                timeout=settings.broker_wait_seconds,
                security=settings.kafka_security,
                stop=stop,
            ):
                return  # stopped while waiting for the broker
        log.info("demo.stage", stage="broker", bootstrap=settings.bootstrap)

        _prepare_history(
            settings, children, days=days, skus=skus, stores=stores, embedded=broker is not None
        )
        log.info("demo.stage", stage="history", seconds=round(time.monotonic() - started, 1))
        summary = children.run("ingest", "ingest", "--until-end").strip().splitlines()
        log.info("demo.stage", stage="ingest", summary=summary[-1] if summary else "")
        if _latest_run_matches_lake(settings):
            log.info("demo.stage", stage="batch", note="the published run already covers the lake")
        else:
            run_id = children.run("batch", "batch", "run").strip().splitlines()[-1]
            log.info("demo.stage", stage="batch", run_id=run_id)

        # The speed layer's state is derived: rebuild it from the watermark every time.
        shutil.rmtree(settings.speed_state_dir, ignore_errors=True)
        query_port = free_port()
        children.start("speed", "speed", "run", "--worker", "0/1", "--query-port", str(query_port))
        children.start("ingest-continuous", "ingest")
        children.start(
            "api", "serve", "--host", settings.api_host, "--port", str(settings.api_port)
        )
        if rate is None or rate > 0:
            load = [] if rate is None else ["--rate", str(rate)]
            children.start("live", "generate", "live", *load, *_generator_args(skus, stores))
        if not _wait_ready(settings, children, stop):
            if stop.is_set():
                return
            raise OperationFailed(f"not ready within {READY_TIMEOUT_S:.0f} s; logs in {log_dir}")
        api = f"http://{settings.api_host}:{settings.api_port}"
        lake_flag = f"--lake {settings.lake_uri}"
        print(
            "\n".join(
                [
                    "",
                    f"lambdalake demo is ready ({time.monotonic() - started:.0f} s)",
                    f"  dashboard     {api}/dashboard",
                    f"  API docs      {api}/docs",
                    f"  status        {api}/v1/status   or   .venv/bin/lambdalake status {lake_flag}",
                    f"  Airflow UI    .venv/bin/lambdalake airflow --bootstrap {settings.bootstrap} "
                    f"{lake_flag}",
                    f"  Kafka         {settings.bootstrap}"
                    + (f"   data: {broker.log_dir}" if broker is not None else ""),
                    f"  logs          {log_dir}",
                    "Ctrl-C stops everything.",
                    "",
                ]
            ),
            flush=True,
        )
        while not stop.is_set():
            dead = children.dead()
            if dead:
                raise OperationFailed(
                    f"{dead.name} exited with code {dead.process.returncode}; see {dead.log_path}"
                )
            stop.wait(1.0)
    finally:
        children.stop_all()
        if broker is not None:
            broker.stop()
        log.info("demo.stopped_all")
