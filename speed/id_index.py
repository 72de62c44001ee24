"""Which of a micro-batch's ids a large table of ids may hold, without reading the table.

A micro-batch deduplicates against two tables that grow with uptime: the ids the batch
already counted (``known_*``: every id ingested within the dedup horizon, ~17 M at
100 events/s over 48 hours) and the events held since the watermark (``held_*``). A join
against either reads the whole table at every micro-batch: 50-90 ms per million ids here
(``bench/speed_uptime.py known-ids``), so a worker's cost per micro-batch grew with the
horizon until it could not keep up.

:class:`IdHashIndex` keeps the sorted 64-bit hashes of one table's ids in memory (8
bytes an id, DuckDB's own ``hash``, so the state computes them in SQL on both sides). A
micro-batch whose ids all miss skips the join: a miss is certain. A hit is confirmed by
the join itself (two ids may share a hash), so answers stay exact; hits come from real
duplicates, which are rare, and from hash collisions (about one in 10^12 per id at 17 M).

The index follows its table: loaded when the state opens, then updated from what the
statements that change the table return, once their transaction has committed
(:class:`IndexChanges`; a rolled-back transaction leaves both as they were).
"""

from __future__ import annotations

import duckdb
import numpy as np


def hashes_of(
    con: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None
) -> np.ndarray:
    """The one UBIGINT column of ``sql`` (``SELECT hash(id) AS h ...``) as a numpy array."""
    cols = con.execute(sql, params).fetchnumpy() if params else con.execute(sql).fetchnumpy()
    (values,) = cols.values()
    return np.asarray(values, dtype=np.uint64)


class IdHashIndex:
    """The sorted hashes of one id column (a multiset: ids may share a hash)."""

    def __init__(self, table: str, column: str) -> None:
        self.table = table
        self.column = column
        self.hashes = np.empty(0, dtype=np.uint64)

    def load(self, con: duckdb.DuckDBPyConnection) -> None:
        """Read the table's ids (at open, and after it changed wholesale)."""
        self.hashes = np.sort(hashes_of(con, f"SELECT hash({self.column}) AS h FROM {self.table}"))

    def maybe(self, hashes: np.ndarray) -> np.ndarray:
        """Per hash: may the table hold an id with it (False is certain)."""
        if not len(self.hashes) or not len(hashes):
            return np.zeros(len(hashes), dtype=bool)
        pos = np.searchsorted(self.hashes, hashes)
        return self.hashes[np.minimum(pos, len(self.hashes) - 1)] == hashes

    def add(self, hashes: np.ndarray) -> None:
        """Ids added to the table (committed)."""
        if len(hashes):
            new = np.sort(np.asarray(hashes, dtype=np.uint64))
            self.hashes = np.insert(self.hashes, np.searchsorted(self.hashes, new), new)

    def remove(self, hashes: np.ndarray) -> bool:
        """Ids removed from the table (committed), one occurrence each. False (and the
        index unchanged) when one of them is not in it: the caller then loads again."""
        if not len(hashes):
            return True
        gone = np.sort(np.asarray(hashes, dtype=np.uint64))
        # The k-th copy of a value removes the k-th occurrence of it in the index.
        rank = np.arange(len(gone)) - np.searchsorted(gone, gone, side="left")
        pos = np.searchsorted(self.hashes, gone, side="left") + rank
        if pos.max() >= len(self.hashes) or not np.array_equal(self.hashes[pos], gone):
            return False
        self.hashes = np.delete(self.hashes, pos)
        return True


class IndexChanges:
    """What one transaction did to indexed tables, applied to their indexes once it has
    committed (a transaction rolled back leaves tables and indexes as they were)."""

    def __init__(self) -> None:
        self._added: dict[IdHashIndex, list[np.ndarray]] = {}
        self._removed: dict[IdHashIndex, list[np.ndarray]] = {}
        self._reload: set[IdHashIndex] = set()

    def added(self, index: IdHashIndex, hashes: np.ndarray) -> None:
        self._added.setdefault(index, []).append(hashes)

    def removed(self, index: IdHashIndex, hashes: np.ndarray) -> None:
        self._removed.setdefault(index, []).append(hashes)

    def reload(self, index: IdHashIndex) -> None:
        """The table changed wholesale (emptied, rows replaced): read it again."""
        self._reload.add(index)

    def apply(self, con: duckdb.DuckDBPyConnection) -> None:
        """Call after the commit: additions first (an id added and removed in the same
        transaction is in neither), then removals."""
        for index in {*self._added, *self._removed, *self._reload}:
            if index in self._reload:
                index.load(con)
                continue
            index.add(np.concatenate(self._added.get(index, [np.empty(0, np.uint64)])))
            if not index.remove(np.concatenate(self._removed.get(index, [np.empty(0, np.uint64)]))):
                index.load(con)
