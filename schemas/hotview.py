"""Layout of the Redis hot view. Pure naming and encoding: no Redis client here.

Everything under these keys is a fold over the log and can be flushed and rebuilt by replay.
Keys carry the tenant, so a conversation id from another tenant simply is not found.
"""

from __future__ import annotations

import hashlib
import re

from schemas.events import Event, decode_event

# Fields of the conversation hash.
F_STATE = "state"  # JSON of ConversationState, written by the sessions worker only
F_CURSOR = "cursor"  # live-stream id of the last event folded into F_STATE
F_CREATED_NS = "created_ns"  # written by the ingress once the start event is durable
F_CLOSED_NS = "closed_ns"  # written by the ingress once the close event is durable
# While a close is under way: until when (Redis TIME, ms) the close holds the conversation, as
# "<until>:<owner>". Sends are refused while it holds, in every ingress process (see `inflight_key`).
F_CLOSING = "closing"
F_CHANNEL = "channel"
F_CUSTOMER = "customer_id"

# Fields of each live-stream entry.
S_EVENT = "e"  # the encoded switchboard.v1.Event, without tenant_id and conversation_id (see below)
S_STATUS = "s"
S_MESSAGES = "n"
S_SEQUENCE = "q"

# ASCII digits only: Python's \d also takes other scripts' digits (١٢-١, １２-１), which int() reads
# as numbers, so such an id would pass every range check and then fail the shared XREAD of every
# live stream on its reader (Redis takes ASCII ids only).
_CURSOR = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def conversation_key(tenant_id: str, conversation_id: str) -> str:
    return f"sb:{{{tenant_id}:{conversation_id}}}:conv"


def live_stream_key(tenant_id: str, conversation_id: str) -> str:
    # Same hash tag as the conversation hash, so both live on one Redis Cluster slot.
    return f"sb:{{{tenant_id}:{conversation_id}}}:live"


def reply_stream_key(tenant_id: str, conversation_id: str) -> str:
    """Reply deltas while the assistant generates (ephemeral: the finished reply is an event)."""
    return f"sb:{{{tenant_id}:{conversation_id}}}:deltas"


# The field of a reply-stream entry holding a serialized switchboard.v1.ReplyDelta.
REPLY_DELTA_FIELD = b"d"


def accept_key(tenant_id: str, conversation_id: str, handoff_count: int) -> str:
    """Who accepted the conversation's `handoff_count`-th handoff (same hash tag as its hash)."""
    return f"sb:{{{tenant_id}:{conversation_id}}}:accept:{handoff_count}"


def queue_key(tenant_id: str, queue: str) -> str:
    """Sorted set of conversations waiting for an agent in a queue, scored by handoff time (ns)."""
    return f"sb:{{{tenant_id}}}:queue:{queue}"


def open_conversations_key(tenant_id: str) -> str:
    """Sorted set of the tenant's open conversations (services/ingress/_quotas.py). Score 0: its
    start is folded (kept by the sessions worker until the close is folded); a positive score: a
    start reserved by the ingress and not folded yet, expiring at that Redis TIME in ms."""
    return f"sb:{{{tenant_id}}}:open"


def activity_key(tenant_id: str) -> str:
    """Sorted set of the tenant's open conversations by last activity (score: the latest folded
    event's occurred_at in ms, kept by the sessions worker, which may lag the truth by up to
    `ACTIVITY_STEP_MS`: the conversation's state is the exact figure). The idle-close sweeper
    (services/ingress/_idle.py) reads the oldest ones."""
    return f"sb:{{{tenant_id}}}:activity"


# Set of the tenants that have had a conversation (the idle-close sweeper's round).
ACTIVE_TENANTS_KEY = "sb:tenants:active"
# The sessions worker moves a conversation's activity score only once it advanced this much.
ACTIVITY_STEP_MS = 5000


def documents_key(tenant_id: str) -> str:
    """Hash of a tenant's knowledge documents: document id -> switchboard.v1.Document bytes."""
    return f"sb:{{{tenant_id}}}:documents"


