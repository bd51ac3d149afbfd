"""The model gateway: one interface for answerers, adapters behind it.

    gateway = ModelGateway(GatewayConfig.from_env_string(settings.gateway))
    reply = gateway.stream(AnswerRequest(question, language, passages, intent=..., tenant_id=...))
    async for delta in reply:          # ReplyDelta(index, text, restart)
        publish(delta)
    answer = reply.answer              # Answer: text, citations, adapter, model, tokens, latencies

Adapters: `TemplateAnswerer` (embedded, deterministic, grounded; the end of every chain) and
`OpenAICompatibleAdapter` (chat completions with SSE streaming). A request is routed to an ordered
chain by tenant, intent, language and length (`GatewayConfig.routes`); with no passages it goes
straight to the template answerer unless `llm_without_passages` is set.

Per adapter try: a first-token deadline and a total deadline; 429, 408, 5xx and connection failures
before any text are retried with exponential backoff and jitter, or after the server's Retry-After
(a Retry-After above `max_retry_after_s` is not waited for); other failures move down the chain.
Each adapter has a circuit breaker: every failed try counts, N consecutive failures open it, an open
adapter is skipped, and after the cool-down one trial call decides whether it closes again.

Mid-stream failures — the contract for the text a client sees:
- `ReplyDelta.index` grows by one per delta over the whole reply and is never reused.
- If an adapter fails after it streamed some text, it is not retried; the next adapter in the chain
  answers from the start, and its first delta carries `restart=True`: a client drops every earlier
  delta of this reply and shows the text again from that delta on. No restart happens when a
  failure comes before any text.
- `Answer.text` is authoritative: it is exactly the concatenation of the deltas from the last
  restart on (or of all deltas when there was none). Only it goes to the log (`ReplyGenerated`).
- `Answer.first_token_ms` measures to the first delta of the text that stands; `latency_ms` to the
  end; tokens and model are those of the adapter that produced the text; `attempts` lists every try.
"""

from ._breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from ._config import TEMPLATE, AdapterConfig, GatewayConfig, RouteRule
from ._errors import AdapterError, AdapterTimeout, GatewayConfigError, StreamInterrupted
from ._gateway import ModelGateway, ReplyStream
from ._openai import OpenAICompatibleAdapter, build_messages, cited_passages
from ._template import DID_YOU_MEAN, NO_ANSWER, TEMPLATE_MODEL, TemplateAnswerer
from ._text import estimate_tokens, guess_language
from ._types import (
    Answer,
    Answerer,
    AnswerRequest,
    AttemptRecord,
    Citation,
    Draft,
    GroundingPassage,
    ReplyDelta,
)

__all__ = [
    "CLOSED",
    "DID_YOU_MEAN",
    "HALF_OPEN",
    "NO_ANSWER",
    "OPEN",
    "TEMPLATE",
    "TEMPLATE_MODEL",
    "AdapterConfig",
    "AdapterError",
    "AdapterTimeout",
    "Answer",
    "AnswerRequest",
    "Answerer",
    "AttemptRecord",
    "CircuitBreaker",
    "Citation",
    "Draft",
    "GatewayConfig",
    "GatewayConfigError",
    "GroundingPassage",
    "ModelGateway",
    "OpenAICompatibleAdapter",
    "ReplyDelta",
    "ReplyStream",
    "RouteRule",
    "StreamInterrupted",
    "TemplateAnswerer",
    "build_messages",
    "cited_passages",
    "estimate_tokens",
    "guess_language",
]
