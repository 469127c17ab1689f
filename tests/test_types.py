"""The plain data at the boundaries, and the one place seeds are derived."""
from __future__ import annotations

import pytest

from proxy.types import SEED_MODULUS, SamplingParams, derive_seed, request_seed, sample_seed


def test_step_and_beam_seeds_are_distinct_and_stable() -> None:
    seeds = [derive_seed(7, step, beam) for step in range(1, 65) for beam in range(16)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < SEED_MODULUS for s in seeds if s is not None)
    assert derive_seed(7, 1, 0) == 7_008_212 and derive_seed(7, 2, 3) == 7_016_406  # the same on every machine
    assert derive_seed(None, 1, 0) is None
    assert {derive_seed(s, 1, 0) for s in range(100)} == {derive_seed(s, 1, 0) for s in range(100)}


def test_sample_seeds_keep_sample_zero_and_stay_apart_from_other_beams() -> None:
    request = derive_seed(7, 3, 0)
    samples = [sample_seed(request, i) for i in range(16)]
    assert samples[0] == request and len(set(samples)) == 16
    # `request + i` would be beam i's own request seed; the mixed ones never are, in a whole search
    beams = {derive_seed(7, step, beam) for step in range(1, 65) for beam in range(16)}
    assert beams.isdisjoint(samples[1:])
    assert sample_seed(request, 5) == sample_seed(request, 5) and sample_seed(None, 3) is None


def test_a_request_for_several_prompts_is_seeded_from_all_of_them() -> None:
    assert request_seed([11]) == 11 and request_seed([None, None]) is None
    mixed = request_seed([7, 8, 9])
    assert mixed == request_seed([7, 8, 9]) and mixed not in (7, 8, 9)
    others = [request_seed(s) for s in ([7, 8], [7, 8, 10], [9, 8, 7], [8, 9], [7, 8, 9, 10])]
    assert mixed not in others and len(set(others)) == len(others)
    assert request_seed([7, None]) != request_seed([None, 7])


def test_sampling_params_are_plain_frozen_values() -> None:
    p = SamplingParams(max_tokens=5, n=2, stop=["\n"])  # type: ignore[arg-type]
    assert p.stop == ("\n",) and p == SamplingParams(max_tokens=5, n=2, stop=("\n",)) and hash(p)
    with pytest.raises(ValueError, match="at least 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="at least 1"):
        SamplingParams(max_tokens=3, n=0)
