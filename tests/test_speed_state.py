"""The speed worker's DuckDB state, without Kafka: dedup, pruning, answers, exactness.

Events go through the real validator and the real state file; expected answers
are recomputed independently in plain Python.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from lambdalake.contract.speed_protocol import SpeedQuery
from lambdalake.contract.validation import validate
from lambdalake.contract.views import SALES
from lambdalake.sentiment import lexicon_model
from speed.runs import watermark_went_back
from speed.state import BatchInput, RunApply, SpeedState, period_bounds
from speed.worker import score_table, with_scores

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def order(i: int, *, sku: str = "sku-1", store: str = "s1", qty: int = 1, when: str = "") -> dict:
    return {
        "event_id": f"o-{i}",
        "event_time": when or "2026-11-23T10:15:00Z",
        "store_id": store,
        "sku": sku,
        "quantity": qty,
        "unit_price": 2.5,
    }


def batch(topic: str, rows: list[tuple[int, int, dict | bytes]], model=None) -> BatchInput:
    """A micro-batch from ``(partition, offset, event)`` rows, validated for real."""
    values = [r if isinstance(r, bytes) else json.dumps(r).encode() for _, _, r in rows]
    v = validate(topic, values, [p for p, _, _ in rows], [o for _, o, _ in rows])
    valid = v.valid
    if topic == "reviews" and valid.num_rows:
        valid = with_scores(model or lexicon_model(), valid)
    ends: dict[tuple[str, int], int] = {}
    for p, o, _ in rows:
        ends[(topic, p)] = max(ends.get((topic, p), 0), o + 1)
    invalid: dict[tuple[str, str], int] = defaultdict(int)
    for reason in v.rejected["reason"].to_pylist():
        invalid[(topic, reason)] += 1
    return BatchInput(valid={topic: valid}, ends=ends, invalid=dict(invalid))


def sales(state: SpeedState, **kw) -> dict[tuple, tuple[int, float, int]]:
    """Sales rows keyed by (period, store, sku), asked at the state's own watermark."""
    kw.setdefault("min_offsets", state.applied.watermark)
    table, _ = state.query(SpeedQuery(view="sales", **kw))
    return {
        (str(r["period"]), r["store_id"], r["sku"]): (r["units"], r["revenue"], r["order_lines"])
        for r in table.to_pylist()
    }


def total_units(state: SpeedState, **kw) -> int:
    return sum(v[0] for v in sales(state, **kw).values())


@pytest.fixture()
def state(tmp_path: Path):
    s = SpeedState(tmp_path / "worker-0-of-1.duckdb", (0, 1))
    s.register_partitions([("orders", 0), ("orders", 1), ("reviews", 0), ("reviews", 1)])
    try:
        yield s
    finally:
        s.close()


def run_apply(run_id: str, wm: dict, ids: dict | None = None, **kw) -> RunApply:
    known = {
        t: pa.table(
            {
                "id": pa.array(list(v), pa.string()),
                "seen_at": pa.array([NOW] * len(v), pa.timestamp("us", tz="UTC")),
            }
        )
        for t, v in (ids or {}).items()
    }
    return RunApply(
        run_id=run_id,
        watermark=wm,
        master_versions={},
        model_version=None,
        known_ids=known,
        replace_known=True,
        **kw,
    )


def test_duplicates_within_a_batch_and_against_held_events_count_once(state: SpeedState) -> None:
    e1, e2 = order(1, qty=3), order(2, qty=5)
    state.commit_batch(batch("orders", [(0, 0, e1), (0, 1, e1), (0, 2, e2)]))
    result = state.commit_batch(batch("orders", [(0, 3, e2), (0, 4, order(3, qty=7))]))
    assert result.held == {"orders": 1} and result.duplicates == {"orders": 1}
    assert total_units(state) == 3 + 5 + 7
    assert state.positions[("orders", 0)] == 5


def test_lowest_offset_wins_across_partitions(state: SpeedState) -> None:
    # The same id arrives on partition 1 at offset 9, then on partition 0 at offset 2 with
    # different content: the lower offset replaces the held one.
    state.commit_batch(batch("orders", [(1, 9, order(1, qty=4, store="s9"))]))
    state.commit_batch(batch("orders", [(0, 2, order(1, qty=6, store="s1"))]))
    rows = sales(state)
    assert {k[1]: v[0] for k, v in rows.items()} == {"s1": 6}
    assert state.counts()["events"]["orders"] == 1


