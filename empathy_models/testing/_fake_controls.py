"""
`Controls`: the behaviours, outages, scripts and counters `FakeLLMServer` and
`FakeProvider` share, and the draw of each answer from them.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from .._validators import shown
from ..exceptions import ConfigurationError, RecordValidationError
from ._fake_behavior import Action, ModelBehavior, check_action
from ._fake_tools import FakeReply

__all__ = ["Controls"]


class Controls:
    """Behaviours, outages, scripts and counters shared by the server and `FakeProvider`."""

    def __init__(
        self,
        behaviors: Mapping[str, ModelBehavior] | None,
        default: ModelBehavior | None,
        seed: int,
    ) -> None:
        self._behaviors: dict[str, ModelBehavior] = {}
        for model, behavior in (behaviors or {}).items():
            self.set_behavior(model, behavior)
        if default is not None and not isinstance(default, ModelBehavior):
            raise ConfigurationError(
                f"default must be a ModelBehavior or None, got {type(default).__name__}"
            )
        self._default = default
        self._seed = seed
        self._rngs: dict[str, random.Random] = {}
        self._scripts: dict[str, collections.deque[Action]] = {}
        self._outages: dict[str, Action] = {}
        self._counts: collections.Counter[str] = collections.Counter()
        self._total = 0
        self._waiters: list[tuple[str | None, int, asyncio.Future[None]]] = []

    def set_behavior(self, model: str, behavior: ModelBehavior | None) -> None:
        """Change ``model``'s behaviour (None: back to the default)."""
        if behavior is None:
            self._behaviors.pop(model, None)
        elif not isinstance(behavior, ModelBehavior):
            raise ConfigurationError(
                f"behavior for {model!r} must be a ModelBehavior, got {type(behavior).__name__}"
            )
        else:
            self._behaviors[model] = behavior

    def set_outage(self, target: str, enabled: bool = True, *, action: Action = 503) -> None:
        """
        Switch an outage on or off for ``target``: a model id, an API or provider name
        (``"anthropic"``, ``"openai"``, a `FakeProvider`'s name), or ``"*"`` (everything).
        While on, every request for the target gets ``action`` (default 503).
        """
        if enabled:
            self._outages[target] = check_action(action, "action")
        else:
            self._outages.pop(target, None)

    @property
    def outages(self) -> Mapping[str, Action]:
        """The outages in force: target -> action."""
        return MappingProxyType(dict(self._outages))

    def script(self, model: str, actions: Iterable[Action]) -> None:
        """
        Queue ``actions`` as ``model``'s next answers, after any already queued.

        Raises:
            RecordValidationError: ``actions`` not a list of actions (one action alone,
                ``"hang"`` or ``503``, goes in a list: ``["hang"]``), or an action that
                is not one.
        """
        if isinstance(actions, str | bytes | int | FakeReply) or not isinstance(actions, Iterable):
            raise RecordValidationError(
                f"actions must be a list of actions, got {shown(actions)}; "
                f"for one action, give [{shown(actions)}]",
                path="actions",
            )
        checked = [check_action(a, f"actions[{i}]") for i, a in enumerate(actions)]
        self._scripts.setdefault(model, collections.deque()).extend(checked)

    def pending(self, model: str) -> int:
        """How many scripted answers are still queued for ``model``."""
        return len(self._scripts.get(model, ()))

    def requests(self, model: str | None = None) -> int:
        """
        Requests that reached ``model`` (after authentication and validation), or, with
        no argument, every request received.
        """
        return self._total if model is None else self._counts[model]

    async def wait_for_requests(self, count: int = 1, model: str | None = None) -> None:
        """
        Return once `requests` (for ``model``, or in total) has reached ``count``: a way
        for tests to know a request is in flight without sleeping.  Put a deadline
        around it if the request might never come.
        """
        if self.requests(model) >= count:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (model, count, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _counted(self, model: str | None) -> None:
        if model is None:
            self._total += 1
        else:
            self._counts[model] += 1
        if self._waiters:
            for wanted, count, waiter in list(self._waiters):
                if not waiter.done() and self.requests(wanted) >= count:
                    waiter.set_result(None)

    def request_counts(self) -> dict[str, int]:
        """Requests per model, as a new dict."""
        return dict(self._counts)

    def reset_counters(self) -> None:
        """Zero every counter."""
        self._counts.clear()
        self._total = 0

    def _rng(self, model: str) -> random.Random:
        rng = self._rngs.get(model)
        if rng is None:
            rng = self._rngs[model] = random.Random(f"{self._seed}:{model}")
        return rng

    def _action(
        self, model: str, group: str, behavior: ModelBehavior, rng: random.Random
    ) -> Action:
        """The answer for this request: outage, then script, then a failure draw, else ok."""
        outages = self._outages
        if outages:
            for target in (model, group, "*"):
                action = outages.get(target)
                if action is not None:
                    return action
        queue = self._scripts.get(model)
        if queue:
            return queue.popleft()
        if behavior.failure_rate and rng.random() < behavior.failure_rate:
            return rng.choice(behavior.failures)
        return "ok"

    def _output_tokens(
        self, behavior: ModelBehavior, rng: random.Random, max_tokens: int | None
    ) -> tuple[int, bool]:
        low, high = behavior.output_tokens
        out = low if low == high else rng.randint(low, high)
        if max_tokens is not None and out >= max_tokens:
            return max_tokens, True
        return out, False
