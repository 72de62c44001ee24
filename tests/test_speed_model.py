"""A stateful model test of the speed worker (hypothesis ``RuleBasedStateMachine``).

A real worker process (``lambdalake speed run``) on the session's broker, real
Delta ``runs`` rows and master tables, and threads of the test putting query
load on its Flight endpoint all along. Hypothesis picks the steps: produce
events (duplicates, invalid messages, late ones), publish a run at a random cut,
demote the newest run (the watermark goes back), demote it while a burst is being
consumed (micro-batches in flight), SIGKILL the worker and restart it, wait for
it to catch up. After every step:

* speed ⊕ batch equals a recompute: the worker's answer, merged with the batch
  part (every event below the current run's watermark), equals a recompute over
  every event below the offsets the answer says it covers (partitions being
  re-read after a reset are reported left out, and the batch alone covers them);
* what must stay bounded does: read cursors (at most the pool), rows of the
  ``invalid`` table (one per topic and reason), held and known rows (at most
  what was produced), the worker's RSS;
* the query load saw no error but the expected kinds (a stale watermark right
  after a run changed, the worker unavailable while it restarts) — never a
  worker failure or a bad request, although it asks for the ends of the calendar.

The session broker is shared: each example starts with a base run at the
current end offsets, so whatever other tests left in the topics is the batch's,
and the model knows every event above it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from kafka import TopicPartition

from lambdalake.contract.manifest import Watermark
from lambdalake.contract.speed_protocol import (
    SpeedError,
    SpeedQuery,
    StaleWatermark,
    query_speed,
    speed_status,
)
from lambdalake.kafka.clients import end_offsets
from lambdalake.ops.broker import EmbeddedBroker, free_port
from lambdalake.settings import Settings
from speed.state import MAX_READERS
from tests.test_speed_worker import (
    PARTITIONS,
    Publisher,
    Stream,
    answer_sales,
    answer_sentiment,
    assert_same,
    expected,
    merged,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ("orders", "reviews")
MAX_RSS_MIB = 1024  # a worker holding a few thousand events needs ~300 MiB
MAX_RSS_GROWTH_MIB = 200  # within one process lifetime, under constant query load


def broker_ends(bootstrap: str) -> Watermark:
    tps = [TopicPartition(t, p) for t in TOPICS for p in range(PARTITIONS)]
    found = end_offsets(bootstrap, tps, timeout=10)
    return {t: {p: int(found[TopicPartition(t, p)]) for p in range(PARTITIONS)} for t in TOPICS}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


class WorkerProcess:
    """``lambdalake speed run`` as a subprocess on a fixed port (restartable)."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.port = free_port()
        self.endpoint = f"grpc://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.first_rss: float | None = None
        self.discarded = 0  # micro-batches discarded after a reset, over every lifetime

    def count_discarded(self) -> None:
        try:
            status = speed_status(self.endpoint, timeout=2)
        except SpeedError:
            return
        self.discarded += int(status["since_start"].get("discarded_batches", 0))

    def start(self) -> None:
        env = {
            **os.environ,
            "LAMBDALAKE_HOME": str(self.settings.home),
            "LAMBDALAKE_SPEED_DIR": str(self.settings.speed_state_dir),
            "LAMBDALAKE_LOG_LEVEL": "WARNING",
            # Small micro-batches: a burst takes many commits, so runs change mid-stream.
            "LAMBDALAKE_SPEED_MAX_RECORDS": "150",
        }
        cmd = [
            sys.executable, "-m", "lambdalake.cli", "speed", "run",
            "--bootstrap", self.settings.bootstrap, "--lake", self.settings.lake_uri,
            "--query-port", str(self.port),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log)
        self.first_rss = None
        wait_until(
            lambda: (s := speed_status(self.endpoint, timeout=2))["connected"] and s["offsets"],
            60,
            "the worker to serve its partitions",
        )

    def kill9(self, count: bool = True) -> None:
        assert self.proc is not None
        if count:
            self.count_discarded()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        assert self.proc is not None
        self.count_discarded()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


