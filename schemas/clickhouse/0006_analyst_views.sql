-- What analysts read. Each view is exact by construction: the raw tables are deduplicated with
-- FINAL inside the view, and the conversation facts are merged with GROUP BY, so a query gives
-- the same answer on chdb (through the endpoint or in process) and on a ClickHouse server,
-- whatever settings the client sends and whether or not a background merge has run.
-- The raw_* tables (0005) are storage: they may briefly hold a row twice.

-- The log, one row per event.
CREATE VIEW IF NOT EXISTS switchboard.events
AS SELECT * FROM switchboard.raw_events FINAL;

-- Messages written by a person (customer, agent), one per message_key (see raw_messages).
CREATE VIEW IF NOT EXISTS switchboard.messages
AS SELECT * FROM switchboard.raw_messages FINAL;

-- Bot answers with adapter, model, intent, language, grounding, tokens, latency and citations.
CREATE VIEW IF NOT EXISTS switchboard.replies
AS SELECT *, prompt_tokens + completion_tokens AS total_tokens FROM switchboard.raw_replies FINAL;

-- Intent decisions with confidence, cascade stage, model and version, detected language.
CREATE VIEW IF NOT EXISTS switchboard.intents
AS SELECT * FROM switchboard.raw_intents FINAL;

-- Handoff requests, agent assignments and returns to the bot, one row per event.
CREATE VIEW IF NOT EXISTS switchboard.handoffs
AS SELECT * FROM switchboard.raw_handoffs FINAL;

CREATE VIEW IF NOT EXISTS switchboard.csat
AS SELECT * FROM switchboard.raw_csat FINAL;

-- One row per conversation (replaces the view of 0004 with more columns; the first 14 are
-- unchanged). Aliases differ from the column names they aggregate where an alias would
-- otherwise refer to itself.
CREATE OR REPLACE VIEW switchboard.conversations
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
    max(last_event_at) AS last_event_at,
    -- 'bot' until a handoff, 'agent' after it, 'bot' again after a return to the bot.
    if(tupleElement(max(mode_change), 3) = '', 'bot', tupleElement(max(mode_change), 3)) AS mode,
    -- The agent of the latest assignment ('' before any, and after a return to the bot).
    tupleElement(max(assignee_change), 3) AS assignee,
    uniqExactMerge(reply_ids) AS bot_reply_count,
    min(first_customer_message_at) AS first_customer_message_at,
    min(first_response_at) AS first_response_at,
    -- First response time: first customer message to the first bot reply or agent message
    -- after it (NULL while unanswered).
    if(first_response_at >= first_customer_message_at,
       dateDiff('millisecond', first_customer_message_at, first_response_at), NULL) AS first_response_ms,
    uniqExactMerge(handoff_ids) AS handoff_count,
    handoff_count > 0 AS handed_off,
    min(first_handoff_at) AS first_handoff_at,
    min(first_assigned_at) AS first_assigned_at,
    -- Closed without any handoff: the bot resolved it.
    status = 'closed' AND handoff_count = 0 AS bot_resolved,
    -- The first intent classified in the conversation ('' when none).
    tupleElement(min(first_intent), 3) AS intent,
    -- The latest rating (NULL when not rated).
    if(tupleElement(max(csat_change), 2) = '', NULL, tupleElement(max(csat_change), 3)) AS csat_score,
    tupleElement(max(csat_change), 4) AS csat_comment,
    if(tupleElement(max(csat_change), 2) = '', NULL, tupleElement(max(csat_change), 1)) AS csat_at
FROM switchboard.conversation_facts
GROUP BY tenant_id, conversation_id;

-- Every message of a conversation by sender kind: customer and agent messages, and bot replies
-- (sender 'bot'), with the detected language (customer messages: from their intent
-- classification; bot replies: the reply's own; '' when unknown) and intent.
CREATE VIEW IF NOT EXISTS switchboard.conversation_messages
AS SELECT
    m.tenant_id AS tenant_id,
    m.conversation_id AS conversation_id,
    m.event_id AS event_id,
    m.sender AS sender,
    m.agent_id AS agent_id,
    m.text AS text,
    m.text_length AS text_length,
    i.language AS language,
    i.intent AS intent,
    m.occurred_at AS occurred_at
FROM switchboard.messages AS m
LEFT JOIN
(
    SELECT
        tenant_id,
        message_event_id,
        argMax(language, (occurred_at, event_id)) AS language,
        argMax(intent, (occurred_at, event_id)) AS intent
    FROM switchboard.intents
    GROUP BY tenant_id, message_event_id
) AS i ON m.tenant_id = i.tenant_id AND m.event_id = i.message_event_id
UNION ALL
SELECT
    tenant_id,
    conversation_id,
    event_id,
    'bot' AS sender,
    '' AS agent_id,
    text,
    toUInt32(lengthUTF8(text)) AS text_length,
    language,
    intent,
    occurred_at
FROM switchboard.replies;

-- One row per handoff request with the first agent assignment at or after it in the same
-- conversation (assigned_at, agent_id and wait_ms are NULL/'' while nobody has accepted).
CREATE VIEW IF NOT EXISTS switchboard.handoff_waits
AS SELECT
    h.tenant_id AS tenant_id,
    h.conversation_id AS conversation_id,
    h.event_id AS event_id,
    h.reason AS reason,
    h.queue AS queue,
    h.message_event_id AS message_event_id,
    h.occurred_at AS requested_at,
    if(a.event_id = '', NULL, a.occurred_at) AS assigned_at,
    a.agent_id AS agent_id,
    if(a.event_id = '', NULL, dateDiff('millisecond', h.occurred_at, a.occurred_at)) AS wait_ms
FROM (SELECT * FROM switchboard.handoffs WHERE kind = 'handoff_requested') AS h
ASOF LEFT JOIN
(
    SELECT tenant_id, conversation_id, event_id, agent_id, occurred_at
    FROM switchboard.handoffs
    WHERE kind = 'agent_assigned'
) AS a ON h.tenant_id = a.tenant_id AND h.conversation_id = a.conversation_id AND a.occurred_at >= h.occurred_at;
