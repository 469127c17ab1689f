"""A stand-in for vLLM's prompt-log-probability API on 127.0.0.1, backed by a tiny transformers
model, for the remote scorer's fast tests (the real vLLM is tests/test_remote_scorer_vllm.py's).

Written from vLLM's OpenAI server as observed on 0.32.0 (tests/vllm_engine.py runs it):
GET /v1/models lists the served name with `max_model_len`; POST /v1/completions takes `prompt`
as a list of token-id lists, answers one choice per prompt in order, with `prompt_logprobs` a
list as long as the prompt, None first, then `{"<id>": {"logprob", "rank", "decoded_token"}}`.
What it rejects as vLLM does: `max_tokens` below 1 (400, param max_tokens), a model it does not
serve (404), a prompt with no room for the generated token (400). Text prompts are refused (the
remote scorer never sends text).

The log-probabilities are the slow independent computation: every sequence run alone, whole,
through the model, log-softmax in float32. Faults for the retry tests: `fail_next` holds what
the next requests get instead of an answer (an HTTP status, or "malformed": a 200 whose
prompt_logprobs miss a position).
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import torch
from aiohttp import web
from transformers import PreTrainedModel

from proxy.serving.site import listen



def error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "BadRequestError", "param": param,
                                        "code": status}}, status=status)


class FakeLogprobEngine:
    def __init__(self, model: PreTrainedModel, name: str, max_model_len: int = 256) -> None:
        self.model = model
        self.name = name
        self.max_model_len = max_model_len
        self.fail_next: list[int | str] = []
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def __aenter__(self) -> "FakeLogprobEngine":
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        self._runner, root = await listen(app, "127.0.0.1", 0, access_log=None)
        self.base_url = f"{root}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "owned_by": "vllm", "max_model_len": self.max_model_len}]})

    def logprobs(self, ids: Sequence[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1: one whole forward of this sequence alone."""
        with torch.inference_mode():
            logits = self.model(torch.tensor([list(ids)])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            return [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]

    async def _completions(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.json()
        self.bodies.append(body)
        if self.fail_next:
            fault = self.fail_next.pop(0)
            if isinstance(fault, int):
                return error(fault, "injected failure")
        else:
            fault = None
        if body.get("model") != self.name:
            return error(404, f"The model `{body.get('model')}` does not exist.", "model")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        prompts = body.get("prompt")
        if not (isinstance(prompts, list) and prompts and all(isinstance(p, list) and p for p in prompts)):
            return error(400, "this fake takes prompts as lists of token ids", "prompt")
        for p in prompts:
            if len(p) + max_tokens > self.max_model_len:
                return error(400, f"This model's maximum context length is {self.max_model_len} tokens.", "prompt")
        want = body.get("prompt_logprobs")
        choices = []
        for i, ids in enumerate(prompts):
            rows: list[dict[str, Any] | None] | None = None
            if want is not None:
                values = await asyncio.to_thread(self.logprobs, ids)
                rows = [None] + [{str(t): {"logprob": v, "rank": 1, "decoded_token": "?"}} for t, v in zip(ids[1:], values)]
                if fault == "malformed":
                    rows = rows[:-1]
            choices.append({"index": i, "text": "x", "finish_reason": "length", "logprobs": None,
                            "prompt_logprobs": rows})
        n_prompt = sum(len(p) for p in prompts)
        return web.json_response({"id": "cmpl-fake", "object": "text_completion", "model": self.name,
                                  "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(prompts),
                                                                "total_tokens": n_prompt + len(prompts)}})
