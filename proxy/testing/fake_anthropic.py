"""A fake of Anthropic's Messages API on 127.0.0.1, for tests: no network, no key, no weights.

Why it exists: the anthropic upstream must be tested through the real `anthropic` SDK (its
headers, its error classes, its parsing), against a server that refuses what the real API
refuses, since most of what that upstream does is avoid those refusals: missing or wrong
key (401; `x-api-key` as documented, or `Authorization: Bearer` as anthropic 2.x sends it), no `max_tokens`, fields the API does not have (`n`, `seed`: 400),
roles that do not alternate, a final assistant turn ending in whitespace, whitespace-only stop
sequences, temperature above 1, `temperature` with `top_p` (newer models), and any prefill on
a model in `no_prefill_models` (Claude 4.6 and later). `failures` answers the next requests
with 429 (`retry-after: retry_after_s`) or 529 (overloaded) or another status first.

Text comes from the seeded toy model (proxy.testing.toy_model) continuing the messages'
contents joined, prefill included, seeded by a request counter so parallel samples differ.
`spacing="trailing"` writes each word with its space after it ("cat sat "), so answers end in
whitespace as real ones often do; `thinking=True` puts a thinking block (`thinking_words` long,
counted in output_tokens and against max_tokens) before the text.

Prompt cache (Anthropic's rules less expiry and the 20-block lookback limit): every text block
carrying `cache_control` (system blocks first, then the messages' blocks; a top-level
`cache_control` marks the last block) ends a prefix that is cached once it reaches
`cache_min_tokens` toy tokens. A request reads the longest marked prefix that was cached when it
arrived (`cache_read_input_tokens`: parallel twins find nothing of each other's), writes the rest
up to its last cacheable mark (`cache_creation_input_tokens`), and `input_tokens` counts the
tokens after that, as the API's does. A request without a breakpoint reports both as 0.

Bookkeeping: `requests` (every JSON body POSTed to /v1/messages, refused ones included),
`headers` (their headers without the key), `responses` (the text answered to each 200),
`in_flight`/`max_in_flight`. The key itself is never recorded.
"""
from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from aiohttp import web

from proxy.protocol.model_requests import CompletionParams
from proxy.serving.site import listen
from proxy.testing.cache_rules import anthropic_cache_use
from proxy.testing.toy_model import ToyBackend
from proxy.types import first_stop

KNOWN_FIELDS = frozenset({"model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k",
                          "stop_sequences", "stream", "metadata", "thinking", "tools", "tool_choice",
                          "service_tier", "container", "output_config", "cache_control"})
DEFAULT_NO_PREFILL = frozenset({"claude-opus-4-6", "claude-sonnet-4-6"})
SECRET_HEADERS = ("x-api-key", "authorization")


class Refused(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


def _blocks(content: Any) -> list[Any]:
    """A content's blocks (a string is one block, with no cache_control; none: no blocks)."""
    return content if isinstance(content, list) else [content] if content else []


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list) or not all(isinstance(b, dict) and b.get("type") == "text" for b in content):
        raise Refused(400, "invalid_request_error", "messages: content must be a string or a list of text blocks")
    return [b.get("text", "") for b in content]


