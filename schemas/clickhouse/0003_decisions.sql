-- The recorded decisions, one table per kind, one row per event (deduplicated on event_id like
-- `events`; exact counts need FINAL or final = 1).

-- Bot answers: model, grounding and cost.
CREATE TABLE IF NOT EXISTS switchboard.replies
(
    tenant_id         LowCardinality(String),
    conversation_id   String,
    event_id          String,
    -- The customer message this answers.
    message_event_id  String,
    text              String,
    model             LowCardinality(String),
    citation_document_ids Array(String),
    citation_count    UInt16,
    latency_ms        UInt32,
    prompt_tokens     UInt32,
    completion_tokens UInt32,
    occurred_at       DateTime64(6, 'UTC'),
    partition         UInt32,
    offset            UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, conversation_id, event_id);

CREATE TABLE IF NOT EXISTS switchboard.intents
(
    tenant_id        LowCardinality(String),
    conversation_id  String,
    event_id         String,
    message_event_id String,
    intent           LowCardinality(String),
    confidence       Float32,
    model            LowCardinality(String),
    occurred_at      DateTime64(6, 'UTC'),
    partition        UInt32,
    offset           UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, conversation_id, event_id);

-- Handoffs to a human and agent assignments, one row per event.
CREATE TABLE IF NOT EXISTS switchboard.handoffs
(
    tenant_id       LowCardinality(String),
    conversation_id String,
    event_id        String,
    -- 'handoff_requested' or 'agent_assigned'.
    kind            LowCardinality(String),
    reason          String,
    queue           LowCardinality(String),
    agent_id        String,
    occurred_at     DateTime64(6, 'UTC'),
    partition       UInt32,
    offset          UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, conversation_id, event_id);

CREATE TABLE IF NOT EXISTS switchboard.csat
(
    tenant_id       LowCardinality(String),
    conversation_id String,
    event_id        String,
    score           UInt8,
    comment         String,
    occurred_at     DateTime64(6, 'UTC'),
    partition       UInt32,
    offset          UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, conversation_id, event_id);
