"""`w2s demo`: the offline film-review demo. With proxy/local/, the only place in proxy/ that may
import torch (and only once a demo really runs). The task itself (openings, judges, the black
box, the guide model) is proxy.film_reviews, shared with `w2s tune` and benchmarks/quality.py.

    command     `w2s demo`: base vs best-of-N vs CBS on film-review openings, judged, with a verdict
    trace_html  the search tree as one HTML page (`--trace`, also `w2s generate --trace`)
"""
