"""Columnar decoder benchmark: CPU per record, by codec, optionally against another commit.

What it does
    Builds an in-memory partition log like a fetch response's: 200 record batches
    of 500 order-like records (~200-byte JSON values, keyed by SKU), once per codec
    (none, gzip, snappy, lz4, zstd), and decodes it with
    :class:`lambdalake.kafka.columnar.ColumnarPartitionRecords` (``read_committed``,
    taken 50,000 records at a time, as ingest's polls do), and with kafka-python's own
    ``PartitionRecords`` for scale. With ``--against REF`` the decoder of that git
    commit is loaded from ``git show REF:lambdalake/kafka/columnar.py`` and timed in
    the same process, interleaved, so a loaded machine affects both alike.

    Figures are process CPU time (best of ``--repeat``), in microseconds per record:
    no broker, no network, only the decoding that ingest's and the speed worker's
    consumer threads do.

    .venv/bin/python bench/decoder.py --against 0a42f18
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kafka import TopicPartition  # noqa: E402
from kafka.consumer.fetcher import Fetcher, IsolationLevel  # noqa: E402
from kafka.record.memory_records import MemoryRecords, MemoryRecordsBuilder  # noqa: E402

from lambdalake.kafka import columnar as kafka_columnar  # noqa: E402

CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}
BATCHES, PER_BATCH = 200, 500


def make_log(codec: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    data = bytearray()
    offset = 0
    for _ in range(BATCHES):
        builder = MemoryRecordsBuilder(magic=2, compression_type=codec, batch_size=1 << 24)
        for i in range(PER_BATCH):
            value = b'{"event_id":"o-%d","sku":"SKU-%05d","note":"%s"}' % (
                offset + i,
                i % 100,
                rng.randbytes(70).hex().encode(),
            )
            builder.append(
                timestamp=1_700_000_000_000 + i, key=b"SKU-%05d" % (i % 100), value=value
            )
        builder.close()
        raw = bytearray(builder.buffer())
        raw[0:8] = offset.to_bytes(8, "big")  # the base offset, as the broker assigns it
        data += raw
        offset += PER_BATCH
    return bytes(data)


# Where the decoder lived: now, and before the shared package was split by role.
DECODER_PATHS = ("lambdalake/kafka/columnar.py", "lambdalake/kafka_columnar.py")


def load_at(ref: str) -> ModuleType:
    """The columnar decoder as it was at git commit ``ref`` (at either of its paths)."""
    for where in DECODER_PATHS:
        shown = subprocess.run(["git", "show", f"{ref}:{where}"], cwd=ROOT, capture_output=True)
        if shown.returncode == 0:
            source = shown.stdout
            break
    else:
        raise SystemExit(f"no columnar decoder at {ref} ({' or '.join(DECODER_PATHS)})")
    path = Path(tempfile.mkdtemp()) / "kafka_columnar_ref.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("kafka_columnar_ref", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cpu_per_record(cls: type, data: bytes, own_records: bool) -> float:
    tp = TopicPartition("orders", 0)
    t0 = time.process_time()
    records = cls(0, tp, MemoryRecords(data), isolation_level=IsolationLevel.READ_COMMITTED)
    n = 0
    while records:
        got = records.take(50_000)
        if own_records:
            got = [(r.offset, r.value) for r in got]  # what records_to_chunk would read
        n += len(got)
    assert n == BATCHES * PER_BATCH, n
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default=None, help="a git commit to compare with")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--codecs", default=",".join(CODECS))
    args = parser.parse_args()
    decoders: dict[str, tuple[type, bool]] = {
        "columnar": (kafka_columnar.ColumnarPartitionRecords, False),
        "kafka-python": (Fetcher.PartitionRecords, True),
    }
    if args.against:
        decoders[f"columnar@{args.against}"] = (
            load_at(args.against).ColumnarPartitionRecords,
            False,
        )
    result: dict[str, dict[str, float]] = {}
    for name in args.codecs.split(","):
        data = make_log(CODECS[name])
        best = {d: float("inf") for d in decoders}
        for _ in range(args.repeat):
            for d, (cls, own) in decoders.items():
                best[d] = min(best[d], cpu_per_record(cls, data, own))
        result[name] = {d: round(v, 3) for d, v in best.items()}
        line = "  ".join(f"{d} {v:.2f} us" for d, v in best.items())
        if args.against:
            line += f"  (now / {args.against}: {best['columnar'] / best[f'columnar@{args.against}']:.2f})"
        print(f"{name:<7} {line}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
