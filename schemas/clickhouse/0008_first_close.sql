-- The first close decides a conversation's resolution and closed_by, as it decides closed_at and
-- as the sessions fold does. 0004's max() over every close row gave the greater string when a
-- conversation was closed twice in the log (a second close lands only from an ingress process
-- that stalled past its claim and resumed; the fold ignores it). Same rule as 0005's first_intent:
--   first_close: min((closed_at, event_id, resolution, closed_by)); the default (2299-12-31, '',
--   '', '') never wins over a real close.
ALTER TABLE switchboard.conversation_facts
    ADD COLUMN IF NOT EXISTS first_close
        SimpleAggregateFunction(min, Tuple(DateTime64(6, 'UTC'), String, String, String))
        DEFAULT (toDateTime64('2299-12-31 23:59:59', 6, 'UTC'), '', '', '');

-- 0006's view with resolution and closed_by from first_close (every other column unchanged).
CREATE OR REPLACE VIEW switchboard.conversations
AS SELECT
    tenant_id,
    conversation_id,
    max(channel) AS channel,
    max(customer_id) AS customer_id,
    max(locale) AS locale,
    -- closed_at here is the alias below: the first close.
    if(closed_at IS NULL, 'open', 'closed') AS status,
    -- The first close's (0008). A first close projected before 0008 has no first_close (its
    -- time is not closed_at, the first close's): then max() over the closes, as before.
    if(tupleElement(min(first_close), 1) = closed_at, tupleElement(min(first_close), 3),
       max(conversation_facts.resolution)) AS resolution,
    if(tupleElement(min(first_close), 1) = closed_at, tupleElement(min(first_close), 4),
       max(conversation_facts.closed_by)) AS closed_by,
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
