"""
The OpenTelemetry instruments of `empathy_models.observability`, one set per meter
provider, and the callbacks of its observable instruments (cost, router picks, breaker
states, the telemetry backends' queue depth and record counts).  ``opentelemetry`` is
imported when the first set is made, never at import.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary, WeakSet

from ._otel_names import (
    _KEY,
    _PROVIDER,
    _REQUEST_MODEL,
    _STAGE,
    _WORKFLOW,
    DURATION_BUCKETS,
    SCOPE,
    TOKEN_BUCKETS,
)

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

    from ._otel_breaker import KeyStates, _BreakerListener
    from .observability import Instrumentation


class _Meters:
    """The instruments of one meter provider, shared by every executor using it."""

    def __init__(self, meter_provider: MeterProvider, version: str) -> None:
        from opentelemetry.metrics import Observation

        self._observation = Observation
        meter = meter_provider.get_meter(SCOPE, version)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )
        self.first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk",
            unit="s",
            description="Time to receive the first chunk in a streaming response.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.transitions = meter.create_counter(
            "empathy_models.breaker.transitions",
            unit="{transition}",
            description="Circuit breaker state changes seen by this process.",
        )
        # The cost and pick counters are summed here on the call path (a dict update) and
        # reported by observable counters when a reader collects: the same cumulative
        # series as synchronous counters, without an SDK measurement per call.
        self.cost: dict[tuple[str, str, str, str], float] = {}
        self.picks: dict[tuple[str, bool, str, str], int] = {}
        meter.create_observable_counter(
            "empathy_models.client.cost",
            callbacks=[self._observe_cost],
            unit="USD",
            description="Estimated cost of the provider calls, from the registry's prices.",
        )
        meter.create_observable_counter(
            "empathy_models.router.picks",
            callbacks=[self._observe_picks],
            unit="{pick}",
            description="Routing decisions; exploration=true counts exploration picks.",
        )
        self.live: WeakSet[Instrumentation] = WeakSet()
        # the telemetry backends whose records are counted (by id: each one's weak
        # reference and last counts), and the last counts of those since freed
        self.records_counted: dict[int, tuple[weakref.ref[object], dict[str, int]]] = {}
        self.records_retired: dict[str, int] = {}
        # per breaker: the listener that records its metrics, and its key states
        self.breaker_owner: WeakKeyDictionary[object, _BreakerListener] = WeakKeyDictionary()
        self.breaker_states: WeakKeyDictionary[object, KeyStates] = WeakKeyDictionary()
        meter.create_observable_gauge(
            "empathy_models.breaker.state",
            callbacks=[self._observe_breakers],
            unit="{state}",
            description="Circuit state per breaker key: 0 closed, 1 half-open, 2 open, "
            "3 forced open, 4 disabled.",
        )
        meter.create_observable_gauge(
            "empathy_models.telemetry.queue_depth",
            callbacks=[self._observe_queue],
            unit="{record}",
            description="Call records accepted by the telemetry backend, not yet written.",
        )
        meter.create_observable_counter(
            "empathy_models.telemetry.records",
            callbacks=[self._observe_records],
            unit="{record}",
            description="Call records by what became of them: written, failed, spooled "
            "(kept in the spool file for later), dropped.",
        )

    def _backends(self) -> Iterator[object]:
        seen: set[int] = set()
        for obs in list(self.live):
            backend = obs.telemetry
            if backend is not None and id(backend) not in seen:
                seen.add(id(backend))
                yield backend

    def _observe_cost(self, options: CallbackOptions) -> Iterable[Observation]:
        # dict.copy() is atomic under the GIL: a reader's thread may collect while the
        # event loop adds
        return [
            self._observation(
                total,
                {_PROVIDER: provider, _REQUEST_MODEL: model, _WORKFLOW: workflow, _STAGE: stage},
            )
            for (provider, model, workflow, stage), total in self.cost.copy().items()
        ]

    def _observe_picks(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            self._observation(
                count,
                {
                    _REQUEST_MODEL: model,
                    "empathy_models.router.exploration": exploration,
                    _WORKFLOW: workflow,
                    _STAGE: stage,
                },
            )
            for (model, exploration, workflow, stage), count in self.picks.copy().items()
        ]

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        out: dict[str, int] = {}
        for breaker in list(self.breaker_owner.keys()):  # breakers some executor uses
            out.update(self.breaker_states.get(breaker, {}))
        return [self._observation(value, {_KEY: key}) for key, value in sorted(out.items())]

    def _observe_queue(self, options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for backend in self._backends():
            pending = getattr(backend, "pending", None)
            if type(pending) is int:
                out.append(self._observation(pending))
        if len(out) > 1:  # one series: the sum over the backends in use
            return [self._observation(sum(int(o.value) for o in out))]
        return out

    def _observe_records(self, options: CallbackOptions) -> Iterable[Observation]:
        totals = dict(self.records_retired)
        for backend in self._backends():  # those in use now join the ones counted
            counts = _record_counts(backend)
            if counts and not self._follow(backend, counts):  # not followable: now only
                for result, value in counts.items():
                    totals[result] = totals.get(result, 0) + value
        for ref, counts in list(self.records_counted.values()):
            backend = ref()
            if backend is not None:  # still counting after its executor closed (a flush)
                counts.update(_record_counts(backend))
            for result, value in counts.items():
                totals[result] = totals.get(result, 0) + value
        return [
            self._observation(value, {"empathy_models.telemetry.result": result})
            for result, value in totals.items()
        ]

    def _follow(self, backend: object, counts: dict[str, int]) -> bool:
        """
        Count ``backend``'s records from now on, whether its executor is open or not;
        once it is freed, its last counts stay in ``records_retired`` (a counter never
        goes down).  False for a backend that takes no weak reference.
        """
        key = id(backend)
        entry = self.records_counted.get(key)
        if entry is None or entry[0]() is not backend:
            try:
                ref = weakref.ref(backend)
            except TypeError:
                return False
            entry = self.records_counted[key] = (ref, counts)
            weakref.finalize(backend, _retire, weakref.ref(self), key, counts)
        return True


_RESULTS = ("written", "failed", "spooled", "dropped")


def _record_counts(backend: object) -> dict[str, int]:
    """What became of ``backend``'s records: the counts it keeps (see `_RESULTS`)."""
    counts = {}
    for result in _RESULTS:
        value = getattr(backend, result, None)
        if type(value) is int:
            counts[result] = value
    return counts


