"""Black-box model APIs: the contract (base), one module per API family, the transport and the
one retry policy. The data they exchange lives in proxy.types."""
from proxy.types import Continuation, Probe, SampleResult, SamplingParams, Usage
from proxy.upstreams.base import Upstream

__all__ = ["Continuation", "Probe", "SampleResult", "SamplingParams", "Upstream", "Usage"]
