"""Files per ingest commit stay bounded: a micro-batch whose events span many dates is
committed as several offset prefixes, each with at most ``ingest_max_dates_per_commit``
dates (so files), and every commit is a consistent snapshot: exactly the valid messages
below the positions it carries. Unless dates are interleaved at random, when cutting
would multiply the files: then one commit. Also: ingest quarantines a far-future order."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from batch.ingest import run_ingest
from batch.ingest_lake import MAX_FILES_FACTOR, plan_commits
from lambdalake.contract.lake import QUARANTINE, Lake
from lambdalake.contract.manifest import ingest_positions
from tests.ingest_stream import ingest_cmd, ingest_env, true_ends

# --- the plan, as a pure function ------------------------------------------------------------


def micro_batch(draw_rows: list[tuple[int, int]]) -> tuple[pa.Table, dict[int, int]]:
    """Rows (partition, date) in arrival order, offsets counted per partition with gaps
    (quarantined messages), and the batch's end positions."""
    offsets: dict[int, int] = {}
    parts, offs, dates = [], [], []
    for p, d in draw_rows:
        o = offsets.get(p, 100) + (1 if d % 3 else 2)  # every third leaves a gap
        offsets[p] = o
        parts.append(p)
        offs.append(o)
        dates.append(d)
    end = {p: o + 3 for p, o in offsets.items()} | {9: 50}  # partition 9: no valid rows
    table = pa.table(
        {
            "_partition": pa.array(parts, pa.int32()),
            "_offset": pa.array(offs, pa.int64()),
            "event_date": pa.array(dates, pa.int32()).cast(pa.date32()),
        }
    )
    return table, end


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40)), max_size=300),
    st.integers(1, 12),
)
def test_a_plan_is_a_sequence_of_offset_prefixes_with_bounded_dates(
    draw_rows: list[tuple[int, int]], max_dates: int
) -> None:
    rows, end = micro_batch(draw_rows)
    plan = plan_commits(rows, end, max_dates)
    everything = sorted(
        zip(rows["_partition"].to_pylist(), rows["_offset"].to_pylist(), strict=True)
    )
    seen: list[tuple[int, int]] = []
    previous = {p: 0 for p in end}
    for part, positions in plan:
        assert set(positions) == set(end)
        keys = list(zip(part["_partition"].to_pylist(), part["_offset"].to_pylist(), strict=True))
        for p, o in keys:
            assert previous[p] <= o < positions[p], "a commit holds its offset range only"
        # Everything below the new positions is committed by now: a prefix per partition.
        seen += keys
        assert sorted(seen) == [(p, o) for p, o in everything if o < positions[p]]
        assert all(positions[p] >= previous[p] for p in end)
        previous = positions
    assert previous == end
    assert sorted(seen) == everything
    files = [len(set(c["event_date"].to_pylist())) for c, _ in plan]
    distinct = len(set(rows["event_date"].to_pylist()))
    if len(plan) > 1:
        assert max(files) <= max_dates
        assert sum(files) <= MAX_FILES_FACTOR * distinct
    elif distinct > max_dates:  # not cut: cutting would have multiplied the files
        assert plan[0][0] is rows


def test_a_backfill_in_date_order_is_cut_into_runs_of_dates_without_extra_files() -> None:
    # 3,000 days of history, sent in time order, keyed over 4 partitions.
    rnd = random.Random(7)
    rows = sorted(
        ((rnd.randrange(4), d) for d in range(3000) for _ in range(rnd.randint(1, 6))),
        key=lambda r: r[1],
    )
    table, end = micro_batch(rows)
    plan = plan_commits(table, end, 256)
    files = [len(set(c["event_date"].to_pylist())) for c, _ in plan]
    assert max(files) <= 256
    assert len(plan) == 12  # ceil(3000 / 256)
    assert sum(files) == 3000  # one file per date, as one commit would have written


def test_dates_interleaved_at_random_are_one_commit_not_a_multiple_of_the_files() -> None:
    rnd = random.Random(3)
    table, end = micro_batch([(rnd.randrange(4), rnd.randrange(3000)) for _ in range(20_000)])
    [(rows, positions)] = plan_commits(table, end, 256)
    assert rows is table and positions == end


def test_few_dates_are_one_commit_of_the_rows_as_given() -> None:
    table, end = micro_batch([(0, 1), (1, 2), (0, 1)])
    [(rows, positions)] = plan_commits(table, end, 2)
    assert rows is table
    assert positions == end


# --- ingest against a real broker ------------------------------------------------------------

START = date(2019, 1, 1)


