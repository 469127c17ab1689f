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

from proxy.config import ConfigError, SearchConfig, ServerCaps, cap_problem
from proxy.config.search import SETTINGS
from proxy.search import algorithm, mode_name, needs_scorer

REQUEST_FIELD = {s.name: s.request_field for s in SETTINGS}
"""Which request field sets each search setting, so a 400 names what the client sent."""
_PLAIN = {s.name: s.default for s in SETTINGS if s.names_mode}
"""The settings that shape a search, at their defaults: plain sampling (one sample, one chunk)."""


class GuidanceError(ValueError):
    """A request the server refuses; `status` is 400 (bad field) or 404 (unknown model)."""

    def __init__(self, message: str, param: str | None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


@dataclass(frozen=True)
class ModeChoice:
    """What a request asked for: the mode's name ("base" for plain sampling) and its search
    settings, within the caps (the engine then plans it: proxy.search.plan)."""

    mode: str
    search: SearchConfig


class GuidanceModes:
    def __init__(self, model: str, plain: SearchConfig, modes: dict[str, SearchConfig], caps: ServerCaps,
                 *, guided: bool) -> None:
        """`guided` is False when the server has no scorer: then only the modes that need none
        (plain sampling, an algorithm that ranks without one) are offered. A mode naming an
        unknown algorithm is a ConfigError here, when the server starts."""
        self.model = model
        self.plain = plain.model_copy(update=_PLAIN)
        self.modes = {name: m for name, m in modes.items() if guided or not needs_scorer(m)}
        self.guided = guided
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
                w2s: dict[str, Any] | None = None) -> ModeChoice:
        """The search for a request; `w2s` holds only the fields the client sent (`l: None` = unbounded)."""
        w2s = dict(w2s or {})
        name, base = self._base(model, w2s.pop("mode", None))
        sent = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "stop": stop or None}
        updates: dict[str, Any] = {}
        for s in SETTINGS:
            if not s.per_request:
                continue
            if s.openai_field is not None:
                value = sent.get(s.openai_field)
                if value is not None:
                    updates[s.name] = value
            elif s.name in w2s and (w2s[s.name] is not None or s.request_null):
                updates[s.name] = w2s[s.name]
        if max_tokens is not None and max_tokens > self.caps.max_tokens:
            raise GuidanceError(f"max_tokens = {max_tokens} exceeds this server's cap of {self.caps.max_tokens}",
                                "max_tokens")
        if max_tokens is None:  # the mode's default budget, within the cap
            updates["max_new_tokens"] = min(base.max_new_tokens, self.caps.max_tokens)
        try:
            search = SearchConfig.model_validate({**base.model_dump(), **updates})
        except ValidationError as e:
            first = e.errors()[0]
            name_ = str(first["loc"][0]) if first["loc"] else ""
            param = REQUEST_FIELD.get(name_, name_)
            raise GuidanceError(f"{param}: {first['msg']}", param or None) from None
        problem = cap_problem(search, self.caps)
        if problem is not None:
            raise GuidanceError(problem.for_request(), problem.param)
        try:
            algorithm(search.algorithm)
        except ConfigError as e:
            raise GuidanceError(str(e).replace("search.algorithm", "w2s.algorithm", 1), "w2s.algorithm") from None
        if needs_scorer(search) and not self.guided:
            raise GuidanceError("this search ranks candidates (w*k > 1), which needs a scorer, and this server "
                                "has none", "w2s")
        renamed = any(s.names_mode and s.name in w2s for s in SETTINGS)
        return ModeChoice(mode=mode_name(search) if renamed else name, search=search)
