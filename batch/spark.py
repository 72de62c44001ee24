"""The Spark session factory of the batch layer.

``get_spark(settings)`` returns a session configured for lambdalake: the master
URL from settings (``local[*]`` by default, any cluster URL works), the running
interpreter as the Python of the workers, UTC as the session time zone, Parquet
timestamps written as microseconds (what Delta readers such as delta-rs expect),
Arrow for pandas UDFs, modest shuffle parallelism for local mode, the UI off
unless asked, and quiet logs.

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

from lambdalake.settings import Settings

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

APP_NAME = "lambdalake-batch"


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
        # Views are written by us and committed by delta-rs: no _SUCCESS marker files.
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
        # A pinned snapshot is read from an explicit list of files. Above this many paths
        # Spark lists them with a distributed job (seconds); locally the driver does it in ms.
        conf["spark.sql.sources.parallelPartitionDiscovery.threshold"] = "100000"
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
