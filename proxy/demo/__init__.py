"""`w2s demo` and `w2s quickstart`: the offline film-review demo, and its models served. With
proxy/local/, the only place in proxy/ that may import torch (and only once a demo really runs).
The task itself (openings, judges, the black box, the guide model) is proxy.film_reviews,
shared with `w2s tune` and benchmarks/quality.py.

    command     `w2s demo`: base vs best-of-N vs CBS on film-review openings, judged, with a verdict
    offline     the demo's pair served: Gemma 3 270M on 127.0.0.1 as an upstream, the guide's scorer config
    quickstart  `w2s quickstart`: that pair as an OpenAI-compatible guidance server, no key and no hub
    trace_html  the search tree as one HTML page (`--trace`, also `w2s generate --trace`)
"""