def test_late_events_count_in_their_own_day_and_hour(state: SpeedState) -> None:
    late = order(1, qty=2, when="2026-10-01T23:59:59.999+00:00")
    state.commit_batch(batch("orders", [(0, 0, late), (0, 1, order(2, qty=1))]))
    by_day = sales(state, granularity="day")
    assert {k[0]: v[0] for k, v in by_day.items()} == {"2026-10-01": 2, "2026-11-23": 1}
    by_hour = sales(state, granularity="hour", start="2026-10-01", end="2026-10-01")
    assert list(by_hour) == [("2026-10-01 23:00:00+00:00", "s1", "sku-1")]


def test_invalid_events_are_skipped_and_counted_by_reason(state: SpeedState) -> None:
    bad = [(0, 0, b"not json"), (0, 1, {**order(1), "quantity": 0}), (0, 2, order(2))]
    state.commit_batch(batch("orders", bad))
    assert total_units(state) == 1
    assert state.counts()["invalid"] == {"orders": {"bad_json": 1, "out_of_range:quantity": 1}}
    # Invalid messages are consumed: the position moves past them.
    assert state.positions[("orders", 0)] == 3


def test_pruning_at_a_watermark_is_exact_by_offset_and_keeps_ids(state: SpeedState) -> None:
    rows = [(0, o, order(o, qty=o + 1)) for o in range(10)] + [
        (1, o, order(100 + o, qty=1)) for o in range(4)
    ]
    state.commit_batch(batch("orders", rows))
    state.apply_run(run_apply("r1", {"orders": {0: 6, 1: 0}}), dedup_hours=48, now=NOW)
    assert total_units(state) == sum(o + 1 for o in range(6, 10)) + 4
    assert state.counts()["events"]["orders"] == 4 + 4
    # A redelivery of an event pruned at the watermark is still a duplicate.
    state.commit_batch(batch("orders", [(0, 10, order(2, qty=3)), (0, 11, order(11, qty=5))]))
    assert total_units(state) == sum(o + 1 for o in range(6, 10)) + 4 + 5


def test_ids_the_batch_run_counted_are_duplicates_even_from_another_partition(
    state: SpeedState,
) -> None:
    state.commit_batch(batch("orders", [(1, 0, order(7, qty=2)), (1, 1, order(8, qty=3))]))
    # The run counted o-7 (on partition 0, below its watermark): partition 1's copy goes.
    state.apply_run(run_apply("r1", {"orders": {0: 5}}, ids={"orders": ["o-7"]}), 48, now=NOW)
    assert total_units(state) == 3
    state.commit_batch(batch("orders", [(1, 2, order(7, qty=2))]))
    assert total_units(state) == 3


def test_known_ids_expire_after_the_horizon(state: SpeedState) -> None:
    state.apply_run(run_apply("r1", {}, ids={"orders": ["o-1"]}), 48, now=NOW)
    state.expire_known(48, now=NOW + timedelta(hours=47))
    state.commit_batch(batch("orders", [(0, 0, order(1))]))
    assert total_units(state) == 0
    state.expire_known(48, now=NOW + timedelta(hours=49))
    state.commit_batch(batch("orders", [(0, 1, order(1))]))
    assert total_units(state) == 1


def test_answers_refuse_a_stale_watermark_and_filter_exactly_when_the_worker_is_behind(
    state: SpeedState,
) -> None:
    state.commit_batch(batch("orders", [(0, o, order(o, qty=1)) for o in range(10)]))
    state.apply_run(run_apply("r1", {"orders": {0: 4}}), 48, now=NOW)
    # The caller merges with an older run (watermark 2 < 4): the worker cannot answer.
    with pytest.raises(flight.FlightServerError, match="stale watermark"):
        state.query(SpeedQuery(view="sales", min_offsets={"orders": {0: 2}}))
    # The caller merges with a newer run (watermark 7): held events are filtered by offset.
    table, meta = state.query(SpeedQuery(view="sales", min_offsets={"orders": {0: 7}}))
    assert sum(table["units"].to_pylist()) == 3 and meta.exact_filter
    assert meta.offsets == {"orders": {0: 10, 1: 0}} and meta.run_id == "r1"
    table, meta = state.query(SpeedQuery(view="sales", min_offsets={"orders": {0: 4}}))
    assert sum(table["units"].to_pylist()) == 6 and not meta.exact_filter


