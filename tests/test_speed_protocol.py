"""The speed query protocol over a real Flight server on a real state (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lambdalake.contract.speed_protocol import (
    SpeedBadRequest,
    SpeedError,
    SpeedQuery,
    SpeedUnauthenticated,
    SpeedUnavailable,
    SpeedWorkerFailed,
    StaleWatermark,
    answer_schema,
    connect,
    query_speed,
    speed_status,
)
from lambdalake.contract.validation import validate
from lambdalake.ops.broker import free_port
from speed.server import SpeedFlightServer
from speed.state import BatchInput, RunApply, SpeedState


def filled_state(path: Path) -> SpeedState:
    """A worker 1/2 state: six orders on partition 1, run-7 applied at offset 2."""
    state = SpeedState(path, (1, 2))
    state.register_partitions([("orders", 1), ("orders", 3), ("reviews", 1), ("reviews", 3)])
    values = [
        json.dumps(
            {
                "event_id": f"e{o}",
                "event_time": f"2026-11-2{o % 3}T10:00:00Z",
                "store_id": "s1",
                "sku": "a",
                "quantity": 2,
                "unit_price": 1.5,
            }
        ).encode()
        for o in range(6)
    ]
    v = validate("orders", values, [1] * 6, list(range(6)))
    state.commit_batch(BatchInput(valid={"orders": v.valid}, ends={("orders", 1): 6}))
    state.apply_run(
        RunApply("run-7", {"orders": {1: 2}}, {}, None, {}, replace_known=True), dedup_hours=48
    )
    return state


@pytest.fixture()
def served_state(tmp_path: Path):
    state = filled_state(tmp_path / "w.duckdb")
    server = SpeedFlightServer(state, lambda: {"worker": "1/2", "ok": True}).start()
    try:
        yield server.endpoint, state
    finally:
        server.stop()
        state.close()


@pytest.fixture()
def served(served_state) -> str:
    return served_state[0]


def test_an_answer_says_what_it_covers_and_has_the_contract_schema(served: str) -> None:
    q = SpeedQuery(view="sales", granularity="day", min_offsets={"orders": {1: 2}})
    answer = query_speed(served, q, timeout=5)
    assert answer.table.schema == answer_schema("sales", "day")
    assert sum(answer.table["order_lines"].to_pylist()) == 4
    assert answer.offsets == {"orders": {1: 6, 3: 0}}
    assert answer.partitions == {"orders": [1, 3], "reviews": [1, 3]}
    assert answer.run_id == "run-7" and answer.meta.worker == "1/2"


def test_a_caller_at_an_older_run_gets_stale_watermark(served: str) -> None:
    with pytest.raises(StaleWatermark) as err:
        query_speed(served, SpeedQuery(view="sales"), timeout=5)
    assert err.value.run_id == "run-7" and err.value.watermark == {"orders": {1: 2}}
    assert "stale watermark" in str(err.value)


def test_a_reused_client_answers_many_queries_and_the_status_action(served: str) -> None:
    client = connect(served)
    try:
        for low in (2, 3, 4):
            q = SpeedQuery(view="sales", granularity="hour", min_offsets={"orders": {1: low}})
            answer = query_speed(served, q, timeout=5, client=client)
            assert sum(answer.table["order_lines"].to_pylist()) == 6 - low
        assert speed_status(served, client=client) == {"worker": "1/2", "ok": True}
    finally:
        client.close()


def test_bad_requests_and_unreachable_workers_are_clear_errors(served: str) -> None:
    q = SpeedQuery(view="sales", start="not-a-date", min_offsets={"orders": {1: 2}})
    with pytest.raises(SpeedError, match="not an ISO date"):
        query_speed(served, q, timeout=5)
    with pytest.raises(SpeedError, match=r"did not answer|unreachable"):
        query_speed(f"grpc://127.0.0.1:{free_port()}", q, timeout=1)
    with pytest.raises(ValueError, match="unknown view"):
        SpeedQuery(view="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad speed query"):
        SpeedQuery.from_json(b"{}")


WM = {"orders": {1: 2}}


def test_error_kinds_tell_a_bad_request_from_a_worker_that_is_down(served: str) -> None:
    bad = SpeedQuery(view="sales", end="2026-13-45", min_offsets=WM)
    with pytest.raises(SpeedBadRequest, match="not an ISO date") as err:
        query_speed(served, bad, timeout=5)
    assert err.value.kind == "bad_request" and not err.value.worker_down
    # The worker is fine: the next good query answers.
    assert query_speed(served, SpeedQuery(view="sales", min_offsets=WM), timeout=5).table
    with pytest.raises(SpeedUnavailable) as down:
        query_speed(f"grpc://127.0.0.1:{free_port()}", bad, timeout=1)
    assert down.value.kind == "unavailable" and down.value.worker_down
    with pytest.raises(StaleWatermark) as stale:
        query_speed(served, SpeedQuery(view="sales"), timeout=5)
    assert stale.value.kind == "stale_watermark" and not stale.value.worker_down


def test_the_ends_of_the_calendar_are_answered_not_a_crash(served: str) -> None:
    for start, end, granularity in [
        (None, "9999-12-31", "day"),
        ("0001-01-01", "9999-12-31", "hour"),
        ("0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "hour"),
    ]:
        q = SpeedQuery(view="sales", granularity=granularity, start=start, end=end, min_offsets=WM)
        assert sum(query_speed(served, q, timeout=5).table["order_lines"].to_pylist()) == 4


def test_a_worker_failure_says_so_with_an_id_and_never_its_exception_text(served_state) -> None:
    endpoint, state = served_state
    state.con.execute("DROP TABLE partials_sales")  # the worker's state is broken now
    with pytest.raises(SpeedWorkerFailed, match=r"error id [0-9a-f]{12}") as err:
        query_speed(endpoint, SpeedQuery(view="sales", min_offsets=WM), timeout=5)
    assert err.value.kind == "worker_failed" and not err.value.worker_down
    assert "partials_sales" not in str(err.value) and "Catalog" not in str(err.value)
    assert "\n" not in str(err.value)


def test_a_shared_secret_is_required_when_the_worker_has_one(tmp_path: Path) -> None:
    state = filled_state(tmp_path / "w.duckdb")
    server = SpeedFlightServer(state, lambda: {"ok": True}, token="s3cret-token").start()
    q = SpeedQuery(view="sales", min_offsets=WM)
    try:
        for token in (None, "wrong"):
            with pytest.raises(SpeedUnauthenticated) as err:
                query_speed(server.endpoint, q, timeout=5, token=token)
            assert not err.value.worker_down
            with pytest.raises(SpeedUnauthenticated):
                speed_status(server.endpoint, timeout=5, token=token)
        answer = query_speed(server.endpoint, q, timeout=5, token="s3cret-token")
        assert sum(answer.table["order_lines"].to_pylist()) == 4
        client = connect(server.endpoint, token="s3cret-token")
        try:
            assert speed_status(server.endpoint, client=client) == {"ok": True}
        finally:
            client.close()
    finally:
        server.stop()
        state.close()
