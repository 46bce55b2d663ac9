"""
The circuit breaker's side of `empathy_models.observability`: the listener that turns
`BreakerEvent`s into span events and transition counts, and the key states behind the
``empathy_models.breaker.state`` gauge.  Several executors may share one breaker; the
first to bind it records its metrics (then the next one still bound), so each state
change is counted once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from ._otel_names import _KEY, _TEXT_LIMIT, BREAKER_STATE_VALUES, _Attrs
from ._otel_spans import _current

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._breaker_events import BreakerEvent
    from ._otel_metrics import _Meters
    from .observability import Instrumentation
    from .records import Ticket


_DISABLED: Final = BREAKER_STATE_VALUES["disabled"]

MAX_KEY_STATES: Final = 4096
"""How many keys' states the gauge holds before a new key lets go of the closed ones."""


class KeyStates(dict[str, int]):
    """
    The gauge's state per breaker key.  A key seen closed is let go of when a new key
    comes past `MAX_KEY_STATES` keys (then past twice the keys kept): a breaker keyed
    per tenant reports its keys that are not closed and those of late, not every key
    it ever saw.  A key in use comes back at its next admission or state change.
    """

    __slots__ = ("sweep_at",)

    def __init__(self) -> None:
        super().__init__()
        self.sweep_at = MAX_KEY_STATES

    def add(self, key: str, value: int) -> None:
        """Hold ``key``, not held yet, at ``value``."""
        if len(self) >= self.sweep_at:
            for closed in [k for k, v in self.items() if v == 0]:
                del self[closed]
            self.sweep_at = max(MAX_KEY_STATES, 2 * len(self))
        self[key] = value


class _BreakerListener:
    """
    One instrumentation's view of the breaker it is bound to.

    ``breaker`` is None while unbound, or when the executor's breaker takes no
    listeners.  Errors inside `on_event` are counted by the instrumentation, never
    raised into the breaker.
    """

    __slots__ = ("breaker", "meters", "obs")

    def __init__(self, obs: Instrumentation, meters: _Meters) -> None:
        self.obs = obs
        self.meters = meters
        self.breaker: object | None = None

    def attach(self, breaker: object) -> None:
        """
        Listen to ``breaker``'s events, and record its metrics unless another
        instrumentation already does.

        Args:
            breaker: The executor's breaker (anything with ``add_listener``; otherwise
                nothing is recorded of it).
        """
        add = getattr(breaker, "add_listener", None)
        if not callable(add):
            return
        meters = self.meters
        self.breaker = breaker
        add(self.on_event)
        try:
            if breaker not in meters.breaker_owner:
                meters.breaker_owner[breaker] = self
                meters.breaker_states.setdefault(breaker, KeyStates())
        except TypeError:  # a breaker without weak references: no breaker metrics
            pass

    def detach(self) -> None:
        """Undo `attach`; another instrumentation on the same breaker takes over its metrics."""
        breaker, self.breaker = self.breaker, None
        if breaker is None:
            return
        remove = getattr(breaker, "remove_listener", None)
        if callable(remove):
            remove(self.on_event)
        meters = self.meters
        try:
            if meters.breaker_owner.get(breaker) is self:
                heir = next(
                    (o._breakers for o in meters.live if o._breakers.breaker is breaker), None
                )
                if heir is not None:
                    meters.breaker_owner[breaker] = heir
                else:
                    del meters.breaker_owner[breaker]
                    meters.breaker_states.pop(breaker, None)
        except TypeError:
            pass

    def states(self) -> KeyStates | None:
        """The key states this listener records, or None (another one does, or none)."""
        breaker = self.breaker
        if breaker is None:
            return None
        meters = self.meters
        try:
            if meters.breaker_owner.get(breaker) is not self:
                return None
            return meters.breaker_states.get(breaker)
        except TypeError:
            return None

    def remember(self, key: str, circuit: str) -> None:
        """
        Record ``key``'s circuit state for the gauge (when this listener records it).

        Args:
            key: The breaker key.
            circuit: The state's name (a `CircuitState` value); unknown names are ignored.
        """
        states = self.states()
        if states is None:
            return
        value = BREAKER_STATE_VALUES.get(circuit)
        if value is not None:
            if key in states:
                states[key] = value
            else:
                states.add(key, value)

    def circuits(self, tickets: Iterable[Ticket]) -> list[str]:
        """
        The circuit state of each admitted key: half-open for a probe (a ticket with a
        lease), else disabled where the gauge holds the key so (a disabled key admits
        without a lease, as a closed one does), else closed.

        Args:
            tickets: The admission's tickets.
        """
        known: KeyStates | None = None
        breaker = self.breaker
        if breaker is not None:
            try:  # whichever listener of this breaker records the states
                known = self.meters.breaker_states.get(breaker)
            except TypeError:
                known = None
        return [
            "half_open"
            if t.lease_id is not None
            else "disabled"
            if known is not None and known.get(t.key) == _DISABLED
            else "closed"
            for t in tickets
        ]

    def admitted(self, tickets: Iterable[Ticket]) -> None:
        """
        Record the state of keys first seen through an admission (closed, or half-open
        for a probe); a key already known keeps the state its events gave it.

        Args:
            tickets: The admission's tickets.
        """
        states = self.states()
        if states is not None:
            for t in tickets:
                if t.key not in states:
                    states.add(t.key, 1 if t.lease_id is not None else 0)

    def on_event(self, event: BreakerEvent) -> None:
        """The breaker's listener: a span event, and for a state change its metrics."""
        try:
            kind = event.kind.value
            if kind == "call_rejected":
                return  # the executor reports its own rejections
            attributes: _Attrs = {}
            if event.key is not None:
                attributes[_KEY] = event.key
            if kind == "state_changed":
                old = event.old_state.value if event.old_state is not None else "closed"
                new = event.new_state.value if event.new_state is not None else "closed"
                attributes["empathy_models.breaker.from"] = old
                attributes["empathy_models.breaker.to"] = new
                if self.states() is not None:
                    self.meters.transitions.add(1, dict(attributes))
                    if event.key is not None:
                        self.remember(event.key, new)
                if event.reason:
                    attributes["empathy_models.breaker.reason"] = event.reason[:_TEXT_LIMIT]
                if event.generation is not None:
                    attributes["empathy_models.breaker.generation"] = event.generation
            elif event.error:
                attributes["empathy_models.breaker.error"] = event.error[:_TEXT_LIMIT]
            # a task a run started (a breaker's send of its successes) keeps that run's
            # state after it ended: what such a task sees later is no event of its spans
            state = _current.get()
            if state is None or state.obs is not self.obs or state.over:
                return
            name = f"empathy_models.breaker.{kind}"
            if state.attempt is None:
                state.span.add_event(name, attributes)
                return
            # the attempt's span ends where its call did, which is known once the
            # feedback that caused this event is over: added then (`attempt_ended`)
            held = state.events
            if held is None:
                held = state.events = []
            held.append((name, attributes, time.time_ns()))
        except Exception:
            self.obs._failed("recording a breaker event")
