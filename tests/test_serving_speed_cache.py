"""The API's speed snapshot cache against a real Flight server on a real speed state.

What the event-loop handlers rely on: with ``block=False`` a question is answered from a
snapshot or refused with ``WouldBlock`` (never a round trip); an expired snapshot keeps
answering for the grace period while one background fetch replaces it; past the grace it is
never answered from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lambdalake.contract.speed_protocol import SpeedError, SpeedQuery
from lambdalake.contract.validation import validate
from lambdalake.contract.views import SALES
from lambdalake.settings import Settings
from serving.speed_client import SpeedClient, SpeedFilter, SpeedResult, WouldBlock
from speed.server import SpeedFlightServer
from speed.state import BatchInput, SpeedState

TTL = 0.5
GRACE = 1.0
WATERMARK = {"orders": {0: 0}}


class Worker:
    def __init__(self, root: Path) -> None:
        self.state = SpeedState(root / "w.duckdb", (0, 1))
        self.state.register_partitions([("orders", 0), ("reviews", 0)])
        self.end = 0
        self.server = SpeedFlightServer(self.state, lambda: {"worker": "0/1", "ok": True}).start()

    def consume(self, n: int, quantity: int) -> None:
        """``n`` more orders of ``quantity`` units, committed like a micro-batch."""
        offsets = list(range(self.end, self.end + n))
        values = [
            json.dumps(
                {
                    "event_id": f"e{o}",
                    "event_time": "2026-11-23T10:00:00Z",
                    "store_id": "s1",
                    "sku": "a",
                    "quantity": quantity,
                    "unit_price": 1.0,
                }
            ).encode()
            for o in offsets
        ]
        v = validate("orders", values, [0] * n, offsets)
        self.end += n
        self.state.commit_batch(
            BatchInput(valid={"orders": v.valid}, ends={("orders", 0): self.end})
        )

    def close(self) -> None:
        self.server.stop()
        self.state.close()


@pytest.fixture()
def worker(tmp_path: Path):
    w = Worker(tmp_path)
    try:
        yield w
    finally:
        w.close()


def units(result: SpeedResult) -> int:
    return sum(int(r["units"] or 0) for r in result.rows)


def test_snapshots_answer_without_blocking_and_refresh_in_the_background(
    worker: Worker, tmp_path: Path
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        lake_uri=str(tmp_path / "lake"),
        home=tmp_path / "home",
        speed_endpoints=worker.server.endpoint,
    )
    client = SpeedClient(settings, cache_ttl=TTL, stale_grace=GRACE)
    flt = SpeedFilter(granularity="day")
    try:
        worker.consume(3, quantity=2)
        with pytest.raises(WouldBlock):  # nothing cached: it would need a round trip
            client.query(SALES, flt, WATERMARK, block=False)
        asked = time.monotonic()  # the snapshot's age counts from no earlier than this
        first = client.query(SALES, flt, WATERMARK)
        answered = time.monotonic()
        assert units(first) == 6 and first.offsets == {"orders": {0: 3}}

        worker.consume(2, quantity=5)
        cached = client.query(SALES, flt, WATERMARK, block=False)
        assert (units(cached), cached.offsets) == (6, first.offsets)  # within the TTL

        time.sleep(max(0.0, answered + TTL + 0.05 - time.monotonic()))
        stale = client.query(SALES, flt, WATERMARK, block=False)
        # Past the TTL, within the grace: the previous snapshot answers (and says what it
        # covers) while one background fetch replaces it.
        assert time.monotonic() - asked < TTL + GRACE, "too slow a machine for this check"
        assert (units(stale), stale.offsets) == (6, first.offsets)
        deadline = time.monotonic() + 5
        fresh = stale
        while fresh.offsets == first.offsets:
            assert time.monotonic() < deadline, "the background refresh never landed"
            time.sleep(0.01)
            fresh = client.query(SALES, flt, WATERMARK, block=False)
        assert units(fresh) == 16 and fresh.offsets == {"orders": {0: 5}}
        assert not fresh.degraded

        time.sleep(TTL + GRACE + 0.1)  # idle: the snapshot is now too old to answer from
        with pytest.raises(WouldBlock):
            client.query(SALES, flt, WATERMARK, block=False)
        assert units(client.query(SALES, flt, WATERMARK)) == 16
    finally:
        client.close()


def test_a_failed_refresh_makes_answers_degraded_not_stale(worker: Worker, tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        lake_uri=str(tmp_path / "lake"),
        home=tmp_path / "home",
        speed_endpoints=worker.server.endpoint,
    )
    client = SpeedClient(settings, cache_ttl=TTL, stale_grace=GRACE, timeout=1.0)
    flt = SpeedFilter(granularity="day")
    try:
        worker.consume(3, quantity=2)
        assert units(client.query(SALES, flt, WATERMARK)) == 6
        worker.server.stop()  # the worker goes away
        time.sleep(TTL + GRACE + 0.1)
        answer = client.query(SALES, flt, WATERMARK)
        assert answer.degraded and answer.missing == {"orders": [0]} and answer.rows == []
    finally:
        client.close()


def test_a_bad_request_does_not_mark_the_worker_down_for_other_questions(
    worker: Worker, tmp_path: Path
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        lake_uri=str(tmp_path / "lake"),
        home=tmp_path / "home",
        speed_endpoints=worker.server.endpoint,
    )
    client = SpeedClient(settings, cache_ttl=0, retry_after=30.0)  # per request
    flt = SpeedFilter(granularity="day")
    try:
        worker.consume(3, quantity=2)
        bad = SpeedQuery(view="sales", start="not a date", min_offsets=WATERMARK)
        refused = client._ask(worker.server.endpoint, bad)
        assert isinstance(refused, SpeedError) and refused.kind == "bad_request", refused
        # Another client's question right after: the worker is up, so it is answered.
        answer = client.query(SALES, flt, WATERMARK)
        assert not answer.degraded and units(answer) == 6
        worker.server.stop()  # a transport failure does mark it down
        assert client.query(SALES, flt, WATERMARK).degraded
    finally:
        client.close()


def test_a_worker_back_on_another_address_leaves_nothing_of_the_old_one(
    worker: Worker, tmp_path: Path
) -> None:
    """A worker restarted on another port (or pod) rewrites its status file with its new
    endpoint. The API asks the new one, and keeps neither the old one's snapshot nor its
    Flight channel: each restart used to leave both behind in every API process."""
    home = tmp_path / "home"
    status = home / "speed" / "status" / "worker-0-of-1.json"
    status.parent.mkdir(parents=True)

    def announce(endpoint: str) -> None:
        offsets = {"orders": {"0": worker.end}}
        status.write_text(json.dumps({"query_endpoint": endpoint, "offsets": offsets}))

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        lake_uri=str(tmp_path / "lake"),
        home=home,
    )
    client = SpeedClient(settings, cache_ttl=60.0, status_ttl=0.05)
    flt = SpeedFilter(granularity="day")
    try:
        worker.consume(3, quantity=2)
        old = worker.server.endpoint
        announce(old)
        assert units(client.query(SALES, flt, WATERMARK)) == 6
        assert set(client._clients) == {old} and {k[0] for k in client._snapshots} == {old}

        worker.server.stop()  # back on another port, same state
        worker.server = SpeedFlightServer(
            worker.state, lambda: {"worker": "0/1", "ok": True}
        ).start()
        new = worker.server.endpoint
        assert new != old
        worker.consume(2, quantity=5)
        announce(new)
        time.sleep(0.1)  # past status_ttl: the file is read again

        answer = client.query(SALES, flt, WATERMARK)
        assert units(answer) == 16 and not answer.degraded
        assert set(client._clients) == {new}
        assert {k[0] for k in client._snapshots} == {new}
        assert all(k[0] == new for k in client._snapshot_locks)
    finally:
        client.close()