def produce(bootstrap: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    for i, value in enumerate(values):
        producer.send("orders", key=f"sku-{i % 13}".encode(), value=value)
    producer.flush()
    producer.close()


def order(i: int, when: datetime | str) -> bytes:
    event_time = when if isinstance(when, str) else when.isoformat()
    return json.dumps(
        {
            "event_id": f"o-{i}",
            "event_time": event_time,
            "store_id": "S001",
            "sku": f"SKU-{i % 13:05d}",
            "quantity": 1,
            "unit_price": 2.5,
        }
    ).encode()


def day(n: int) -> datetime:
    return datetime.combine(START + timedelta(days=n), datetime.min.time(), UTC)


def commit_files(uri: str, version: int) -> tuple[int, int]:
    """(files added, distinct event dates among them) by one commit of a local table."""
    log = Path(uri) / "_delta_log" / f"{version:020d}.json"
    adds = [json.loads(line)["add"] for line in log.read_text().splitlines() if '"add"' in line]
    return len(adds), len({a["partitionValues"]["event_date"] for a in adds})


def test_ingest_bounds_files_per_commit_and_every_commit_is_a_prefix(
    fresh_broker, settings_for
) -> None:
    rnd = random.Random(11)
    # A backfill of 600 days in time order, with a late event (any of 20 days) in 40.
    values = [
        order(i, day(rnd.randrange(20)) if i % 40 == 39 else day(100 + i // 2)) for i in range(1300)
    ]
    values += [b"not json", order(2000, "2099-12-31T00:00:00Z")]
    produce(fresh_broker.bootstrap, values)
    settings = settings_for(
        fresh_broker,
        ingest_batch_size=10_000,
        ingest_batch_seconds=30,
        ingest_max_dates_per_commit=50,
    )
    summary = run_ingest(settings, until_end=True, stop=threading.Event())
    assert summary["orders"] == {"written": 1300, "quarantined": 2}

    lake = Lake(settings.lake_uri)
    uri = lake.master("orders")
    final = DeltaTable(uri)
    rows = final.to_pyarrow_table(columns=["_partition", "_offset"]).to_pylist()
    valid = Counter((r["_partition"], r["_offset"]) for r in rows)
    assert max(valid.values()) == 1
    assert ingest_positions(uri, "orders") == true_ends(fresh_broker.bootstrap)["orders"]

    commits = 0
    for version in range(1, final.version() + 1):
        files, dates = commit_files(uri, version)
        assert files == dates <= 50, f"version {version}: {files} files, {dates} dates"
        commits += 1
        # The snapshot at this version holds exactly the valid offsets below its positions.
        positions = ingest_positions(uri, "orders", version=version)
        at = DeltaTable(uri, version=version).to_pyarrow_table(columns=["_partition", "_offset"])
        held = sorted(zip(at["_partition"].to_pylist(), at["_offset"].to_pylist(), strict=True))
        assert held == sorted(k for k in valid if k[1] < positions.get(k[0], 0)), version
    assert commits >= 650 // 50  # 650 dates: cut into many commits, not one

    quarantined = DeltaTable(lake.table(QUARANTINE)).to_pyarrow_table().to_pylist()
    assert sorted(q["reason"] for q in quarantined) == ["bad_json", "out_of_range:event_time"]


def test_ingest_killed_between_the_commits_of_one_batch_resumes_exactly_once(
    fresh_broker, tmp_path: Path
) -> None:
    values = [order(i, day(i // 10)) for i in range(3000)]  # 300 days in time order
    produce(fresh_broker.bootstrap, values)
    lake = Lake(str(tmp_path / "lake"))
    uri = lake.master("orders")
    env = ingest_env(
        LAMBDALAKE_INGEST_MAX_DATES_PER_COMMIT="5",
        LAMBDALAKE_INGEST_BATCH_SIZE="100000",
        LAMBDALAKE_INGEST_BATCH_SECONDS="60",
    )
    log = tmp_path / "ingest.log"
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            ingest_cmd(fresh_broker.bootstrap, lake.root, "--until-end"),
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
        try:
            # Kill it once some, not all, commits of its one micro-batch are in.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if DeltaTable.is_deltatable(uri) and DeltaTable(uri).version() >= 3:
                    break
                time.sleep(0.02)
            proc.kill()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    partial = DeltaTable(uri)
    ends = true_ends(fresh_broker.bootstrap)["orders"]
    assert ingest_positions(uri, "orders", version=partial.version()) != ends, (
        "ingest finished before it was killed: nothing was tested"
    )
    assert partial.to_pyarrow_table(columns=["_offset"]).num_rows > 0

    run_until_end_env(fresh_broker.bootstrap, lake.root, log, env)
    rows = DeltaTable(uri).to_pyarrow_table(columns=["_partition", "_offset", "event_id"])
    keys = Counter(zip(rows["_partition"].to_pylist(), rows["_offset"].to_pylist(), strict=True))
    assert len(keys) == 3000 and max(keys.values()) == 1
    assert sorted(rows["event_id"].to_pylist()) == sorted(f"o-{i}" for i in range(3000))
    assert ingest_positions(uri, "orders") == ends


def run_until_end_env(bootstrap: str, lake: str, log: Path, env: dict[str, str]) -> None:
    with open(log, "ab") as err:
        done = subprocess.run(
            [*ingest_cmd(bootstrap, lake), "--until-end"],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            timeout=180,
            check=False,
        )
    assert done.returncode == 0, log.read_text()[-3000:]
