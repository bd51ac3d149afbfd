"""Gateway configuration: plain dataclasses, loadable from one JSON setting.

```json
{
  "adapters": [
    {"name": "qwen", "kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "qwen2.5-7b-instruct",
     "api_key_env": "QWEN_API_KEY", "timeout_s": 20, "first_token_timeout_s": 3, "max_retries": 2,
     "breaker_failures": 5, "breaker_cooldown_s": 30}
  ],
  "routes": [
    {"tenants": ["acme"], "intents": ["complaint", "refund"], "languages": ["zh"], "chain": ["qwen"]},
    {"chain": ["template"]}
  ],
  "default_chain": ["template"],
  "llm_without_passages": false
}
```

The first route whose conditions all match wins (an absent condition matches anything). Every
chain ends at the template answerer, which needs no entry in `adapters` (its name is "template").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ._errors import GatewayConfigError

TEMPLATE = "template"
KINDS = ("openai", "template")


@dataclass(frozen=True)
class AdapterConfig:
    name: str
    kind: str = "openai"
    base_url: str = ""
    model: str = ""
    api_key: str | None = field(default=None, repr=False)
    # Read the key from this environment variable when `api_key` is not given (keeps secrets out of JSON).
    api_key_env: str | None = None
    timeout_s: float = 20.0
    first_token_timeout_s: float = 5.0
    connect_timeout_s: float = 3.0
    max_retries: int = 2
    backoff_initial_s: float = 0.25
    backoff_max_s: float = 4.0
    # A Retry-After longer than this is not waited for: the call falls back instead.
    max_retry_after_s: float = 10.0
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    temperature: float = 0.2
    max_tokens: int = 512
    headers: Mapping[str, str] = field(default_factory=dict)
    # Ask for usage in the stream (`stream_options.include_usage`); some older servers reject it.
    include_usage: bool = True

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


@dataclass(frozen=True)
class RouteRule:
    chain: Sequence[str]
    tenants: Sequence[str] | None = None
    intents: Sequence[str] | None = None
    languages: Sequence[str] | None = None
    min_chars: int | None = None
    max_chars: int | None = None

    def matches(self, *, tenant_id: str, intent: str, language: str, question_chars: int) -> bool:
        if self.tenants is not None and tenant_id not in self.tenants:
            return False
        if self.intents is not None and intent not in self.intents:
            return False
        if self.languages is not None and language not in self.languages:
            return False
        if self.min_chars is not None and question_chars < self.min_chars:
            return False
        return not (self.max_chars is not None and question_chars > self.max_chars)


@dataclass(frozen=True)
class GatewayConfig:
    adapters: Sequence[AdapterConfig] = ()
    routes: Sequence[RouteRule] = ()
    default_chain: Sequence[str] = (TEMPLATE,)
    # With no grounding passage, an LLM can only invent; by default such requests go straight to the
    # template answerer, which says it found nothing and offers a person.
    llm_without_passages: bool = False
    # Settings for the template answerer's own (timeouts only; it has no breaker and is never retried).
    template: AdapterConfig = field(
        default_factory=lambda: AdapterConfig(
            name=TEMPLATE, kind=TEMPLATE, timeout_s=2.0, first_token_timeout_s=2.0
        )
    )

    def __post_init__(self) -> None:
        names = [a.name for a in self.adapters]
        for a in self.adapters:
            if a.kind not in KINDS:
                raise GatewayConfigError(f"adapter {a.name!r}: kind {a.kind!r} is not one of {KINDS}")
            if a.name == TEMPLATE and a.kind != TEMPLATE:
                raise GatewayConfigError(f"adapter name {TEMPLATE!r} is reserved for the template answerer")
            if a.kind == "openai" and not (a.base_url and a.model):
                raise GatewayConfigError(f"adapter {a.name!r}: an openai adapter needs base_url and model")
            if a.timeout_s <= 0 or a.first_token_timeout_s <= 0:
                raise GatewayConfigError(f"adapter {a.name!r}: timeouts must be positive")
            if a.max_retries < 0 or a.breaker_failures < 1:
                raise GatewayConfigError(f"adapter {a.name!r}: max_retries >= 0 and breaker_failures >= 1")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise GatewayConfigError(f"adapter names must be unique; repeated: {duplicates}")
        known = {*names, TEMPLATE}
        for where, chain in [("default_chain", self.default_chain)] + [
            (f"routes[{i}].chain", r.chain) for i, r in enumerate(self.routes)
        ]:
            unknown = [n for n in chain if n not in known]
            if unknown:
                raise GatewayConfigError(f"{where} names unknown adapters {unknown}; known: {sorted(known)}")

    def adapter(self, name: str) -> AdapterConfig:
        if name == TEMPLATE:
            return self.template
        for a in self.adapters:
            if a.name == name:
                return a
        raise KeyError(name)

    def chain_for(self, *, tenant_id: str, intent: str, language: str, question_chars: int) -> list[str]:
        """The ordered adapter names to try; always ends with the template answerer, no repeats."""
        chain: Sequence[str] = self.default_chain
        for rule in self.routes:
            if rule.matches(
                tenant_id=tenant_id, intent=intent, language=language, question_chars=question_chars
            ):
                chain = rule.chain
                break
        ordered = list(dict.fromkeys(n for n in chain if n != TEMPLATE))
        return [*ordered, TEMPLATE]

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GatewayConfig:
        _reject_unknown("gateway config", data, cls)
        adapters = []
        for i, raw in enumerate(data.get("adapters", ())):
            _reject_unknown(f"adapters[{i}]", raw, AdapterConfig)
            if "name" not in raw:
                raise GatewayConfigError(f"adapters[{i}] needs a name")
            adapters.append(AdapterConfig(**raw))
        routes = []
        for i, raw in enumerate(data.get("routes", ())):
            _reject_unknown(f"routes[{i}]", raw, RouteRule)
            if "chain" not in raw:
                raise GatewayConfigError(f"routes[{i}] needs a chain")
            routes.append(RouteRule(**raw))
        kwargs: dict[str, Any] = {"adapters": tuple(adapters), "routes": tuple(routes)}
        if "default_chain" in data:
            kwargs["default_chain"] = tuple(data["default_chain"])
        if "llm_without_passages" in data:
            kwargs["llm_without_passages"] = bool(data["llm_without_passages"])
        if "template" in data:
            _reject_unknown("template", data["template"], AdapterConfig)
            kwargs["template"] = AdapterConfig(**{"name": TEMPLATE, "kind": TEMPLATE, **data["template"]})
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> GatewayConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GatewayConfigError(f"gateway config is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise GatewayConfigError("gateway config must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_env_string(cls, value: str | None) -> GatewayConfig:
        """One setting: empty means the embedded default (template only); `@path` reads a JSON file;
        anything else is the JSON itself."""
        if value is None or not value.strip():
            return cls()
        value = value.strip()
        if value.startswith("@"):
            with open(value[1:], encoding="utf-8") as f:
                return cls.from_json(f.read())
        return cls.from_json(value)

    def to_json(self) -> str:
        """JSON without secrets (`api_key` is dropped; `api_key_env` is kept)."""
        data = asdict(self)
        for a in data["adapters"]:
            a.pop("api_key", None)
        data["template"].pop("api_key", None)
        return json.dumps(data, ensure_ascii=False)


def _reject_unknown(where: str, raw: Any, cls: type) -> None:
    if not isinstance(raw, Mapping):
        raise GatewayConfigError(f"{where} must be a JSON object, got {type(raw).__name__}")
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise GatewayConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
