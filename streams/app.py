"""The Faust apps. Each role is its own app id, so its own consumer group: the projector lagging
never holds back conversation state, and each can be scaled (by partitions) on its own."""

from __future__ import annotations

import logging
import socket
from typing import Any

import faust
from faust.transport.producer import ProducerBuffer

from services.settings import Settings

# Table writes queue in Faust's producer buffer, and past `max_messages` (100, a class attribute
# with no setting) every further write makes the stream wait while the buffer drains one message
# at a time: with many conversations per batch that stalled the sessions worker. Our batches
# bound what is queued anyway.
ProducerBuffer.max_messages = 20_000


def create_app(role: str, settings: Settings) -> faust.App:
    datadir = settings.data_dir / "faust" / role
    datadir.mkdir(parents=True, exist_ok=True)
    brokers = ";".join(f"kafka://{b.strip()}" for b in settings.kafka_bootstrap.split(","))
    return faust.App(
        f"switchboard-{role}",
        broker=brokers,
        store="memory://",
        datadir=str(datadir),
        # No web server: nothing of ours listens on 0.0.0.0.
        web_enabled=False,
        web_host="127.0.0.1",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=settings.producer_linger_ms,
        broker_commit_interval=1.0,
        consumer_group_instance_id=settings.worker_instance_id or f"{role}-{socket.gethostname()}",
        broker_session_timeout=settings.worker_session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.worker_session_timeout_s / 5),
        stream_wait_empty=False,
        loghandlers=[],
    )


def conversation_topic(app: faust.App, settings: Settings) -> Any:
    return app.topic(
        settings.conversation_topic,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.topic_partitions,
        internal=False,
    )


def run_worker(app: faust.App, loglevel: str = "info") -> None:
    """Run a Faust worker in this process until it is stopped (SIGTERM/SIGINT)."""
    from faust.worker import Worker

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    worker = Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
