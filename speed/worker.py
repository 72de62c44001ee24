"""One speed worker: Kafka -> exactly-once recent views in DuckDB -> Arrow Flight.

>>> run_worker(settings, worker=(0, 1), query_port=0, stop=threading.Event())  # doctest: +SKIP

Threads
    main      applies published runs; validates, scores and commits micro-batches
              (the only writer)
    poller    Kafka polls, one micro-batch ahead (speed.consumer)
    runs      watches the runs table, prepares runs (speed.runs)
    flight    the query endpoint (speed.server)
    status    the status file, lag (speed.status)

Exactly once: every micro-batch is committed in one DuckDB transaction together
with the positions it reached, and anything the poller delivers below the
committed positions (or the applied watermark) is dropped, so a crash at any
moment, a reconnect or a run applied mid-batch neither loses nor repeats an
event. A micro-batch polled before a seek backwards (a run demoted or withdrawn:
the watermark went back) is discarded whole (its epoch is older), so positions
never jump past the events the re-read must deliver first.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lambdalake.contract.lake import Lake
from lambdalake.contract.manifest import watermark_to_dict
from lambdalake.errors import InvalidInput
from lambdalake.logs import get_logger
from lambdalake.memory import heap
from lambdalake.settings import Settings, check_secret
from speed.consumer import Assigned, Polled, Poller, quiet_kafka_logs, validate_polled
from speed.runs import PreparedRun, RunWatcher, load_model
from speed.server import SpeedFlightServer
from speed.state import BatchInput, RunApply, SpeedState, invalid_totals
from speed.status import StatusReporter, iso, status_path

log = get_logger(__name__)

PROGRESS_EVERY = 10.0  # seconds between progress log lines
EXPIRE_EVERY = 600.0  # seconds between expiries of known ids past the horizon


def state_path(settings: Settings, worker: tuple[int, int]) -> Any:
    return settings.speed_state_dir / f"worker-{worker[0]}-of-{worker[1]}.duckdb"


@dataclass
class Counters:
    """Running totals since the worker started (for logs and status)."""

    batches: int = 0
    messages: int = 0
    held: int = 0
    duplicates: int = 0
    invalid: int = 0
    poll_seconds: float = 0.0
    validate_seconds: float = 0.0
    commit_seconds: float = 0.0
    discarded: int = 0  # micro-batches polled before a seek backwards, not committed
    skipped_by_operator: int = 0  # record batches passed after an operator's skip
    # The last of them: topic, partition, offsets, reason, passed_at.
    last_skipped_by_operator: dict[str, Any] | None = None
    started_at: float = field(default_factory=time.monotonic)
    last_commit_at: float | None = None
    rate: float = 0.0  # messages/s over the last progress interval
    # Seconds from a micro-batch's first message polled to its commit (the last 1,000).
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=1000))

    def latency_ms(self) -> dict[str, float | None]:
        """p50/p99 of poll-to-commit over the recent micro-batches (queryable after commit)."""
        if not self.latencies:
            return {"p50": None, "p99": None}
        ordered = sorted(self.latencies)

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

        return {"p50": pick(0.5), "p99": pick(0.99)}


class SpeedWorker:
    """The main loop of a worker (see the module doc); :func:`run_worker` runs one."""

    def __init__(
        self,
        settings: Settings,
        state: SpeedState,
        worker: tuple[int, int],
        *,
        max_records: int = 50_000,
        max_wait: float = 0.1,
        min_interval: float | None = None,
        kafka_client: str = "kafka-python",
    ) -> None:
        self.settings = settings
        self.state = state
        self.worker = worker
        self.name = f"{worker[0]}/{worker[1]}"
        self.halt = threading.Event()
        # One micro-batch waits while another commits; the poller keeps growing the next.
        self.queue: queue.Queue[Polled | Assigned] = queue.Queue(maxsize=1)
        self.poller = Poller(
            settings,
            worker,
            self.queue,
            self.halt,
            max_records=max_records,
            max_wait=max_wait,
            min_interval=(
                settings.speed_batch_interval_ms / 1000 if min_interval is None else min_interval
            ),
            client=kafka_client,
        )
        self.watcher = RunWatcher(
            settings,
            self.halt,
            spill_dir=settings.speed_state_dir / "prepared" / f"worker-{worker[0]}-of-{worker[1]}",
        )
        self.counters = Counters()
        # Micro-batches polled in an older epoch (before the last seek backwards) are
        # discarded: they may lie above positions the state just moved back.
        self.epoch = 0
        self.model: Any = None
        self.server: SpeedFlightServer | None = None
        self.reporter = StatusReporter(
            status_path(settings.speed_state_dir, worker),
            settings.bootstrap,
            self.snapshot,
            lambda: dict(self.poller.highwater),
            self.halt,
            security=settings.kafka_security,
        )

    # --- status ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        counts = self.state.counts()
        applied = self.state.applied
        c = self.counters
        return {
            "worker": self.name,
            "positions": dict(self.state.positions),
            "events": counts["events"],
            "invalid": invalid_totals(counts["invalid"]),
            "invalid_by_topic": counts["invalid"],
            "run_id": applied.run_id,
            "watermark": watermark_to_dict(applied.watermark),
            "model_version": applied.model_version,
            # Partitions re-read after the watermark went back, and the offset to reach.
            "rereading": watermark_to_dict(applied.rereading(self.state.positions)),
            "query_endpoint": self.server.endpoint if self.server else None,
            "connected": self.poller.connected,
            "kafka_client": self.poller.client_name,
            # Why polling is stopped (a batch that must not be passed over), while it is.
            "halted": self.poller.halted,
            # The last record batch passed because an operator skipped it (ingest --skip).
            "last_skipped_by_operator": self.counters.last_skipped_by_operator,
            # Why the broker refuses this worker (credentials or ACLs), while it does.
            "broker_refused": self.poller.refused,
            # Where the process's memory is: DuckDB's buffers, and the allocator's heap
            # in use vs retained free (growth in "free" is fragmentation, not a leak).
            "memory": {"duckdb": counts["duckdb_bytes"], "heap": heap()},
            "since_start": {
                "batches": c.batches,
                "messages": c.messages,
                "held": c.held,
                "duplicates": c.duplicates,
                "invalid": c.invalid,
                "discarded_batches": c.discarded,
                "poisoned_batches": self.poller.poisoned,
                "skipped_by_operator": c.skipped_by_operator,
                "poll_seconds": round(c.poll_seconds, 3),
                "validate_seconds": round(c.validate_seconds, 3),
                "commit_seconds": round(c.commit_seconds, 3),
            },
            # What must stay bounded over a long uptime (tests and the soak bench watch it).
            "state": {"read_cursors": self.state.cursor_count, "rows": counts["rows"]},
            "messages_per_second": round(c.rate, 1),
            "poll_to_commit_ms": c.latency_ms(),
        }

    # --- runs -----------------------------------------------------------------------------

    def apply(self, prepared: PreparedRun) -> None:
        """Prune to a run's watermark, load its ids, re-score with its model: one commit."""
        t0 = time.monotonic()
        run = prepared.run
        model = prepared.model or self.model
        scores = None
        if prepared.model is not None:
            held = self.state.held_reviews_from(run.watermark)
            scores = score_table(model, held)
        self.state.apply_run(
            RunApply(
                run_id=run.run_id,
                watermark=run.watermark,
                master_versions=run.master_versions,
                model_version=prepared.model_version,
                known_ids=prepared.known_ids,
                replace_known=prepared.replace_known,
                scores=scores,
                reset=prepared.reset,
            ),
            self.settings.dedup_hours,
        )
        prepared.discard()
        self.model = model
        applied = self.state.applied
        self.watcher.applied(
            applied.run_id, applied.watermark, applied.master_versions, applied.model_version
        )
        positions = {
            tp: self.state.positions[tp]
            for tp in self.poller.assigned
            if tp in self.state.positions
        }
        if positions:
            self.epoch = self.poller.seek(positions, backwards=prepared.reset)
        log.info(
            "speed.run_applied",
            run_id=run.run_id,
            watermark=run.watermark,
            rescored=0 if scores is None else scores.num_rows,
            reset=prepared.reset,
            seconds=round(time.monotonic() - t0, 3),
        )

    # --- micro-batches ----------------------------------------------------------------------

    def process(self, polled: Polled) -> None:
        """Drop what the state already accounts for, score reviews, commit."""
        state = self.state
        t0 = time.monotonic()
        topics = validate_polled(
            polled, self.settings.max_event_bytes, self.settings.event_time_max_skew
        )
        validate_seconds = time.monotonic() - t0
        valid: dict[str, pa.Table] = {}
        invalid: Counter[tuple[str, str]] = Counter()
        for topic, tb in topics.items():
            v = _keep_new(state, topic, tb.valid)
            if topic == "reviews" and v.num_rows:
                v = with_scores(self.model, v)
            valid[topic] = v
            rejected = _keep_new(state, topic, tb.rejected)
            if rejected.num_rows:
                for item in pc.value_counts(rejected["reason"]).to_pylist():
                    invalid[(topic, item["values"])] += int(item["counts"])
        result = state.commit_batch(BatchInput(valid=valid, ends=polled.ends, invalid=invalid))
        c = self.counters
        c.batches += 1
        c.messages += polled.messages
        c.held += sum(result.held.values())
        c.duplicates += sum(result.duplicates.values())
        c.invalid += sum(invalid.values())
        c.commit_seconds += result.seconds
        c.poll_seconds += polled.poll_seconds
        c.validate_seconds += validate_seconds
        c.last_commit_at = time.monotonic()
        for skip in polled.skipped:
            # Committed: the position is past the batch, none of its events counted.
            c.skipped_by_operator += 1
            c.last_skipped_by_operator = {
                **{k: v for k, v in skip.log_fields().items() if k != "detail"},
                "passed_at": iso(time.time()),
            }
            log.warning("speed.skipped_by_operator", **skip.log_fields())
        if polled.first_at:
            c.latencies.append(c.last_commit_at - polled.first_at)
        log.debug(
            "speed.batch",
            messages=polled.messages,
            held=result.held,
            duplicates=result.duplicates,
            invalid=sum(invalid.values()),
            poll_s=round(polled.poll_seconds, 3),
            validate_s=round(validate_seconds, 3),
            commit_s=round(result.seconds, 3),
        )

    # --- the loop ---------------------------------------------------------------------------

    def start(
        self, query_port: int, query_host: str = "127.0.0.1", advertise_host: str | None = None
    ) -> None:
        """Apply the latest run, open the endpoint, start the threads."""
        check_query_auth(self.settings, query_host)
        quiet_kafka_logs()
        lake = Lake(self.settings.lake_uri)
        applied = self.state.applied
        self.model = load_model(lake, applied.model_version)
        self.watcher.applied(
            applied.run_id, applied.watermark, applied.master_versions, applied.model_version
        )
        prepared = self.watcher.check_now()
        if prepared is not None:
            self.apply(prepared)
        try:
            self.server = SpeedFlightServer(
                self.state,
                self.reporter.current,
                host=query_host,
                port=query_port,
                advertise_host=advertise_host,
                token=self.settings.speed_token or None,
            )
        except Exception as exc:  # pyarrow raises its own errors for a port in use
            raise InvalidInput(f"cannot serve queries on port {query_port}: {exc}") from exc
        self.server.start()
        self.reporter.write()
        self.reporter.start()
        self.watcher.start()
        self.poller.start()
        log.info(
            "speed.started",
            worker=self.name,
            query_endpoint=self.server.endpoint,
            run_id=self.state.applied.run_id,
            state=str(self.state.path),
        )

    def apply_pending(self) -> None:
        """Apply the newest published run if the watcher has one prepared."""
        prepared = self.watcher.take()
        if prepared is not None:
            self.apply(prepared)

    def handle(self, item: Polled | Assigned) -> None:
        """Take the partitions the poller was assigned, or commit one micro-batch."""
        if isinstance(item, Assigned):
            start = self.state.register_partitions(item.partitions)
            self.epoch = self.poller.seek(start, backwards=True)
            return
        # A run published while this batch was in flight is applied first, so the
        # batch is filtered at the new watermark (exact, by offset) — or discarded
        # whole when the watermark went back (the poller re-reads from it).
        self.apply_pending()
        if item.epoch < self.epoch:
            self.counters.discarded += 1
            log.info(
                "speed.batch_discarded",
                reason="polled before a seek backwards",
                messages=item.messages,
                epoch=item.epoch,
                current_epoch=self.epoch,
            )
            return
        behind = [s for s in item.skipped if self.state.threshold(s.topic, s.partition) < s.offset]
        if behind:
            # The poller hands a skip over alone, after everything polled before the batch,
            # so the position is at the batch by now: should that ever not hold, read again
            # from the committed positions rather than move past events not committed yet.
            self.counters.discarded += 1
            log.error("speed.skip_out_of_order", skipped=[s.log_fields() for s in behind])
            self.epoch = self.poller.seek(
                {
                    tp: self.state.positions[tp]
                    for tp in self.poller.assigned
                    if tp in self.state.positions
                },
                backwards=True,
            )
            return
        self.process(item)

    def step(self, timeout: float = 0.2) -> None:
        """Apply a newly published run if there is one, then one micro-batch if any."""
        self.apply_pending()
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            item = None
        if item is not None:
            self.handle(item)
        if self.poller.error is not None:
            raise self.poller.error

    def run(
        self,
        stop: threading.Event,
        query_port: int,
        query_host: str = "127.0.0.1",
        advertise_host: str | None = None,
    ) -> None:
        self.start(query_port, query_host, advertise_host)
        last_progress = last_expire = time.monotonic()
        last_messages = 0
        try:
            while not stop.is_set():
                self.step()
                now = time.monotonic()
                if now - last_progress >= PROGRESS_EVERY:
                    c = self.counters
                    c.rate = (c.messages - last_messages) / (now - last_progress)
                    last_progress, last_messages = now, c.messages
                    log.info(
                        "speed.progress",
                        worker=self.name,
                        messages=c.messages,
                        rate=round(c.rate, 1),
                        held=c.held,
                        duplicates=c.duplicates,
                        invalid=c.invalid,
                        broker_unreachable=self.reporter.broker_unreachable,
                    )
                if now - last_expire >= EXPIRE_EVERY:
                    self.state.expire_known(self.settings.dedup_hours)
                    last_expire = now
        finally:
            self.close()

    def close(self) -> None:
        self.halt.set()
        if self.server is not None:
            self.server.stop()
        for thread in (self.poller, self.watcher, self.reporter):
            if thread.is_alive():
                thread.join(timeout=10)
        log.info("speed.stopped", worker=self.name, messages=self.counters.messages)