def test_filters_by_sku_store_and_inclusive_period_bounds(state: SpeedState) -> None:
    rows = [
        (0, 0, order(0, sku="a", store="s1", when="2026-11-20T00:00:00Z")),
        (0, 1, order(1, sku="a", store="s2", when="2026-11-21T13:30:00Z")),
        (0, 2, order(2, sku="b", store="s1", when="2026-11-22T23:10:00Z")),
        (0, 3, order(3, sku="a", store="s1", when="2026-11-23T00:00:00Z")),
    ]
    state.commit_batch(batch("orders", rows))
    assert total_units(state, skus=["a"]) == 3
    assert total_units(state, stores=["s1"]) == 3
    assert total_units(state, start="2026-11-21", end="2026-11-22") == 2
    assert total_units(state, granularity="hour", start="2026-11-21T13:59:00Z") == 3
    assert total_units(state, granularity="hour", end="2026-11-22T23:00:00Z") == 3


def test_period_bounds_are_inclusive_periods() -> None:
    lo, hi = period_bounds("day", "2026-01-02", "2026-01-03")
    assert (lo, hi) == (datetime(2026, 1, 2, tzinfo=UTC), datetime(2026, 1, 4, tzinfo=UTC))
    lo, hi = period_bounds("hour", "2026-01-02T05:30:00+02:00", "2026-01-02T07:00:00Z")
    assert (lo, hi) == (datetime(2026, 1, 2, 3, tzinfo=UTC), datetime(2026, 1, 2, 8, tzinfo=UTC))
    lo, hi = period_bounds("week", "2026-10-14", "2026-10-14T23:00:00Z")
    assert (lo, hi) == (datetime(2026, 10, 12, tzinfo=UTC), datetime(2026, 10, 19, tzinfo=UTC))
    lo, hi = period_bounds("month", "2026-10-15", "2026-12-03")
    assert (lo, hi) == (datetime(2026, 10, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds("month", None, "9999-12-31") == (None, None)
    with pytest.raises(ValueError, match="not an ISO date"):
        period_bounds("day", "yesterday", None)


def test_sentiment_is_rescored_with_a_new_model_when_a_run_publishes_it(state: SpeedState) -> None:
    reviews = [
        (
            0,
            o,
            {
                "review_id": f"r{o}",
                "event_time": "2026-11-23T10:00:00Z",
                "sku": "a",
                "rating": 5,
                "text": "great, I love it",
            },
        )
        for o in range(3)
    ]
    state.commit_batch(batch("reviews", reviews))
    table, _ = state.query(SpeedQuery(view="sentiment"))
    before = table.to_pylist()[0]
    assert before["reviews"] == 3 and before["positive"] == 3

    class Grumpy:  # a different model version: everything is negative
        def score(self, texts, titles):
            import numpy as np

            return np.full(len(texts), -0.5), np.array(["negative"] * len(texts), dtype=object)

    scores = score_table(Grumpy(), state.held_reviews_from({"reviews": {0: 1}}))
    state.apply_run(run_apply("r2", {"reviews": {0: 1}}, scores=scores), 48, now=NOW)
    q = SpeedQuery(view="sentiment", min_offsets={"reviews": {0: 1}})
    after = state.query(q)[0].to_pylist()[0]
    assert after["reviews"] == 2 and after["negative"] == 2 and after["sentiment_sum"] == -1.0


def test_compaction_of_partials_keeps_every_answer(state: SpeedState) -> None:
    rows = [(0, o, order(o, sku=f"sku-{o % 3}", qty=o % 5 + 1)) for o in range(60)]
    for start in range(0, 60, 10):
        state.commit_batch(batch("orders", rows[start : start + 10]))
    before = sales(state, granularity="hour")
    state._compact_partials(SALES)
    assert state.con.execute("SELECT count(*) FROM partials_sales").fetchone()[0] == 3
    assert sales(state, granularity="hour") == before


def review(i: int, *, sku: str, when: datetime, rating: int) -> dict:
    return {
        "review_id": f"r{i}",
        "event_time": when.isoformat().replace("+00:00", "Z"),
        "sku": sku,
        "rating": rating,
        "text": "great, I love it" if rating > 3 else "awful, it broke",
    }


def test_one_topic_feeds_every_grain_of_its_view(tmp_path: Path) -> None:
    """Reviews feed the sentiment view's partials once (stored per ISO week): its weekly
    answers and its all-time answer both equal a recompute over the deduplicated reviews,
    whichever week boundary (Sunday 23:59 UTC, Monday 00:00) an event sits on; and a state
    file whose partials have another shape (from before weeks) is rebuilt on open."""
    path = tmp_path / "w.duckdb"
    state = SpeedState(path, (0, 1))
    start = datetime(2026, 10, 4, tzinfo=UTC)  # a Sunday (all before now: none rejected)
    rng = np.random.default_rng(5)
    rows = []
    for o in range(300):
        when = start + timedelta(minutes=int(rng.integers(0, 60 * 24 * 40)))
        if o % 50 == 0:
            when = datetime(2026, 10, 11, 23, 59, 59, tzinfo=UTC)  # the last second of a week
        rows.append((0, o, review(o, sku=f"s{o % 4}", when=when, rating=int(rng.integers(1, 6)))))
    rows += [(0, 300 + k, rows[k][2]) for k in range(20)]  # redeliveries: counted once
    for first in range(0, len(rows), 40):
        state.commit_batch(batch("reviews", rows[first : first + 40], model=lexicon_model()))

    want_weeks: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    want_all: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _, _, r in rows[:300]:
        when = datetime.fromisoformat(r["event_time"].replace("Z", "+00:00"))
        monday = (when - timedelta(days=when.weekday())).date()
        for acc in (want_weeks[(monday, r["sku"])], want_all[r["sku"]]):
            acc[0] += 1
            acc[1] += r["rating"]

    def answers(s: SpeedState) -> tuple[dict, dict]:
        weeks = s.query(SpeedQuery(view="sentiment", granularity="week"))[0].to_pylist()
        total = s.query(SpeedQuery(view="sentiment"))[0].to_pylist()
        return (
            {(r["period"], r["sku"]): [r["reviews"], r["rating_sum"]] for r in weeks},
            {r["sku"]: [r["reviews"], r["rating_sum"]] for r in total},
        )

    assert answers(state) == (dict(want_weeks), dict(want_all))
    assert all(p.weekday() == 0 for p, _ in answers(state)[0])
    # Bounds select whole weeks: a Wednesday selects its week.
    q = SpeedQuery(view="sentiment", granularity="week", start="2026-10-14", end="2026-10-14")
    one = state.query(q)[0].to_pylist()
    assert {r["period"] for r in one} == {datetime(2026, 10, 12, tzinfo=UTC).date()}
    state.con.execute("DROP TABLE partials_sentiment")
    state.con.execute("CREATE TABLE partials_sentiment (sku VARCHAR, reviews BIGINT)")
    state.close()
    reopened = SpeedState(path, (0, 1))
    assert answers(reopened) == (dict(want_weeks), dict(want_all))
    reopened.close()
    with pytest.raises(ValueError, match="no grain 'hour'"):
        SpeedQuery(view="sentiment", granularity="hour")


def test_a_crash_mid_batch_leaves_the_last_commit(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    s = SpeedState(path, (0, 1))
    s.commit_batch(batch("orders", [(0, 0, order(0, qty=2))]))
    good = batch("orders", [(0, 1, order(1, qty=3))])
    good.valid["orders"] = good.valid["orders"].drop_columns(["sku"])  # fails inside the txn
    with pytest.raises(Exception):  # noqa: B017 - any failure must roll back
        s.commit_batch(good)
    s.con.close()  # no checkpoint: like a kill
    s = SpeedState(path, (0, 1))
    try:
        assert total_units(s) == 2 and s.positions == {("orders", 0): 1}
    finally:
        s.close()


def test_a_state_file_of_another_worker_layout_is_refused(tmp_path: Path) -> None:
    SpeedState(tmp_path / "w.duckdb", (0, 1)).close()
    with pytest.raises(ValueError, match="holds the state of worker 0/1"):
        SpeedState(tmp_path / "w.duckdb", (0, 2))


def test_events_below_the_applied_watermark_or_position_are_not_new(state: SpeedState) -> None:
    state.commit_batch(batch("orders", [(0, o, order(o)) for o in range(3)]))
    state.apply_run(run_apply("r1", {"orders": {1: 8}}), 48, now=NOW)
    mask = state.keep_mask("orders", np.array([0, 0, 1, 1, 1]), np.array([2, 3, 7, 8, 9]))
    # Partition 0 resumes at its position 3; partition 1 at the watermark 8.
    assert mask.tolist() == [False, True, False, True, True]


def test_a_watermark_going_back_resets_the_state_to_reconsume_from_it(state: SpeedState) -> None:
    # A published run withdrawn (a data-quality check) makes an older run current again.
    state.commit_batch(batch("orders", [(0, o, order(o)) for o in range(10)]))
    state.apply_run(run_apply("r2", {"orders": {0: 6}}), 48, now=NOW)
    assert watermark_went_back({"orders": {0: 6}}, {"orders": {0: 3}})
    state.apply_run(run_apply("r1", {"orders": {0: 3}}, reset=True), 48, now=NOW)
    assert state.positions[("orders", 0)] == 3 and state.positions[("orders", 1)] == 0
    assert state.counts()["events"]["orders"] == 0
    # Re-consumed from the older watermark, the events count again (none is "known").
    state.commit_batch(batch("orders", [(0, o, order(o)) for o in range(3, 10)]))
    assert total_units(state) == 7


def test_read_cursors_are_pooled_not_one_per_thread(state: SpeedState) -> None:
    # The Flight server answers on threads Python sees as new: one cursor per thread
    # leaked a cursor per request.
    state.commit_batch(batch("orders", [(0, o, order(o)) for o in range(5)]))
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            for _ in range(3):
                assert total_units(state) == 5
        except BaseException as exc:
            errors.append(exc)

    for _ in range(4):
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert 1 <= state.cursor_count <= state.max_readers


def test_scratch_tables_stay_bounded_over_many_micro_batches(
    state: SpeedState, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DuckDB keeps what DELETE removes from a temporary table: scratch tables kept for the
    # connection stored every event ever consumed (~115 bytes each, without end).
    import speed.state

    monkeypatch.setattr(speed.state, "SCRATCH_ROWS_MAX", 2_000)
    per_batch, batches = 500, 40
    for b in range(batches):
        rows = [(b % 2, b * per_batch + i, order(b * per_batch + i)) for i in range(per_batch)]
        state.commit_batch(batch("orders", rows))
        stored = state.scratch_rows_stored()
        assert stored["cand_orders"] <= 2_000 + per_batch, (b, stored)
    assert total_units(state) == per_batch * batches  # answers unchanged across re-creations
    # Without the bound the scratch table would store all 20,000 events by now.
    assert per_batch * batches > 4 * (2_000 + per_batch)


def test_the_checkpoint_threshold_bounds_the_write_ahead_log_and_memory(tmp_path: Path) -> None:
    # What a worker wrote since its last checkpoint is in memory as well as in the WAL, so
    # the threshold is what bounds a long-running worker's DuckDB memory.
    path = tmp_path / "w.duckdb"
    state = SpeedState(path, (0, 1), checkpoint_threshold="1MB")
    state.register_partitions([("orders", 0)])
    wal = path.with_name(path.name + ".wal")
    per_batch, batches, largest, grown = 200, 300, 0, 0
    try:
        for b in range(batches):
            rows = [(0, b * per_batch + i, order(b * per_batch + i)) for i in range(per_batch)]
            before = wal.stat().st_size if wal.exists() else 0
            state.commit_batch(batch("orders", rows))
            after = wal.stat().st_size if wal.exists() else 0
            grown += max(0, after - before)
            largest = max(largest, after)
        assert total_units(state) == per_batch * batches
    finally:
        state.close()
    # More than three thresholds' worth went through the log, which never held two.
    assert grown > 3 * 2**20, grown
    assert largest < 2 * 2**20, largest


def test_invalid_counts_keep_one_row_per_topic_and_reason(state: SpeedState) -> None:
    for i in range(40):
        state.commit_batch(batch("orders", [(0, 2 * i, b"{bad"), (0, 2 * i + 1, order(i, qty=0))]))
    assert state.counts()["invalid"] == {"orders": {"bad_json": 40, "out_of_range:quantity": 40}}
    assert state.con.execute("SELECT count(*) FROM invalid").fetchall() == [(2,)]


def test_an_invalid_table_of_the_old_layout_is_folded_into_counts(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "w.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE invalid (topic VARCHAR, reason VARCHAR, n BIGINT)")
    con.execute("INSERT INTO invalid VALUES ('orders', 'bad_json', 2), ('orders', 'bad_json', 3)")
    con.close()
    s = SpeedState(path, (0, 1))
    try:
        s.commit_batch(batch("orders", [(0, 0, b"{bad")]))
        assert s.counts()["invalid"] == {"orders": {"bad_json": 6}}
        assert s.con.execute("SELECT count(*) FROM invalid").fetchall() == [(1,)]
    finally:
        s.close()


def test_after_a_reset_partitions_are_left_out_of_answers_until_re_read(state: SpeedState) -> None:
    state.commit_batch(batch("orders", [(0, o, order(o)) for o in range(10)]))
    state.commit_batch(batch("orders", [(1, o, order(100 + o)) for o in range(4)]))
    state.apply_run(run_apply("r2", {"orders": {0: 6, 1: 2}}), 48, now=NOW)
    state.apply_run(run_apply("r1", {"orders": {0: 3, 1: 2}}, reset=True), 48, now=NOW)

    def answer() -> tuple[int, object]:
        table, meta = state.query(SpeedQuery(view="sales", min_offsets=state.applied.watermark))
        return sum(table["units"].to_pylist()), meta

    # Partition 0 went back from 10 to 3: left out until it is at 10 again. Partition 1
    # kept its position (4 > watermark 2): nothing to re-read there, but a reset clears it.
    assert state.positions[("orders", 0)] == 3 and state.positions[("orders", 1)] == 2
    units, meta = answer()
    assert meta.rereading == {"orders": {0: 10, 1: 4}} and meta.partitions["orders"] == []
    assert units == 0 and meta.offsets == {"orders": {}}
    state.commit_batch(batch("orders", [(1, o, order(100 + o)) for o in range(2, 4)]))
    state.commit_batch(batch("orders", [(0, o, order(o)) for o in range(3, 8)]))
    units, meta = answer()
    assert meta.rereading == {"orders": {0: 10}} and meta.partitions["orders"] == [1]
    assert units == 2 and meta.offsets == {"orders": {1: 4}}
    state.commit_batch(batch("orders", [(0, o, order(o)) for o in range(8, 10)]))
    units, meta = answer()
    assert meta.rereading == {} and meta.partitions["orders"] == [0, 1] and units == 7 + 2


def test_dates_at_the_ends_of_the_calendar_clamp() -> None:
    ymin = datetime(1, 1, 1, tzinfo=UTC)
    assert period_bounds("day", "0001-01-01", "9999-12-31") == (ymin, None)
    assert period_bounds("hour", "0001-01-01T00:00:00+05:00", "9999-12-31T23:30:00-05:00") == (
        ymin,
        None,
    )
    assert period_bounds("hour", None, "9999-12-31T22:10:00Z") == (
        None,
        datetime(9999, 12, 31, 23, tzinfo=UTC),
    )


def test_queries_bounded_at_the_ends_of_the_calendar_answer(state: SpeedState) -> None:
    state.commit_batch(batch("orders", [(0, o, order(o)) for o in range(3)]))
    assert total_units(state, end="9999-12-31") == 3
    assert total_units(state, start="0001-01-01", end="9999-12-31", granularity="hour") == 3
    assert total_units(state, start="9999-12-31T23:00:00-05:00", granularity="hour") == 0
