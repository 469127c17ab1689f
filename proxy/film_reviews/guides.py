"""The two guides of the film-review experiment, and the methods the benchmark compares.

Both guides are SmolLM2-135M-Instruct reading text raw (no chat template): the opening of a
review, then the continuation being scored. They differ in what makes them a pair:

- "contrast": one model, two text prefixes. The tuned side reads the opening after "A very
  positive film review:", the untuned side after "A very negative film review:"; their
  log-ratio rewards continuations the positive framing finds likelier than the negative one.
  No training at all. (Against a plain "A film review:" the ratio hardly tracks sentiment on
  Gemma's continuations: within-opening correlation with VADER 0.02 on 192 samples and 0.11 on
  1040, against 0.39 for the positive/negative pair on the same 192; the common "film review"
  part of the two framings cancels, and what is left is the sentiment.) It is kept as
  `plain_contrast_guide`, with `reversed_guide` (a pair's sides swapped: it wants the opposite),
  for `benchmarks/guide_check_vs_search.py`; neither is one of the benchmark's GUIDES.
- "tuned": the paper's way. The tuned side is SmolLM2 with the shipped DPO LoRA adapter (trained
  on VADER-labelled pairs of continuations of other openings), the untuned side its parent; both
  read the bare opening.

Nothing here imports torch; `ScorerConfig`s are loaded by `scorers.registry.load_scorer`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from proxy.config import ModelSpec, ScorerConfig, SearchConfig

GUIDES = ("contrast", "tuned")
CONTROL_GUIDES = ("plain-contrast", "reversed")
"""Guides kept as controls for `w2s guide-check`'s claim to predict the search: the discarded
positive/plain contrast and the tuned pair reversed."""
POSITIVE_PREFIX = "A very positive film review:\n\n"
NEGATIVE_PREFIX = "A very negative film review:\n\n"
PLAIN_PREFIX = "A film review:\n\n"


class GuideUnavailable(RuntimeError):
    """A guide that cannot be built on this machine (the tuned adapter is missing)."""


def _raw(smol: ModelSpec, prefix: str | None, adapter: str | None = None) -> ModelSpec:
    # With the raw template the system prompt is plain text in front of the opening.
    return smol.model_copy(update={"chat_template": "raw", "system_prompt": prefix, "adapter": adapter})


def contrast_guide(smol: ModelSpec, **options: object) -> ScorerConfig:
    """Prompt contrast on one set of weights: positive-review prefix vs negative-review prefix."""
    return ScorerConfig(tuned=_raw(smol, POSITIVE_PREFIX), untuned=_raw(smol, NEGATIVE_PREFIX),
                        **options)  # type: ignore[arg-type]


def plain_contrast_guide(smol: ModelSpec, **options: object) -> ScorerConfig:
    """The discarded contrast: positive-review prefix vs a plain "A film review:" prefix."""
    return ScorerConfig(tuned=_raw(smol, POSITIVE_PREFIX), untuned=_raw(smol, PLAIN_PREFIX),
                        **options)  # type: ignore[arg-type]


def reversed_guide(guide: ScorerConfig) -> ScorerConfig:
    """The pair with its sides swapped: its score is the negative of `guide`'s (a deliberately
    wrong guide, a control for checks that should rank it last)."""
    return guide.model_copy(update={"tuned": guide.untuned, "untuned": guide.tuned})


def tuned_guide(smol: ModelSpec, adapter: str, **options: object) -> ScorerConfig:
    """SmolLM2 + DPO adapter vs SmolLM2, both on the bare opening."""
    return ScorerConfig(tuned=_raw(smol, None, adapter), untuned=_raw(smol, None), **options)  # type: ignore[arg-type]


def shipped_adapter() -> str:
    """The shipped DPO adapter's directory, or GuideUnavailable saying how to get one."""
    try:
        from scorers.tuning import shipped_adapter_path

        return str(shipped_adapter_path())
    except (ImportError, FileNotFoundError) as e:
        raise GuideUnavailable(f"the tuned guide needs the shipped DPO adapter: {e}") from e


