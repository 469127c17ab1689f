"""Black-box model APIs: the contract (base), one module per API family, the transport, the one
retry policy, our own UpstreamError (errors) and the lenient readers of their answers (reading).
The data they exchange lives in proxy.types; their configs in proxy.config.upstream."""
from proxy.types import Continuation, Probe, SampleResult, SamplingParams, Usage
from proxy.upstreams.base import Upstream
from proxy.upstreams.errors import UpstreamError

__all__ = ["Continuation", "Probe", "SampleResult", "SamplingParams", "Upstream", "UpstreamError", "Usage"]
