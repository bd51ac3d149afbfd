-- The raw log: one row per event, exactly as it was on Kafka.
--
-- Idempotency: the projector may write an event more than once (a batch redelivered after a
-- crash, overlapping batches after a rebalance). ReplacingMergeTree keeps one row per sorting
-- key, and the sorting key ends in event_id, so duplicates collapse on merge. The partition key
-- derives from occurred_at, which is part of the event, so a duplicate always lands in the same
-- partition as the original (ReplacingMergeTree only deduplicates within a partition).
-- Until a merge has run, duplicates are visible to plain reads: query with FINAL (or the
-- setting final = 1, which the embedded query endpoint applies by default) for exact counts.
CREATE TABLE IF NOT EXISTS switchboard.events
(
    event_id        String,
    tenant_id       LowCardinality(String),
    conversation_id String,
    -- The payload's field name in switchboard.v1.Event, e.g. 'message_received'.
    type            LowCardinality(String),
    occurred_at     DateTime64(6, 'UTC'),
    causation_id    String,
    traceparent     String,
    schema_version  UInt32,
    -- Where the event sits in the conversation-events topic.
    partition       UInt32,
    offset          UInt64,
    -- The payload (not the envelope) as protobuf JSON with proto field names, e.g.
    -- {"client_message_id": "m1", "text": "hi", "sender": "SENDER_CUSTOMER"}.
    payload_json    String,
    ingested_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, conversation_id, event_id);
