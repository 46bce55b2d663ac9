"""
Spend budgets and rate limits shared by every worker through a quota store.

::

    from empathy_models import EmpathyLLMExecutor
    from empathy_models.limits import Budget, RateLimit

    async with EmpathyLLMExecutor(
        providers,
        budgets=[Budget(limit_usd=50, window="day"),                  # every call
                 Budget(scope="user_id", limit_usd=2, window="hour")],  # each user
        rate_limits={"openai": RateLimit(rpm=500, tpm=200_000)},
        quota_store="redis://127.0.0.1:6379/0",   # or sqlite:///state.db, postgresql://...
    ) as executor:
        ...

Before a call the executor reserves its worst case (``max_tokens`` of output, or the
larger cap ``extra_body`` sends in its place, and a token per UTF-8 byte of what the
request sends as input: the prompt's text, the tool definitions, a structured-output
schema and ``extra_body``, with allowances for framing, the provider's tool-use
prompt and images; at the registry's list prices, the
input at the cache write price when the request marks parts for Anthropic's prompt
cache) atomically in every `Budget` covering it; after the call it settles at what the
call cost and releases the rest (a call never sent, or answered with the provider's
error, costs nothing, as its record says; one sent and given up on before its answer
came, cancelled or ended by its timeout or deadline, is charged its whole reservation,
a stream that had not opened the prompt's worst case: the provider bills it, and what
it cost is unknown; one that cost more than it reserved, through images or web
searches, is charged in full and its excess counted in `BudgetUsage.overrun`).
A budget that cannot cover a call sends it to the most capable cheaper candidate that
fits, else raises `BudgetExceededError` naming the budget, what is left and when it
resets (`AllRoutesFailedError` holding it after the routes before it failed).  Rate
limits (`RateLimit`) are GCRA schedules in the same store: each call takes its place
atomically and waits for it (within ``rate_limit_wait`` and the deadline), so workers
together stay under the limit instead of collecting 429s; the router avoids models
whose schedule is booked further ahead than that, and a call that cannot wait moves to
the next route.

Stores: `MemoryQuotaStore` (one process), `SQLiteQuotaStore` (one host), and the
``redis://`` and ``postgresql://`` plugins (many hosts); `quota_store_from_url` builds
one from a URL.  ``empathy-models budget status|set|reset`` inspects and changes them.
"""

from __future__ import annotations

from ..exceptions import BudgetExceededError
from .guard import (
    HOLD_GRACE,
    UNBOUNDED_HOLD,
    DeadlineRanOut,
    Limiter,
    LocalRateLimitError,
    quota_store_from_url,
)
from .memory import MemoryQuotaStore
from .sqlite import SQLiteQuotaStore
from .values import (
    MAX_WINDOW,
    NANO,
    SCOPES,
    WINDOW_RETENTION,
    Budget,
    BudgetGrant,
    BudgetUsage,
    RateGrant,
    RateLimit,
    window_bounds,
)

__all__ = [
    "HOLD_GRACE",
    "MAX_WINDOW",
    "NANO",
    "SCOPES",
    "UNBOUNDED_HOLD",
    "WINDOW_RETENTION",
    "Budget",
    "BudgetExceededError",
    "BudgetGrant",
    "BudgetUsage",
    "DeadlineRanOut",
    "Limiter",
    "LocalRateLimitError",
    "MemoryQuotaStore",
    "RateGrant",
    "RateLimit",
    "SQLiteQuotaStore",
    "quota_store_from_url",
    "window_bounds",
]
