"""Choosing the search for one server request: model alias, OpenAI sampling fields, `w2s` body
field, and the operator's caps, in that order.

The model name picks the mode: the upstream's model alone is plain sampling; `<model>+<mode>`
is a mode from `server.modes`. The OpenAI fields (max_tokens, temperature, top_p, seed, stop)
then override the mode's sampling settings, and the `w2s` field may switch the mode and set W,
K and L. The caps are checked last, on what would really run, so that no combination of
fields can order a search larger than the operator allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from proxy.config import SearchConfig, ServerCaps

# Which request field each search field came from, so a 400 names what the client sent.
_REQUEST_FIELD = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p",
                  "seed": "seed", "stop": "stop", "w": "w2s.w", "k": "w2s.k", "l": "w2s.l",
                  "prefer_finished": "w2s.prefer_finished", "narrow_start": "w2s.narrow_start",
                  "max_upstream_tokens": "w2s.max_upstream_tokens",
                  "max_cost_usd": "w2s.max_cost_usd", "deadline_s": "w2s.deadline_s"}


class GuidanceError(ValueError):
    """A request the server refuses; `status` is 400 (bad field) or 404 (unknown model)."""

    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class Plan:
    """What a request will run: the mode's name ("base" for plain sampling) and its search."""

    mode: str
    search: SearchConfig


class GuidanceModes:
    def __init__(self, model: str, plain: SearchConfig, modes: dict[str, SearchConfig], caps: ServerCaps,
                 *, guided: bool) -> None:
        """`guided` is False when the server has no scorer: then only plain sampling is offered."""
        self.model = model
        self.plain = plain.model_copy(update={"w": 1, "k": 1, "l": None})
        self.modes = dict(modes) if guided else {}
        self.caps = caps

    def model_ids(self) -> list[str]:
        return [self.model, *(f"{self.model}+{name}" for name in self.modes)]

    def _base(self, model: str, mode: str | None) -> tuple[str, SearchConfig]:
        name, plus, suffix = model.partition("+")
        if name != self.model or (plus and suffix not in self.modes):
            raise GuidanceError(f"The model `{model}` does not exist; GET /v1/models lists the served ones",
                                "model", 404, "model_not_found")
        chosen = mode if mode is not None else (suffix or None)
        if chosen is None:
            return "base", self.plain
        if chosen not in self.modes:
            known = ", ".join(self.modes) or "none (this server has no scorer)"
            raise GuidanceError(f"unknown mode {chosen!r} (known: {known})", "w2s.mode", 400, "invalid_value")
        return chosen, self.modes[chosen]

    def resolve(self, model: str, *, max_tokens: int | None = None, temperature: float | None = None,
                top_p: float | None = None, seed: int | None = None, stop: list[str] | None = None,
                w2s: dict[str, Any] | None = None) -> Plan:
        """The search for a request; `w2s` holds only the fields the client sent (`l: None` = unbounded)."""
        w2s = dict(w2s or {})
        name, base = self._base(model, w2s.pop("mode", None))
        updates: dict[str, Any] = {k: v for k, v in dict(temperature=temperature, top_p=top_p, seed=seed,
                                                          stop=stop or None).items() if v is not None}
        updates.update({k: w2s[k] for k in ("w", "k", "l") if k in w2s})
        for key in ("prefer_finished", "narrow_start", "max_upstream_tokens", "max_cost_usd", "deadline_s"):
            if w2s.get(key) is not None:
                updates[key] = w2s[key]
        if max_tokens is not None:
            if max_tokens > self.caps.max_tokens:
                raise GuidanceError(f"max_tokens = {max_tokens} exceeds this server's cap of {self.caps.max_tokens}",
                                    "max_tokens")
            updates["max_new_tokens"] = max_tokens
        else:  # the mode's default budget, within the cap
            updates["max_new_tokens"] = min(base.max_new_tokens, self.caps.max_tokens)
        try:
            search = SearchConfig.model_validate({**base.model_dump(), **updates})
        except ValidationError as e:
            first = e.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else ""
            raise GuidanceError(f"{_REQUEST_FIELD.get(field, field)}: {first['msg']}",
                                _REQUEST_FIELD.get(field, field) or None) from None
        self._check_caps(search)
        if search.needs_scorer and not self.modes:
            raise GuidanceError("w*k > 1 needs a scorer and this server has none", "w2s")
        return Plan(mode=name if not ({"w", "k", "l"} & w2s.keys()) else search.mode, search=search)

    def _check_caps(self, s: SearchConfig) -> None:
        if s.w * s.k > self.caps.max_w_times_k:
            raise GuidanceError(f"w*k = {s.w * s.k} exceeds this server's cap of {self.caps.max_w_times_k}", "w2s")
        if s.l is not None and s.l < self.caps.min_l:
            raise GuidanceError(f"l = {s.l} is below this server's minimum chunk length of {self.caps.min_l}",
                                "w2s.l")
