"""One settings object, read from ``LAMBDALAKE_*`` environment variables and ``.env``.

Build it once at the edge (the CLI, a test fixture) and pass it in; nothing reads
the environment behind a caller's back.

>>> s = Settings(lake_uri="/tmp/lake")
>>> s.partitions
4
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lambdalake.contract.events import TOPICS  # noqa: F401  (re-exported: the topics)
from lambdalake.errors import InvalidInput

MIN_SECRET_CHARS = 16
# Placeholders from docs and examples (compared ignoring case, "-" and "_").
EXAMPLE_SECRETS = frozenset(
    {"changeme", "replaceme", "secret", "password", "apikey", "yourapikey", "example", "test"}
)


def check_secret(name: str, value: str) -> None:
    """Refuse an example value or a short secret for setting ``name`` (one-line ``InvalidInput``, a ``ValueError``).

    >>> check_secret("LAMBDALAKE_SPEED_TOKEN", "secret")
    Traceback (most recent call last):
    ...
    lambdalake.errors.InvalidInput: LAMBDALAKE_SPEED_TOKEN holds an example value ('secret'); set real keys (16+ random characters, e.g. `openssl rand -hex 24`)
    """
    hint = "set real keys (16+ random characters, e.g. `openssl rand -hex 24`)"
    plain = value.lower().replace("-", "").replace("_", "")
    if plain in EXAMPLE_SECRETS or "changeme" in plain:
        raise InvalidInput(f"{name} holds an example value ({value!r}); {hint}")
    if len(value) < MIN_SECRET_CHARS:
        raise InvalidInput(
            f"{name} holds a key of {len(value)} characters, fewer than {MIN_SECRET_CHARS}; {hint}"
        )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LAMBDALAKE_", env_file=".env", extra="ignore", frozen=False
    )

    home: Path = Field(Path(".lambdalake"), description="State directory of local processes.")
    kafka_bootstrap: str | None = Field(
        None, description="HOST:PORT of the Kafka cluster; unset = the embedded broker."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How lambdalake's Kafka clients connect: TLS (SSL, SASL_SSL) and/or SASL "
        "authentication (SASL_PLAINTEXT, SASL_SSL).",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism, with a SASL_* protocol."
    )
    kafka_sasl_username: str = Field("", description="SASL user, with a SASL_* protocol.")
    kafka_sasl_password: str = Field("", description="SASL password, with a SASL_* protocol.")
    kafka_ssl_cafile: Path | None = Field(
        None,
        description="CA bundle (PEM) to verify the brokers' certificates; unset = the system's.",
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="Client certificate (PEM), for brokers that require mutual TLS."
    )
    kafka_ssl_keyfile: Path | None = Field(None, description="Client certificate's key (PEM).")
    broker_host: str = "127.0.0.1"
    broker_port: int = 9092
    kafka_jars: Path | None = Field(
        None,
        description="Folder of the embedded Kafka broker's jars; default the one `make install` "
        "fills, {sys.prefix}/share/lambdalake/jars/kafka.",
    )
    broker_heap: str = Field(
        "512m",
        pattern=r"^[0-9]+[kmgKMG]$",
        description="Heap of the embedded broker, held from its start (-Xms = -Xmx).",
    )
    partitions: int = Field(4, ge=1, description="Partitions of topics created on first use.")
    lake_uri: str = Field(
        "./lake", description="Root of the Delta lake (path or object-store URI)."
    )
    spark_master: str = "local[*]"
    spark_driver_memory: str = "4g"
    spark_ui: bool = False
    speed_dir: Path | None = Field(None, description="Speed worker state; default HOME/speed.")
    speed_kafka_client: Literal["kafka-python", "confluent-kafka"] = Field(
        "kafka-python",
        description="Kafka client of the speed worker; confluent-kafka is an optional "
        "package (librdkafka), about 15 % faster here than kafka-python with the columnar decoder.",
    )
    speed_token: str = Field(
        "",
        description="Shared secret of the speed workers' query endpoints: when set, a worker "
        "refuses Flight calls without it and the API sends it; empty = no auth (loopback only).",
    )
    speed_allow_unauthenticated: bool = Field(
        False,
        description="Let a speed worker serve its query endpoint on a non-loopback address "
        "without LAMBDALAKE_SPEED_TOKEN (anyone who reaches the port reads the recent events' "
        "aggregates); off: such a worker refuses to start.",
    )
    speed_max_records: int = Field(
        50_000, ge=1, description="Messages per speed micro-batch at most (one DuckDB commit)."
    )
    speed_batch_interval_ms: int = Field(
        250,
        ge=0,
        description="A speed worker commits micro-batches at least this far apart (ms): what a "
        "micro-batch costs hardly depends on its size, so at low rates this bounds the CPU "
        "spent per second; it adds up to this much to freshness (docs/speed.md).",
    )
    speed_checkpoint: str = Field(
        "16MB",
        pattern=r"^[0-9]+(\.[0-9]+)?\s*([KMG]i?B)$",
        description="Write-ahead log a speed worker's DuckDB state gathers before a "
        "checkpoint; what it holds is in memory until then, so this bounds the state's memory "
        "(docs/production.md, memory over weeks).",
    )
    dedup_hours: int = Field(48, ge=0, description="Deduplication horizon for event_id.")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_keys: str = Field("", description="Comma-separated API keys; empty = no auth.")
    api_max_in_flight: int = Field(
        32, ge=1, description="Requests one API process answers at once (more wait or get 503)."
    )
    api_max_queued: int = Field(
        64, ge=0, description="Requests one API process lets wait for a slot (more get 503)."
    )
    api_max_queue_ms: float = Field(
        25.0,
        gt=0,
        description="A request predicted, as it is read, to wait longer than this to start "
        "(counted since its bytes reached the machine) while a backlog stands gets 503 at once.",
    )
    api_max_wait_ms: float = Field(
        45.0,
        gt=0,
        description="A request let in is refused after all only once it has waited this long "
        "to start (at least LAMBDALAKE_API_MAX_QUEUE_MS): a wrong prediction costs latency, "
        "not a slow refusal.",
    )
    api_burst: int = Field(
        8,
        ge=0,
        description="Late requests are still answered while at most this many others wait "
        "with them (a page's calls at once); more waiting is a backlog, shed.",
    )
    api_starts_per_turn: int = Field(
        0,
        ge=0,
        description="Requests one API process starts per event-loop turn at most, the rest "
        "in later turns (0: no bound); see docs/serving.md.",
    )
    api_callbacks_per_poll: int = Field(
        4,
        ge=0,
        description="The API's event loop looks at its sockets after this many callbacks, "
        "not once per turn, so refusals and new requests are read promptly under load "
        "(0: once per turn, asyncio's own); see docs/serving.md.",
    )
    api_url: str = Field(
        "",
        description="The API the CLI's `sql` command asks; empty: "
        "http://LAMBDALAKE_API_HOST:LAMBDALAKE_API_PORT.",
    )
    api_key: str = Field("", description="The key the CLI's `sql` command sends (X-API-Key).")
    sql_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="A SQL statement is interrupted after this long."
    )
    sql_max_rows: int = Field(
        100_000, ge=1, description="Rows a SQL answer holds at most (`truncated` beyond)."
    )
    sql_memory_limit: str = Field(
        "1GB", description="DuckDB memory_limit of each SQL statement (e.g. 512MB, 2GB)."
    )
    sql_concurrency: int = Field(
        4, ge=1, description="SQL statements one API process runs at once (more get 429)."
    )
    speed_endpoints: str = Field(
        "", description="Comma-separated grpc://HOST:PORT of speed workers for the API."
    )
    max_event_bytes: int = Field(256 * 1024, ge=1024)
    event_time_max_skew_seconds: float = Field(
        86_400.0,
        ge=0,
        description="How far ahead of the validator's clock an event_time may be; later "
        "events are quarantined as out_of_range:event_time.",
    )
    batch_schedule: str = "@hourly"
    maintenance_schedule: str = Field(
        "@hourly",
        description="When the maintenance DAG compacts the lake; ingest's memory follows the "
        "master tables' file count until then (docs/production.md, memory over weeks).",
    )
    broker_wait_seconds: float = Field(
        60.0, gt=0, description="How long one-shot commands retry an unreachable broker."
    )
    ingest_batch_size: int = Field(50_000, ge=1)
    ingest_batch_seconds: float = Field(2.0, gt=0)
    ingest_max_dates_per_commit: int = Field(
        256,
        ge=1,
        description="Event dates (so files) one master commit may hold; a micro-batch "
        "spanning more is committed as several offset prefixes.",
    )

    @model_validator(mode="after")
    def _kafka_security_is_complete(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL_") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise InvalidInput(
                f"LAMBDALAKE_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "LAMBDALAKE_KAFKA_SASL_USERNAME and LAMBDALAKE_KAFKA_SASL_PASSWORD"
            )
        return self

    @property
    def kafka_security(self) -> dict[str, object]:
        """The security settings as kafka-python client arguments (empty for PLAINTEXT), for
        every client lambdalake opens: ``KafkaConsumer(..., **settings.kafka_security)``."""
        protocol = self.kafka_security_protocol
        out: dict[str, object] = {}
        if protocol == "PLAINTEXT":
            return out
        out["security_protocol"] = protocol
        if protocol.startswith("SASL_"):
            out["sasl_mechanism"] = self.kafka_sasl_mechanism
            out["sasl_plain_username"] = self.kafka_sasl_username
            out["sasl_plain_password"] = self.kafka_sasl_password
        if protocol in ("SSL", "SASL_SSL"):
            for key in ("cafile", "certfile", "keyfile"):
                value = getattr(self, f"kafka_ssl_{key}")
                if value is not None:
                    out[f"ssl_{key}"] = str(value)
        return out

    @property
    def kafka_security_librdkafka(self) -> dict[str, object]:
        """The same settings as librdkafka (confluent-kafka) configuration."""
        names = {
            "security_protocol": "security.protocol",
            "sasl_mechanism": "sasl.mechanism",
            "sasl_plain_username": "sasl.username",
            "sasl_plain_password": "sasl.password",
            "ssl_cafile": "ssl.ca.location",
            "ssl_certfile": "ssl.certificate.location",
            "ssl_keyfile": "ssl.key.location",
        }
        return {names[k]: v for k, v in self.kafka_security.items()}

    @property
    def bootstrap(self) -> str:
        """The Kafka bootstrap to use: the configured cluster, else the embedded broker."""
        return self.kafka_bootstrap or f"{self.broker_host}:{self.broker_port}"

    @property
    def event_time_max_skew(self) -> timedelta:
        return timedelta(seconds=self.event_time_max_skew_seconds)

    @property
    def speed_state_dir(self) -> Path:
        return self.speed_dir or (self.home / "speed")

    @property
    def api_key_set(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    def with_overrides(self, *, bootstrap: str | None = None, lake: str | None = None) -> Settings:
        """Copy with the ``--bootstrap`` / ``--lake`` command-line flags applied."""
        update: dict[str, object] = {}
        if bootstrap:
            update["kafka_bootstrap"] = bootstrap
        if lake:
            update["lake_uri"] = lake
        return self.model_copy(update=update)


def absolute_uri(uri: str) -> str:
    """A local lake path made absolute (Airflow tasks run in a temporary directory); URIs
    with a scheme (``s3://...``) unchanged."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())
