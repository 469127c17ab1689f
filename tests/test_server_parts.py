"""The server's pure parts: the Prometheus registry, the settled-prefix tracker, mode resolution,
and the `server:` config section."""
from __future__ import annotations

import math

import pytest

from proxy.config import AppConfig, ConfigError, SearchConfig, ServerCaps, ServerConfig, build_config
from proxy.guidance import GuidanceError, GuidanceModes
from proxy.metrics import Registry, format_value
from proxy.streaming import SettledText, common_prefix

# ------------------------------------------------------------------------------ metrics


def test_registry_renders_the_prometheus_text_format_exactly() -> None:
    r = Registry()
    c = r.counter("x_requests_total", "Requests.", ("endpoint", "status"))
    g = r.gauge("x_in_flight", "In flight.")
    h = r.histogram("x_seconds", "Latency.", buckets=(0.1, 1.0))
    c.inc(endpoint="/a", status="200")
    c.inc(2, endpoint='/b"\\\n', status="500")
    g.inc()
    g.inc()
    g.dec()
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert r.render() == (
        "# HELP x_requests_total Requests.\n"
        "# TYPE x_requests_total counter\n"
        'x_requests_total{endpoint="/a",status="200"} 1\n'
        'x_requests_total{endpoint="/b\\"\\\\\\n",status="500"} 2\n'
        "# HELP x_in_flight In flight.\n"
        "# TYPE x_in_flight gauge\n"
        "x_in_flight 1\n"
        "# HELP x_seconds Latency.\n"
        "# TYPE x_seconds histogram\n"
        'x_seconds_bucket{le="0.1"} 2\n'  # le is inclusive: 0.1 counts
        'x_seconds_bucket{le="1"} 3\n'
        'x_seconds_bucket{le="+Inf"} 4\n'
        "x_seconds_sum 3.65\n"
        "x_seconds_count 4\n"
    )


def test_metric_misuse_is_refused() -> None:
    r = Registry()
    c = r.counter("a_total", "A.", ("kind",))
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, kind="x")
    with pytest.raises(ValueError, match="expected labels"):
        c.inc(other="x")
    with pytest.raises(ValueError, match="already registered"):
        r.gauge("a_total", "again")
    assert [format_value(v) for v in (3.0, 0.25, math.inf, -math.inf)] == ["3", "0.25", "+Inf", "-Inf"]


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
    assert sorted(cfg.server.modes) == ["base", "bon16", "bon4", "bon8", "cbs-w2k2l30", "cbs-w4k4l30"]
    assert cfg.server.modes["cbs-w4k4l30"] == SearchConfig(w=4, k=4, l=30, max_new_tokens=2048, temperature=0.7)
    custom = build_config({"upstream": {"model": "m"},
                           "server": {"modes": {"quick": {"preset": "cbs-w2k2l30", "l": 12}, "b": "bon4"}}})
    assert custom.server.modes == {"quick": SearchConfig(w=2, k=2, l=12, max_new_tokens=2048, temperature=0.7),
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
    assert sorted(small.modes) == ["base", "bon4", "cbs-w2k2l30"]
