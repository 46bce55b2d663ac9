"""
The router's parts, each a room with one door (`empathy_models.AdaptiveModelRouter`
is the facade users meet):

* `routing.stats`: Wilson bounds, log-normal latency bounds, the sum vector of a bucket.
* `routing.book`: per-arm evidence as minute buckets, split into regimes by a change
  test; the same buckets always give the same regimes and summaries.
* `routing.policy`: `RoutingPolicy` and the `Constraints` of one decision.
* `routing.decide`: verdicts per constraint, selection and the exploration budget, and
  the candidates a decision explains itself with.
* `routing.reports`: `RoutingStats` and `TierRecommendation`.
* private parts of the facade: `_memory` (the arms and stage priors in memory),
  `_verdicts` (the verdict cache), `_explain` (decisions and ``on_no_match``),
  `_recent` (recent-outcome windows), `_args` (argument checks).

Nothing here does I/O or reads a clock; the facade owns both (and passes the time in).
"""

from __future__ import annotations

from .policy import Constraints, RoutingPolicy
from .reports import ModelStats, RoutingStats, TierRecommendation
from .stats import wilson_bounds

__all__ = [
    "Constraints",
    "ModelStats",
    "RoutingPolicy",
    "RoutingStats",
    "TierRecommendation",
    "wilson_bounds",
]
