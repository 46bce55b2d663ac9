"""
`RpmBucket`: the requests-per-minute limit `FakeLLMServer` enforces over every model
when built with ``rpm``, and the figures its rate-limit headers report.
"""

from __future__ import annotations

import math
import time

__all__ = ["RpmBucket"]


class RpmBucket:
    """
    A token bucket of ``burst`` requests (default one second's worth, ``ceil(rpm / 60)``)
    refilled at ``rpm / 60`` per second, read on the monotonic clock.

    Args:
        rpm: Requests per minute; None for no limit (`admit` is then never called and
            `figures` returns None).
        burst: The bucket's size; None for one second's worth.
    """

    __slots__ = ("_accepted", "_at", "_counts", "burst", "limit", "tokens")

    def __init__(self, rpm: int | None, burst: int | None) -> None:
        self.limit = rpm
        self.burst = float(burst or math.ceil((rpm or 60) / 60))
        self.tokens = self.burst
        self._at: float | None = None
        self._accepted: list[float] = []  # first and last acceptance times
        self._counts = [0, 0]  # accepted, refused

    def _tokens_now(self, rate: float) -> float:
        """The bucket's tokens, refilled up to now."""
        now = time.monotonic()
        if self._at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * rate)
        self._at = now
        return self.tokens

    def admit(self) -> float | None:
        """
        Take a token from the bucket.

        Returns:
            None when a token was taken, else the seconds until one is there.
        """
        assert self.limit is not None
        rate = self.limit / 60.0
        self._tokens_now(rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self._counts[0] += 1
            now = time.monotonic()
            if len(self._accepted) < 2:
                self._accepted.append(now)
            else:
                self._accepted[1] = now
            return None
        self._counts[1] += 1
        return (1.0 - self.tokens) / rate

    def figures(self) -> tuple[int, int, float] | None:
        """
        What the request rate-limit headers say now, after a refill.

        Returns:
            ``(limit, remaining, seconds until the bucket is full)``, or None without a
            limit.
        """
        if self.limit is None:
            return None
        rate = self.limit / 60.0
        tokens = self._tokens_now(rate)
        return self.limit, math.floor(tokens), (self.burst - tokens) / rate

    def stats(self) -> dict[str, float]:
        """``accepted``, ``refused`` and ``span_s`` (first to last acceptance)."""
        span = self._accepted[-1] - self._accepted[0] if self._accepted else 0.0
        return {
            "accepted": self._counts[0],
            "refused": self._counts[1],
            "span_s": span,
        }

    def reset(self) -> None:
        """Forget the counts and acceptance times (the tokens stay as they are)."""
        self._accepted.clear()
        self._counts = [0, 0]