# Set by each assistant once the documents hashes hold every document it read: gone (Redis lost
# its data), the assistant reads knowledge-events from the start again and writes them back.
KNOWLEDGE_MIRRORED_KEY = "sb:knowledge:mirrored"


def pending_documents_key(tenant_id: str) -> str:
    """Sorted set of a tenant's new documents acknowledged but not yet in `documents_key` (member:
    document id, score: expiry ms), kept by the ingress so the document quota counts them."""
    return f"sb:{{{tenant_id}}}:documents:pending"


def failed_documents_key(tenant_id: str) -> str:
    """Hash of a tenant's documents whose latest version the assistant could not index (document
    id -> JSON {"error", "attempts"}); the assistant keeps retrying them and removes
    an entry once the document is indexed or deleted."""
    return f"sb:{{{tenant_id}}}:documents:failed"


def inflight_key(tenant_id: str, conversation_id: str) -> str:
    """Sorted set of the conversation's messages claimed but not yet settled (member: the
    attempt's marker and claim key; score: when it expires, Redis TIME in ms). A close waits
    until it is empty, so every message acknowledged before the close is before it in the log,
    whichever ingress process wrote it."""
    return f"sb:{{{tenant_id}:{conversation_id}}}:inflight"


def idempotency_key(tenant_id: str, conversation_id: str, client_message_id: str) -> str:
    return f"sb:{{{tenant_id}:{conversation_id}}}:msg:{client_message_id}"


def live_stream_id(offset: int) -> str:
    """Stream entry id for the event at `offset`. Deterministic, so a redelivered event's XADD is
    refused by Redis (ids must grow) instead of appearing twice; a client cursor is the id and its
    conversation's tag (services/ingress/_reads.py, public_cursor)."""
    return f"{offset}-1"


def is_valid_cursor(cursor: str) -> bool:
    return _CURSOR.fullmatch(cursor) is not None


# A live-stream entry's event leaves out tenant_id and conversation_id (fields 2 and 3 of
# switchboard.v1.Event), which the stream's key has: ~50 of an entry's ~200 bytes, in every entry
# of every conversation. A reader appends them back (`live_event_suffix`) before it parses: protobuf
# keeps the last occurrence of a field, so an entry written whole (by an older version, or when the
# fields are not where `compact_live_event` looks) parses the same.
_EVENT_ID_TAG = 0x0A  # field 1, length-delimited
_TENANT_TAG = 0x12  # field 2
_CONVERSATION_TAG = 0x1A  # field 3


def compact_live_event(value: bytes) -> bytes:
    """An encoded Event without its tenant_id and conversation_id when they follow its event_id,
    as every protobuf serializer writes them (fields in number order; lengths under 128 bytes,
    one-byte length prefixes); otherwise the event as it is."""
    size = len(value)
    if size < 2 or value[0] != _EVENT_ID_TAG or value[1] & 0x80:
        return value
    cut = end = 2 + value[1]
    for tag in (_TENANT_TAG, _CONVERSATION_TAG):
        if end + 1 < size and value[end] == tag and not value[end + 1] & 0x80:
            end += 2 + value[end + 1]
    if end == cut or end > size:
        return value
    return value[:cut] + value[end:]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def live_event_suffix(tenant_id: str, conversation_id: str) -> bytes:
    """What a reader appends to a live-stream entry's event of this conversation before parsing it."""
    tenant, conversation = tenant_id.encode(), conversation_id.encode()
    return (
        bytes([_TENANT_TAG])
        + _varint(len(tenant))
        + tenant
        + bytes([_CONVERSATION_TAG])
        + _varint(len(conversation))
        + conversation
    )


_S_EVENT_FIELD = S_EVENT.encode()


def live_entry_event(fields: dict[bytes, bytes], suffix: bytes) -> Event:
    """The event of a live-stream entry (its fields as redis-py returns them), with its tenant and
    conversation ids put back (`suffix` = `live_event_suffix` of the stream's conversation).
    Raises EventDecodeError when the entry has no event or it does not parse."""
    raw = fields.get(_S_EVENT_FIELD)
    return decode_event(raw + suffix if raw else raw)


