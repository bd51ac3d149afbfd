"""A bare grpc.aio echo server: the ingest benchmark's "what does gRPC alone cost" baseline.

It serves `switchboard.v1.ChatService/SendMessage`, `/SendMessages` and `/SendMessageBatch` with the same request and
response messages as the ingress, through generic handlers, and does nothing else: no validation,
no Redis, no Kafka. Run by `benchmarks/ingest.py` as a child process:

    python benchmarks/echo_server.py --listen 127.0.0.1:45052
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import Message
from switchboard.v1 import chat_pb2

SERVICE_NAME = "switchboard.v1.ChatService"
# An event id is a 36-character UUID; the echo answers with one of the same size.
_EVENT_ID = "00000000-0000-7000-8000-000000000000"
_offsets = itertools.count()


def _echo(req: chat_pb2.SendMessageRequest) -> chat_pb2.SendMessageResponse:
    return chat_pb2.SendMessageResponse(
        event_id=_EVENT_ID,
        partition=0,
        offset=next(_offsets),
        client_message_id=req.client_message_id,
        conversation_id=req.conversation_id,
    )


async def send_message(
    request: chat_pb2.SendMessageRequest, context: grpc.aio.ServicerContext
) -> chat_pb2.SendMessageResponse:
    return _echo(request)


async def send_messages(
    requests: AsyncIterator[chat_pb2.SendMessageRequest], context: grpc.aio.ServicerContext
) -> AsyncIterator[chat_pb2.SendMessageResponse]:
    async for req in requests:
        yield _echo(req)


async def send_message_batch(
    request: chat_pb2.SendMessageBatchRequest, context: grpc.aio.ServicerContext
) -> chat_pb2.SendMessageBatchResponse:
    return chat_pb2.SendMessageBatchResponse(results=[_echo(req) for req in request.messages])


def _serialize(message: Message) -> bytes:
    # Not `Message.SerializeToString`: with the upb backend the base-class method is abstract.
    return message.SerializeToString()


def _handlers() -> grpc.GenericRpcHandler:
    parse = chat_pb2.SendMessageRequest.FromString
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "SendMessage": grpc.unary_unary_rpc_method_handler(send_message, parse, _serialize),
            "SendMessages": grpc.stream_stream_rpc_method_handler(send_messages, parse, _serialize),
            "SendMessageBatch": grpc.unary_unary_rpc_method_handler(
                send_message_batch, chat_pb2.SendMessageBatchRequest.FromString, _serialize
            ),
        },
    )


async def serve(listen: str) -> None:
    # The same server options as the ingress, so the only difference is the work behind each call.
    server = grpc.aio.server(
        maximum_concurrent_rpcs=8000,
        options=[("grpc.max_receive_message_length", 4 * 1024 * 1024), ("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((_handlers(),))
    if server.add_insecure_port(listen) == 0:
        raise SystemExit(f"echo server: cannot listen on {listen} (port in use?)")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"echo server listening on {listen}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:45052")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