class QueryLoad:
    """Threads asking the worker all the time, as the API's snapshot refreshes do."""

    def __init__(self, endpoint: str, watermark: Callable[[], Watermark], threads: int = 2) -> None:
        self.endpoint = endpoint
        self.watermark = watermark
        self.stop_event = threading.Event()
        self.queries = 0
        self.expected_errors = 0
        self.unexpected: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        rng = random.Random()
        while not self.stop_event.is_set():
            q = rng.choice(
                [
                    SpeedQuery(view="sales", granularity="hour"),
                    SpeedQuery(view="sales", granularity="day", end="9999-12-31"),
                    SpeedQuery(view="sales", granularity="hour", start="0001-01-01"),
                    SpeedQuery(view="sentiment"),
                ]
            )
            q = dataclasses.replace(q, min_offsets=self.watermark())
            try:
                query_speed(self.endpoint, q, timeout=5)
                self.queries += 1
            except SpeedError as exc:
                if exc.kind in ("stale_watermark", "unavailable"):
                    self.expected_errors += 1
                    time.sleep(0.05)
                else:
                    self.unexpected.append(f"{exc.kind}: {exc}")

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=10)


class SpeedWorkerModel(RuleBasedStateMachine):
    """See the module doc. Class attributes are set by the test before it runs."""

    broker: EmbeddedBroker
    base_dir: Path
    examples = 0

    def __init__(self) -> None:
        super().__init__()
        SpeedWorkerModel.examples += 1
        n = SpeedWorkerModel.examples
        root = self.base_dir / f"example-{n}"
        self.settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            kafka_bootstrap=self.broker.bootstrap,
            lake_uri=str(root / "lake"),
            home=root / "home",
            partitions=self.broker.partitions,
        )
        self.stream = Stream(self.broker.bootstrap, seed=random.Random().randrange(10**9))
        self.publisher = Publisher(self.settings)
        self.lock = threading.Lock()
        self.published_runs = 0
        # The base run: everything already in the topics is the batch's.
        self.base = broker_ends(self.broker.bootstrap)
        self.runs: list[tuple[str, Watermark]] = []  # published and not demoted, in order
        self.highest: Watermark = {t: dict(ps) for t, ps in self.base.items()}
        self._publish("base", self.base)
        self.publisher.published = {t: dict(ps) for t, ps in self.base.items()}
        self.worker = WorkerProcess(self.settings, root / "worker.log")
        self.worker.start()
        self.crashes = 0
        self.steps: list[str] = []
        self.load = QueryLoad(self.worker.endpoint, self.watermark)

    # --- the model ---------------------------------------------------------------------------

    def watermark(self) -> Watermark:
        with self.lock:
            return {t: dict(ps) for t, ps in self.runs[-1][1].items()}

    def ends(self) -> Watermark:
        log_ends = self.stream.ends()
        return {
            t: {p: max(self.base[t][p], log_ends[t][p]) for p in range(PARTITIONS)} for t in TOPICS
        }

    def _publish(self, run_id: str, wm: Watermark) -> None:
        self.publisher.publish(run_id, wm, list(self.stream.log))
        with self.lock:
            self.runs.append((run_id, wm))

    # --- rules -------------------------------------------------------------------------------

    @initialize()
    def a_first_run(self) -> None:
        """Events and a run above the base, so the watermark can go back from the start."""
        self.steps.append("a_first_run")
        self.stream.burst(orders=300, reviews=20, dup=0.05, bad=0.02)
        self.publish_run(0.5)
        self.stream.burst(orders=200, reviews=10, dup=0.05, bad=0.02)

    @rule(
        orders=st.integers(20, 400),
        reviews=st.integers(0, 30),
        dup=st.sampled_from([0.0, 0.05, 0.2]),
    )
    def produce(self, orders: int, reviews: int, dup: float) -> None:
        self.steps.append("produce")
        self.stream.burst(orders=orders, reviews=reviews, dup=dup, bad=0.02)

    @rule(cut=st.floats(0.0, 1.0))
    def publish_run(self, cut: float) -> None:
        """A batch run at a cut between the highest watermark so far and the ends."""
        self.steps.append(f"publish_run({cut:.2f})")
        ends = self.ends()
        wm = {
            t: {
                p: self.highest[t][p] + int(cut * (ends[t][p] - self.highest[t][p]))
                for p in range(PARTITIONS)
            }
            for t in TOPICS
        }
        self.highest = {t: dict(ps) for t, ps in wm.items()}
        self.published_runs += 1
        self._publish(f"run-{self.published_runs}", wm)

    @precondition(lambda self: len(self.runs) > 1)
    @rule()
    def demote_newest_run(self) -> None:
        """The data-quality check fails the newest run: the previous one is served again."""
        self.steps.append("demote_newest_run")
        self._demote()

    @precondition(lambda self: len(self.runs) > 1)
    @rule(orders=st.integers(1000, 2500))
    def demote_while_a_burst_is_consumed(self, orders: int) -> None:
        self.steps.append("demote_while_a_burst_is_consumed")
        self.stream.burst(orders=orders, reviews=10, dup=0.02, bad=0.01)
        self._demote()

    @precondition(lambda self: self.crashes < 2)
    @rule(produce_first=st.integers(0, 800))
    def crash_and_restart(self, produce_first: int) -> None:
        self.steps.append("crash_and_restart")
        if produce_first:
            self.stream.burst(orders=produce_first, dup=0.05, bad=0.01)
        self.worker.kill9()
        self.crashes += 1
        self.worker.start()

    def wait_caught_up(self) -> None:
        ends = self.ends()
        wait_until(
            lambda: all(
                int(speed_status(self.worker.endpoint, timeout=2)["offsets"][t][str(p)])
                >= ends[t][p]
                for t in TOPICS
                for p in range(PARTITIONS)
            ),
            60,
            "the worker to catch up",
        )

    def _demote(self) -> None:
        from batch.quality import demote_run

        run_id, _ = self.runs[-1]
        assert demote_run(self.settings, run_id, ["model test: demoted"])
        with self.lock:
            self.runs.pop()

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def speed_merged_with_batch_equals_a_recompute(self) -> None:
        wm = self.watermark()
        sales, sentiment = wait_until(lambda: self._answers(wm), 60, "answers at the watermark")
        # The merged answer covers every event below max(watermark, speed offsets): a
        # worker behind the run (not yet at its watermark) adds nothing to the batch.
        upto = {
            topic: {
                p: max(wm[topic][p], answer.offsets.get(topic, {}).get(p, 0))
                for p in range(PARTITIONS)
            }
            for answer, topic in ((sales, "orders"), (sentiment, "reviews"))
        }
        # Left out only while re-read after a reset, and then said so.
        for answer, topic in ((sales, "orders"), (sentiment, "reviews")):
            left_out = set(range(PARTITIONS)) - set(answer.partitions.get(topic, []))
            assert left_out == set(answer.meta.rereading.get(topic, {})), answer.meta
        batch_sales, batch_sentiment = expected(self.stream.log, {}, upto=wm)
        want_sales, want_sentiment = expected(self.stream.log, {}, upto=upto)
        assert_same(merged(batch_sales, answer_sales(sales)), want_sales)
        assert_same(merged(batch_sentiment, answer_sentiment(sentiment)), want_sentiment)

    @invariant()
    def what_must_stay_bounded_does(self) -> None:
        status = wait_until(lambda: speed_status(self.worker.endpoint, timeout=2), 30, "status")
        assert 1 <= status["state"]["read_cursors"] <= MAX_READERS
        rows = status["state"]["rows"]
        assert rows["invalid"] <= 2 * 8, rows  # one per (topic, reason)
        produced = {t: sum(1 for s in self.stream.log if s.topic == t) for t in TOPICS}
        for t in TOPICS:
            assert rows[f"held_{t}"] <= produced[t] and rows[f"known_{t}"] <= produced[t], rows
        assert self.worker.proc is not None
        rss = rss_mib(self.worker.proc.pid)
        if self.worker.first_rss is None:
            self.worker.first_rss = rss
        assert rss < MAX_RSS_MIB and rss - self.worker.first_rss < MAX_RSS_GROWTH_MIB, (
            rss,
            self.worker.first_rss,
        )
        assert not self.load.unexpected, self.load.unexpected[:3]

    def _answers(self, wm: Watermark):  # type: ignore[no-untyped-def]
        try:
            return (
                query_speed(
                    self.worker.endpoint,
                    SpeedQuery(view="sales", granularity="hour", min_offsets=wm),
                    timeout=5,
                ),
                query_speed(self.worker.endpoint, SpeedQuery(view="sentiment", min_offsets=wm), 5),
            )
        except StaleWatermark:
            return None  # the worker has not applied the run the model serves yet

    def teardown(self) -> None:
        try:
            self.load.stop()
            if self.worker.proc is not None and self.worker.proc.poll() is None:
                self.wait_caught_up()
                self.speed_merged_with_batch_equals_a_recompute()
                assert self.load.queries > 0 and not self.load.unexpected, self.load.unexpected
                code = self.worker.stop()
                assert code == 0, self.worker.log_tail()
                print(
                    f"\nspeed model example {SpeedWorkerModel.examples}: {' '.join(self.steps)}; "
                    f"{self.load.queries} queries under load "
                    f"({self.load.expected_errors} stale or unavailable), "
                    f"{len(self.stream.log)} messages, "
                    f"{self.worker.discarded} micro-batches discarded after resets"
                )
        finally:
            if self.worker.proc is not None and self.worker.proc.poll() is None:
                self.worker.kill9(count=False)
            self.stream.close()


