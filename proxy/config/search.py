"""The one table of search settings, and everything derived from it.

Each setting is declared once, in `SETTINGS`: its name, type, default, bounds, help, whether it
changes the answer, whether a request may set it (and through which OpenAI field), and its CLI
flag. The config model (`SearchConfig`), the server request's `w2s` options
(proxy.protocol.requests), the CLI flags (proxy.search_flags), the server's per-request
overrides (proxy.serving.guidance) and the identity of an AlpacaEval run
(proxy.alpaca_eval.identity) are built from the table, so a new setting is one new row.

The settings are the algorithm's knobs (proxy.search: `algorithm` names one, chunk-level beam
search by default, whose best-of-N and plain sampling are W=1 and W=K=1) and the search's caps
on spend and time (proxy.budget).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model

from proxy.config.base import ConfigError, Strict, format_validation_error

Identity = Literal["always", "when_set", "unless_default"]
"""How a setting enters a run's identity: always; only when not None (a cap added after runs
were fingerprinted without it); only when it differs from its default (likewise)."""


@dataclass(frozen=True)
class Setting:
    """One row of the table."""

    name: str
    type: Any
    default: Any
    help: str
    bounds: Mapping[str, Any] = field(default_factory=dict)
    """pydantic Field constraints: ge, gt, le, max_length, pattern."""
    shapes_answer: bool = True
    """Does it change the answer (and so a resumed run's identity)?"""
    identity: Identity = "unless_default"
    """A new setting's default keeps the fingerprints of runs made before it existed; the
    settings the first runs were fingerprinted with are "always"."""
    per_request: bool = True
    """May a server request override it?"""
    openai_field: str | None = None
    """The OpenAI request field that carries it (max_tokens, temperature, ...); None: `w2s.<name>`."""
    flag: str | None = None
    """The CLI flag; None: `--<name with dashes>`."""
    cli: bool = True
    """Offered as a flag by the commands that run searches."""
    request_null: bool = False
    """A request's explicit null is passed on (`l: null` is an unbounded chunk; `w: null` is
    refused as not a number); otherwise a null leaves the mode's value as it is."""
    names_mode: bool = False
    """It shapes the search (which algorithm, how wide, how long its chunks): a request that sets
    it runs a search named after its settings, not the mode it asked for, and plain sampling is
    every such setting at its default."""

    @property
    def request_field(self) -> str:
        """The field a request sets it with, as a 400 names it."""
        return self.openai_field or f"w2s.{self.name}"

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("algorithm", str, "cbs", "the search algorithm (proxy.search's registry): cbs is chunk-level beam "
            "search, whose best-of-N and plain sampling are W=1 and W=K=1", {"min_length": 1}, names_mode=True),
    Setting("w", int, 1, "beam width: beams kept after each step", {"ge": 1},
            identity="always", names_mode=True, request_null=True),
    Setting("k", int, 1, "successors sampled per beam per step", {"ge": 1},
            identity="always", names_mode=True, request_null=True),
    Setting("l", int | None, None, "chunk length in upstream tokens; null: unbounded (one chunk)", {"ge": 1},
            identity="always", names_mode=True, request_null=True),
    Setting("max_new_tokens", int, 512, "upstream tokens in the answer at most", {"ge": 1},
            identity="always", openai_field="max_tokens"),
    Setting("temperature", float, 0.7, "sampling temperature of the upstream", {"ge": 0.0},
            identity="always", openai_field="temperature"),
    Setting("top_p", float, 1.0, "nucleus sampling of the upstream", {"gt": 0.0, "le": 1.0},
            identity="always", openai_field="top_p"),
    Setting("seed", int | None, None, "seeds every upstream request (derived per step and beam)",
            identity="always", openai_field="seed"),
    Setting("stop", list[str], (), "stop sequences (at most 4), also cut where they straddle two chunks",
            {"max_length": 4}, identity="always", openai_field="stop", cli=False),
    Setting("prefer_finished", bool, False,
            "answer with the best finished beam when there is one, and rank out-of-budget unfinished beams "
            "last (default: the paper's rule, the top-scored beam; finishing counts only through the EOS term)",
            identity="always"),
    Setting("narrow_start", bool, False,
            "draw K first chunks from the prompt instead of the paper's W*K (saves (W-1)*K chunks; with K <= W "
            "the first selection then keeps every first chunk and chooses nothing)", identity="always"),
    Setting("horizon", int | None, None,
            "search only the first H upstream tokens, then finish the chosen beam with one plain continuation "
            "to max_new_tokens (null: search to the end, the paper's)", {"ge": 1}, names_mode=True),
    Setting("sample_schedule", list[Annotated[int, Field(ge=1)]] | None, None,
            "samples per expanded beam at each step, the last repeated: [16, 4] draws 16 first chunks of the "
            "prompt, then 4 per beam (null: W*K first, K after, the paper's)", {"min_length": 1, "max_length": 64},
            names_mode=True),
    Setting("max_upstream_tokens", int | None, None,
            "tokens (prompt + completion) one search may be billed; it stops before a step that could pass it",
            {"ge": 1}, identity="when_set"),
    Setting("max_cost_usd", float | None, None, "US dollars one search may cost at the upstream's prices",
            {"gt": 0}, identity="when_set", flag="--search-max-cost-usd"),
    Setting("deadline_s", float | None, None,
            "seconds one search may take, retries included; then it answers with its best beam so far "
            "and a step still running is cancelled with its upstream calls", {"gt": 0}, identity="when_set"),
)


def setting_fields(settings: Iterable[Setting], *, optional: bool = False) -> dict[str, Any]:
    """pydantic field definitions for `settings`; `optional`: every field may be left out
    (None), as a request's overrides are."""
    out: dict[str, Any] = {}
    for s in settings:
        default = list(s.default) if isinstance(s.default, tuple) else s.default
        if optional:
            out[s.name] = (s.type | None, Field(None, description=s.help, **s.bounds))
        elif isinstance(default, list):
            out[s.name] = (s.type, Field(default_factory=lambda d=default: list(d), description=s.help, **s.bounds))
        else:
            out[s.name] = (s.type, Field(default, description=s.help, **s.bounds))
    return out


def build_search_config(settings: Iterable[Setting], name: str = "SearchConfig") -> type[Strict]:
    """The config model of a table (a test builds one from a table with a row added)."""
    settings = tuple(settings)
    model = create_model(name, __base__=Strict, __doc__="How one search runs: one validated value per setting.",
                         **setting_fields(settings))
    model.__settings__ = settings  # type: ignore[attr-defined]
    return model


SearchConfig = build_search_config(SETTINGS)
"""How one search runs: a validated, frozen row of values, one per setting."""


def search_with(base: Any, **overrides: Any) -> Any:
    """A copy of `base` with the overrides that are not None, validated, errors naming
    `search.<field>`."""
    data = base.model_dump()
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return type(base).model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "search")) from None


def search_identity(cfg: Any, settings: Iterable[Setting] | None = None) -> dict[str, Any]:
    """The settings of `cfg` that change its answers, each by its identity rule."""
    out: dict[str, Any] = {}
    for s in settings if settings is not None else type(cfg).__settings__:
        if not s.shapes_answer:
            continue
        value = getattr(cfg, s.name)
        default = list(s.default) if isinstance(s.default, tuple) else s.default
        if (s.identity == "when_set" and value is None) or (s.identity == "unless_default" and value == default):
            continue
        out[s.name] = value
    return out
