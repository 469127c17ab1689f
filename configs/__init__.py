"""The YAML presets, installed as the data-only package `w2s_presets` (see setup.py and
proxy/presets.py): top-level files are whole configs, upstreams/, scorers/ and search/ hold
the presets of each config part."""