@pytest.mark.slow
def test_speed_worker_model_through_a_fixed_story(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """Every kind of step at least once, in an order known to be hard: a crash with a
    backlog, a demotion while a burst is consumed, a run published during the re-read."""
    SpeedWorkerModel.broker = broker
    SpeedWorkerModel.base_dir = tmp_path
    SpeedWorkerModel.examples = 0
    model = SpeedWorkerModel()
    try:
        for step in (
            model.a_first_run,
            lambda: model.produce(orders=300, reviews=20, dup=0.2),
            lambda: model.crash_and_restart(produce_first=800),
            lambda: model.publish_run(cut=0.7),
            lambda: model.demote_while_a_burst_is_consumed(orders=2000),
            lambda: model.publish_run(cut=0.3),
            model.demote_newest_run,
            model.demote_newest_run,
            lambda: model.produce(orders=100, reviews=5, dup=0.05),
        ):
            step()
            print("speed model story:", model.steps[-1], "serving", model.runs[-1][0], flush=True)
            model.speed_merged_with_batch_equals_a_recompute()
            model.what_must_stay_bounded_does()
    finally:
        model.teardown()


@pytest.mark.slow
def test_speed_worker_model(broker: EmbeddedBroker, tmp_path: Path) -> None:
    SpeedWorkerModel.broker = broker
    SpeedWorkerModel.base_dir = tmp_path
    SpeedWorkerModel.examples = 0
    run_state_machine_as_test(
        SpeedWorkerModel,
        settings=settings(
            max_examples=int(os.environ.get("LAMBDALAKE_MODEL_EXAMPLES", "2")),
            stateful_step_count=int(os.environ.get("LAMBDALAKE_MODEL_STEPS", "5")),
            deadline=None,
            database=None,
            phases=(Phase.explicit, Phase.generate),  # no shrinking: every step is real
            suppress_health_check=list(HealthCheck),
        ),
    )
