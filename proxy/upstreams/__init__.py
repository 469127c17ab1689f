"""Black-box model APIs, one module per API family."""
from proxy.upstreams.base import Continuation, SampleResult, Upstream, Usage

__all__ = ["Continuation", "SampleResult", "Upstream", "Usage"]
