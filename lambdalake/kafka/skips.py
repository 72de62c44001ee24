"""An operator's skip, as the lake records it, for a consumer stopped at the same batch.

``lambdalake ingest --skip TOPIC/PARTITION@OFFSET`` (``batch/ingest_skip.py``) passes the one
record batch ingest is stopped at: one ``quarantine`` row (``reason`` =
``skipped_by_operator:<kind>``, ``_offset`` = where ingest stood, ``raw`` = the whole batch,
header first) and ingest's positions moved past the batch in the same commits. A speed worker
stopped at that batch cannot tell by itself that it may pass it; :class:`OperatorSkips` tells
it, and only when everything agrees:

* ingest's committed position on the partition (master's app transaction, the watermark-to-be)
  is past the offset the consumer stands at. Until then there is nothing to find, and this is
  all a check costs: the master table's log brought up to date, no data file read;
* a ``skipped_by_operator`` row of that topic, partition and offset is in ``quarantine`` (a
  read pruned by the data files' statistics, done once per new version of the table);
* the batch's header in ``raw`` (the header the skip took the batch's extent from) says where
  the batch ends; the consumer's own read of the batch says the same; ingest's master and
  quarantine positions are at or past that offset.

It then returns the batch as a :class:`~lambdalake.kafka.columnar.PoisonBatch` passed by the
operator: the consumer moves to its ``next_offset``, where ingest's skip moved, never further.
Anything else is no skip (the consumer stays stopped; see docs/kafka.md).
"""

from __future__ import annotations

from typing import Any

from lambdalake.contract.lake import QUARANTINE, Lake
from lambdalake.contract.manifest import ingest_app_id
from lambdalake.kafka.columnar import (
    SKIPPED_BY_OPERATOR,
    PoisonBatch,
    UndecodableBatch,
    batch_extent,
)
from lambdalake.logs import get_logger

log = get_logger(__name__)


class OperatorSkips:
    """Finds the operator's skip of the batch a consumer is stopped at (see the module doc).

    Keeps the two Delta tables it reads open and brings them up to date incrementally, so a
    consumer can ask every few seconds while it is stopped; :meth:`close` lets them go
    once it reads on. Not thread-safe: one consumer thread asks."""

    def __init__(self, lake: Lake, *, component: str = "speed") -> None:
        self.lake = lake
        self.component = component
        self._tables: dict[str, Any] = {}
        # The last (stop, quarantine version) looked into without finding a skip to take.
        self._looked: tuple[tuple[str, int, int], int] | None = None

    def find(self, halt: UndecodableBatch) -> PoisonBatch | None:
        """The batch ``halt`` stopped at, as the operator's skip passed it; None if there is
        no such skip (yet), or anything about it disagrees (logged once per table version)."""
        topic, partition, at = halt.topic, halt.partition, halt.offset
        master = self._table(self.lake.master(topic))
        if master is None:
            return None
        ingest_at = _position(master, topic, partition)
        if ingest_at <= at:
            return None  # ingest has not passed it: no skip to find
        quarantine = self._table(self.lake.table(QUARANTINE))
        if quarantine is None:
            return None
        looked = ((topic, partition, at), int(quarantine.version()))
        if looked == self._looked:
            return None  # looked into at this version already: nothing new
        skip = self._skip_row(quarantine, topic, partition, at)
        if skip is not None and min(ingest_at, _position(quarantine, topic, partition)) < (
            skip.next_offset
        ):
            return None  # the skip's commits are not all in yet: look again next time
        self._looked = looked
        if skip is None:
            return None
        if halt.next_offset != skip.next_offset:
            log.warning(
                f"{self.component}.skip_not_taken",
                **skip.log_fields(),
                why=f"this consumer's read of the batch there says it ends before offset "
                f"{halt.next_offset} (None: cannot tell); the skip passed it up to "
                f"offset {skip.next_offset}",
                stopped=str(halt),
            )
            return None
        self._looked = None
        return skip

    def _skip_row(self, quarantine: Any, topic: str, partition: int, at: int) -> PoisonBatch | None:
        import pyarrow.dataset as ds

        keys = [("_topic", "=", topic), ("_partition", "=", partition), ("_offset", "=", at)]
        dataset = quarantine.to_pyarrow_dataset(file_pruning_predicate=keys)
        rows = dataset.to_table(
            columns=["reason", "raw"],
            filter=(ds.field("_topic") == topic)
            & (ds.field("_partition") == partition)
            & (ds.field("_offset") == at),
        ).to_pylist()
        prefix = f"{SKIPPED_BY_OPERATOR}:"
        for row in rows:
            reason = row["reason"]
            if not reason.startswith(prefix):
                continue
            raw = row["raw"] or b""
            extent = batch_extent(raw)
            if extent is None or not extent[0] <= at < extent[1]:
                log.warning(
                    f"{self.component}.skip_not_taken",
                    topic=topic,
                    partition=partition,
                    offset=at,
                    reason=reason,
                    why="its raw batch's header does not say where it ends",
                )
                return None
            return PoisonBatch(
                topic=topic,
                partition=partition,
                offset=at,
                next_offset=extent[1],
                reason=reason.removeprefix(prefix),
                detail="skipped by an operator (lambdalake ingest --skip)",
                raw=raw,
                by_operator=True,
            )
        return None

    def _table(self, uri: str) -> Any:
        from deltalake import DeltaTable

        table = self._tables.get(uri)
        if table is not None:
            try:
                table.update_incremental()
                return table
            except Exception:  # rewritten or vacuumed under us: open it again
                del self._tables[uri]
        if not DeltaTable.is_deltatable(uri, storage_options=self.lake.storage_options):
            return None
        table = self._tables[uri] = DeltaTable(uri, storage_options=self.lake.storage_options)
        return table

    def close(self) -> None:
        """Let the open tables go (the next :meth:`find` opens them again)."""
        if self._tables or self._looked is not None:
            self._tables.clear()
            self._looked = None


def _position(table: Any, topic: str, partition: int) -> int:
    """Ingest's committed position of ``topic``/``partition`` in a master or quarantine table."""
    return int(table.transaction_version(ingest_app_id(topic, partition)) or 0)