def check_query_auth(settings: Settings, query_host: str) -> None:
    """Refuse (one-line ``ValueError``) to serve the speed layer's data unauthenticated to
    other machines, unless ``speed_allow_unauthenticated`` accepts it; refuse an example
    or short token. Runs before anything binds."""
    if settings.speed_token:
        check_secret("LAMBDALAKE_SPEED_TOKEN", settings.speed_token)
        return
    if _loopback(query_host):
        return
    if not settings.speed_allow_unauthenticated:
        raise InvalidInput(
            f"--query-host {query_host} is reachable from other machines and "
            "LAMBDALAKE_SPEED_TOKEN is empty: set a token (the same on every worker and the "
            "API, e.g. `openssl rand -hex 24`), or bind 127.0.0.1 "
            "(LAMBDALAKE_SPEED_ALLOW_UNAUTHENTICATED=true accepts the risk)"
        )
    log.warning(
        "speed.endpoint_unauthenticated",
        bind=query_host,
        fix="set LAMBDALAKE_SPEED_TOKEN (worker and API) or bind 127.0.0.1",
    )


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keep_new(state: SpeedState, topic: str, table: pa.Table) -> pa.Table:
    """Rows at or above the state's threshold of their partition (vectorised)."""
    if table.num_rows == 0:
        return table
    mask = state.keep_mask(
        topic,
        table["_partition"].to_numpy().astype(np.int64),
        table["_offset"].to_numpy().astype(np.int64),
    )
    return table if mask.all() else table.filter(pa.array(mask))


