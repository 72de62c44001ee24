"""The Spark session factory of the batch layer.

``get_spark(settings)`` returns a session configured for lambdalake: the master
URL from settings (``local[*]`` by default, any cluster URL works), the running
interpreter as the Python of the workers, UTC as the session time zone, Parquet
timestamps written as microseconds (what Delta readers such as delta-rs expect),
Arrow for pandas UDFs, modest shuffle parallelism for local mode, the UI off
unless asked, quiet logs, and Delta Lake: delta-spark's jars on the classpath
(from ``make install``, never resolved at run time), its SQL extension and
catalog, and table defaults that delta-rs reads and writes too (see
``DELTA_TABLE_DEFAULTS``).

>>> from lambdalake.settings import Settings
>>> spark = get_spark(Settings(spark_master="local[2]"))  # doctest: +SKIP
>>> spark.conf.get("spark.sql.session.timeZone")  # doctest: +SKIP
'UTC'
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lambdalake.errors import OperationFailed
from lambdalake.settings import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

APP_NAME = "lambdalake-batch"

# Where ``make install`` puts delta-spark and delta-storage (Maven, jvm/delta/pom.xml).
DELTA_JARS_DIR = Path(sys.prefix) / "share" / "lambdalake" / "jars" / "delta"

# Protocol of every table delta-spark creates: reader 1 / writer 2, no table features, so
# delta-rs (ingest, speed, serving, BI) reads and appends to it, and DuckDB and Polars read it
# through delta-rs. Deletion vectors, column mapping, v2 checkpoints and row tracking each
# raise the protocol to table features; none is needed by tables that are only appended to
# (masters) or replaced whole (views). Set explicitly so a newer Delta default cannot creep in.
DELTA_TABLE_DEFAULTS = {
    "minReaderVersion": "1",
    "minWriterVersion": "2",
    "enableDeletionVectors": "false",
    "columnMapping.mode": "none",
    "checkpointPolicy": "classic",
    "enableRowTracking": "false",
    "enableInCommitTimestamps": "false",
}


class DeltaJarsMissing(OperationFailed):
    """delta-spark's jars are not installed where the batch layer looks for them."""


def delta_jars(folder: Path = DELTA_JARS_DIR) -> list[str]:
    """The jar files of delta-spark (and what it needs besides Spark), sorted.

    Raises :class:`DeltaJarsMissing` with a one-line reason when they are absent.
    """
    jars = sorted(str(p) for p in folder.glob("*.jar")) if folder.is_dir() else []
    if not any(Path(j).name.startswith("delta-spark_") for j in jars):
        raise DeltaJarsMissing(
            f"delta-spark jars not found in {folder}: run `make install` (needs Java 17+ and Maven)"
        )
    return jars


def _local_cores(master: str) -> int:
    """Cores a ``local[...]`` master uses (``local[*]`` = all), else 0 for a cluster."""
    if not master.startswith("local"):
        return 0
    inside = master[master.find("[") + 1 : master.find("]")] if "[" in master else "1"
    head = inside.split(",")[0]
    if head == "*":
        return os.cpu_count() or 1
    return max(1, int(head))


# Warnings and errors to stderr only (stdout carries the commands' results); Hadoop's
# "native library" warning, printed on every start, is not worth a line.
LOG4J2_PROPERTIES = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = stderr
appender.stderr.type = Console
appender.stderr.name = stderr
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = %d{ISO8601}{UTC}Z spark %p %c{1}: %m%n%ex
logger.native.name = org.apache.hadoop.util.NativeCodeLoader
logger.native.level = error
logger.parquet.name = org.apache.parquet
logger.parquet.level = error
"""


def _log4j2_file() -> str:
    """Path of the driver's log4j2 configuration (written once per content)."""
    import hashlib

    digest = hashlib.sha256(LOG4J2_PROPERTIES.encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"lambdalake-log4j2-{digest}.properties"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(LOG4J2_PROPERTIES)
        tmp.replace(path)  # atomic: concurrent sessions never see half a file
    return str(path)


def spark_conf(settings: Settings) -> dict[str, str]:
    """The configuration ``get_spark`` applies (pure, for inspection and docs)."""
    cores = _local_cores(settings.spark_master)
    conf = {
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.memory": settings.spark_driver_memory,
        "spark.ui.enabled": "true" if settings.spark_ui else "false",
        "spark.ui.showConsoleProgress": "false",
        # delta-rs and every Delta reader expect INT64 microsecond timestamps, not INT96.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        # Keep whole groups in one Arrow batch up to this size for grouped UDFs.
        "spark.sql.execution.arrow.maxRecordsPerBatch": "20000",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.sources.partitionOverwriteMode": "static",
        # Delta Lake: the jars from the venv (shipped to executors by spark.jars).
        "spark.jars": ",".join(delta_jars()),
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        **{
            f"spark.databricks.delta.properties.defaults.{k}": v
            for k, v in DELTA_TABLE_DEFAULTS.items()
        },
        "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
        "spark.hadoop.parquet.enable.summary-metadata": "false",
        "spark.sql.parquet.compression.codec": "snappy",
        "spark.driver.extraJavaOptions": (
            f"-Dderby.system.home={tempfile.gettempdir()} "
            f"-Dlog4j2.configurationFile={_log4j2_file()}"
        ),
        # Python workers fork from a daemon that has imported statsforecast, scikit-learn and
        # VADER once: a worker respawned after an idle minute then starts in ms, not seconds.
        "spark.python.daemon.module": "batch.worker_daemon",
    }
    if cores:
        # The default of 200 shuffle partitions is tuned for clusters; locally it only adds
        # task overhead. A few per core keeps both cores busy with small skew.
        conf["spark.sql.shuffle.partitions"] = str(max(2, 2 * cores))
        conf["spark.default.parallelism"] = str(max(2, 2 * cores))
        # Delta rebuilds a table's state (log replay) in this many partitions (default 50).
        conf["spark.databricks.delta.snapshotPartitions"] = str(max(2, 2 * cores))
        # Delta's VACUUM lists a table's directories in this many tasks (default 10,000).
        conf["spark.sql.sources.parallelPartitionDiscovery.parallelism"] = str(max(2, 2 * cores))
        conf["spark.driver.bindAddress"] = "127.0.0.1"
        conf["spark.driver.host"] = "127.0.0.1"
    return conf


def get_spark(settings: Settings) -> SparkSession:
    """A Spark session for the batch layer (reuses a running one in this process)."""
    # Workers must import our packages: run them with this interpreter, not the system one.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    # Silence the Java side's startup banner and WARN chatter about native libs.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(APP_NAME).master(settings.spark_master)
    for key, value in spark_conf(settings).items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def spark_path(uri: str) -> str:
    """A lake URI as Spark's Hadoop file systems want it.

    A local path becomes an absolute ``file://`` URI; ``s3://`` (delta-rs' scheme) becomes
    ``s3a://`` (Hadoop's S3 connector, configured with ``spark.hadoop.fs.s3a.*``).

    >>> spark_path("s3://bucket/lake/views/daily_sales")
    's3a://bucket/lake/views/daily_sales'
    """
    if uri.startswith("s3://"):
        return "s3a://" + uri[len("s3://") :]
    if "://" in uri:
        return uri
    return f"file://{os.path.abspath(uri)}"
