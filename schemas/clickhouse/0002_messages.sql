-- One row per conversation message written by a person: customer messages (message_received)
-- and agent messages (agent_message_sent). Bot answers live in `replies`.
--
-- Idempotency: message_key is the client_message_id when the writer set one, else the event id.
-- A client retry whose first ack was lost puts the same client message on Kafka twice, with two
-- event ids; both rows share a message_key and collapse to one. The version column makes the
-- first write (lowest offset; one conversation lives in one partition) the survivor, the one the
-- sessions fold counted, whatever order batches are replayed in. No time partitioning: the two
-- writes of a retried message carry different occurred_at values and must share a partition.
-- Exact counts need FINAL or the setting final = 1 (the embedded endpoint's default).
CREATE TABLE IF NOT EXISTS switchboard.messages
(
    tenant_id         LowCardinality(String),
    conversation_id   String,
    message_key       String,
    event_id          String,
    client_message_id String,
    -- 'customer', 'agent', 'bot' or 'system' (switchboard.v1.Sender without its prefix).
    sender            LowCardinality(String),
    -- Set for agent messages.
    agent_id          String,
    text              String,
    text_length       UInt32 DEFAULT lengthUTF8(text),
    occurred_at       DateTime64(6, 'UTC'),
    partition         UInt32,
    offset            UInt64,
    ingested_at       DateTime64(3, 'UTC') DEFAULT now64(3),
    first_write_wins  UInt64 MATERIALIZED 18446744073709551615 - offset
)
ENGINE = ReplacingMergeTree(first_write_wins)
ORDER BY (tenant_id, conversation_id, message_key);
