"""OpenAI-compatible chat completions with SSE streaming (OpenAI, vLLM, Ollama, llama.cpp server,
DeepSeek, Qwen/DashScope compatible mode).

The adapter makes one HTTP call per `generate` and classifies failures; retries, timeouts and
fallback belong to the gateway. Citations are the passage markers ([1], [2] or 【1】) the model
wrote; when it wrote none, passages that share enough terms with the answer are cited instead.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp

from ._errors import AdapterError, StreamInterrupted
from ._text import estimate_tokens, terms
from ._types import AnswerRequest, Citation, Draft, GroundingPassage

_LANGUAGE_NAMES = {"zh": "Simplified Chinese (简体中文)", "en": "English"}
_MARKER = re.compile(r"[\[【]\s*(\d+(?:\s*[,，、]\s*\d+)*)\s*[\]】]")
# Share of an answer's terms a passage must contain to be cited when the model wrote no marker.
_OVERLAP_CITATION_SHARE = 0.3

SYSTEM_PROMPT = """You are the customer-service assistant of an online shop.
Answer the customer's question using only the numbered passages from the help centre below.
After each fact, cite the passage it came from with its number in square brackets, like [1].
If the passages do not answer the question, say that you could not find the answer and offer to
connect the customer with a human agent. Never invent policies, prices, dates, order details or links.
Answer in {language}, even when a passage is written in another language. Be brief and friendly.

Passages:
{passages}"""


def build_messages(request: AnswerRequest) -> list[dict[str, str]]:
    """The chat messages for a grounded answer: a system prompt with numbered passages, then the question."""
    if request.passages:
        passages = "\n\n".join(
            f"[{i}] {p.title} (language: {p.language})\n{p.text.strip()}"
            for i, p in enumerate(request.passages, 1)
        )
    else:
        passages = "(none — nothing in the help centre matched this question)"
    language = _LANGUAGE_NAMES.get(request.language, _LANGUAGE_NAMES["en"])
    return [
        {"role": "system", "content": SYSTEM_PROMPT.format(language=language, passages=passages)},
        {"role": "user", "content": request.question},
    ]


def cited_passages(text: str, passages: Sequence[GroundingPassage]) -> list[GroundingPassage]:
    """Passages referenced by markers in `text`, in order of first reference; by term overlap if none."""
    seen: dict[int, None] = {}
    for match in _MARKER.finditer(text):
        for number in re.split(r"\s*[,，、]\s*", match.group(1)):
            n = int(number)
            if 1 <= n <= len(passages):
                seen.setdefault(n - 1, None)
    if seen:
        return [passages[i] for i in seen]
    answer_terms = terms(text)
    if not answer_terms:
        return []
    return [
        p
        for p in passages
        if len(answer_terms & terms(p.text)) >= _OVERLAP_CITATION_SHARE * len(answer_terms)
    ]


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds, fractional accepted, or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAICompatibleAdapter:
    """Streams `POST {base_url}/chat/completions` with `stream: true`.

    `base_url` includes the API version prefix, e.g. `https://api.openai.com/v1`,
    `http://127.0.0.1:11434/v1` (Ollama) or `https://api.deepseek.com/v1`.
    """

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        model: str,
        api_key: str | None = None,
        temperature: float = 0.2,
        max_tokens: int = 512,
        connect_timeout_s: float = 3.0,
        include_usage: bool = True,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._name = name
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._api_key = api_key
        self._temperature = temperature
        self._max_tokens = max_tokens
        self._connect_timeout_s = connect_timeout_s
        self._include_usage = include_usage
        self._headers = dict(headers or {})
        self._session = session
        self._owns_session = session is None

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self) -> str:
        return self._model

    def __repr__(self) -> str:
        return f"OpenAICompatibleAdapter(name={self._name!r}, url={self._url!r}, model={self._model!r})"

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Total and first-token deadlines are the gateway's; only connecting is bounded here.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
            self._owns_session = True
        return self._session

    def _payload(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self._model,
            "messages": messages,
            "stream": True,
            "temperature": self._temperature,
            "max_tokens": self._max_tokens,
        }
        if self._include_usage:
            payload["stream_options"] = {"include_usage": True}
        return payload

    async def generate(self, request: AnswerRequest, draft: Draft) -> AsyncIterator[str]:
        draft.model = self._model
        messages = build_messages(request)
        headers = {"Accept": "text/event-stream", **self._headers}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        parts: list[str] = []
        usage: Mapping[str, Any] | None = None
        done = False
        try:
            async with self._client().post(
                self._url, json=self._payload(messages), headers=headers
            ) as response:
                if response.status != 200:
                    raise await self._http_error(response)
                async for data in _sse_data(response):
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = self._decode(data)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            parts.append(delta)
                            yield delta
        except aiohttp.ClientPayloadError as e:
            raise StreamInterrupted(self._name, f"stream broke after {len(parts)} deltas: {e}") from e
        except (aiohttp.ClientConnectionError, OSError) as e:
            # Refused, reset or dropped: worth another try only if nothing was streamed yet.
            raise StreamInterrupted(
                self._name, f"connection to {self._url} failed: {e!r}", retryable=not parts
            ) from e
        if not done:
            raise StreamInterrupted(self._name, f"stream ended without [DONE] after {len(parts)} deltas")
        text = "".join(parts)
        cited = cited_passages(text, request.passages)
        draft.citations = [Citation(p.document_id, p.chunk_id, p.score) for p in cited]
        draft.grounded = bool(cited)
        if usage and isinstance(usage.get("prompt_tokens"), int):
            draft.prompt_tokens = usage["prompt_tokens"]
            draft.completion_tokens = int(usage.get("completion_tokens") or 0)
        else:
            # 4 tokens of chat framing per message, as OpenAI counts them.
            draft.prompt_tokens = sum(estimate_tokens(m["content"]) + 4 for m in messages)
            draft.completion_tokens = estimate_tokens(text)

    def _decode(self, data: str) -> Mapping[str, Any]:
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError as e:
            raise AdapterError(self._name, f"unparseable stream event {data[:200]!r}") from e
        if not isinstance(chunk, dict):
            raise AdapterError(self._name, f"stream event is not an object: {data[:200]!r}")
        if chunk.get("error"):
            # Some servers (vLLM, llama.cpp) report failures inside the stream.
            raise StreamInterrupted(self._name, f"server error in stream: {str(chunk['error'])[:300]}")
        return chunk

    async def _http_error(self, response: aiohttp.ClientResponse) -> AdapterError:
        body = (await response.text(errors="replace"))[:300]
        status = response.status
        retryable = status == 429 or status >= 500 or status == 408
        return AdapterError(
            self._name,
            f"HTTP {status} from {self._url}: {body}",
            retryable=retryable,
            retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
            status=status,
        )


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines); comments,
    `event:`/`id:` fields and keep-alives are skipped."""
    lines: list[str] = []
    async for raw in response.content:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue
        field_name, _, value = line.partition(":")
        if field_name == "data":
            lines.append(value[1:] if value.startswith(" ") else value)
    if lines:
        yield "\n".join(lines)