# --- the sessions worker's bookkeeping and the ingress's readiness gate ---------------------------
# Hash: partition -> next offset the sessions worker will apply. Written in the same pipeline as,
# and after, the states of a batch, so a Redis that kept it also kept what came before it. When it
# is missing for a partition the worker has history for, Redis lost data: the worker rebuilds
# that partition from the log (states, live streams and idempotency claims).
APPLIED_KEY = "sb:sessions:applied"
# Hash: partition -> "1" once the hot view of that partition is complete (nothing to rebuild).
# A Redis that lost everything loses this too, and the ingress refuses writes (UNAVAILABLE) until
# every partition is back, so a retry can never miss the claim of its first attempt.
READY_KEY = "sb:sessions:ready"
# Hash: partition -> the offset a rebuild of that partition's hot view must reach before it is
# ready (the log end when the rebuild began). Written before the rebuild starts and removed with
# the partition's READY entry when it completes, so a worker that takes the partition over
# mid-rebuild (a restart, a kill -9, a rebalance) knows the rebuild is not done.
REBUILDING_KEY = "sb:sessions:rebuilding"

# Idempotency claims: "pending:<attempt marker>" while the write is in flight (each attempt its
# own marker, so a late delete of a failed attempt spares a later one), then
# "event_id|partition|offset|digest" once the record is in the log (digest: `claim_digest` of the
# message's text, which a retry must carry again; none for a start's or a close's claim, nor in
# claims written before it was recorded: "event_id|partition|offset").
CLAIM_PENDING = b"pending"
# Hash: an ingress process's marker prefix (CLAIM_PENDING + ":" + 12 hex digits, which starts every
# marker it sets) -> until when (Redis time, ms) it is alive; renewed every second. A pending claim
# whose owner's lease ran out is its dead process's (kill -9, a crash): a retry takes it over within
# the lease instead of waiting for the claim's own expiry. No lease at all (a Redis that lost it)
# is not taken for dead.
INGRESS_LEASES_KEY = "sb:ingress:leases"
MARKER_PREFIX_LEN = len(CLAIM_PENDING) + 1 + 12
# What starts and closes claim in the client_message_id space (no client id has a NUL in it).
START_CLAIM = "\x00start"
CLOSE_CLAIM = "\x00close"
# Agents' messages have a client_message_id space of their own (an agent desk and a customer app
# both may count 1, 2, 3…): claimed, and deduplicated by the fold, under this prefix.
AGENT_CLAIM_PREFIX = "\x00agent:"


def agent_claim(client_message_id: str) -> str:
    """The claim (and the fold's dedup id) of an agent's message with this client_message_id;
    none ("") for a message without one, like a customer message without one."""
    return AGENT_CLAIM_PREFIX + client_message_id if client_message_id else ""


def claim_digest(text: str) -> str:
    """What tells a retry from another message under the same client_message_id: 16 hex digits
    of BLAKE2b over the text."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def event_claim_digest(event: Event) -> str:
    """`claim_digest` of the text of a message-like event (a customer's or an agent's message);
    "" for any other (a start, a close), whose retry has nothing to compare."""
    kind = event.WhichOneof("payload")
    if kind == "message_received":
        return claim_digest(event.message_received.text)
    if kind == "agent_message_sent":
        return claim_digest(event.agent_message_sent.text)
    return ""


def encode_claim(event_id: str, partition: int, offset: int, digest: str = "") -> str:
    return f"{event_id}|{partition}|{offset}|{digest}" if digest else f"{event_id}|{partition}|{offset}"


def decode_claim(raw: bytes) -> tuple[str, int, int, str] | None:
    """(event_id, partition, offset, digest) of a settled claim, digest "" when it has none; None
    while it is pending."""
    if raw.startswith(CLAIM_PENDING):
        return None
    event_id, partition, offset, *rest = raw.decode().split("|")
    return event_id, int(partition), int(offset), rest[0] if rest else ""


def close_hold_until_ms(value: bytes | None) -> int:
    """Until when (Redis TIME, ms) an F_CLOSING value holds the conversation; 0 for no hold."""
    until = re.match(rb"\d+", value) if value else None
    return int(until.group(0)) if until is not None else 0
