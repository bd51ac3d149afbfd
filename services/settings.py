"""One typed settings module for every Switchboard process.

Every field can be overridden by an environment variable named ``SWITCHBOARD_<FIELD>``
(for example ``SWITCHBOARD_KAFKA_BOOTSTRAP``). Values are validated once, at start-up.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_HOST_PORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
# The processes `switchboard run` looks after (services/processes.py), each of which may have a
# warm spare (Settings.warm_spares).
SPARE_ROLES = ("analytics", "sessions", "assistant", "archiver", "ingress")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWITCHBOARD_", extra="ignore", frozen=True)

    # Where the embedded stack and every local store keeps its files.
    data_dir: Path = PROJECT_ROOT / "var"

    # --- Kafka -------------------------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_controller_port: int = 9093
    kafka_version: str = "4.1.2"
    conversation_topic: str = "conversation-events"
    knowledge_topic: str = "knowledge-events"
    dead_letter_topic: str = "switchboard-dead-letter"
    topic_partitions: int = Field(default=4, ge=1, le=1024)
    topic_replication_factor: int = Field(default=1, ge=1, le=16)

    # --- Redis -------------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    # How long the ingress waits for Redis to connect or answer a command before the call fails
    # UNAVAILABLE (and readiness says NOT_SERVING): a Redis that hangs must not hold callers to
    # their own deadlines. Not retried on a timeout; every command it sends takes milliseconds.
    redis_timeout_s: float = Field(default=5.0, gt=0)

    # --- ClickHouse --------------------------------------------------------------------------
    # chdb:///abs/path runs ClickHouse in-process (only one process may open a path);
    # http(s)://user:pass@host:8123/db talks to a ClickHouse server.
    clickhouse_dsn: str = ""
    # A ClickHouse cluster name (server DSN only): migrations run their cluster variants (ON
    # CLUSTER, Replicated* engines, Distributed tables; docs/analytics.md). Empty: one server.
    clickhouse_cluster: str = ""
    # The query endpoint the analytics process serves in embedded mode (ClickHouse HTTP shape).
    analytics_listen: str = "127.0.0.1:8123"
    # The endpoint's `admin` user is the only one that writes (migrations, replays); every other
    # caller reads. Empty: a random password in <data_dir>/secrets/analytics-password (0600);
    # listening on a non-loopback address needs one set here.
    analytics_password: str = ""
    # Host names it answers to (Host header, against DNS rebinding; its listen host is added).
    analytics_allowed_hosts: str = "localhost,127.0.0.1,[::1]"
    # Origins of web pages that may call it (none: browsers are refused).
    analytics_allowed_origins: str = ""
    analytics_max_body_mb: int = Field(default=64, ge=1)
    analytics_max_decompressed_mb: int = Field(default=256, ge=1)
    # A reader's queries stop after this (its own max_execution_time may only be lower).
    analytics_max_execution_time_s: int = Field(default=60, ge=1)
    # Analysts who see one tenant only, as JSON: {"user": {"tenant": "acme", "password_sha256_hex":
    # "<sha256 of the password>"}} (ClickHouse's users.xml form); docs/analytics.md.
    analytics_tenant_users: dict[str, dict[str, str]] = Field(default_factory=dict)
    # Seconds an idle connection, or one still sending a request's head, is kept open.
    analytics_idle_timeout_s: float = Field(default=10.0, gt=0)

    # --- S3 (any S3-compatible store; SeaweedFS locally) ----------------------------------------
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: str = "switchboard"
    s3_secret_key: str = "switchboard-secret"
    s3_bucket: str = "switchboard"
    s3_secure: bool = False
    s3_region: str = "us-east-1"

    # --- cold archive and retention (streams/archive, `switchboard archive`, `switchboard replay`)
    # Objects go to <bucket>/<archive_prefix>/<topic>/<partition>/<first offset>.{seg.zst,manifest.json}.
    archive_prefix: str = "archive"
    # A segment is closed when its records reach this many bytes (uncompressed) or its oldest
    # record has waited this long, whichever comes first.
    archive_segment_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    archive_segment_age_s: float = Field(default=300.0, gt=0)
    archive_zstd_level: int = Field(default=3, ge=1, le=22)
    # Kafka retention of conversation-events (-1: forever). The archive is what lets Kafka forget:
    # keep it longer than the archiver can be down (segments are written within the age above).
    conversation_retention_ms: int = Field(default=30 * 24 * 3600 * 1000, ge=-1)
    # Where a replay rebuilds before it swaps: a ClickHouse database and a Redis logical database.
    replay_database: str = Field(default="switchboard_replay", pattern=r"^[a-z][a-z0-9_]{0,62}$")
    replay_redis_db: int = Field(default=15, ge=0, le=15)

    # --- local stack ports (the embedded stack that services/stack runs; unused against real servers)
    # SeaweedFS (`weed mini`) runs a master, a volume server, a filer, the S3 gateway and an admin
    # server in one process, each on its own HTTP port plus a gRPC port. A gRPC port of 0 means
    # "HTTP port + 10000", SeaweedFS's own rule. The admin server listens even with its UI off, so
    # two stacks side by side need different admin ports: 0 means "S3 port + 1".
    s3_master_port: int = Field(default=9333, ge=1, le=65535)
    s3_master_grpc_port: int = Field(default=0, ge=0, le=65535)
    s3_volume_port: int = Field(default=9340, ge=1, le=65535)
    s3_volume_grpc_port: int = Field(default=0, ge=0, le=65535)
    s3_filer_port: int = Field(default=8888, ge=1, le=65535)
    s3_filer_grpc_port: int = Field(default=0, ge=0, le=65535)
    s3_grpc_port: int = Field(default=0, ge=0, le=65535)
    s3_admin_port: int = Field(default=0, ge=0, le=65535)
    s3_admin_grpc_port: int = Field(default=0, ge=0, le=65535)
    # Heap of the embedded Kafka broker, in MiB.
    kafka_heap_mb: int = Field(default=512, ge=128)
    # Start the embedded Kafka with a class-data archive of its classes (made once by `stack
    # install` from a short start and stop: services/stack/_cds.py). Saves about a second of JVM
    # start-up, most of all after a kill -9; false: a plain JVM start, no archive made.
    kafka_cds: bool = True
    # Where `stack install` puts Kafka's jars and class-data archive; empty: <data_dir>/kafka. Stacks
    # that name the same directory share one install (the tests share the project's var/kafka, as
    # they share var/models), made under a lock in it.
    kafka_install_dir: Path | None = None
    # Brokers of the embedded Kafka: 1, or a KRaft cluster of combined broker+controller nodes on
    # loopback (node i listens on the Kafka and controller ports + 10*(i-1)); with 3 or more,
    # topics get replication factor 3 and min.insync.replicas 2 (services/kafka_topics.py).
    kafka_brokers: int = Field(default=1, ge=1, le=9)
    # --- end of local stack ports

    # --- gRPC ingress ------------------------------------------------------------------------
    grpc_listen: str = "127.0.0.1:50051"
    max_message_bytes: int = Field(default=8192, ge=1)
    max_metadata_entries: int = Field(default=32, ge=0)
    # Produce requests awaiting a Kafka ack, across the whole process; past it: RESOURCE_EXHAUSTED.
    max_inflight_produce: int = Field(default=2000, ge=1)
    # How long a caller waits for Kafka before UNAVAILABLE (the event may still land; retry).
    produce_timeout_s: float = Field(default=10.0, gt=0)
    # 0: send as soon as the sender is free; batches still form while a request is in flight.
    producer_linger_ms: int = Field(default=0, ge=0)
    # Comma-separated allow-list of tenant ids; empty accepts any well-formed tenant id.
    tenants: str = ""
    # Concurrent StreamConversation calls per ingress process (each holds a Redis connection of
    # its own pool, apart from the write path's); past it: RESOURCE_EXHAUSTED.
    max_live_streams: int = Field(default=20000, ge=1)
    # StreamConversation calls that share one blocking Redis connection (services/ingress/_live.py).
    live_streams_per_reader: int = Field(default=256, ge=1, le=4096)
    # How long a client_message_id is remembered for deduplication.
    idempotency_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    # SendMessageBatch: at most this many messages and this many request bytes per call; past
    # either the whole call is INVALID_ARGUMENT (like Pub/Sub's Publish and Kinesis PutRecords).
    max_batch_messages: int = Field(default=1000, ge=1, le=100_000)
    max_batch_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # `switchboard ingress` runs this many server processes on one port (SO_REUSEPORT), each
    # with its own in-flight bound; 0 means one per CPU core. 1 runs the server in-process.
    ingress_processes: int = Field(default=0, ge=0, le=256)
    # How long a stopping ingress process lets in-flight calls finish (SIGTERM: drain).
    ingress_drain_s: float = Field(default=10.0, ge=0)

    # --- Stream processors -------------------------------------------------------------------
    # Static group membership: a restarted worker with the same id takes its partitions back at
    # once instead of waiting for the dead member's session to expire. Must be unique per worker
    # of one role; empty means "<role>-<hostname>" (unique per pod in Kubernetes).
    worker_instance_id: str = ""
    worker_session_timeout_s: float = Field(default=10.0, ge=3.0)
    # `switchboard worker sessions` runs this many processes, each a group member with the static
    # id "<worker_instance_id or sessions-hostname>-<i>"; useful up to the topic's partition count.
    sessions_processes: int = Field(default=1, ge=1, le=1024)
    # `switchboard run` keeps a warm spare of these processes (comma-separated: sessions,
    # assistant, archiver, analytics, ingress; empty: none): started beside each, its imports
    # done, it takes over the moment the process dies (services/runner.py). A start is CPU-bound
    # (~1 s of CPU for a worker, several seconds of wall time on a busy machine); a spare skips it.
    warm_spares: str = "sessions,assistant"
    batch_size: int = Field(default=2000, ge=1)
    # Each ClickHouse insert has a fixed cost (~20-40 ms on chdb here), so the projector takes
    # bigger batches than the sessions worker (filled for up to 0.5 s, streams/projector/_agent.py).
    projector_batch_size: int = Field(default=20_000, ge=1)
    batch_within_s: float = Field(default=0.05, gt=0)
    # Recent messages kept in each conversation's Redis stream (older ones live in ClickHouse).
    live_stream_maxlen: int = Field(default=10_000, ge=100)

    # --- Assistant ---------------------------------------------------------------------------
    # Where `switchboard models build` puts the ONNX models and tokenizers; empty: <data_dir>/models.
    models_dir: Path | None = None
    # The model gateway: empty (the grounded template answerer only), a JSON document, or @path
    # to one (see streams/assistant/gateway: adapters, routes, timeouts, breaker).
    gateway: str = ""
    # Customer messages the assistant takes per batch (classified together; replies of different
    # conversations are generated concurrently, each conversation in order).
    assistant_batch_size: int = Field(default=64, ge=1)
    # The assistant's internal search endpoint (the ingress forwards SearchKnowledge to it).
    assistant_listen: str = "127.0.0.1:50061"
    # The tenant `make run`'s demo loads the bilingual shop FAQ for.
    demo_tenant: str = "demo"

    # --- Security: API keys, tenants, TLS (services/auth) ----------------------------------------
    # Compacted topic of tenants and API keys; every ingress folds it (revocations apply at once).
    tenants_topic: str = "tenants"
    # Erasure records (`switchboard tenant erase`), compacted by event id (each kept): every
    # processor and replay folds it and skips the erased customers' events still in the log.
    privacy_topic: str = "privacy-events"
    # How often the archiver applies each tenant's retention (`tenants update T --retention-days
    # N`) to ClickHouse and the archive (streams/privacy/_retention.py); 0: only by the command.
    retention_interval_s: float = Field(default=3600.0, ge=0)
    # Pepper of the API-key hashes: the same everywhere keys are issued or checked. Empty: a random
    # one is made in <data_dir>/secrets/auth-pepper (0600) on first use (fine for one host).
    auth_pepper: str = ""
    # The key the CLI's own gRPC clients present (the demo; `make run` issues one).
    api_key: str = ""
    # gRPC TLS: PEM certificate chain and key; with a client CA, clients need a certificate it signed.
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    grpc_tls_client_ca: Path | None = None
    # CA bundle the CLI's own clients trust for the ingress's certificate.
    grpc_tls_ca: Path | None = None
    # Rate limits of keyed calls (services/auth/_limits.py), token buckets shared by every ingress
    # through Redis: the defaults for tenants without their own (`switchboard tenants update T
    # --rate R --burst B --key-rate R --key-burst B`). Rate 0: unlimited; burst 0: one second's worth.
    tenant_rate_per_s: float = Field(default=0.0, ge=0)
    tenant_burst: int = Field(default=0, ge=0)
    key_rate_per_s: float = Field(default=0.0, ge=0)
    key_burst: int = Field(default=0, ge=0)
    # A limiter's Redis call that fails or takes longer than this lets the call through (fail open).
    rate_limit_timeout_s: float = Field(default=0.25, gt=0)
    # Quotas per tenant, the defaults for tenants without their own (`switchboard tenants update T
    # --max-open-conversations N --max-knowledge-documents N`); 0: unlimited.
    max_open_conversations: int = Field(default=0, ge=0)
    max_knowledge_documents: int = Field(default=0, ge=0)
    # Idle close (services/ingress/_idle.py): a conversation with no event for this long is closed
    # by the system (resolution "idle"), freeing its place in the open-conversation quota; per
    # tenant: `switchboard tenants update T --idle-close-after S`. 0: never. How often each ingress
    # process looks for idle conversations.
    idle_close_after_s: float = Field(default=24 * 3600.0, ge=0)
    idle_sweep_interval_s: float = Field(default=30.0, gt=0)

    # --- Observability: Prometheus metrics (one endpoint per process; empty: off) and traces ------
    ingress_metrics_listen: str = "127.0.0.1:9464"
    sessions_metrics_listen: str = "127.0.0.1:9465"
    assistant_metrics_listen: str = "127.0.0.1:9466"
    analytics_metrics_listen: str = "127.0.0.1:9467"
    # OpenTelemetry traces: "" (off), "otlp" (OTLP over HTTP to otel_endpoint) or "console".
    otel_exporter: str = Field(default="", pattern=r"^(|otlp|console)$")
    otel_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    otel_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)

    # --- Privacy: PII masked in the analytics projections and reports ---------------------------
    # Kinds masked for every tenant: any of email, phone, card, cn_id; "all" or "none".
    pii_redact: str = "all"
    # Per-tenant overrides: "tenant=kinds;tenant=kinds", e.g. "acme=email,phone;lab=none".
    pii_redact_tenants: str = ""

    @property
    def effective_models_dir(self) -> Path:
        return self.models_dir or self.data_dir / "models"

    @field_validator("models_dir", "kafka_install_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty variable means the default (under the data directory), not the current one."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("kafka_bootstrap", "grpc_listen", "analytics_listen", "s3_endpoint", "assistant_listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        for part in value.split(","):
            if not _HOST_PORT.match(part.strip()):
                raise ValueError(f"expected host:port, got {part!r}")
        return value

    @field_validator("pii_redact", "pii_redact_tenants")
    @classmethod
    def _pii_policy(cls, value: str, info: ValidationInfo) -> str:
        # Checked here, at start-up: a typo found by the projector would refuse every event.
        from streams.privacy.redact import RedactionPolicy

        if info.field_name == "pii_redact":
            RedactionPolicy.parse(value)
        else:
            RedactionPolicy.parse("all", value)
        return value

    @field_validator("warm_spares")
    @classmethod
    def _spare_names(cls, value: str) -> str:
        unknown = {n.strip() for n in value.split(",") if n.strip()} - set(SPARE_ROLES)
        if unknown:
            raise ValueError(f"unknown process {sorted(unknown)}; expected some of {', '.join(SPARE_ROLES)}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis:// URL, got {value!r}")
        return value

    @field_validator("clickhouse_dsn")
    @classmethod
    def _clickhouse_scheme(cls, value: str) -> str:
        if value and not value.startswith(("chdb://", "http://", "https://")):
            raise ValueError(f"expected chdb:///path or http(s)://host:port, got {value!r}")
        return value

    @cached_property
    def effective_clickhouse_dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    @property
    def embedded_clickhouse(self) -> bool:
        return self.effective_clickhouse_dsn.startswith("chdb://")

    @property
    def spare_roles(self) -> frozenset[str]:
        return frozenset(n.strip() for n in self.warm_spares.split(",") if n.strip())

    @property
    def allowed_tenants(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.tenants.split(",") if t.strip())

    @property
    def redis_port(self) -> int:
        tail = self.redis_url.split("://", 1)[1].split("/", 1)[0]
        return int(tail.rsplit(":", 1)[1]) if ":" in tail else 6379

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def s3_port(self) -> int:
        return int(self.s3_endpoint.rsplit(":", 1)[1])


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit overrides (used by tests) on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
