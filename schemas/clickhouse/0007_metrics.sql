-- Per-minute metrics per tenant and channel.
--
-- Idempotence is the design constraint: the projector writes at least once (a redelivered batch,
-- overlapping batches after a crash, a replay from offset 0), and a materialized view fires on
-- every insert, so an MV that sums or counts rows of a ReplacingMergeTree would count a
-- re-inserted row twice, for good. Insert deduplication tokens do not help either: a redelivered
-- batch after a crash is cut at other offsets than the first one, so its blocks differ.
--
-- So every metric here is computed from state that is idempotent by construction:
--  * `conversation_facts` (0004/0005): min/max/uniqExact aggregates, which give the same result
--    however often and in whatever order their inputs arrive;
--  * the exact views of 0006 (FINAL over the raw tables, one row per event or message);
--  * `event_counts` below: an AggregatingMergeTree fed by a materialized view with
--    uniqExactState(event_id), a set of event ids per minute, which a duplicate cannot grow.
-- Metrics that need two events of a conversation (first response time: the customer message and
-- the answer; bot resolution: the close and the absence of a handoff; agent wait: the handoff
-- and the assignment) cannot be computed by an MV over one insert block anyway, since the two
-- events may arrive in different batches; views compute them when read. Cost: a read scans the
-- conversations and events of the tenants and time it asks for (the views filter well on
-- tenant_id, the first sorting key of every table).

-- Events per minute, tenant and type (pipeline volume), exact and cheap at any size.
CREATE TABLE IF NOT EXISTS switchboard.event_counts
(
    tenant_id LowCardinality(String),
    minute    DateTime('UTC'),
    type      LowCardinality(String),
    event_ids AggregateFunction(uniqExact, String)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant_id, minute, type);

CREATE MATERIALIZED VIEW IF NOT EXISTS switchboard.event_counts_from_raw_events
TO switchboard.event_counts
AS SELECT tenant_id, toStartOfMinute(occurred_at) AS minute, type, uniqExactState(event_id) AS event_ids
FROM switchboard.raw_events
GROUP BY tenant_id, minute, type;

CREATE VIEW IF NOT EXISTS switchboard.events_per_minute
AS SELECT tenant_id, minute, type, uniqExactMerge(event_ids) AS events
FROM switchboard.event_counts
GROUP BY tenant_id, minute, type;

-- One row per measurement: (tenant, conversation, channel, metric, when, value). The building
-- block of metrics_per_minute; handy for custom buckets (per 5 minutes, per hour).
CREATE VIEW IF NOT EXISTS switchboard.metric_points
AS SELECT
    p.tenant_id AS tenant_id,
    p.conversation_id AS conversation_id,
    ch.channel AS channel,
    p.metric AS metric,
    p.at AS at,
    p.value AS value
FROM
(
    SELECT tenant_id, conversation_id, 'conversation_started' AS metric, assumeNotNull(started_at) AS at, 1.0 AS value
    FROM switchboard.conversations WHERE started_at IS NOT NULL
    UNION ALL
    SELECT tenant_id, conversation_id, 'conversation_closed', assumeNotNull(closed_at), 1.0
    FROM switchboard.conversations WHERE closed_at IS NOT NULL
    UNION ALL
    SELECT tenant_id, conversation_id, 'bot_resolved', assumeNotNull(closed_at), 1.0
    FROM switchboard.conversations WHERE bot_resolved
    UNION ALL
    SELECT tenant_id, conversation_id, 'first_response_ms', assumeNotNull(first_response_at),
        toFloat64(assumeNotNull(first_response_ms))
    FROM switchboard.conversations WHERE first_response_ms IS NOT NULL
    UNION ALL
    SELECT tenant_id, conversation_id, 'conversation_handed_off', assumeNotNull(first_handoff_at), 1.0
    FROM switchboard.conversations WHERE first_handoff_at IS NOT NULL
    UNION ALL
    SELECT tenant_id, conversation_id, 'csat_score', assumeNotNull(csat_at), toFloat64(assumeNotNull(csat_score))
    FROM switchboard.conversations WHERE csat_score IS NOT NULL
    UNION ALL
    SELECT tenant_id, conversation_id, concat(sender, '_message'), occurred_at, 1.0
    FROM switchboard.conversation_messages
    UNION ALL
    SELECT tenant_id, conversation_id, 'handoff_requested', requested_at, 1.0
    FROM switchboard.handoff_waits
    UNION ALL
    SELECT tenant_id, conversation_id, 'agent_wait_ms', assumeNotNull(assigned_at), toFloat64(assumeNotNull(wait_ms))
    FROM switchboard.handoff_waits WHERE wait_ms IS NOT NULL
    UNION ALL
    SELECT tenant_id, conversation_id, 'prompt_tokens', occurred_at, toFloat64(prompt_tokens)
    FROM switchboard.replies
    UNION ALL
    SELECT tenant_id, conversation_id, 'completion_tokens', occurred_at, toFloat64(completion_tokens)
    FROM switchboard.replies
) AS p
LEFT JOIN
(
    SELECT tenant_id, conversation_id, max(channel) AS channel
    FROM switchboard.conversation_facts
    GROUP BY tenant_id, conversation_id
) AS ch ON p.tenant_id = ch.tenant_id AND p.conversation_id = ch.conversation_id;

