"""The server's pure parts: its metrics, the settled-prefix tracker, mode resolution,
and the `server:` config section."""
from __future__ import annotations

from pathlib import Path

import httpx2
import openai
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import AppConfig, ConfigError, SearchConfig, ServerCaps, ServerConfig
from proxy.serving.guidance import GuidanceError, GuidanceModes
from proxy.serving.metrics import ServerMetrics
from proxy.presets import build_config, server_modes
from proxy.serving.streaming import SettledText, common_prefix
from proxy.upstreams.openai_http import from_openai

# ------------------------------------------------------------------------------ metrics


def families(text: str | bytes, openmetrics: bool = False) -> dict[str, Metric]:
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    return {f.name: f for f in parse(text.decode() if isinstance(text, bytes) else text)}


def value(fams: dict[str, Metric], family: str, sample: str, **labels: str) -> float:
    [v] = [s.value for s in fams[family].samples if s.name == sample and s.labels == labels]
    return v


def test_metrics_start_zeroed_for_every_known_label_and_negotiate_the_format() -> None:
    m = ServerMetrics(["bon4"])
    body, content_type = m.render()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    fams = families(body)
    for mode in ("base", "bon4", "custom"):  # served modes, plain sampling, and requests that set W/K/L
        for kind in ("prompt_uncached", "prompt_cached", "cache_write", "completion"):
            assert value(fams, "w2s_upstream_tokens", "w2s_upstream_tokens_total", mode=mode, kind=kind) == 0
        assert value(fams, "w2s_upstream_cost_usd", "w2s_upstream_cost_usd_total", mode=mode) == 0
        for outcome in ("finished", "length", "error", "cancelled"):
            assert value(fams, "w2s_searches", "w2s_searches_total", mode=mode, outcome=outcome) == 0
    assert value(fams, "w2s_step_upstream_seconds", "w2s_step_upstream_seconds_bucket", le="+Inf") == 0
    if Path("/proc/self/stat").exists():  # the process collector, where the platform has one
        assert value(fams, "process_cpu_seconds", "process_cpu_seconds_total") > 0
    body, content_type = m.render("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0") and body.endswith(b"# EOF\n")
    assert value(families(body, openmetrics=True), "w2s_searches", "w2s_searches_total", mode="base",
                 outcome="finished") == 0
    assert ServerMetrics(process=False).total("process_cpu_seconds_total") == 0  # each server its own registry


def test_metrics_label_modes_and_upstream_failure_kinds() -> None:
    m = ServerMetrics(["bon4"])
    m.search_done("bon4", "finished")
    m.search_done("cbs-w3k3l9", "length")  # not a served mode: "custom", so the label set stays bounded
    request = httpx2.Request("POST", "http://upstream/v1/completions")
    # What the openai family raises for its SDK's errors (proxy.upstreams.openai_http.from_openai).
    m.upstream_retried(from_openai(openai.APIStatusError("busy", response=httpx2.Response(429, request=request),
                                                         body=None)))
    m.upstream_retried(from_openai(openai.APITimeoutError(request=request)))
    m.upstream_failed(from_openai(openai.APIConnectionError(request=request)))
    m.request_done("/v1/completions", 200, 0.002)
    fams = families(m.render()[0])
    assert value(fams, "w2s_searches", "w2s_searches_total", mode="bon4", outcome="finished") == 1
    assert value(fams, "w2s_searches", "w2s_searches_total", mode="custom", outcome="length") == 1
    assert value(fams, "w2s_upstream_retries", "w2s_upstream_retries_total", kind="http_429") == 1
    assert value(fams, "w2s_upstream_retries", "w2s_upstream_retries_total", kind="timeout") == 1
    assert value(fams, "w2s_upstream_errors", "w2s_upstream_errors_total", kind="connection") == 1
    assert value(fams, "w2s_request_duration_seconds", "w2s_request_duration_seconds_bucket",
                 endpoint="/v1/completions", model="none", le="0.0025") == 1
    assert m.total("w2s_searches_total") == 2 and m.total("w2s_searches_total", mode="bon4") == 1


# ------------------------------------------------------------------------------ streaming


def test_common_prefix() -> None:
    assert common_prefix([]) == ""
    assert common_prefix([" the cat sat", " the cat ran", " the car"]) == " the ca"
    assert common_prefix([" a"]) == " a"


def test_settled_text_sends_each_character_once_and_refuses_contradictions() -> None:
    s = SettledText(str.lstrip)
    assert [s.advance(x) for x in ["", "  ", "  Hi", "  Hi", "  Hi there"]] == ["", "", "Hi", "", " there"]
    assert s.sent == "Hi there"
    with pytest.raises(RuntimeError, match="contradicted"):
        s.advance("  Hi thorn")


# ------------------------------------------------------------------------------ guidance


def modes(guided: bool = True, **caps: int) -> GuidanceModes:
    presets = {"bon4": SearchConfig(w=1, k=4, max_new_tokens=300, temperature=0.7),
               "cbs": SearchConfig(w=2, k=2, l=10, max_new_tokens=100, temperature=0.5, stop=["\n"])}
    return GuidanceModes("m", SearchConfig(w=3, k=3, l=5, max_new_tokens=64, temperature=0.9), presets,
                         ServerCaps(**caps), guided=guided)


def test_plain_name_is_plain_sampling_with_the_app_search_settings() -> None:
    plan = modes().resolve("m")
    assert plan.mode == "base"
    assert plan.search == SearchConfig(w=1, k=1, l=None, max_new_tokens=64, temperature=0.9)