def guide_config(name: str, smol: ModelSpec, **options: object) -> ScorerConfig:
    if name == "contrast":
        return contrast_guide(smol, **options)
    if name == "tuned":
        return tuned_guide(smol, shipped_adapter(), **options)
    if name == "plain-contrast":
        return plain_contrast_guide(smol, **options)
    if name == "reversed":
        return reversed_guide(tuned_guide(smol, shipped_adapter(), **options))
    raise ValueError(f"unknown guide {name!r} (known: {', '.join(GUIDES + CONTROL_GUIDES)})")


@dataclass(frozen=True)
class Method:
    """One row of the benchmark. `l` None: best-of-N (w=1, k=N), read off the shared samples;
    otherwise a real chunk-level beam search per guide."""

    w: int
    k: int
    l: int | None = None
    horizon: int | None = None
    """Search only the first `horizon` tokens, then one plain continuation (SearchConfig.horizon)."""
    schedule: tuple[int, ...] | None = None
    """Samples per beam at each step, the last repeated (SearchConfig.sample_schedule)."""

    @property
    def name(self) -> str:
        if self.l is None:
            return "base" if self.k == 1 else f"bon{self.k}"
        return (f"cbs-w{self.w}k{self.k}l{self.l}" + (f"-h{self.horizon}" if self.horizon else "")
                + ("-s" + ".".join(map(str, self.schedule)) if self.schedule else ""))

    @classmethod
    def parse(cls, name: str) -> "Method":
        """The method a name stands for ("bon8", "cbs-w4k4l8", "cbs-w4k4l8-h16-s16.4"); ValueError if none."""
        if name == "base":
            return cls(1, 1)
        if m := re.fullmatch(r"bon(\d+)", name):
            return cls(1, int(m[1]))
        m = re.fullmatch(r"cbs-w(\d+)k(\d+)l(\d+)(?:-h(\d+))?(?:-s(\d+(?:\.\d+)*))?", name)
        if not m:
            raise ValueError(f"not a method name: {name!r} (e.g. bon8, cbs-w4k4l8, cbs-w4k4l8-h16, cbs-w4k4l8-s16.4)")
        return cls(int(m[1]), int(m[2]), int(m[3]), int(m[4]) if m[4] else None,
                   tuple(int(x) for x in m[5].split(".")) if m[5] else None)

    @property
    def variant(self) -> bool:
        """A horizon or a schedule: a departure from the paper's search, reported beside it."""
        return self.horizon is not None or self.schedule is not None

    @property
    def breadth(self) -> int:
        """Samples per step: N for best-of-N, W*K for CBS (the over-optimization axis)."""
        return self.w * self.k

    @property
    def searched(self) -> bool:
        return self.l is not None

    def search_config(self, *, max_new_tokens: int, temperature: float, seed: int) -> SearchConfig:
        """The paper's rule (score alone ranks, `prefer_finished` off), as SearchConfig defaults."""
        return SearchConfig(w=self.w, k=self.k, l=self.l, max_new_tokens=max_new_tokens, horizon=self.horizon,
                            sample_schedule=list(self.schedule) if self.schedule else None,
                            temperature=temperature, top_p=1.0, seed=seed)


BON_SIZES = (1, 2, 4, 8, 16)
CBS_SHAPES = ((2, 2), (4, 4))


def bon_methods(sizes: tuple[int, ...] = BON_SIZES) -> list[Method]:
    return [Method(1, n) for n in sizes]


def cbs_methods(chunk_lengths: tuple[int, ...], shapes: tuple[tuple[int, int], ...] = CBS_SHAPES) -> list[Method]:
    return [Method(w, k, l) for l in chunk_lengths for w, k in shapes]


def headline_methods(chunk_lengths: tuple[int, ...]) -> list[Method]:
    """The issue's list: base, BoN-4, BoN-16, CBS W2K2 and W4K4 at each chunk length."""
    return [Method(1, 1), Method(1, 4), Method(1, 16), *cbs_methods(chunk_lengths)]
