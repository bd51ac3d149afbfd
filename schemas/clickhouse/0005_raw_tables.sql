-- Storage and reading are separated: the tables the projector writes become `raw_*`, and their
-- old names become views with FINAL inside (0006), exact by construction on chdb and on a
-- ClickHouse server alike, with no setting to remember (the embedded endpoint used to apply
-- `final = 1` to every query; it no longer changes settings behind the analyst's back).
--
-- Every statement is re-runnable: RENAME … IF EXISTS is a no-op once done (the views with the
-- old names only appear in 0006, after this migration is recorded), DROP … IF EXISTS and
-- ADD COLUMN IF NOT EXISTS likewise. Run while nothing inserts (the analytics process migrates
-- before it projects).
RENAME TABLE IF EXISTS switchboard.events TO switchboard.raw_events;
RENAME TABLE IF EXISTS switchboard.messages TO switchboard.raw_messages;
RENAME TABLE IF EXISTS switchboard.replies TO switchboard.raw_replies;
RENAME TABLE IF EXISTS switchboard.intents TO switchboard.raw_intents;
RENAME TABLE IF EXISTS switchboard.handoffs TO switchboard.raw_handoffs;
RENAME TABLE IF EXISTS switchboard.csat TO switchboard.raw_csat;

-- A materialized view reads its source by name, and a rename does not carry it along: the two
-- views of 0004 would stay attached to the old names. Replace them with views over the raw tables.
DROP VIEW IF EXISTS switchboard.conversation_facts_from_messages;
DROP VIEW IF EXISTS switchboard.conversation_facts_from_events;

CREATE MATERIALIZED VIEW IF NOT EXISTS switchboard.conversation_facts_from_raw_messages
TO switchboard.conversation_facts
AS SELECT tenant_id, conversation_id, uniqExactState(message_key) AS message_keys
FROM switchboard.raw_messages
GROUP BY tenant_id, conversation_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS switchboard.conversation_facts_from_raw_events
TO switchboard.conversation_facts
AS SELECT tenant_id, conversation_id, uniqExactState(event_id) AS event_ids
FROM switchboard.raw_events
GROUP BY tenant_id, conversation_id;

-- The decision fields added to events.proto.
ALTER TABLE switchboard.raw_intents
    ADD COLUMN IF NOT EXISTS stage LowCardinality(String) AFTER model,
    ADD COLUMN IF NOT EXISTS model_version LowCardinality(String) AFTER stage,
    ADD COLUMN IF NOT EXISTS language LowCardinality(String) AFTER model_version;

ALTER TABLE switchboard.raw_replies
    ADD COLUMN IF NOT EXISTS adapter LowCardinality(String) AFTER model,
    ADD COLUMN IF NOT EXISTS intent LowCardinality(String) AFTER adapter,
    ADD COLUMN IF NOT EXISTS language LowCardinality(String) AFTER intent,
    ADD COLUMN IF NOT EXISTS grounded Bool AFTER language,
    ADD COLUMN IF NOT EXISTS reply_id String AFTER grounded,
    ADD COLUMN IF NOT EXISTS citation_chunk_ids Array(String) AFTER citation_document_ids,
    ADD COLUMN IF NOT EXISTS citation_scores Array(Float32) AFTER citation_chunk_ids,
    ADD COLUMN IF NOT EXISTS first_token_ms UInt32 AFTER latency_ms;

-- kind is now 'handoff_requested', 'agent_assigned' or 'returned_to_bot'.
ALTER TABLE switchboard.raw_handoffs
    ADD COLUMN IF NOT EXISTS message_event_id String AFTER agent_id,
    ADD COLUMN IF NOT EXISTS previous_agent_id String AFTER message_event_id;

-- What the conversation row needs for mode, assignee, first response, handoff, CSAT and intent.
-- Same rule as 0004: every column is an aggregate that is idempotent and order-free (min, max,
-- uniqExact), so a redelivered or replayed batch, in any order, changes nothing.
--   *_change: max((occurred_at, event_id, value)) = the value of the latest event that set it;
--   the default (1970-01-01, '', …) never wins over a real event.
--   first_intent: min((occurred_at, event_id, intent)); the default (2299-12-31, '', '') never wins.
ALTER TABLE switchboard.conversation_facts
    ADD COLUMN IF NOT EXISTS first_customer_message_at SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    -- The first bot reply or agent message.
    ADD COLUMN IF NOT EXISTS first_response_at SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    ADD COLUMN IF NOT EXISTS first_handoff_at SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    ADD COLUMN IF NOT EXISTS first_assigned_at SimpleAggregateFunction(min, Nullable(DateTime64(6, 'UTC'))),
    ADD COLUMN IF NOT EXISTS mode_change SimpleAggregateFunction(max, Tuple(DateTime64(6, 'UTC'), String, String)),
    ADD COLUMN IF NOT EXISTS assignee_change SimpleAggregateFunction(max, Tuple(DateTime64(6, 'UTC'), String, String)),
    ADD COLUMN IF NOT EXISTS csat_change SimpleAggregateFunction(max, Tuple(DateTime64(6, 'UTC'), String, UInt8, String)),
    ADD COLUMN IF NOT EXISTS first_intent SimpleAggregateFunction(min, Tuple(DateTime64(6, 'UTC'), String, String))
        DEFAULT (toDateTime64('2299-12-31 23:59:59', 6, 'UTC'), '', ''),
    ADD COLUMN IF NOT EXISTS handoff_ids AggregateFunction(uniqExact, String),
    ADD COLUMN IF NOT EXISTS reply_ids AggregateFunction(uniqExact, String);

CREATE MATERIALIZED VIEW IF NOT EXISTS switchboard.conversation_facts_from_raw_handoffs
TO switchboard.conversation_facts
AS SELECT tenant_id, conversation_id, uniqExactState(event_id) AS handoff_ids
FROM switchboard.raw_handoffs
WHERE kind = 'handoff_requested'
GROUP BY tenant_id, conversation_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS switchboard.conversation_facts_from_raw_replies
TO switchboard.conversation_facts
AS SELECT tenant_id, conversation_id, uniqExactState(event_id) AS reply_ids
FROM switchboard.raw_replies
GROUP BY tenant_id, conversation_id;
