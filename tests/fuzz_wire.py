"""A live fuzzer for a running ingress (gRPC) and analyst endpoint (HTTP), shared by
tests/integration/test_live_fuzz.py and benchmarks/fuzz.py.

`HostileRequests` is a seeded generator of hostile calls: hand-built protobuf (invalid UTF-8 in
string fields, unknown enum numbers, unknown fields, truncated varints, nested groups, bit
flips), bytes that are not protobuf at all, ids with separators and controls, texts over the
byte limit, batches over the count and byte bounds, StreamConversation opens that are cancelled
at once, and junk metadata. `FuzzRun` sends them with bounded concurrency over a few channels
while `GoodTraffic` writes real conversations beside them, and judges every reply:
no UNKNOWN, INTERNAL only for a frame that does not parse as the request message (what gRPC
answers when a deserializer fails), and every other refusal a specific code with details.
`http_fuzz` does the same for the analyst endpoint with malformed HTTP over raw sockets.

Everything goes through grpc's generic calls with no serializer, so the bytes on the wire are
exactly the generated ones.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.v1 import agent_pb2, chat_pb2, chat_pb2_grpc, events_pb2, knowledge_pb2

CHAT = "/switchboard.v1.ChatService/"
AGENT = "/switchboard.v1.AgentService/"
KNOWLEDGE = "/switchboard.v1.KnowledgeService/"

# What each method parses its request as (a frame that does not parse is "not protobuf").
REQUEST_TYPES: dict[str, type[Message]] = {
    CHAT + "StartConversation": chat_pb2.StartConversationRequest,
    CHAT + "SendMessage": chat_pb2.SendMessageRequest,
    CHAT + "SendMessages": chat_pb2.SendMessageRequest,
    CHAT + "SendMessageBatch": chat_pb2.SendMessageBatchRequest,
    CHAT + "GetConversation": chat_pb2.GetConversationRequest,
    CHAT + "StreamConversation": chat_pb2.StreamConversationRequest,
    CHAT + "CloseConversation": chat_pb2.CloseConversationRequest,
    CHAT + "RateConversation": chat_pb2.RateConversationRequest,
    AGENT + "ListQueue": agent_pb2.ListQueueRequest,
    AGENT + "AcceptConversation": agent_pb2.AcceptConversationRequest,
    AGENT + "SendAgentMessage": agent_pb2.SendAgentMessageRequest,
    AGENT + "TransferConversation": agent_pb2.TransferConversationRequest,
    AGENT + "ReturnToBot": agent_pb2.ReturnToBotRequest,
    KNOWLEDGE + "UpsertDocuments": knowledge_pb2.UpsertDocumentsRequest,
    KNOWLEDGE + "DeleteDocument": knowledge_pb2.DeleteDocumentRequest,
    KNOWLEDGE + "GetDocument": knowledge_pb2.GetDocumentRequest,
    KNOWLEDGE + "ListDocuments": knowledge_pb2.ListDocumentsRequest,
    KNOWLEDGE + "SearchKnowledge": knowledge_pb2.SearchKnowledgeRequest,
}
SERVER_STREAMING = {CHAT + "StreamConversation"}
BIDI = {CHAT + "SendMessages"}

# Refusals a caller can act on. UNIMPLEMENTED: a method path that does not exist.
PRECISE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# What grpc.aio's client reports when it lost the server's status (see `judge`).
CLIENT_LOST_STATUS = "Internal error from Core"
_INTERNAL_CODES = (grpc.StatusCode.UNKNOWN.value[0], grpc.StatusCode.INTERNAL.value[0])

# --------------------------------------------------------------------------- protobuf by hand


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers as protobuf writes them: ten bytes
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, data: bytes) -> bytes:
    return tag(number, 2) + varint(len(data)) + data


def parses(method: str, data: bytes) -> bool:
    cls = REQUEST_TYPES.get(method)
    if cls is None:
        return True
    try:
        cls.FromString(data)
    except DecodeError:
        return False
    return True


# --------------------------------------------------------------------------- hostile values

_SEPARATORS = [":", "|", "/", "{", "}", "\x00", "\n", "*", "?", "[", "]", "\\", "..", "%", " ", "\t", ","]
_UNICODE = [
    "你好",
    "مرحبا",
    "שָׁלוֹם",
    "🙂👍🏽",
    "e\u0301",
    "\u200b",
    "\u202e",
    "\ufeff",
    "\U0010ffff",
    "ᴀʙᴄ",
    "𝔘𝔫𝔦",
    "\u0085",
    "\u2028",
]
_CONTROLS = [chr(c) for c in (*range(0, 32), 0x7F)]
_INVALID_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\xc0\x80",  # overlong NUL
    b"\xed\xa0\x80",  # a lone surrogate
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xe4\xbd",  # truncated
    b"\x80\x80\x80",
    b"a\xffb",
]


class HostileValues:
    """Random field values that break some rule (and sometimes none)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def ident(self) -> str:
        return f"f{self.rng.getrandbits(48):012x}"

    def string(self) -> str:
        r = self.rng
        pick = r.randrange(12)
        if pick == 0:
            return ""
        if pick == 1:
            return self.ident()
        if pick == 2:
            return "".join(
                r.choice(_SEPARATORS) + self.ident()[: r.randrange(1, 6)] for _ in range(r.randint(1, 4))
            )
        if pick == 3:
            return self.ident() + r.choice(_SEPARATORS)
        if pick == 4:
            return "".join(r.choice(_UNICODE) for _ in range(r.randint(1, 8)))
        if pick == 5:
            return "".join(r.choice(_CONTROLS) for _ in range(r.randint(1, 5))) + self.ident()
        if pick == 6:
            return "x" * r.choice([63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 5000])
        if pick == 7:
            return " " * r.randint(1, 4) + r.choice(["", "\t", "\r\n"])
        if pick == 8:
            return "".join(chr(r.randrange(32, 0x2FFF)) for _ in range(r.randint(1, 40)))
        if pick == 9:
            return r.choice(["../../etc/passwd", "*", "sb:*", "{t}", "a|b", "0-0", "-1", "null", "%s%n"])
        if pick == 10:
            return self.ident() + "\n"
        return "".join(chr(r.randrange(0x20, 0x7F)) for _ in range(r.randint(1, 200)))

    def text(self) -> str:
        r = self.rng
        pick = r.randrange(6)
        if pick == 0:
            return "x" * r.choice([8193, 9000, 65_536, 300_000])  # over SWITCHBOARD_MAX_MESSAGE_BYTES
        if pick == 1:
            return "你" * r.choice([2731, 2732, 3000])  # 3 bytes each: just under and over 8 KiB
        if pick == 2:
            return "hi" + "".join(r.choice(_CONTROLS) for _ in range(r.randint(1, 3)))
        return self.string() or "hello"

    def number(self) -> int:
        return self.rng.choice([0, 1, 5, 6, 200, 201, 501, 2**31 - 1, 2**32 - 1, self.rng.getrandbits(32)])


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One hostile call: its method, the frames sent, and what the reply is judged against."""

    kind: str
    method: str
    frames: tuple[bytes, ...]
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    # Cancelled by the client after this many seconds (a stream flood): CANCELLED is ours.
    cancel_after_s: float | None = None

    @property
    def not_protobuf(self) -> bool:
        return any(not parses(self.method, frame) for frame in self.frames)


@dataclass
class Targets:
    """What hostile calls aim at: a tenant with conversations the fuzzer may close or rate."""

    tenant: str
    victims: list[str]


class HostileRequests:
    """Seeded: the same seed gives the same sequence of cases."""

    def __init__(self, seed: int, targets: Targets) -> None:
        self.rng = random.Random(seed)
        self.values = HostileValues(self.rng)
        self.targets = targets
        self._makers: list[tuple[int, Callable[[], Case]]] = [
            (10, self.start_conversation),
            (18, self.send_message),
            (6, self.send_messages_stream),
            (4, self.send_message_batch),
            (8, self.get_conversation),
            (10, self.stream_flood),
            (5, self.close_conversation),
            (5, self.rate_conversation),
            (6, self.agent_call),
            (5, self.knowledge_call),
            (12, self.raw_mutation),
            (8, self.not_protobuf),
            (1, self.unknown_method),
        ]
        self._weights = [w for w, _ in self._makers]

    def next(self) -> Case:
        (maker,) = self.rng.choices([m for _, m in self._makers], weights=self._weights)
        case = maker()
        if self.rng.random() < 0.08:
            case = Case(case.kind, case.method, case.frames, self.metadata(), case.cancel_after_s)
        return case

    def cases(self, n: int) -> list[Case]:
        return [self.next() for _ in range(n)]

    # --- helpers

    def tenant(self) -> str:
        r = self.rng.random()
        if r < 0.55:
            return self.targets.tenant
        if r < 0.7:
            return self.values.ident()
        return self.values.string()

    def conversation(self) -> str:
        r = self.rng.random()
        if r < 0.5 and self.targets.victims:
            return self.rng.choice(self.targets.victims)
        if r < 0.65:
            return self.values.ident()
        return self.values.string()

    def metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        r = self.rng
        pick = r.randrange(6)
        if pick == 0:
            return (("traceparent", "".join(chr(r.randrange(0x20, 0x7F)) for _ in range(r.randint(1, 300)))),)
        if pick == 1:
            return (
                ("authorization", r.choice(["Bearer ", "Bearer sbk_x_y", "Basic Zm9vOmJhcg==", "bearer"])),
            )
        if pick == 2:
            return (("x-fuzz-bin", r.randbytes(r.randint(0, 2000))),)
        if pick == 3:
            return tuple((f"x-fuzz-{i}", "v" * r.randint(0, 50)) for i in range(r.randint(20, 60)))
        if pick == 4:
            return (("x-fuzz-big", "a" * r.choice([4000, 7000, 12_000, 40_000])),)
        return (("grpc-timeout-ish", "1n"), ("user-agent", "fuzz/" + "z" * r.randint(0, 500)))

    # --- ChatService

    def start_conversation(self) -> Case:
        v = self.values
        req = chat_pb2.StartConversationRequest(
            tenant_id=self.tenant(),
            channel=self.rng.choice([0, 1, 7]),  # type: ignore[arg-type]
            customer_id=v.string(),
            locale=v.string() if self.rng.random() < 0.5 else "zh-CN",
            conversation_id=v.string() if self.rng.random() < 0.5 else "",
        )
        for _ in range(self.rng.choice([0, 0, 1, 3, 40])):
            req.metadata[v.string()] = v.string()
        return Case("fields", CHAT + "StartConversation", (req.SerializeToString(),))

    def send_request(self) -> chat_pb2.SendMessageRequest:
        v = self.values
        return chat_pb2.SendMessageRequest(
            tenant_id=self.tenant(),
            conversation_id=self.conversation(),
            client_message_id=v.string() if self.rng.random() < 0.6 else v.ident(),
            text=v.text(),
        )

    def send_message(self) -> Case:
        return Case("fields", CHAT + "SendMessage", (self.send_request().SerializeToString(),))

    def send_messages_stream(self) -> Case:
        frames: list[bytes] = []
        for _ in range(self.rng.randint(1, 30)):
            if self.rng.random() < 0.25:
                frames.append(self.mutate(CHAT + "SendMessage", self.send_request().SerializeToString()))
            else:
                frames.append(self.send_request().SerializeToString())
        cancel = self.rng.uniform(0, 0.05) if self.rng.random() < 0.3 else None
        return Case("stream", CHAT + "SendMessages", tuple(frames), cancel_after_s=cancel)

    def send_message_batch(self) -> Case:
        r = self.rng
        pick = r.randrange(5)
        if pick == 0:  # over the count bound
            req = chat_pb2.SendMessageBatchRequest(
                messages=[
                    chat_pb2.SendMessageRequest(
                        tenant_id=self.targets.tenant, conversation_id="c", client_message_id=str(i), text="x"
                    )
                    for i in range(r.choice([1001, 1500, 5000]))
                ]
            )
            return Case("huge_batch", CHAT + "SendMessageBatch", (req.SerializeToString(),))
        if pick == 1:  # over the byte bound (4 MiB), or past the receive limit (gRPC's own)
            size = r.choice([4 * 1024 * 1024 + 1, 5 * 1024 * 1024, 6 * 1024 * 1024])
            message = chat_pb2.SendMessageRequest(text="x" * 8000).SerializeToString()
            count = size // len(message) + 1
            frame = length_delimited(1, message) * count
            return Case("huge_batch", CHAT + "SendMessageBatch", (frame,))
        req = chat_pb2.SendMessageBatchRequest(
            messages=[self.send_request() for _ in range(r.randint(0, 40))]
        )
        frame = req.SerializeToString()
        if pick == 2:
            frame += length_delimited(1, r.choice(_INVALID_UTF8))  # a message that is not one
        return Case("batch", CHAT + "SendMessageBatch", (frame,))

    def get_conversation(self) -> Case:
        req = chat_pb2.GetConversationRequest(
            tenant_id=self.tenant(), conversation_id=self.conversation(), recent_messages=self.values.number()
        )
        return Case("fields", CHAT + "GetConversation", (req.SerializeToString(),))

    def cursor(self) -> str:
        r = self.rng
        return r.choice(
            [
                "",
                "",
                "0-0",
                "1-0",
                "-1",
                "1-",
                "abc",
                "99999999999999999999-0",
                "0-0\n",
                "1-1-1",
                f"{r.getrandbits(40)}-0",
                self.values.string(),
            ]
        )

    def stream_flood(self) -> Case:
        req = chat_pb2.StreamConversationRequest(
            tenant_id=self.targets.tenant if self.rng.random() < 0.8 else self.tenant(),
            conversation_id=self.conversation(),
            after_cursor=self.cursor(),
        )
        return Case(
            "stream_flood",
            CHAT + "StreamConversation",
            (req.SerializeToString(),),
            cancel_after_s=self.rng.choice([0.0, 0.001, 0.01, 0.05, 0.2]),
        )

    def close_conversation(self) -> Case:
        req = chat_pb2.CloseConversationRequest(
            tenant_id=self.tenant(), conversation_id=self.conversation(), resolution=self.values.string()
        )
        return Case("fields", CHAT + "CloseConversation", (req.SerializeToString(),))

    def rate_conversation(self) -> Case:
        req = chat_pb2.RateConversationRequest(
            tenant_id=self.tenant(),
            conversation_id=self.conversation(),
            score=self.values.number(),
            comment=self.values.string(),
        )
        return Case("fields", CHAT + "RateConversation", (req.SerializeToString(),))

    # --- AgentService and KnowledgeService

    def agent_call(self) -> Case:
        v, r = self.values, self.rng
        t, c = self.tenant(), self.conversation()
        req: Message = r.choice(
            [
                lambda: agent_pb2.ListQueueRequest(tenant_id=t, queue=v.string(), limit=v.number()),
                lambda: agent_pb2.AcceptConversationRequest(
                    tenant_id=t, conversation_id=c, agent_id=v.string()
                ),
                lambda: agent_pb2.SendAgentMessageRequest(
                    tenant_id=t,
                    conversation_id=c,
                    agent_id=v.string(),
                    client_message_id=v.string(),
                    text=v.text(),
                ),
                lambda: agent_pb2.TransferConversationRequest(
                    tenant_id=t,
                    conversation_id=c,
                    agent_id=v.string(),
                    to_agent_id=v.string(),
                    to_queue=v.string(),
                ),
                lambda: agent_pb2.ReturnToBotRequest(tenant_id=t, conversation_id=c, agent_id=v.string()),
            ]
        )()
        return Case("fields", AGENT + type(req).__name__.removesuffix("Request"), (req.SerializeToString(),))

    def knowledge_call(self) -> Case:
        v, r = self.values, self.rng
        t = self.tenant()
        pick = r.randrange(5)
        req: Message
        if pick == 0:
            docs = [
                knowledge_pb2.Document(
                    document_id=v.string(),
                    title=v.string(),
                    body=v.text() if r.random() < 0.7 else "b" * (64 * 1024 + 1),
                    language=v.string(),
                    tags=[v.string() for _ in range(r.choice([0, 1, 33]))],
                    url=v.string(),
                )
                for _ in range(r.choice([0, 1, 2, 101]))
            ]
            if docs and r.random() < 0.97:
                # A valid upsert is indexed by the assistant (chunked and embedded): a few hundred
                # of them queue its knowledge work for minutes and starve the tests after this one
                # (CI saw the knowledge replay test time out). So nearly all carry one document
                # with an empty id, which refuses the whole request.
                docs.append(knowledge_pb2.Document(document_id="", title="t", body="b"))
            req = knowledge_pb2.UpsertDocumentsRequest(tenant_id=t, documents=docs)
        elif pick == 1:
            req = knowledge_pb2.DeleteDocumentRequest(tenant_id=t, document_id=v.string())
        elif pick == 2:
            req = knowledge_pb2.GetDocumentRequest(tenant_id=t, document_id=v.string())
        elif pick == 3:
            req = knowledge_pb2.ListDocumentsRequest(tenant_id=t, page_size=v.number(), page_token=v.string())
        else:
            # Only invalid searches: a valid one runs the assistant's model (not this fuzzer's subject).
            query = r.choice(["", "   ", "q" * 2049, "a\x00b", "\x1b[31m"])
            req = knowledge_pb2.SearchKnowledgeRequest(tenant_id=t, query=query, limit=v.number())
        name = type(req).__name__.removesuffix("Request")
        return Case("fields", KNOWLEDGE + name, (req.SerializeToString(),))

    # --- bytes

    def valid_frame(self, method: str) -> bytes:
        cls = REQUEST_TYPES[method]
        msg = cls()
        for f in cls.DESCRIPTOR.fields:
            if f.type == f.TYPE_STRING and not f.is_repeated:
                setattr(msg, f.name, self.targets.tenant if f.name == "tenant_id" else self.values.ident())
        return msg.SerializeToString()

    def mutate(self, method: str, base: bytes) -> bytes:
        """`base` with one hand-made corruption (some still parse: unknown fields, enums)."""
        r = self.rng
        cls = REQUEST_TYPES[method]
        strings = [f.number for f in cls.DESCRIPTOR.fields if f.type == f.TYPE_STRING]
        pick = r.randrange(11)
        if pick == 0 and strings:  # a string field holding bytes that are not UTF-8
            return base + length_delimited(r.choice(strings), r.choice(_INVALID_UTF8))
        if pick == 1:  # an unknown enum number (only StartConversation has an enum: channel)
            return base + tag(2, 0) + varint(r.choice([8, 99, 2**31 - 1, -1, 2**40]))
        if pick == 2:  # unknown fields of every wire type
            number = r.choice([15, 16, 2047, 2**29 - 1])
            extra = r.choice(
                [
                    tag(number, 0) + varint(r.getrandbits(64)),
                    tag(number, 1) + r.randbytes(8),
                    tag(number, 5) + r.randbytes(4),
                    length_delimited(number, r.randbytes(r.randint(0, 300))),
                    tag(number, 3) + tag(number, 4),
                ]
            )
            return base + extra
        if pick == 3:  # a truncated varint
            return base + tag(r.choice([1, 2, 3]), 0) + b"\xff" * r.randint(1, 9)
        if pick == 4:  # a length past the end
            return base + tag(1, 2) + varint(r.choice([10, 2**20, 2**31 - 1, 2**63])) + b"abc"
        if pick == 5:  # groups nested past any parser's depth limit
            depth = r.choice([50, 101, 1000, 5000])
            return base + tag(999, 3) * depth + tag(999, 4) * depth
        if pick == 6:  # field number 0, wire types 6 and 7
            return base + r.choice([b"\x00\x01", b"\x0e", b"\x0f", b"\x07\x00"])
        if pick == 7 and base:  # bit flips
            data = bytearray(base)
            for _ in range(r.randint(1, 4)):
                data[r.randrange(len(data))] ^= 1 << r.randrange(8)
            return bytes(data)
        if pick == 8 and base:  # cut short
            return base[: r.randrange(len(base))]
        if pick == 9:  # a known string field sent as a varint (wrong wire type)
            return base + tag(r.choice(strings or [1]), 0) + varint(1)
        return base + tag(r.choice([1, 2, 3]), 0) + b"\xff" * 10 + b"\x7f"  # an 11-byte varint

    def raw_mutation(self) -> Case:
        method = self.rng.choice(
            sorted(set(REQUEST_TYPES) - BIDI - SERVER_STREAMING - {CHAT + "SendMessageBatch"})
        )
        frame = self.mutate(method, self.valid_frame(method))
        return Case("raw", method, (frame,))

    def not_protobuf(self) -> Case:
        r = self.rng
        method = r.choice(sorted(REQUEST_TYPES))
        frame = r.choice(
            [
                lambda: r.randbytes(r.randint(1, 3000)),
                lambda: b'{"tenant_id": "acme", "text": "hi"}',
                lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                lambda: b"\xff" * r.randint(1, 100),
                lambda: b"\x00" * r.randint(1, 100),
                lambda: gzip.compress(b"hello" * 50),
            ]
        )()
        if method in BIDI:
            return Case("not_protobuf", method, (frame, self.valid_frame(method), frame))
        cancel = 0.05 if method in SERVER_STREAMING else None
        return Case("not_protobuf", method, (frame,), cancel_after_s=cancel)

    def unknown_method(self) -> Case:
        path = self.rng.choice([CHAT + "Nope", "/switchboard.v1.Nope/Send", "/x", CHAT + "sendmessage"])
        return Case("unknown_method", path, (b"",))


# --------------------------------------------------------------------------- judging replies


@dataclass
class Report:
    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    item_codes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    internal_for_not_protobuf: int = 0
    client_lost_status: int = 0
    elapsed_s: float = 0.0

    def violation(self, case: Case, what: str) -> None:
        if len(self.violations) < 50:
            frames = ", ".join(
                repr(f[:80]) + (f"… ({len(f)} bytes)" if len(f) > 80 else "") for f in case.frames[:3]
            )
            self.violations.append(f"{case.kind} {case.method} [{frames}] md={case.metadata[:2]!r}: {what}")
        else:
            self.violations.append("…")


def judge(
    case: Case, code: grpc.StatusCode, details: str, items: Sequence[tuple[int, str]], report: Report
) -> None:
    report.codes[code.name] += 1
    for item_code, message in items:
        report.item_codes[grpc.StatusCode.OK.name if item_code == 0 else _code_name(item_code)] += 1
        if item_code in _INTERNAL_CODES:
            report.violation(case, f"a message's error_code {_code_name(item_code)}: {message}")
        elif item_code and not message.strip():
            report.violation(case, f"error_code {_code_name(item_code)} without error_message")
    if code == grpc.StatusCode.OK:
        return
    if code == grpc.StatusCode.CANCELLED and case.cancel_after_s is not None:
        return  # we cancelled it
    if code == grpc.StatusCode.INTERNAL and details == CLIENT_LOST_STATUS and case.method in BIDI:
        # grpc.aio's client, not the server: a write in flight when the server ends the call
        # replaces the server's status with this one (grpc/aio/_call.py `_write`). The server's
        # own INTERNALs are caught in its log (the test looks for incidents there).
        report.client_lost_status += 1
        return
    if code == grpc.StatusCode.INTERNAL and case.not_protobuf:
        report.internal_for_not_protobuf += 1  # gRPC's convention for a frame that does not parse
        return
    if code not in PRECISE:
        report.violation(case, f"{code.name}: {details}")
    elif not details.strip():
        report.violation(case, f"{code.name} without details")


def _code_name(value: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.name
    return f"code {value}"


def _items(method: str, replies: Sequence[bytes]) -> list[tuple[int, str]]:
    """Per-message results of a stream or batch (their own error codes)."""
    if method == CHAT + "SendMessages":
        parsed = [chat_pb2.SendMessageResponse.FromString(r) for r in replies]
    elif method == CHAT + "SendMessageBatch":
        parsed = [r for reply in replies for r in chat_pb2.SendMessageBatchResponse.FromString(reply).results]
    else:
        return []
    return [(r.error_code, r.error_message) for r in parsed]


CALL_TIMEOUT_S = 30.0


async def send_case(channel: grpc.aio.Channel, case: Case, report: Report) -> None:
    """Send one case and judge its reply."""
    metadata = case.metadata or None
    replies: list[bytes] = []
    code, details = grpc.StatusCode.OK, ""
    try:
        if case.method in BIDI:
            call: Any = channel.stream_stream(case.method)(
                iter(case.frames), metadata=metadata, timeout=CALL_TIMEOUT_S
            )
        elif case.method in SERVER_STREAMING:
            call = channel.unary_stream(case.method)(
                case.frames[0], metadata=metadata, timeout=CALL_TIMEOUT_S
            )
        else:
            call = channel.unary_unary(case.method)(case.frames[0], metadata=metadata, timeout=CALL_TIMEOUT_S)
        if case.method in BIDI or case.method in SERVER_STREAMING:

            async def drain() -> None:
                async for reply in call:
                    replies.append(reply)

            if case.cancel_after_s is None:
                await drain()
            else:
                try:
                    await asyncio.wait_for(drain(), case.cancel_after_s)
                except TimeoutError:
                    call.cancel()
                    code = grpc.StatusCode.CANCELLED
        else:
            replies.append(await call)
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    except ValueError as exc:
        # The client library refused to send it (metadata it does not allow): nothing reached the server.
        report.codes["client-refused"] += 1
        del exc
        return
    report.sent += 1
    try:
        items = _items(case.method, replies)
    except DecodeError as exc:
        report.violation(case, f"undecodable reply: {exc}")
        items = []
    judge(case, code, details, items, report)


# --------------------------------------------------------------------------- good traffic


@dataclass
class GoodTraffic:
    """Real conversations written beside the fuzzing, one message at a time per conversation (so
    their order is the order sent); every message must be acknowledged once and readable."""

    tenant: str
    conversations: list[str]
    per_conversation: int
    acks: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # conversation -> [(cmid, event id)]
    retries: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    async def write(self, stubs: Sequence[chat_pb2_grpc.ChatServiceStub], seed: int, pace_s: float) -> None:
        rng = random.Random(seed)

        async def one(conversation: str) -> None:
            sent = self.acks.setdefault(conversation, [])
            for i in range(self.per_conversation):
                cmid = f"{conversation[-8:]}-{i}-{uuid.uuid4().hex[:6]}"
                text = rng.choice(["你好 ", "hello ", "مرحبا ", "🙂 "]) + f"{i}"
                event_id = await self._send(rng.choice(stubs), conversation, cmid, text)
                if event_id is not None:
                    sent.append((cmid, event_id))
                await asyncio.sleep(rng.uniform(0, pace_s))

        await asyncio.gather(*(one(c) for c in self.conversations))

    async def _send(
        self, stub: chat_pb2_grpc.ChatServiceStub, conversation: str, cmid: str, text: str
    ) -> str | None:
        request = chat_pb2.SendMessageRequest(
            tenant_id=self.tenant, conversation_id=conversation, client_message_id=cmid, text=text
        )
        for attempt in range(40):
            try:
                ack = await stub.SendMessage(request, timeout=CALL_TIMEOUT_S)
                return str(ack.event_id)
            except grpc.aio.AioRpcError as exc:
                # The documented retries: same client_message_id, after a pause.
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    self.retries[exc.code().name] += 1
                    await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
                    continue
                self.failures.append(f"{cmid}: {exc.code().name} {exc.details()}")
                return None
        self.failures.append(f"{cmid}: still refused after 40 attempts")
        return None

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.acks.values())

    async def check(self, stub: chat_pb2_grpc.ChatServiceStub, within_s: float = 60.0) -> list[str]:
        """What is wrong with the written conversations as GetConversation shows them (nothing: [])."""
        problems = list(self.failures)
        deadline = time.monotonic() + within_s
        for conversation, sent in self.acks.items():
            seen: list[tuple[str, str]] = []
            while True:
                conv = await stub.GetConversation(
                    chat_pb2.GetConversationRequest(
                        tenant_id=self.tenant, conversation_id=conversation, recent_messages=200
                    )
                )
                seen = [
                    (m.client_message_id, m.event_id)
                    for m in conv.messages
                    if m.sender == events_pb2.SENDER_CUSTOMER
                ]
                if seen == sent or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            if seen != sent:
                missing = [m for m in sent if m not in seen]
                extra = [m for m in seen if m not in sent]
                problems.append(
                    f"{conversation}: {len(sent)} acked, {len(seen)} read; missing {missing[:3]}, "
                    f"unexpected {extra[:3]}, in order: {[m for m in seen if m in sent] == [m for m in sent if m in seen]}"
                )
        return problems


async def stream_still_opens(stub: chat_pb2_grpc.ChatServiceStub, tenant: str, conversation: str) -> str:
    """A new StreamConversation gets its first update (no slot leaked), or why not."""
    call = stub.StreamConversation(
        chat_pb2.StreamConversationRequest(tenant_id=tenant, conversation_id=conversation), timeout=15
    )
    try:
        async for _ in call:
            return "yes"
        return "ended without an update"
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    finally:
        call.cancel()


async def start_conversations(stub: chat_pb2_grpc.ChatServiceStub, tenant: str, n: int) -> list[str]:
    replies = await asyncio.gather(
        *(
            stub.StartConversation(
                chat_pb2.StartConversationRequest(
                    tenant_id=tenant, customer_id=f"c{i}", channel=events_pb2.CHANNEL_WEB
                ),
                timeout=CALL_TIMEOUT_S,
            )
            for i in range(n)
        )
    )
    return [r.conversation_id for r in replies]


# --------------------------------------------------------------------------- running it


@dataclass
class FuzzRun:
    """Sends `cases` over `channels`, at most `concurrency` in flight."""

    channels: Sequence[grpc.aio.Channel]
    concurrency: int = 50

    async def run(self, cases: Sequence[Case], report: Report | None = None) -> Report:
        report = report or Report()
        started = time.monotonic()
        queue: asyncio.Queue[Case] = asyncio.Queue()
        for case in cases:
            queue.put_nowait(case)

        async def worker(index: int) -> None:
            channel = self.channels[index % len(self.channels)]
            while not queue.empty():
                await send_case(channel, queue.get_nowait(), report)

        await asyncio.gather(*(worker(i) for i in range(self.concurrency)))
        report.elapsed_s += time.monotonic() - started
        return report


async def serving(address: str) -> str:
    """The ingress's health status for the whole server and ChatService."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = [
            (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
            for name in ("", "switchboard.v1.ChatService")
        ]
    return ",".join(health_pb2.HealthCheckResponse.ServingStatus.Name(s) for s in statuses)


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    root = psutil.Process(pid)
    total = 0
    for proc in (root, *root.children(recursive=True)):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_pids(pid: int) -> set[int]:
    root = psutil.Process(pid)
    return {root.pid, *(p.pid for p in root.children(recursive=True))}