def score_table(model: Any, reviews: pa.Table) -> pa.Table:
    """``(_partition, _offset, sentiment, label)`` for reviews with ``text``/``title``."""
    sentiment, label = model.score(reviews["text"].to_pylist(), reviews["title"].to_pylist())
    return pa.table(
        {
            "_partition": reviews["_partition"],
            "_offset": reviews["_offset"],
            "sentiment": pa.array(np.asarray(sentiment, dtype=np.float64)),
            "label": pa.array([str(x) for x in label], pa.string()),
        }
    )


def with_scores(model: Any, reviews: pa.Table) -> pa.Table:
    scores = score_table(model, reviews)
    return reviews.append_column("sentiment", scores["sentiment"]).append_column(
        "label", scores["label"]
    )


def run_worker(
    settings: Settings,
    *,
    worker: tuple[int, int] = (0, 1),
    query_port: int = 0,
    stop: threading.Event,
    kafka_client: str = "kafka-python",
    query_host: str = "127.0.0.1",
    advertise_host: str | None = None,
) -> None:
    """Run speed worker ``worker = (I, N)`` until ``stop`` is set.

    Holds the events of partitions ``p % N == I`` at or above the latest published
    batch watermark in ``{speed_state_dir}/worker-I-of-N.duckdb``, serves partial
    aggregates on Arrow Flight at ``query_port`` (0 = a free port) and writes
    ``{speed_state_dir}/status/worker-I-of-N.json`` about once a second.
    ``kafka_client``: ``"kafka-python"`` or ``"confluent-kafka"`` (optional
    package; much faster polling, see :mod:`speed.kafka_clients`)."""
    state = SpeedState(
        state_path(settings, worker), worker, checkpoint_threshold=settings.speed_checkpoint
    )
    try:
        SpeedWorker(
            settings,
            state,
            worker,
            kafka_client=kafka_client,
            max_records=settings.speed_max_records,
        ).run(stop, query_port, query_host, advertise_host)
    finally:
        state.close()
