"""Where one stack keeps its files, and which ports it listens on. Everything derives from Settings,
so two stacks with different data directories and ports never touch each other's files; only
Kafka's jars and class-data archive are shared, by stacks that name the same install directory
(Settings.kafka_install_dir)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.settings import PROJECT_ROOT, Settings

COMPONENTS = ("kafka", "redis", "s3")
# Node i > 1 of a multi-broker Kafka listens this far above node 1's broker and controller ports.
KAFKA_NODE_PORT_STEP = 10
INFRA_DIR = PROJECT_ROOT / "infra"
LOOPBACK = "127.0.0.1"
_GRPC_OFFSET = 10_000  # SeaweedFS's default distance from an HTTP port to its gRPC port


class StackError(RuntimeError):
    """A local stack component could not be installed, started or stopped; the message says why."""


@dataclass(frozen=True)
class Layout:
    data_dir: Path
    # Kafka's jars and class-data archive (Settings.kafka_install_dir, else <data_dir>/kafka).
    kafka_install_dir: Path

    @classmethod
    def of(cls, settings: Settings) -> Layout:
        data_dir = settings.data_dir.expanduser().resolve()
        install = settings.kafka_install_dir
        return cls(data_dir, install.expanduser().resolve() if install is not None else data_dir / "kafka")

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def pid_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / "stack.lock"

    @property
    def kafka_dir(self) -> Path:
        return self.data_dir / "kafka"

    @property
    def kafka_install_lock(self) -> Path:
        """Held while Kafka's jars or archive are being made (two stacks may share them)."""
        return self.kafka_install_dir / "install.lock"

    def kafka_libs(self, version: str) -> Path:
        return self.kafka_install_dir / f"libs-{version}"

    def kafka_cds_archive(self, version: str) -> Path:
        """The class-data archive of Kafka's classes from libs-<version>, made at install
        (services/stack/_cds.py); beside it the same name + ".json" says what it was made with."""
        return self.kafka_install_dir / f"classes-{version}.jsa"

    @property
    def kafka_log_dir(self) -> Path:
        return self.kafka_dir / "data"

    @property
    def kafka_config(self) -> Path:
        return self.kafka_dir / "server.properties"

    @property
    def kafka_cluster_id(self) -> Path:
        return self.kafka_dir / "cluster.id"

    @property
    def kafka_brokers_marker(self) -> Path:
        """How many nodes the cluster was formatted with (written only for more than one)."""
        return self.kafka_dir / "brokers"

    # Node 1 of a cluster keeps the single broker's paths above; node i > 1 has its own.
    def kafka_node_log_dir(self, node_id: int) -> Path:
        return self.kafka_log_dir if node_id == 1 else self.kafka_dir / f"data-{node_id}"

    def kafka_node_config(self, node_id: int) -> Path:
        return self.kafka_config if node_id == 1 else self.kafka_dir / f"server-{node_id}.properties"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def s3_dir(self) -> Path:
        return self.data_dir / "s3"

    @property
    def s3_data(self) -> Path:
        return self.s3_dir / "data"

    @property
    def s3_identities(self) -> Path:
        return self.s3_dir / "identities.json"


def seaweed_ports(settings: Settings) -> dict[str, int]:
    """Every port `weed mini` binds, keyed by its command-line flag."""
    s3 = settings.s3_port
    admin = settings.s3_admin_port or s3 + 1

    def grpc(explicit: int, http: int) -> int:
        return explicit or http + _GRPC_OFFSET

    return {
        "master.port": settings.s3_master_port,
        "master.port.grpc": grpc(settings.s3_master_grpc_port, settings.s3_master_port),
        "volume.port": settings.s3_volume_port,
        "volume.port.grpc": grpc(settings.s3_volume_grpc_port, settings.s3_volume_port),
        "filer.port": settings.s3_filer_port,
        "filer.port.grpc": grpc(settings.s3_filer_grpc_port, settings.s3_filer_port),
        "s3.port": s3,
        "s3.port.grpc": grpc(settings.s3_grpc_port, s3),
        "admin.port": admin,
        "admin.port.grpc": grpc(settings.s3_admin_grpc_port, admin),
    }


def kafka_node_name(node_id: int) -> str:
    return "kafka" if node_id == 1 else f"kafka-{node_id}"


def kafka_node_ports(settings: Settings, node_id: int) -> tuple[int, int]:
    """(broker port, controller port) of one Kafka node; node 1 uses the configured ports."""
    shift = KAFKA_NODE_PORT_STEP * (node_id - 1)
    return settings.kafka_port + shift, settings.kafka_controller_port + shift


def kafka_nodes(settings: Settings) -> int:
    """Kafka nodes to manage: the configured count, or more if the data dir was formatted for more
    (so `stack down` or `status` without the setting still reaches every node of a cluster)."""
    marker = Layout.of(settings).kafka_brokers_marker
    try:
        formatted = int(marker.read_text().strip())
    except (FileNotFoundError, ValueError):
        formatted = 1
    return max(settings.kafka_brokers, formatted)


def component_names(settings: Settings) -> tuple[str, ...]:
    """The stack's components: COMPONENTS, plus "kafka-2".."kafka-N" for a multi-broker Kafka."""
    extra = tuple(kafka_node_name(i) for i in range(2, kafka_nodes(settings) + 1))
    return (*COMPONENTS, *extra)


def component_ports(settings: Settings) -> dict[str, list[int]]:
    ports = {
        "kafka": [settings.kafka_port, settings.kafka_controller_port],
        "redis": [settings.redis_port],
        "s3": list(seaweed_ports(settings).values()),
    }
    for node_id in range(2, kafka_nodes(settings) + 1):
        ports[kafka_node_name(node_id)] = list(kafka_node_ports(settings, node_id))
    return ports


def check_ports_distinct(settings: Settings) -> None:
    extra_nodes = range(2, kafka_nodes(settings) + 1)
    named = [
        ("kafka", settings.kafka_port),
        ("kafka controller", settings.kafka_controller_port),
        *((f"kafka node {i}", kafka_node_ports(settings, i)[0]) for i in extra_nodes),
        *((f"kafka node {i} controller", kafka_node_ports(settings, i)[1]) for i in extra_nodes),
        ("redis", settings.redis_port),
        *((f"s3 ({flag})", port) for flag, port in seaweed_ports(settings).items()),
    ]
    seen: dict[int, str] = {}
    for what, port in named:
        if port > 65535:
            raise StackError(f"{what}: derived port {port} is above 65535; set it explicitly")
        if port in seen:
            raise StackError(
                f"port {port} is configured for both {seen[port]} and {what}: give each its own port "
                "(SWITCHBOARD_S3_*_PORT; a gRPC port of 0 is HTTP port + 10000, admin port 0 is S3 port + 1)"
            )
        seen[port] = what