-- The dashboard table: one row per tenant, channel ('' until the conversation's start is
-- projected) and minute with any activity. Counts add up across rows; for a rate or an average
-- over a longer range, add the numerators and denominators (or use metric_points), never
-- average the per-minute rates. Each measurement lands in the minute it was completed: a first
-- response time in the minute of the response, an agent wait in the minute of the assignment,
-- bot resolution in the minute of the close.
CREATE VIEW IF NOT EXISTS switchboard.metrics_per_minute
AS SELECT
    tenant_id,
    channel,
    toStartOfMinute(at) AS minute,
    countIf(metric = 'conversation_started') AS conversations_started,
    countIf(metric = 'conversation_closed') AS conversations_closed,
    countIf(metric = 'customer_message') AS customer_messages,
    countIf(metric = 'bot_message') AS bot_messages,
    countIf(metric = 'agent_message') AS agent_messages,
    countIf(metric = 'first_response_ms') AS first_responses,
    if(first_responses = 0, NULL, quantileExactIf(0.5)(value, metric = 'first_response_ms')) AS frt_p50_ms,
    if(first_responses = 0, NULL, quantileExactIf(0.9)(value, metric = 'first_response_ms')) AS frt_p90_ms,
    -- Closed with no handoff, and its share of the closed conversations.
    countIf(metric = 'bot_resolved') AS bot_resolved,
    if(conversations_closed = 0, NULL, bot_resolved / conversations_closed) AS bot_resolution_rate,
    -- Conversations handed off for the first time, and their share of the conversations started.
    countIf(metric = 'conversation_handed_off') AS conversations_handed_off,
    if(conversations_started = 0, NULL, conversations_handed_off / conversations_started) AS handoff_rate,
    countIf(metric = 'handoff_requested') AS handoff_requests,
    countIf(metric = 'agent_wait_ms') AS agent_assignments,
    if(agent_assignments = 0, NULL, avgIf(value, metric = 'agent_wait_ms')) AS agent_wait_avg_ms,
    if(agent_assignments = 0, NULL, quantileExactIf(0.5)(value, metric = 'agent_wait_ms')) AS agent_wait_p50_ms,
    if(agent_assignments = 0, NULL, quantileExactIf(0.9)(value, metric = 'agent_wait_ms')) AS agent_wait_p90_ms,
    countIf(metric = 'csat_score') AS csat_count,
    if(csat_count = 0, NULL, avgIf(value, metric = 'csat_score')) AS csat_avg,
    toUInt64(sumIf(value, metric = 'prompt_tokens')) AS prompt_tokens,
    toUInt64(sumIf(value, metric = 'completion_tokens')) AS completion_tokens,
    prompt_tokens + completion_tokens AS llm_tokens
FROM switchboard.metric_points
GROUP BY tenant_id, channel, minute;

-- Intent mix: classified customer messages per tenant, channel, minute, intent and cascade stage.
CREATE VIEW IF NOT EXISTS switchboard.intent_mix_per_minute
AS SELECT
    i.tenant_id AS tenant_id,
    ch.channel AS channel,
    toStartOfMinute(i.occurred_at) AS minute,
    i.intent AS intent,
    i.stage AS stage,
    count() AS classifications,
    avg(i.confidence) AS avg_confidence
FROM switchboard.intents AS i
LEFT JOIN
(
    SELECT tenant_id, conversation_id, max(channel) AS channel
    FROM switchboard.conversation_facts
    GROUP BY tenant_id, conversation_id
) AS ch ON i.tenant_id = ch.tenant_id AND i.conversation_id = ch.conversation_id
GROUP BY tenant_id, channel, minute, intent, stage;