def _retire(meters: weakref.ref[_Meters], key: int, counts: dict[str, int]) -> None:
    """A backend counted by ``meters`` was freed: its last ``counts`` stay counted."""
    owner = meters()
    if owner is None:
        return
    entry = owner.records_counted.get(key)
    if entry is not None and entry[1] is counts:
        del owner.records_counted[key]
        retired = owner.records_retired
        for result, value in counts.items():
            retired[result] = retired.get(result, 0) + value


_meters: WeakKeyDictionary[object, _Meters] = WeakKeyDictionary()
_meters_by_id: dict[int, tuple[object, _Meters]] = {}  # providers that take no weak reference


def _meters_for(meter_provider: MeterProvider, version: str) -> _Meters:
    """
    The instruments of ``meter_provider``, made at its first use and shared after.

    Args:
        meter_provider: The OpenTelemetry meter provider.
        version: The instrumentation scope's version (the package's).

    Returns:
        The one `_Meters` of that provider in this process.
    """
    try:
        meters = _meters.get(meter_provider)
        if meters is None:
            meters = _meters[meter_provider] = _Meters(meter_provider, version)
        return meters
    except TypeError:  # not weakly referenceable: keep it alive with its instruments
        entry = _meters_by_id.get(id(meter_provider))
        if entry is None or entry[0] is not meter_provider:
            entry = _meters_by_id[id(meter_provider)] = (
                meter_provider,
                _Meters(meter_provider, version),
            )
        return entry[1]
