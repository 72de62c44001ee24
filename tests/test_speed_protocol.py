"""The speed query protocol over a real Flight server on a real state (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lambdalake.broker import free_port
from lambdalake.contracts import validate
from lambdalake.speed_protocol import (
    SpeedError,
    SpeedQuery,
    StaleWatermark,
    answer_schema,
    connect,
    query_speed,
    speed_status,
)
from speed.server import SpeedFlightServer
from speed.state import BatchInput, RunApply, SpeedState


@pytest.fixture()
def served(tmp_path: Path):
    state = SpeedState(tmp_path / "w.duckdb", (1, 2))
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
    server = SpeedFlightServer(state, lambda: {"worker": "1/2", "ok": True}).start()
    try:
        yield server.endpoint
    finally:
        server.stop()
        state.close()


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
