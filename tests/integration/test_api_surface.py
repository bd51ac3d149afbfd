"""What a client with nothing but the server sees: health, reflection, and a JSON call through it."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.integration.conftest import System

pytestmark = pytest.mark.integration


async def test_health_reports_serving(system: System) -> None:
    async with grpc.aio.insecure_channel(system.settings.grpc_listen) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "switchboard.v1.ChatService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services_and_a_json_call_works(system: System, tenant: str) -> None:
    # Like `grpcurl -plaintext HOST list` and `grpcurl -d '{json}' HOST Service/Method`: no generated code.
    with grpc.insecure_channel(system.settings.grpc_listen) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {
            "switchboard.v1.ChatService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services

        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("switchboard.v1.ChatService")
        assert {m.name for m in service.methods} >= {
            "StartConversation",
            "SendMessage",
            "SendMessages",
            "GetConversation",
            "StreamConversation",
            "CloseConversation",
        }
        method = service.methods_by_name["StartConversation"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(
            json.dumps({"tenant_id": tenant, "channel": "CHANNEL_WEB", "customer_id": "c-json"}),
            request_cls(),
        )
        call = channel.unary_unary(
            "/switchboard.v1.ChatService/StartConversation",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        reply = json.loads(json_format.MessageToJson(call(request, timeout=30)))
        assert reply["tenantId"] == tenant
        assert reply["status"] == "CONVERSATION_STATUS_OPEN"
        assert reply["channel"] == "CHANNEL_WEB"
        assert reply["conversationId"]