def test_openai_fields_then_w2s_field_override_the_alias() -> None:
    plan = modes().resolve("m+cbs", max_tokens=40, temperature=0.2, top_p=0.5, seed=9, stop=["END"],
                           w2s={"k": 3, "l": None})
    assert plan.search == SearchConfig(w=2, k=3, l=None, max_new_tokens=40, temperature=0.2, top_p=0.5, seed=9,
                                       stop=["END"])
    assert plan.mode == "cbs-w2k3linf"
    # no OpenAI fields: the mode's own settings; its stop list is kept
    assert modes().resolve("m+cbs").search == SearchConfig(w=2, k=2, l=10, max_new_tokens=100, temperature=0.5,
                                                           stop=["\n"])
    assert modes().resolve("m+cbs", w2s={"mode": "bon4"}).mode == "bon4"
    # the selection rule: the paper's unless the request asks for finished answers first
    assert not modes().resolve("m+cbs").search.prefer_finished
    assert modes().resolve("m+cbs", w2s={"prefer_finished": True}).search.prefer_finished
    # the start: the paper's W*K first chunks unless the request asks for a narrow one
    assert not modes().resolve("m+cbs").search.narrow_start
    assert modes().resolve("m+cbs", w2s={"narrow_start": True}).search.narrow_start


def test_default_budget_is_capped_and_explicit_budget_over_the_cap_refused() -> None:
    assert modes(max_tokens=50).resolve("m+bon4").search.max_new_tokens == 50
    with pytest.raises(GuidanceError) as e:
        modes(max_tokens=50).resolve("m+bon4", max_tokens=51)
    assert (e.value.status, e.value.param) == (400, "max_tokens")


@pytest.mark.parametrize(("model", "w2s", "status", "param"), [
    ("other", None, 404, "model"),
    ("m+nope", None, 404, "model"),
    ("m+", None, 404, "model"),
    ("m", {"mode": "nope"}, 400, "w2s.mode"),
    ("m", {"w": 5, "k": 4}, 400, "w2s"),
    ("m", {"l": 7}, 400, "w2s.l"),
    ("m+cbs", {"w": 0}, 400, "w2s.w"),
])
def test_refusals_name_the_request_field(model: str, w2s: dict[str, object] | None, status: int, param: str) -> None:
    with pytest.raises(GuidanceError) as e:
        modes(max_w_times_k=16, min_l=8).resolve(model, w2s=w2s)
    assert (e.value.status, e.value.param) == (status, param)


def test_temperature_out_of_range_names_the_openai_field() -> None:
    with pytest.raises(GuidanceError) as e:
        modes().resolve("m", top_p=0.0)
    assert e.value.param == "top_p" and e.value.message.startswith("top_p: ")


def test_without_a_scorer_no_mode_is_offered() -> None:
    m = modes(guided=False)
    assert m.model_ids() == ["m"]
    with pytest.raises(GuidanceError) as e:
        m.resolve("m", w2s={"k": 2})
    assert e.value.param == "w2s" and "needs a scorer" in e.value.message
    assert m.resolve("m", w2s={"l": 8}).search.l == 8  # chunked plain sampling needs no scorer


# ------------------------------------------------------------------------------ config


def test_server_section_defaults_and_refusals() -> None:
    cfg = AppConfig.model_validate({"upstream": {"model": "m"}})
    assert (cfg.server.host, cfg.server.port, cfg.server.api_keys_env) == ("127.0.0.1", 8000, None)
    assert cfg.server.modes is None  # the default, resolved when the server starts
    modes = server_modes(cfg.server)
    assert sorted(modes) == ["base", "bon16", "bon4", "bon8", "cbs-w2k2l30", "cbs-w4k4l30"]
    assert modes["cbs-w4k4l30"] == SearchConfig(w=4, k=4, l=30, max_new_tokens=2048, temperature=0.7)
    custom = build_config({"upstream": {"model": "m"},
                           "server": {"modes": {"quick": {"preset": "cbs-w2k2l30", "l": 12}, "b": "bon4"}}})
    assert server_modes(custom.server) == custom.server.modes == {"quick": SearchConfig(w=2, k=2, l=12, max_new_tokens=2048, temperature=0.7),
                                   "b": SearchConfig(w=1, k=4, max_new_tokens=2048, temperature=0.7)}
    for server, message in [
        ({"modes": {"x": "nope"}}, "search: unknown preset 'nope'"),
        ({"modes": {"a+b": "bon4"}}, "'a+b' is not a usable mode name"),
        ({"modes": {"wide": "bon16"}, "caps": {"max_w_times_k": 8}}, "modes.wide: w*k = 16 exceeds caps"),
        ({"modes": {"x": {"w": 2, "k": 2, "l": 4}}}, "modes.x: l = 4 is below caps.min_l = 8"),
        ({"caps": {"max_tokens": 0}}, "server.caps.max_tokens: Input should be greater than or equal to 1"),
        ({"max_body_bytes": 10}, "server.max_body_bytes"),
        ({"listen": 1}, "server.listen: unknown field"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("*", r"\*").replace("+", r"\+")):
            build_config({"upstream": {"model": "m"}, "server": server})
    # default modes over a lowered cap are left out, not an error
    small = ServerConfig.model_validate({"caps": {"max_w_times_k": 4}})
    assert sorted(server_modes(small)) == ["base", "bon4", "cbs-w2k2l30"]
