"""
The router's selection probability for the model a `RoutingDecision` chose.

Off-policy estimates (`empathy_models.whatif`) weigh each recorded call by the inverse
of the probability with which the router picked its model.  The router's choice is
mostly deterministic (the cheapest eligible model) and departs from it in a few known
ways, each stated by the decision; the probability is read from the public decision
and the routing policy, without re-running the choice:

=======================================  =============================================
the decision                             ``routing_propensity``
=======================================  =============================================
an eligible pick (no exploration)        ``1 - explore_rate`` (the share the
                                         exploration budget may divert)
relaxed or pinned (``policy_applied``)   1.0 (no random choice is made)
``exploration_kind="warm-up"``           ``warmup_share``
``"re-probe"`` (a rejected model)        ``1 / reprobe_interval``
``"budget"`` (exploration budget)        ``explore_rate``
``"unproven"`` (nothing eligible)        1.0 (the cheapest plausible candidate; a
                                         draw decides only between near-misses)
=======================================  =============================================

It is an approximation where the router breaks a near-tie by a Thompson draw or where
the warm-up's draw may have declined; estimates built on it say so.
"""

from __future__ import annotations

from .records import RoutingDecision
from .routing.policy import RoutingPolicy

__all__ = ["routing_propensity"]


def routing_propensity(decision: RoutingDecision, policy: RoutingPolicy | None) -> float:
    """The probability in (0, 1] with which the router chose ``decision.model``."""
    if decision.policy_applied is not None:
        return 1.0
    explore_rate = policy.explore_rate if policy is not None else 0.0
    if not decision.exploration:
        return max(1e-6, 1.0 - explore_rate)
    if policy is None:
        return 1.0
    kind = decision.exploration_kind
    if kind == "warm-up":
        p = policy.warmup_share
    elif kind == "re-probe":
        p = 1.0 / policy.reprobe_interval
    elif kind == "budget":
        p = explore_rate
    else:  # "unproven" (nothing else to pick), or not said
        p = 1.0
    return min(1.0, max(1e-6, p))
