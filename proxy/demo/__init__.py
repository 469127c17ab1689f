"""`w2s demo`: the offline film-review demo, with everything only it needs. With proxy/local/,
the only place in proxy/ that may import torch (and only once a demo really runs).

    command     `w2s demo`: base vs best-of-N vs CBS on film-review openings, judged, with a verdict
    judge       the sentiment judges (VADER, TextBlob) the server never sees
    model       fetching the small demo models from PyPI-hosted archives
    trace_html  the search tree as one HTML page (`--trace`, also `w2s generate --trace`)
"""