class FakeAnthropicServer:
    def __init__(self, *, models: Iterable[str] = ("claude-opus-4-5-20251101", "claude-opus-4-6"),
                 aliases: dict[str, str] | None = None, api_key: str = "test-anthropic-key",
                 no_prefill_models: Iterable[str] = DEFAULT_NO_PREFILL, exclusive_temperature_top_p: bool = True,
                 spacing: Literal["leading", "trailing"] = "leading", eos_prob: float = 0.08,
                 thinking: bool = False, thinking_words: int = 3, failures: Sequence[int] = (),
                 retry_after_s: float | None = None, latency_s: float = 0.0, cache_min_tokens: int = 0) -> None:
        self.models = list(models)
        self.aliases = dict(aliases or {"claude-opus-4-5": "claude-opus-4-5-20251101"})
        self.api_key = api_key
        self.no_prefill_models = frozenset(no_prefill_models)
        self.exclusive_temperature_top_p = exclusive_temperature_top_p
        self.spacing, self.thinking, self.thinking_words = spacing, thinking, thinking_words
        self.toy = ToyBackend(eos_prob=eos_prob)
        self.failures: deque[int] = deque(failures)
        self.retry_after_s, self.latency_s = retry_after_s, latency_s
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.responses: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.cached_prefixes: set[str] = set()
        self.cache_min_tokens = cache_min_tokens
        """The model's minimum cacheable prefix, in toy tokens: a shorter marked prefix caches nothing."""
        self._counter = itertools.count()
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> "FakeAnthropicServer":
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/v1/models/{model_id}", self._get_model)
        self._runner, self.base_url = await listen(app, "127.0.0.1", 0, handler_cancellation=True,
                                                   shutdown_timeout=0.5, access_log=None)  # the SDK appends /v1/...
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ refusals

    def _check_auth(self, request: web.Request) -> None:
        """The documented `x-api-key`, or `Authorization: Bearer <key>` (what anthropic 2.x sends)."""
        key = request.headers.get("x-api-key")
        bearer = request.headers.get("authorization", "")
        if not key and bearer.startswith("Bearer "):
            key = bearer.removeprefix("Bearer ")
        if not key:
            raise Refused(401, "authentication_error", "x-api-key header is required")
        if key != self.api_key:
            raise Refused(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in request.headers:
            raise Refused(400, "invalid_request_error", "anthropic-version: header is required")

    def _injected_failure(self) -> None:
        if not self.failures:
            return
        status = self.failures.popleft()
        if status == 429:
            headers = {"retry-after": str(self.retry_after_s)} if self.retry_after_s is not None else None
            raise Refused(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit.", headers)
        raise Refused(status, "overloaded_error" if status == 529 else "api_error",
                      "Overloaded" if status == 529 else "Internal server error")

    def _validate(self, body: dict[str, Any]) -> tuple[str, list[str]]:
        """(model, texts of every turn, system first) of a valid body; else Refused."""
        for field in body:
            if field not in KNOWN_FIELDS:
                raise Refused(400, "invalid_request_error", f"{field}: Extra inputs are not permitted")
        model = body.get("model")
        if model not in self.models and model not in self.aliases:
            raise Refused(404 if isinstance(model, str) else 400,
                          "not_found_error" if isinstance(model, str) else "invalid_request_error", f"model: {model}")
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise Refused(400, "invalid_request_error", "max_tokens: Field required")
        if body.get("stream"):
            raise Refused(400, "invalid_request_error", "stream: this fake does not stream")
        temperature, top_p = body.get("temperature"), body.get("top_p")
        if temperature is not None and not 0.0 <= temperature <= 1.0:
            raise Refused(400, "invalid_request_error", "temperature: Input should be less than or equal to 1")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise Refused(400, "invalid_request_error", "top_p: Input should be less than or equal to 1")
        if temperature is not None and top_p is not None and self.exclusive_temperature_top_p:
            raise Refused(400, "invalid_request_error",
                          "`temperature` and `top_p` cannot both be specified for this model. Please use only one.")
        for s in body.get("stop_sequences") or []:
            if not isinstance(s, str) or not s.strip():
                raise Refused(400, "invalid_request_error", "stop_sequences: each stop sequence must contain non-whitespace")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Refused(400, "invalid_request_error", "messages: at least one message is required")
        texts = _texts(body["system"]) if body.get("system") else []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ("user", "assistant"):
                raise Refused(400, "invalid_request_error", f"messages.{i}.role: Unexpected role {role!r}")
            if i and messages[i - 1]["role"] == role:
                raise Refused(400, "invalid_request_error",
                              f'messages: roles must alternate between "user" and "assistant", '
                              f'but found multiple "{role}" roles in a row')
            parts = _texts(m.get("content"))
            if not all(parts):
                raise Refused(400, "invalid_request_error", "messages: text content blocks must be non-empty")
            texts.extend(parts)
        if messages[-1]["role"] == "assistant":
            if texts[-1] != texts[-1].rstrip():
                raise Refused(400, "invalid_request_error",
                              "messages: final assistant content cannot end with trailing whitespace")
            if self.aliases.get(model, model) in self.no_prefill_models:
                raise Refused(400, "invalid_request_error", "This model does not support assistant message prefill. "
                                                            "The conversation must end with a user message.")
        return self.aliases.get(model, model), texts

    # ------------------------------------------------------------------ answers

    def _generate(self, body: dict[str, Any], model: str, texts: list[str],
                  available: frozenset[str]) -> dict[str, Any]:
        prompt = "\n".join(texts)
        budget = body["max_tokens"]
        content: list[dict[str, Any]] = []
        thought = 0
        if self.thinking:
            thought = min(self.thinking_words, budget)
            content.append({"type": "thinking", "thinking": "Let me think. " * thought, "signature": "sig"})
        temperature = body.get("temperature", 1.0)
        choice = self.toy.lm.generate(CompletionParams(
            model=model, prompt=prompt, max_tokens=max(budget - thought, 1), temperature=temperature,
            top_p=body.get("top_p", 1.0), seed=next(self._counter)), 0, self.toy.encoding)
        words = choice.text.split()
        if budget - thought < 1:
            words, reason = [], "max_tokens"
        else:
            reason = "end_turn" if choice.finish_reason == "stop" else "max_tokens"
        text = "".join(f"{w} " if self.spacing == "trailing" else f" {w}" for w in words)
        stops = body.get("stop_sequences") or []
        cut = first_stop(text, stops)
        matched = None
        if cut is not None:
            matched = min((s for s in stops if text.find(s) == cut), key=len)
            text, reason = text[:cut], "stop_sequence"
            words = text.split()
        if text:
            content.append({"type": "text", "text": text})
        self.responses.append(text)
        return {"id": f"msg_fake{len(self.responses)}", "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": reason, "stop_sequence": matched,
                "usage": {**self._cache_usage(body, texts, available), "output_tokens": thought + len(words)}}

    def _cache_usage(self, body: dict[str, Any], texts: list[str], available: frozenset[str]) -> dict[str, int]:
        """input_tokens and the cache fields of a valid body (see the module's docstring);
        `available`: the prefixes cached when the request arrived."""
        marks = [isinstance(b, dict) and "cache_control" in b for b in _blocks(body.get("system"))]
        for m in body["messages"]:
            marks.extend(isinstance(b, dict) and "cache_control" in b for b in _blocks(m.get("content")))
        if body.get("cache_control") is not None:
            marks[-1] = True
        use = anthropic_cache_use(texts, marks, available, lambda t: len(self.toy.encoding.encode_ordinary(t)),
                                  self.cache_min_tokens)
        self.cached_prefixes.update(use.cached)
        return {"input_tokens": use.input_tokens, "cache_read_input_tokens": use.read,
                "cache_creation_input_tokens": use.write}

    async def _messages(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body: Any = None
            try:
                body = await request.json()
            finally:
                self.requests.append(body if isinstance(body, dict) else {"<invalid>": body})
                self.headers.append({k.lower(): v for k, v in request.headers.items()
                                     if k.lower() not in SECRET_HEADERS})
            available = frozenset(self.cached_prefixes)  # what a request finds is what was there when it came
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            self._check_auth(request)
            self._injected_failure()
            if not isinstance(body, dict):
                raise Refused(400, "invalid_request_error", "request body must be a JSON object")
            model, texts = self._validate(body)
            return web.json_response(self._generate(body, model, texts, available), headers={"request-id": "req_fake"})
        except Refused as e:
            return self._error(e)
        finally:
            self.in_flight -= 1

    def _error(self, e: Refused) -> web.Response:
        return web.json_response({"type": "error", "error": {"type": e.type, "message": e.message},
                                  "request_id": "req_fake"}, status=e.status, headers=e.headers)

    def _card(self, model: str) -> dict[str, Any]:
        return {"type": "model", "id": model, "display_name": model.replace("-", " ").title(),
                "created_at": "2025-09-29T00:00:00Z"}

    async def _list_models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except Refused as e:
            return self._error(e)
        limit = int(request.query.get("limit", "20"))
        after = request.query.get("after_id")
        start = self.models.index(after) + 1 if after in self.models else 0
        page = self.models[start:start + limit]
        return web.json_response({"data": [self._card(m) for m in page], "has_more": start + limit < len(self.models),
                                  "first_id": page[0] if page else None, "last_id": page[-1] if page else None})

    async def _get_model(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
            model = self.aliases.get(request.match_info["model_id"], request.match_info["model_id"])
            if model not in self.models:
                raise Refused(404, "not_found_error", f"model: {request.match_info['model_id']}")
        except Refused as e:
            return self._error(e)
        return web.json_response(self._card(model))
