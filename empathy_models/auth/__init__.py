"""
Subscription or API: which way to pay for the LLM work on a module, and where that
choice is kept.

`AuthStrategy` holds the choice (subscription tier, default mode, the module-size
thresholds 500 / 2000 lines and the lines-to-tokens multiplier 4.0 by default)
and recommends an `AuthMode` per module size.  It is validated at construction and
saved in a versioned JSON file under ``$EMPATHY_HOME`` (default ``~/.empathy``)::

    strategy = AuthStrategy.load()                   # defaults when no file exists yet
    report = count_lines_of_code("src/app/models.py")
    strategy.get_recommended_mode(report.effective_lines)
    strategy.estimate_cost(report.effective_lines)   # priced from the model registry
    strategy.replace(small_module_threshold=300).save()

The file is never lost by accident: `AuthStrategy.save` is atomic (a temporary file in
the same directory, fsync, ``os.replace``), creates the file 0600 and its directory
0700, and refuses to overwrite a file it cannot parse; `AuthStrategy.load` raises
`AuthFileError` naming the path for a corrupt file instead of returning defaults;
`reset_auth_strategy` copies the file to a timestamped backup before removing it, and
`restore_auth_strategy` brings the newest backup back.

File functions block on disk I/O.  From async code use `AuthStrategy.aload`,
`AuthStrategy.asave` and `acount_lines_of_code`, which run them in a worker thread.
Concurrent saves from several processes are last-writer-wins (each write is whole,
never torn); `AuthStrategy.update` changes some fields of the saved strategy under the
file's lock, so concurrent updates of different fields all land.
"""

from __future__ import annotations

import typing
from pathlib import Path

from .._loc import (
    LINE_EQUIVALENT_CHARS,
    LinesOfCodeReport,
    acount_lines_of_code,
    count_lines_of_code,
)
from .._paths import empathy_home
from ..exceptions import AuthFileError, SourceFileError
from ._files import auth_strategy_file
from .store import list_auth_strategy_backups, reset_auth_strategy, restore_auth_strategy
from .strategy import (
    API_CONTEXT_TOKENS,
    DOC_PIPELINE,
    SUBSCRIPTION_CONTEXT_TOKENS,
    AuthCostEstimate,
    AuthMode,
    AuthStrategy,
    CostStage,
    StageCost,
    SubscriptionTier,
    get_module_size_category,
)

__all__ = [
    "API_CONTEXT_TOKENS",
    "AUTH_STRATEGY_FILE",
    "AuthCostEstimate",
    "AuthFileError",
    "AuthMode",
    "AuthStrategy",
    "CostStage",
    "DOC_PIPELINE",
    "LINE_EQUIVALENT_CHARS",
    "LinesOfCodeReport",
    "SUBSCRIPTION_CONTEXT_TOKENS",
    "SourceFileError",
    "StageCost",
    "SubscriptionTier",
    "acount_lines_of_code",
    "auth_strategy_file",
    "count_lines_of_code",
    "empathy_home",
    "get_module_size_category",
    "list_auth_strategy_backups",
    "reset_auth_strategy",
    "restore_auth_strategy",
]

if typing.TYPE_CHECKING:
    AUTH_STRATEGY_FILE: Path
    """
    The auth strategy file as `auth_strategy_file` returned it when this name was first
    read (kept for callers that import the constant: a later change of
    ``$EMPATHY_HOME`` is honoured by the function, not here); prefer the function.
    """
else:
    # resolved when the name is first read, never at import: an ``$EMPATHY_HOME`` that
    # cannot be expanded fails there, with `ConfigurationError` (and is tried again on
    # the next read), so importing this package always works

    def __getattr__(name: str) -> Path:
        if name == "AUTH_STRATEGY_FILE":
            path = globals()[name] = auth_strategy_file()
            return path
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
