"""Every process serves Prometheus metrics on its own 127.0.0.1 port, and the series move with
traffic: gRPC calls by method and code, produce latency, events processed and batch time per
processor, consumer lag per partition, model inference, gateway attempts, ClickHouse inserts.
The Pipeline dashboard's Prometheus panels only name series these endpoints export."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from switchboard.v1 import chat_pb2

from services.commands.status import process_status
from services.observability.metrics import metrics_listen
from tests.conftest import System, eventually, scrape_text, start_conversation
from tests.integration.test_assistant import conversation, faq_tenant
from tests.integration.test_grafana_dashboards import prometheus_exprs

pytestmark = pytest.mark.integration
__all__ = ["faq_tenant"]  # a fixture, imported for its side of pytest

ROLES = ("ingress", "sessions", "assistant", "analytics")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(scrape_text(address)):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape_all(system: System) -> dict[str, Samples]:
    return {role: await asyncio.to_thread(scrape, metrics_listen(system.settings, role)) for role in ROLES}


def moved(
    before: Mapping[str, Samples], after: Mapping[str, Samples], role: str, name: str, **labels: str
) -> float:
    return total(after[role], name, **labels) - total(before[role], name, **labels)


@pytest.mark.timeout(400)
async def test_every_process_exports_metrics_that_move_with_traffic(
    system: System, stub, faq_tenant: str
) -> None:
    # Every endpoint answers (the processes may still be starting: wait for each).
    for role in ROLES:
        address = metrics_listen(system.settings, role)

        async def answers(a: str = address) -> bool:
            return await asyncio.to_thread(_answers, a)

        await eventually(answers, bool, what=f"{role} metrics on {address}")
    before = await scrape_all(system)

    cid = await start_conversation(stub, faq_tenant)
    await stub.SendMessage(
        chat_pb2.SendMessageRequest(
            tenant_id=faq_tenant,
            conversation_id=cid,
            client_message_id="q1",
            text="how long does a refund take?",
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.SendMessage(
            chat_pb2.SendMessageRequest(
                tenant_id=faq_tenant, conversation_id=cid, client_message_id="q2", text=""
            )
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await eventually(
        lambda: conversation(stub, faq_tenant, cid),
        lambda c: c is not None and c.message_count >= 2,
        within_s=120,
        what="the bot's reply",
    )

    processors = (
        ("sessions", "sessions", "switchboard-sessions"),
        ("assistant", "assistant", "switchboard-assistant"),
        ("analytics", "projector", "switchboard-projector"),
    )

    def projected(after: dict[str, Samples]) -> bool:
        # The reply's events reach the projector after the sessions worker saw the reply. A batch's
        # records are counted at its commit, its time and size a moment later (as its span ends).
        return moved(
            before, after, "analytics", "switchboard_events_processed_total", processor="projector"
        ) >= 4 and all(
            moved(before, after, role, "switchboard_batch_processing_seconds_count", processor=processor) >= 1
            for role, processor, _ in processors
        )

    after = await eventually(lambda: scrape_all(system), projected, what="the projector's counters")

    # Ingress: calls by method and code, produce latency, in-flight writes.
    assert (
        moved(before, after, "ingress", "switchboard_grpc_requests_total", method="SendMessage", code="OK")
        >= 1
    )
    assert (
        moved(
            before,
            after,
            "ingress",
            "switchboard_grpc_requests_total",
            method="SendMessage",
            code="INVALID_ARGUMENT",
        )
        >= 1
    )
    assert (
        moved(before, after, "ingress", "switchboard_grpc_request_seconds_count", method="StartConversation")
        >= 1
    )
    assert moved(before, after, "ingress", "switchboard_produce_seconds_count", outcome="ok") >= 2
    assert any(n == "switchboard_inflight_writes" for n, _ in after["ingress"])

    # Every processor: events applied, batch time and size, lag per partition of its group.
    for role, processor, group in processors:
        assert moved(before, after, role, "switchboard_events_processed_total", processor=processor) >= 2, (
            role
        )
        assert (
            moved(before, after, role, "switchboard_batch_processing_seconds_count", processor=processor) >= 1
        )
        assert moved(before, after, role, "switchboard_batch_records_sum", processor=processor) >= 2
        partitions = {
            dict(labels)["partition"]
            for name, labels in after[role]
            if name == "switchboard_consumer_lag" and dict(labels).get("group") == group
        }
        assert partitions == {str(p) for p in range(system.settings.topic_partitions)}, role

    # Assistant: model inference and the gateway's attempt by adapter and outcome.
    assert moved(before, after, "assistant", "switchboard_model_inference_seconds_count", model="intent") >= 1
    assert (
        moved(before, after, "assistant", "switchboard_model_inference_seconds_count", model="retrieval") >= 1
    )
    assert (
        moved(before, after, "assistant", "switchboard_gateway_calls_total", adapter="template", outcome="ok")
        >= 1
    )

    # Projector: ClickHouse inserts, their rows and time.
    assert moved(before, after, "analytics", "switchboard_projector_insert_rows_sum", table="raw_events") >= 4
    assert (
        moved(before, after, "analytics", "switchboard_projector_insert_seconds_count", table="raw_events")
        >= 1
    )

    # The lag of a caught-up group drains to zero.
    async def lag() -> float:
        return total(
            await asyncio.to_thread(scrape, metrics_listen(system.settings, "analytics")),
            "switchboard_consumer_lag",
        )

    await eventually(lag, lambda v: v == 0, what="projector lag back to 0")


def _answers(address: str) -> bool:
    try:
        return bool(scrape_text(address))
    except OSError:
        return False


async def test_prometheus_panels_only_use_exported_series(system: System, stub, tenant: str) -> None:
    # Some traffic first, so every labelled series has been created at least once.
    cid = await start_conversation(stub, tenant)
    await stub.SendMessage(
        chat_pb2.SendMessageRequest(tenant_id=tenant, conversation_id=cid, client_message_id="m1", text="hi")
    )
    exprs = prometheus_exprs()
    assert exprs, "the Pipeline dashboard has Prometheus panels"
    wanted: dict[str, set[str]] = {}
    for title, expr in exprs:
        names = set(re.findall(r"\b(switchboard_[a-z_]+)\b", expr))
        assert names, f"{title}: no switchboard series in {expr!r}"
        wanted[title] = names

    async def missing() -> dict[str, list[str]]:
        """Each panel's series no process exports (yet)."""
        found: set[str] = set()
        for role in ROLES:
            for family in text_string_to_metric_families(
                await asyncio.to_thread(scrape_text, metrics_listen(system.settings, role))
            ):
                found.update(s.name for s in family.samples)
                found.add(family.name)
        return {title: sorted(names - found) for title, names in wanted.items() if not names <= found}

    # A labelled series appears once its first event is counted, which for the projector is after
    # its insert's commit: wait for them rather than scrape once.
    await eventually(missing, lambda left: not left, within_s=30, what="every series a panel uses")


def test_switchboard_status_lists_every_process_and_its_metrics(system: System) -> None:
    status = process_status(system.settings)
    assert set(status) == set(ROLES)
    for role, s in status.items():
        assert s["metrics"] == f"http://{metrics_listen(system.settings, role)}/metrics", role
        assert s["metrics_answer"] is True, role
    assert status["ingress"]["address"] == system.settings.grpc_listen and status["ingress"]["answers"]
    assert status["analytics"]["answers"] is True
