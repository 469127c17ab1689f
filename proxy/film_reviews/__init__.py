"""Film-review continuation: the controlled-sentiment experiment (openings, models, guides, statistics)."""
