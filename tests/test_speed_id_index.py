"""The in-memory hash indexes of the ids a micro-batch deduplicates against.

A micro-batch skips its join with ``known_*`` / ``held_*`` when none of its ids' hashes
is in the table's index, so the index must hold exactly the hashes of the table's ids
after every change, or a duplicate would be counted. Checked here on the class alone
(hashes made to collide) and on a real state through every way the tables change.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from speed.id_index import IdHashIndex, hashes_of
from speed.state import SpeedState
from tests.test_speed_state import NOW, batch, order, run_apply

SMALL = st.integers(min_value=0, max_value=12)  # few values: many equal hashes


@given(st.lists(SMALL), st.lists(SMALL), st.lists(SMALL))
def test_the_index_is_the_multiset_of_what_was_added_less_what_was_removed(
    first: list[int], more: list[int], gone: list[int]
) -> None:
    index = IdHashIndex("t", "id")
    index.add(np.array(first, dtype=np.uint64))
    index.add(np.array(more, dtype=np.uint64))
    held = Counter(first) + Counter(more)
    before = index.hashes.copy()
    removable = not (Counter(gone) - held)
    assert index.remove(np.array(gone, dtype=np.uint64)) is removable
    if removable:
        held -= Counter(gone)
    else:  # refused whole: nothing removed
        assert np.array_equal(index.hashes, before)
    assert Counter(index.hashes.tolist()) == held
    assert list(index.hashes) == sorted(index.hashes)
    probe = np.arange(14, dtype=np.uint64)
    assert index.maybe(probe).tolist() == [held[v] > 0 for v in range(14)]


def assert_indexes_follow(state: SpeedState) -> None:
    for index in [*state._known_index.values(), *state._held_index.values()]:
        table = hashes_of(state.con, f"SELECT hash({index.column}) AS h FROM {index.table}")
        assert Counter(index.hashes.tolist()) == Counter(table.tolist()), index.table


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), st.lists(st.tuples(st.integers(0, 1), st.integers(0, 15)))),
        st.tuples(st.just("fail"), st.lists(st.integers(0, 15), min_size=1)),
        st.tuples(st.just("run"), st.lists(st.integers(0, 15)), st.booleans(), st.booleans()),
        st.tuples(st.just("expire"), st.sampled_from([1, 24, 49])),
        st.tuples(st.just("reopen")),
    ),
    max_size=12,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
@example(ops=[("run", [1, 2], False, False), ("expire", 49)])  # ids the run counted expire
@example(ops=[("commit", [(0, 1), (1, 2)]), ("run", [], False, False), ("expire", 49)])
@example(ops=[("commit", [(1, 3)]), ("commit", [(0, 3)]), ("reopen",)])  # a held id replaced
def test_the_indexes_hold_the_hashes_of_their_tables_after_every_change(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple]
) -> None:
    path = Path(tmp_path_factory.mktemp("ids")) / "w.duckdb"
    state = SpeedState(path, (0, 1))
    state.register_partitions([("orders", 0), ("orders", 1)])
    next_offset = {0: 0, 1: 0}
    hours = 0
    try:
        for op in ops:
            if op[0] == "commit":  # ids from a small pool: duplicates of held and known ids
                rows = []
                for partition, i in op[1]:
                    rows.append((partition, next_offset[partition], order(i)))
                    next_offset[partition] += 1
                if rows:
                    state.commit_batch(batch("orders", rows))
            elif op[0] == "fail":  # rolled back after its events were added
                rows = [(0, next_offset[0] + k, order(i)) for k, i in enumerate(op[1])]
                bad = batch("orders", rows)
                bad.invalid = {("orders", None): 1}  # type: ignore[dict-item]
                with pytest.raises(Exception):  # noqa: B017 - any failure must roll back
                    state.commit_batch(bad)
            elif op[0] == "run":  # prunes below the positions, counts ids, maybe resets
                _, ids, reset, replace = op  # replace: the run's ids are all it counted
                wm = {"orders": {p: (0 if reset else o) for p, o in next_offset.items()}}
                state.apply_run(
                    dataclasses.replace(
                        run_apply(f"r{hours}", wm, ids={"orders": [f"o-{i}" for i in ids]}),
                        reset=reset,
                        replace_known=replace,
                    ),
                    48,
                    now=NOW + timedelta(hours=hours),
                )
                if reset:
                    next_offset = {0: 0, 1: 0}
            elif op[0] == "expire":
                hours += op[1]
                state.expire_known(48, now=NOW + timedelta(hours=hours))
            else:
                state.con.close()
                state = SpeedState(path, (0, 1))
            assert_indexes_follow(state)
        # And what the indexes decide is right: an id held or known is not counted again.
        held_or_known = {
            r[0]
            for t in ("held_orders", "known_orders")
            for r in state.con.execute(
                f"SELECT {'event_id' if t == 'held_orders' else 'id'} FROM {t}"
            ).fetchall()
        }
        if held_or_known:
            rows = [(0, next_offset[0] + k, order(int(i[2:]))) for k, i in enumerate(held_or_known)]
            result = state.commit_batch(batch("orders", rows))
            assert result.held == {"orders": 0} and result.duplicates == {"orders": len(rows)}
    finally:
        state.close()
