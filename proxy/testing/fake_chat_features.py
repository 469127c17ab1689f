"""What the fake chat API (proxy.testing.fake_openai_chat) does with the features guided search
never uses but a plain-mode proxy forwards: tools, tool results, structured output, image parts
and streaming.

Why a fake: the passthrough (proxy.serving.passthrough) must be tested through the real openai
client against what a chat API accepts, refuses and answers, without network or keys. The rules
are written from OpenAI's chat completions reference, which vLLM, DeepSeek, Mistral and
OpenRouter follow for these fields:

  tools         a list of `{"type": "function", "function": {"name", "description"?,
                "parameters"?}}`; a tool without a function name is a 400 naming
                `tools[i].function.name`.
  tool_choice   "none", "auto", "required" or `{"type": "function", "function": {"name"}}`; any
                value without tools is a 400, as is a named function that is not among them.
                The fake calls a tool when the choice is "required" or names one, and under
                "auto" when the last message is the user's (so a conversation that already has
                the tool's result gets a text answer): the first (or named) tool, its arguments
                `{"text": <the toy model's sampled text>}` as a JSON string, content null,
                finish reason "tool_calls".
  tool messages `{"role": "tool", "tool_call_id", "content"}` must answer a `tool_calls` entry of
                an earlier assistant message (OpenAI's 400 otherwise).
  response_format  "text"; "json_object" (the content is a JSON object); "json_schema" (needs
                `json_schema.name`; the content is an object with every `required` property of
                the schema, strings sampled, numbers 0, booleans false).
  content parts text parts are read as text; `image_url` parts are seen as "[image]".
  stream        server-sent events: a role chunk, one chunk per sampled piece of content or per
                tool call (name, then its arguments), a final chunk with the finish reason, and
                with `stream_options.include_usage` a last chunk with empty choices and the usage
                (the earlier chunks carry `"usage": null`), then `data: [DONE]`.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from proxy.serving.errors import ApiError

FINISH_TOOL_CALLS = "tool_calls"


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_request_error")


def content_text(content: Any) -> str:
    """A message's content as the toy model reads it."""
    if isinstance(content, list):
        return "".join(p.get("text", "") if p.get("type") == "text" else "[image]"
                       for p in content if isinstance(p, dict))
    return content or ""


def check_messages(messages: Any) -> None:
    """The roles, contents and tool-call links OpenAI's reference allows."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects.", "messages")
    called: set[str] = set()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise _bad("messages must be a non-empty list of {role, content} objects.", f"messages[{i}]")
        if not isinstance(m.get("content", ""), (str, list, type(None))):
            raise _bad("content must be a string or a list of parts.", f"messages[{i}].content")
        for call in m.get("tool_calls") or []:
            called.add(str(call.get("id")))
        if m["role"] == "tool" and m.get("tool_call_id") not in called:
            raise _bad("Invalid parameter: messages with role 'tool' must be a response to a preceding message "
                       "with 'tool_calls'.", f"messages[{i}].role")


def chosen_tool(body: dict[str, Any]) -> str | None:
    """The function the answer calls, or None for a text answer; refusals as OpenAI words them."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice is not None:
            raise _bad("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                       "tool_choice")
        return None
    names = []
    for i, tool in enumerate(tools):
        name = (tool.get("function") or {}).get("name") if isinstance(tool, dict) else None
        if not name:
            raise _bad(f"Missing required parameter: 'tools[{i}].function.name'.", f"tools[{i}].function.name")
        names.append(name)
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in names:
            raise _bad(f"Invalid value for 'tool_choice': no function named {name!r} was specified in 'tools'.",
                       "tool_choice")
        return name
    if choice == "required" or (choice in (None, "auto") and body["messages"][-1].get("role") == "user"):
        return names[0]
    return None


def formatted(body: dict[str, Any], sampled: str) -> str:
    """The content under `response_format`, built around the sampled text."""
    fmt = body.get("response_format") or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return sampled
    if kind == "json_object":
        return json.dumps({"text": sampled})
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        if not spec.get("name"):
            raise _bad("Missing required parameter: 'response_format.json_schema.name'.",
                       "response_format.json_schema.name")
        schema = spec.get("schema") or {}
        props = schema.get("properties") or {}
        filler = {"string": sampled, "number": 0, "integer": 0, "boolean": False, "array": [], "object": {}}
        return json.dumps({name: filler.get((props.get(name) or {}).get("type"), sampled)
                           for name in schema.get("required", list(props))})
    raise _bad(f"Invalid value: {kind!r}. Supported values are: 'text', 'json_object' and 'json_schema'.",
               "response_format.type")


def tool_call(index: int, name: str, sampled: str) -> dict[str, Any]:
    return {"id": f"call_{index}_{name}", "type": "function",
            "function": {"name": name, "arguments": json.dumps({"text": sampled})}}


def stream_events(answer: dict[str, Any], include_usage: bool) -> Iterator[dict[str, Any]]:
    """The whole answer `answer` as chat.completion.chunk objects, in the order a stream sends them."""
    base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"],
            "model": answer["model"]}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": index, "delta": delta, "finish_reason": reason}], **extra}

    for choice in answer["choices"]:
        i, message = choice["index"], choice["message"]
        yield chunk(i, {"role": "assistant", "content": ""})
        for n, call in enumerate(message.get("tool_calls") or []):
            fn = call["function"]
            yield chunk(i, {"tool_calls": [{"index": n, "id": call["id"], "type": "function",
                                            "function": {"name": fn["name"], "arguments": ""}}]})
            yield chunk(i, {"tool_calls": [{"index": n, "function": {"arguments": fn["arguments"]}}]})
        content = message.get("content") or ""
        for start in range(0, len(content), 8):
            yield chunk(i, {"content": content[start:start + 8]})
        yield chunk(i, {}, choice["finish_reason"])
    if include_usage:
        yield {**base, "choices": [], "usage": answer["usage"]}
