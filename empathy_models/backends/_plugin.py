"""The shape of a backend plugin, as published through entry points."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen

__all__ = ["BackendPlugin"]


@frozen(kw_only=True)
class BackendPlugin:
    """
    What a plugin exposes under the ``empathy_models.backends`` entry-point group.

    The entry point's name is a URL scheme and its value a `BackendPlugin`:

    .. code-block:: toml

        [project.entry-points."empathy_models.backends"]
        redis = "empathy_models_redis:PLUGIN"

    Each factory is called as ``factory(url, **options)``; any may be ``None`` when the
    engine does not provide that kind of backend.

    Args:
        schemes: the URL schemes it serves.
        package: its distribution's name (``"empathy-models-redis"``), used in error messages.
        telemetry: the `TelemetryBackend` factory.
        state_store: the `CircuitStateStore` factory.
        quota_store: the factory of an `empathy_models.abc.QuotaStore`, for budgets and
            rate limits.
        cache: the factory of an `empathy_models.abc.ResponseCache`.
    """

    schemes: tuple[str, ...]
    package: str
    telemetry: Callable[..., Any] | None = None
    state_store: Callable[..., Any] | None = None
    quota_store: Callable[..., Any] | None = None
    cache: Callable[..., Any] | None = None
