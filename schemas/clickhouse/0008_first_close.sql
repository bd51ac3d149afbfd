-- The first close in the log decides a conversation's closed_at, resolution and closed_by, as in
-- the sessions fold. Before, closed_at was the earliest close time and resolution/closed_by max()
-- over every close row. They differ from the fold only when a conversation was closed twice in the
-- log: a second close lands only from an ingress process that stalled past its claim and resumed
-- (the fold ignores it), and it carries the earlier timestamp (made before the stall), so not even
-- time tells the first. Hence the log offset (a conversation's events share one partition):
--   first_close: min((offset, closed_at, resolution, closed_by)); the default (2^64-1, 2299-12-31,
--   '', '') never wins over a real close.
ALTER TABLE switchboard.conversation_facts
    ADD COLUMN IF NOT EXISTS first_close
        SimpleAggregateFunction(min, Tuple(UInt64, DateTime64(6, 'UTC'), String, String))
        DEFAULT (18446744073709551615, toDateTime64('2299-12-31 23:59:59', 6, 'UTC'), '', '');

-- 0006's view with closed_at, resolution and closed_by from first_close (every other column
-- unchanged). Rows projected before 0008 have no first_close: the earlier rule for them.
CREATE OR REPLACE VIEW switchboard.conversations
AS SELECT
    tenant_id,
    conversation_id,
    max(channel) AS channel,
    max(customer_id) AS customer_id,
    max(locale) AS locale,
    -- closed_at here is the alias below: the first close.
    if(closed_at IS NULL, 'open', 'closed') AS status,
    if(tupleElement(min(first_close), 1) < 18446744073709551615, tupleElement(min(first_close), 3),
       max(conversation_facts.resolution)) AS resolution,
    if(tupleElement(min(first_close), 1) < 18446744073709551615, tupleElement(min(first_close), 4),
       max(conversation_facts.closed_by)) AS closed_by,
    min(started_at) AS started_at,
    if(tupleElement(min(first_close), 1) < 18446744073709551615, tupleElement(min(first_close), 2),
       min(conversation_facts.closed_at)) AS closed_at,
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