# --------------------------------------------------------------------------- the analyst endpoint


@dataclass(frozen=True)
class HttpCase:
    """Raw bytes for one connection, sent in pieces `pause_s` apart; `incomplete`: the request
    never ends (the server may wait for the rest, and we give up after the read timeout)."""

    kind: str
    pieces: tuple[bytes, ...]
    incomplete: bool = False
    pause_s: float = 0.0
    # A well-formed request (whatever its content): it gets a status line, not a dropped connection.
    well_formed: bool = False


def _request(method: str, target: bytes, headers: Sequence[tuple[str, bytes]], body: bytes = b"") -> bytes:
    head = method.encode() + b" " + target + b" HTTP/1.1\r\n"
    head += b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers)
    return head + b"\r\n" + body


class HostileHttp:
    """Seeded malformed HTTP for the ClickHouse-compatible endpoint."""

    def __init__(self, seed: int, host: str) -> None:
        self.rng = random.Random(seed)
        self.host = host.encode()
        self._makers: list[Callable[[], HttpCase]] = [
            self.garbage_line,
            self.huge_headers,
            self.bad_content_length,
            self.chunked_garbage,
            self.bad_encoding,
            self.odd_query,
            self.odd_params,
            self.odd_methods,
            self.slowloris,
            self.sql_garbage,
        ]

    def cases(self, n: int) -> list[HttpCase]:
        return [self.rng.choice(self._makers)() for _ in range(n)]

    def base_headers(self, client: bool = True) -> list[tuple[str, bytes]]:
        headers = [("Host", self.host), ("Connection", b"close")]
        if client:
            headers.append(("User-Agent", b"fuzz/1.0"))
        return headers

    def garbage_line(self) -> HttpCase:
        r = self.rng
        data = r.choice(
            [
                lambda: r.randbytes(r.randint(1, 500)) + b"\r\n\r\n",
                lambda: b"GET\r\n\r\n",
                lambda: b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
                lambda: b"GET /" + b"a" * r.choice([9000, 70000]) + b" HTTP/1.1\r\n\r\n",
                lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + r.randbytes(100),
                lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + r.randbytes(50),
                lambda: b"GET / HTTP/1.1\nHost: x\n\n",
                lambda: b"GET /\x00 HTTP/1.1\r\n\r\n",
            ]
        )()
        return HttpCase("garbage_line", (data,))

    def huge_headers(self) -> HttpCase:
        r = self.rng
        headers = self.base_headers()
        pick = r.randrange(4)
        if pick == 0:
            headers.append(("X-Big", b"a" * r.choice([8190, 9000, 200_000])))
        elif pick == 1:
            headers.extend((f"X-H{i}", b"v") for i in range(r.choice([100, 200, 5000])))
        elif pick == 2:
            headers.append(("X-Bin", bytes(r.randrange(128, 256) for _ in range(200))))
        else:
            headers.append(("X-Ctl", b"a\x00b\x01c\x7f"))
        return HttpCase("huge_headers", (_request("GET", b"/?query=SELECT+1", headers),))

    def bad_content_length(self) -> HttpCase:
        r = self.rng
        value = r.choice([b"abc", b"-1", b"1e3", b"99999999999999999999", b"8, 9", b" ", b"0x10", b"+8"])
        headers = [*self.base_headers(), ("Content-Length", value)]
        if r.random() < 0.3:
            headers.append(("Content-Length", b"3"))
        incomplete = False
        if r.random() < 0.2:  # a length the body never reaches
            headers = [*self.base_headers(), ("Content-Length", b"1000")]
            incomplete = True
        return HttpCase("bad_content_length", (_request("POST", b"/", headers, b"SELECT 1"),), incomplete)

    def chunked_garbage(self) -> HttpCase:
        r = self.rng
        body, incomplete = r.choice(
            [
                (b"zz\r\nSELECT 1\r\n0\r\n\r\n", False),
                (b"8\r\nSELECT 1 and more than eight\r\n0\r\n\r\n", False),
                (b"FFFFFFFFFFFFFFFFFF\r\nx\r\n", False),
                (b"-1\r\nx\r\n0\r\n\r\n", False),
                (b"8;ext=\x00\r\nSELECT 1\r\n0\r\n\r\n", False),
                (b"8\r\nSELECT 1\r\n", True),  # no last chunk
                (b"8\r\nSELECT 1", True),
            ]
        )
        headers = [
            *self.base_headers(),
            ("Transfer-Encoding", r.choice([b"chunked", b"chunked, gzip", b"gzip, chunked", b"x"])),
        ]
        if r.random() < 0.3:
            headers.append(("Content-Length", b"4"))
        return HttpCase("chunked_garbage", (_request("POST", b"/", headers, body),), incomplete)

    def bad_encoding(self) -> HttpCase:
        r = self.rng
        encoding = r.choice(
            [b"gzip", b"deflate", b"zstd", b"lz4", b"br", b"xz", b"gzip, gzip", b"GZIP", b"\xff"]
        )
        body = r.choice(
            [
                lambda: r.randbytes(r.randint(1, 2000)),
                lambda: gzip.compress(b"SELECT 1")[: r.randint(1, 20)],
                lambda: b"\x28\xb5\x2f\xfd" + r.randbytes(40),  # zstd magic, then junk
                lambda: b"\x04\x22\x4d\x18" + r.randbytes(40),  # lz4 frame magic, then junk
                lambda: b"SELECT 1",
            ]
        )()
        headers = [
            *self.base_headers(),
            ("Content-Encoding", encoding),
            ("Content-Length", str(len(body)).encode()),
        ]
        return HttpCase("bad_encoding", (_request("POST", b"/", headers, body),), well_formed=True)

    def odd_query(self) -> HttpCase:
        r = self.rng
        target = r.choice(
            [
                b"/?query=SELECT%20%27%FF%FE%27",
                b"/?query=SELECT%20'\xff\xfe'",
                b"/?query=%ZZ",
                b"/?query=%",
                b"/?query=SELECT+1&%FF=1",
                b"/?query=SELECT+{p:String}&param_p=%FF%00",
                b"/?query=SELECT+1&param_%FF=1",
                b"/?query=" + b"%C3%28" * 50,
                b"/?" + b"&".join(b"a%d=1" % i for i in range(2000)),
                b"/?query=SELECT+1#frag\xff",
                b"//?query=SELECT+1",
                b"/../../etc/passwd",
                b"*",
                b"http://evil.example/?query=SELECT+1",
            ]
        )
        return HttpCase("odd_query", (_request("GET", target, self.base_headers()),), well_formed=True)

    def odd_params(self) -> HttpCase:
        """Transport parameters with hostile values (they reach headers, sessions, formats)."""
        r = self.rng
        name = r.choice(
            [
                b"default_format",
                b"database",
                b"session_id",
                b"session_timeout",
                b"client_protocol_version",
                b"query_id",
                b"readonly",
                b"session_check",
                b"max_threads",
                b"compress",
                b"user",
                b"password",
            ]
        )
        value = r.choice(
            [
                b"%FF%FE",
                b"%0D%0AX-Injected:%201",
                b"abc",
                b"-1",
                b"1e309",
                b"nan",
                b"%00",
                b"99999999999999999999999",
                b"x" * 5000,
                b"%E4%BD%A0",
            ]
        )
        target = b"/?query=SELECT+1&" + name + b"=" + value
        request = _request(r.choice(["GET", "POST"]), target, self.base_headers())
        return HttpCase("odd_params", (request,), well_formed=True)

    def odd_methods(self) -> HttpCase:
        r = self.rng
        method = r.choice(["PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "CONNECT", "G\x01T", "get", "BREW"])
        headers = self.base_headers(client=r.random() < 0.5)
        if r.random() < 0.3:
            headers.append(("Origin", b"http://evil.example"))
        if r.random() < 0.2:
            headers = [("Host", b"evil.example"), ("Connection", b"close")]
        return HttpCase(
            "odd_methods", (_request(method, b"/?query=SELECT+1", headers),), well_formed=method.isalpha()
        )

    def slowloris(self) -> HttpCase:
        r = self.rng
        full = _request(
            "POST", b"/?query=SELECT+1", [*self.base_headers(), ("Content-Length", b"100")], b"SE"
        )
        cut = r.randint(1, len(full) - 1)
        pieces = tuple(full[i : i + 7] for i in range(0, cut, 7))
        return HttpCase("slowloris", pieces, incomplete=True, pause_s=r.uniform(0.05, 0.3))

    def sql_garbage(self) -> HttpCase:
        r = self.rng
        sql = r.choice(
            [
                lambda: r.randbytes(r.randint(1, 300)),
                lambda: b"SELECT " + r.randbytes(40),
                lambda: b"SELEC 1",
                lambda: b"SELECT * FROM no_such_table_" + str(r.getrandbits(20)).encode(),
                lambda: b"SELECT " + b"(" * 5000 + b"1" + b")" * 5000,
                lambda: b"SELECT '" + b"\\" * 101 + b"'",
                lambda: b"DROP TABLE switchboard.messages",
                lambda: b"SELECT 1; SELECT 2",
                lambda: b"INSERT INTO switchboard.messages FORMAT JSONEachRow\n{garbage",
                lambda: b"SELECT * FROM file('/etc/passwd')",
            ]
        )()
        headers = [*self.base_headers(), ("Content-Length", str(len(sql)).encode())]
        return HttpCase("sql_garbage", (_request("POST", b"/", headers, sql),), well_formed=True)


@dataclass
class HttpReport:
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    # Engine errors ClickHouse itself answers with a 5xx, by error code.
    engine_5xx: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


async def send_http(host: str, port: int, case: HttpCase, report: HttpReport, read_timeout_s: float) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    data = b""
    try:
        try:
            for piece in case.pieces:
                writer.write(piece)
                await writer.drain()
                if case.pause_s:
                    await asyncio.sleep(case.pause_s)
        except (ConnectionError, OSError):
            pass  # the server hung up on us half-way: an answer too
        # A request that never ends waits `read_timeout_s` for the server to give up on it; a
        # complete one gets longer (a query on a loaded machine), and no answer is a hang.
        timeout_s = read_timeout_s if case.incomplete else max(read_timeout_s, 15.0)
        try:
            data = await asyncio.wait_for(reader.read(1 << 16), timeout_s)
            while data and len(data) < (1 << 16):
                more = await asyncio.wait_for(reader.read(1 << 16), timeout_s)
                if not more:
                    break
                data += more
        except TimeoutError:
            if not data and not case.incomplete:
                report.violations.append(
                    f"{case.kind} {case.pieces[0][:120]!r}: no answer within {timeout_s} s"
                )
        except (ConnectionError, OSError):
            pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    report.sent += 1
    status = "closed"
    if data.startswith(b"HTTP/"):
        status = data.split(b" ", 2)[1].decode(errors="replace")
    report.statuses[status] += 1
    report.by_kind[f"{case.kind} {status}"] += 1
    head, _, body = data.partition(b"\r\n\r\n")
    excerpt = f"{case.kind} {case.pieces[0][:160]!r} -> {head[:40]!r} {body[:300]!r}"
    engine_error = re.match(rb"Code: (\d+)\. DB::Exception: ", body)
    if b"Traceback" in data or b"STD_EXCEPTION" in data:
        report.violations.append(excerpt)
    elif status[:1] == "5":
        # ClickHouse's own status for an engine error it does not map to 4xx (TOO_DEEP_RECURSION
        # for a query nested past the parser's depth is 500 on a ClickHouse server too) is kept;
        # anything else is a failure of the endpoint's own.
        if engine_error is None or engine_error.group(1) == b"1001":
            report.violations.append(excerpt)
        else:
            report.engine_5xx[engine_error.group(1).decode()] += 1
    elif status == "closed" and case.well_formed:
        report.violations.append(excerpt)


async def http_fuzz(
    host: str, port: int, cases: Sequence[HttpCase], concurrency: int = 20, read_timeout_s: float = 3.0
) -> HttpReport:
    report = HttpReport()
    queue: asyncio.Queue[HttpCase] = asyncio.Queue()
    for case in cases:
        queue.put_nowait(case)

    async def worker() -> None:
        while not queue.empty():
            await send_http(host, port, queue.get_nowait(), report, read_timeout_s)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return report


def established(pid: int, port: int) -> int:
    """TCP connections the process tree holds open on its listening `port`."""
    count = 0
    root = psutil.Process(pid)
    for proc in (root, *root.children(recursive=True)):
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        count += sum(1 for c in conns if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN)
    return count


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# What the ingress logs when it fails: an incident (every INTERNAL it answers), a traceback, a
# restarted server process.
INGRESS_FAILURES = ("incident", "Traceback", "exited with", "Exception in callback")
# The analyst endpoint's own failures (aiohttp logs a traceback for every malformed request it
# answers 400 itself, which is not one).
ENDPOINT_FAILURES = ("query endpoint failed", "Unhandled exception", "Exception in callback")


def log_problems(path: Path, since: int, markers: Sequence[str] = INGRESS_FAILURES) -> list[str]:
    """Lines a process logged after byte `since` that carry one of `markers`."""
    with path.open("rb") as f:
        f.seek(since)
        lines = f.read().decode(errors="replace").splitlines()
    return [
        line
        for i, line in enumerate(lines)
        if any(m in line for m in markers)
        # grpc.aio's own record (not the ingress's) when it cannot send the status of a stream
        # the client's broken framing already ended in core: nothing of ours failed.
        and not (line.startswith("Traceback") and i and _GRPC_LOST_STATUS in lines[i - 1])
    ]


_GRPC_LOST_STATUS = "ExecuteBatchError raised in core by servicer method"


async def http_exchange(
    host: str, port: int, raw: bytes, timeout_s: float = 10.0
) -> tuple[str, bytes, bytes]:
    """One request on its own connection: (status, header block, body); status "closed" when the
    server hung up without answering."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "closed"
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        body = _dechunk(body)  # a streamed result (as ClickHouse sends one)
    return status, head, body


def _dechunk(body: bytes) -> bytes:
    """A chunked transfer-encoded body's content; what cannot be parsed is kept as it came."""
    out, pos = bytearray(), 0
    while True:
        line_end = body.find(b"\r\n", pos)
        try:
            size = int(body[pos:line_end].split(b";", 1)[0], 16)
        except ValueError:
            return body
        if line_end < 0 or size == 0:
            return bytes(out)
        out += body[line_end + 2 : line_end + 2 + size]
        pos = line_end + 2 + size + 2


def http_post(
    host: str, sql: bytes, headers: Sequence[tuple[str, bytes]] = (), target: bytes = b"/"
) -> bytes:
    """A POST as a ClickHouse client sends it (its own User-Agent), closing the connection after."""
    fixed = [("Host", host.encode()), ("Connection", b"close"), ("User-Agent", b"fuzz/1.0")]
    return _request("POST", target, [*fixed, *headers, ("Content-Length", str(len(sql)).encode())], sql)


# --------------------------------------------------------------------------- gRPC framing


@dataclass(frozen=True)
class FramingCase:
    """A gRPC call written by hand over HTTP/2: its headers and the DATA it carries, which need
    not be a well-formed gRPC message (flag byte, 4-byte length, message)."""

    kind: str
    path: str
    data: bytes
    headers: tuple[tuple[str, str], ...] = ()
    method: str = "POST"
    content_type: str = "application/grpc"

    @property
    def unfinished(self) -> bool:
        """Whether the DATA ends inside a message (or has none). grpc.aio's server then reads no
        request and returns without a status (its `_handle_unary_unary_rpc` takes a missing
        message for a cancelled call), so a unary call ends at its deadline, DEADLINE_EXCEEDED,
        and not before: gRPC's behaviour, allowed for these only."""
        rest = self.data
        if not rest:
            return True
        while rest:
            if len(rest) < 5 or len(rest) < 5 + int.from_bytes(rest[1:5], "big"):
                return True
            rest = rest[5 + int.from_bytes(rest[1:5], "big") :]
        return False


def grpc_message(payload: bytes, flag: int = 0, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return bytes([flag]) + size.to_bytes(4, "big") + payload


class MalformedFraming:
    """Seeded gRPC calls whose framing is broken (or whose headers are), not just their payload."""

    def __init__(self, seed: int, tenant: str) -> None:
        self.rng = random.Random(seed)
        self.request = chat_pb2.GetConversationRequest(
            tenant_id=tenant, conversation_id="nope"
        ).SerializeToString()

    def cases(self, n: int) -> list[FramingCase]:
        return [self.next() for _ in range(n)]

    def next(self) -> FramingCase:
        r = self.rng
        path = r.choice(
            [
                CHAT + "GetConversation",
                CHAT + "SendMessage",
                CHAT + "SendMessages",
                CHAT + "StreamConversation",
            ]
        )
        good = grpc_message(self.request)
        pick = r.randrange(14)
        if pick == 0:
            return FramingCase("compressed_flag_no_encoding", path, grpc_message(self.request, flag=1))
        if pick == 1:
            return FramingCase(
                "bad_gzip", path, grpc_message(r.randbytes(40), flag=1), (("grpc-encoding", "gzip"),)
            )
        if pick == 2:
            return FramingCase("flag_byte", path, grpc_message(self.request, flag=r.randrange(2, 256)))
        if pick == 3:
            return FramingCase(
                "length_past_end",
                path,
                grpc_message(self.request, length=len(self.request) + r.randint(1, 1000)),
            )
        if pick == 4:
            return FramingCase(
                "huge_length",
                path,
                grpc_message(b"x" * 10, length=r.choice([2**31 - 1, 2**32 - 1, 50 << 20])),
            )
        if pick == 5:
            return FramingCase("partial_prefix", path, good + bytes([0, 0, 0])[: r.randint(1, 3)])
        if pick == 6:
            return FramingCase("two_messages_unary", CHAT + "GetConversation", good + good)
        if pick == 7:
            return FramingCase("no_message", path, b"")
        if pick == 8:
            return FramingCase("random_bytes", path, r.randbytes(r.randint(1, 500)))
        if pick == 9:
            return FramingCase(
                "unknown_encoding", path, grpc_message(self.request, flag=1), (("grpc-encoding", "snappy"),)
            )
        if pick == 10:
            return FramingCase(
                "bad_timeout", path, good, (("grpc-timeout", r.choice(["abc", "-1S", "99999999999H", "1x"])),)
            )
        if pick == 11:
            return FramingCase(
                "content_type", path, good, content_type=r.choice(["text/plain", "application/json", ""])
            )
        if pick == 12:
            return FramingCase("http_method", path, good, method=r.choice(["GET", "PUT", "DELETE"]))
        return FramingCase("bin_header", path, good, (("x-junk-bin", "!!!not base64!!!"),))


@dataclass
class FramingReport:
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)


async def send_framing(
    host: str, port: int, case: FramingCase, report: FramingReport, timeout_s: float = 10.0
) -> None:
    """One call on a connection of its own; judged by its grpc-status (or the HTTP status)."""
    import h2.config
    import h2.connection
    import h2.events

    reader, writer = await asyncio.open_connection(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    headers = [
        (":method", case.method),
        (":scheme", "http"),
        (":path", case.path),
        (":authority", f"{host}:{port}"),
        ("te", "trailers"),
        *([("content-type", case.content_type)] if case.content_type else []),
        # A deadline, as real clients send: gRPC leaves a unary call whose request never came
        # whole (no message, a length past the end) to it (see `send_framing`'s judgement).
        *([] if any(k == "grpc-timeout" for k, _ in case.headers) else [("grpc-timeout", "3S")]),
        *case.headers,
    ]
    conn.send_headers(stream, headers, end_stream=not case.data)
    if case.data:
        conn.send_data(stream, case.data, end_stream=True)
    writer.write(conn.data_to_send())
    seen: dict[str, str] = {}
    outcome = ""
    try:
        async with asyncio.timeout(timeout_s):
            while not outcome:
                chunk = await reader.read(65536)
                if not chunk:
                    outcome = "connection closed"
                    break
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        seen.update({str(k): str(v) for k, v in event.headers})
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        outcome = "ended"
                    elif isinstance(event, h2.events.StreamReset):
                        outcome = f"reset {event.error_code!r}"
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        outcome = f"goaway {event.error_code!r}"
                writer.write(conn.data_to_send())
    except TimeoutError:
        outcome = "timeout"
    finally:
        writer.close()
    report.sent += 1
    code = seen.get("grpc-status")
    name = _code_name(int(code)) if code is not None and code.isdigit() else None
    label = name or (f"http {seen[':status']}" if ":status" in seen else outcome)
    report.outcomes[f"{case.kind} {label}"] += 1
    what = f"{case.kind} {case.path} {case.data[:40]!r}: {label} {seen.get('grpc-message', '')[:200]!r}"
    if outcome == "timeout":
        report.violations.append(what + " (no answer: a hang)")
    elif name == "DEADLINE_EXCEEDED" and not case.unfinished:
        report.violations.append(what + " (a request that came whole waited for its deadline)")
    elif name == "UNKNOWN":
        report.violations.append(what)
    elif name == "INTERNAL" and "incident" in seen.get("grpc-message", ""):
        report.violations.append(what + " (the ingress's own INTERNAL)")


async def framing_fuzz(
    host: str, port: int, cases: Sequence[FramingCase], concurrency: int = 20
) -> FramingReport:
    report = FramingReport()
    queue: asyncio.Queue[FramingCase] = asyncio.Queue()
    for case in cases:
        queue.put_nowait(case)

    async def worker() -> None:
        while not queue.empty():
            await send_framing(host, port, queue.get_nowait(), report)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return report
