-- One row per conversation, built from events that each know only part of it: the start knows
-- the channel and customer, the close knows the resolution, every event moves last_event_at.
--
-- Why this shape: the rows reach ClickHouse more than once (redelivery) and in batches whose
-- order is not the log's order (replays, overlapping batches after a crash). So every column is
-- an aggregate that gives the same answer however often and in whatever order its inputs
-- arrive: min/max for values and timestamps, uniqExact over a key for counts. A
-- "latest row wins" ReplacingMergeTree could not combine a start row with a close row, and
-- could not count. The projector writes a partial row per conversation per batch (only the
-- columns that batch knows; the others keep their neutral default); two materialized views add
-- the message and event counts from `messages` and `events`.
--
-- Analysts read the view `switchboard.conversations`, which merges the partial rows with
-- GROUP BY: exact without FINAL.
CREATE TABLE IF NOT EXISTS switchboard.conversation_facts
(
    tenant_id       LowCardinality(String),
    conversation_id String,
    -- From conversation_started; '' in rows of other events, and max() ignores ''.
    channel         SimpleAggregateFunction(max, String),
    customer_id     SimpleAggregateFunction(max, String),
    locale          SimpleAggregateFunction(max, String),
    started_at      SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    -- From conversation_closed: the first close counts (like the sessions fold).
    closed_at       SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    resolution      SimpleAggregateFunction(max, String),
    closed_by       SimpleAggregateFunction(max, String),
    -- From every event.
    first_event_at  SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    last_event_at   SimpleAggregateFunction(max, Nullable(DateTime64(6, 'UTC'))),
    -- Filled by the materialized views below.
    message_keys    AggregateFunction(uniqExact, String),
    event_ids       AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
ORDER BY (tenant_id, conversation_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS switchboard.conversation_facts_from_messages
TO switchboard.conversation_facts
AS SELECT tenant_id, conversation_id, uniqExactState(message_key) AS message_keys
FROM switchboard.messages
GROUP BY tenant_id, conversation_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS switchboard.conversation_facts_from_events
TO switchboard.conversation_facts
AS SELECT tenant_id, conversation_id, uniqExactState(event_id) AS event_ids
FROM switchboard.events
GROUP BY tenant_id, conversation_id;

CREATE VIEW IF NOT EXISTS switchboard.conversations
AS SELECT
    tenant_id,
    conversation_id,
    max(channel) AS channel,
    max(customer_id) AS customer_id,
    max(locale) AS locale,
    -- closed_at here is the alias below: the first close.
    if(closed_at IS NULL, 'open', 'closed') AS status,
    max(resolution) AS resolution,
    max(closed_by) AS closed_by,
    min(started_at) AS started_at,
    min(closed_at) AS closed_at,
    uniqExactMerge(message_keys) AS message_count,
    uniqExactMerge(event_ids) AS event_count,
    min(first_event_at) AS first_event_at,
    max(last_event_at) AS last_event_at
FROM switchboard.conversation_facts
GROUP BY tenant_id, conversation_id;
