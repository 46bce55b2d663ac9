"""
Test helpers that ship with the package: the contract suites for backends
(`empathy_models.testing.contracts`), `FakeLLMServer` (real HTTP on 127.0.0.1 in both
wire formats), in-process fakes and a fake clock.
"""

import sys

from ._fake_tools import FakeReply as FakeReply
from .clock import DEFAULT_START as DEFAULT_START, FakeClock as FakeClock
from .fake_server import (
    FakeLLMServer as FakeLLMServer,
    Latency as Latency,
    ModelBehavior as ModelBehavior,
    RecordedRequest as RecordedRequest,
    StreamBehavior as StreamBehavior,
)
from .fakes import FakeProvider as FakeProvider

# Under pytest, the checks users run against their own backends report what failed
# (the values compared) rather than a bare AssertionError: their modules are installed
# code, which pytest rewrites only when asked before they are imported.
if "pytest" in sys.modules:
    sys.modules["pytest"].register_assert_rewrite(
        "empathy_models.testing.contracts", "empathy_models.testing.fleet"
    )

__all__ = [
    "DEFAULT_START",
    "FakeClock",
    "FakeLLMServer",
    "FakeProvider",
    "FakeReply",
    "Latency",
    "ModelBehavior",
    "RecordedRequest",
    "StreamBehavior",
]
