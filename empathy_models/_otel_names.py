"""
The names and fixed values the OpenTelemetry instrumentation (`empathy_models.observability`)
writes: attribute names (the GenAI conventions' and ours), the instrumentation scope and
the histograms' bucket boundaries.  A leaf: it imports nothing of the package, and
nothing of OpenTelemetry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

_Attrs = dict[str, "AttributeValue"]

SCOPE: Final = "empathy_models"
DURATION_BUCKETS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
"""``gen_ai.client.operation.duration`` buckets, as the conventions specify (seconds)."""
TOKEN_BUCKETS: Final = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
    67108864,
)  # fmt: skip
"""``gen_ai.client.token.usage`` buckets, as the conventions specify."""
BREAKER_STATE_VALUES: Final[Mapping[str, int]] = {
    "closed": 0,
    "half_open": 1,
    "open": 2,
    "forced_open": 3,
    "disabled": 4,
}
"""The value of the ``empathy_models.breaker.state`` gauge for each circuit state."""

_TEXT_LIMIT = 300
"""The longest free text (a reason, an error message) put in an attribute."""

# attribute names (the conventions' and ours)
_OPERATION = "gen_ai.operation.name"
_PROVIDER = "gen_ai.provider.name"
_REQUEST_MODEL = "gen_ai.request.model"
_RESPONSE_MODEL = "gen_ai.response.model"
_ERROR_TYPE = "error.type"
_SERVER_ADDRESS = "server.address"
_SERVER_PORT = "server.port"
_WORKFLOW = "empathy_models.workflow"
_STAGE = "empathy_models.stage"
_KEY = "empathy_models.breaker.key"
_TTFC = "gen_ai.response.time_to_first_chunk"
_INPUT_ESTIMATED = "empathy_models.input_tokens_estimated"
"""
The call record's metadata key (True: its input tokens are the request's estimate, the
provider reported none), and the span attribute saying so.
"""
_OUTPUT_ESTIMATED = "empathy_models.output_tokens_estimated"
"""The same for the output tokens (an estimate from the answer's size)."""
_CACHE_WRITES = ("empathy_models.cache_write_tokens", "empathy_models.cache_write_1h_tokens")
"""The call record's metadata keys of the prompt tokens written to the provider's cache."""
_CACHE_READ = "empathy_models.cache_read_tokens"
"""The metadata key of those read from it, counted apart from the input (Anthropic)."""
_CACHED_INPUT = "empathy_models.cached_input_tokens"
"""The metadata key of those read from it among the input (OpenAI's ``cached_tokens``)."""
