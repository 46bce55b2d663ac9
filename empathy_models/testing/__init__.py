"""
Test helpers that ship with the package: the contract suites for backends
(`empathy_models.testing.contracts`), `FakeLLMServer` (real HTTP on 127.0.0.1 in both
wire formats), in-process fakes and a fake clock.
"""

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
