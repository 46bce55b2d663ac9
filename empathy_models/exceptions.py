"""
The error tree of empathy-models.

Every error raised on purpose by this package derives from `EmpathyModelsError`, and
each subclass also derives from the builtin a caller would naturally catch where one
fits (a provider timeout is a `TimeoutError`, a refused connection a `ConnectionError`,
bad input a `ValueError`)::

    EmpathyModelsError
    ├── ConfigurationError (ValueError)          bad settings, unknown URL scheme, missing plugin
    │   └── AuthFileError                        the auth strategy file cannot be read or written
    ├── RecordValidationError (ValueError)       a record or dict that breaks an invariant
    ├── NotOpenError (RuntimeError)              used before `async with` or after aclose()
    ├── SourceFileError (OSError)                a file count_lines_of_code cannot count
    ├── ProviderError                            anything a model provider answered or failed to
    │   ├── ProviderTimeoutError (TimeoutError)  no answer before the deadline; 408 / 409
    │   ├── ProviderConnectionError (ConnectionError)  also a 499: cancelled on the way
    │   ├── RateLimitedError                     429, with retry_after
    │   ├── AuthenticationError (PermissionError) 401 / 402 / 403, no credit, account disabled
    │   │   └── MissingAPIKeyError (also a ConfigurationError) no key configured: never sent
    │   ├── ModelNotFoundError (LookupError)     404 / 410 / unknown model / 403 model_not_found
    │   ├── InvalidRequestError (ValueError)     400
    │   │   ├── ContextWindowExceededError       the prompt does not fit
    │   │   └── ContentPolicyError               refused by the provider's policy
    │   ├── ServerError                          5xx
    │   │   └── OverloadedError                  529 / "overloaded_error"
    │   ├── InvalidResponseError                 malformed JSON, missing fields, truncated body
    │   └── StreamInterruptedError               a stream failed after its first delta
    ├── CircuitOpenError                         the breaker said no (key, state, retry_after)
    ├── BudgetExceededError                      a spend budget cannot cover the call
    ├── NoModelMeetsConstraintsError (LookupError) with the reasons per model
    ├── AllRoutesFailedError (ExceptionGroup)    no route answered; each failed attempt's error
    └── BackendError                             a telemetry or state-store backend failed
        ├── TelemetryError
        │   └── TelemetryRejectedError (ValueError) records refused for a value they hold
        ├── StateStoreError
        ├── BackendClosedError (also a NotOpenError) a backend used after aclose()
        └── SchemaVersionError                   a database written by a newer version

Warnings, given with `warnings.warn` (shown on stderr once per line of the caller's code
that led to them, without any logging set up)::

    ConfigurationWarning (UserWarning)           a setting that works, likely not as meant
    ├── MissingAPIKeyWarning                     a provider without a key (top level)
    └── TelemetryDisabledWarning                 an executor without a telemetry store

Errors are mapped from native exceptions at one boundary per layer and raised with
``from exc``, so the original cause is always in the traceback.  No error message or
attribute holds an API key.  Every error pickles whole (a process pool, a queue): its
attributes and the notes added to it (`BaseException.add_note`) come back with it.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .abc import Completion
    from .records import CircuitState

__all__ = [
    "AllRoutesFailedError",
    "AuthFileError",
    "AuthenticationError",
    "BackendClosedError",
    "BackendError",
    "BudgetExceededError",
    "CircuitOpenError",
    "ConfigurationError",
    "ConfigurationWarning",
    "ContentPolicyError",
    "ContextWindowExceededError",
    "EmpathyModelsError",
    "InvalidRequestError",
    "InvalidResponseError",
    "MissingAPIKeyError",
    "ModelNotFoundError",
    "NoModelMeetsConstraintsError",
    "NotOpenError",
    "OverloadedError",
    "ProviderConnectionError",
    "ProviderError",
    "ProviderTimeoutError",
    "RateLimitedError",
    "RecordValidationError",
    "SchemaVersionError",
    "ServerError",
    "SourceFileError",
    "StateStoreError",
    "StreamInterruptedError",
    "TelemetryError",
    "TelemetryRejectedError",
]


class EmpathyModelsError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigurationError(EmpathyModelsError, ValueError):
    """A setting, URL or argument that cannot work; the message says which and why."""


class NotOpenError(EmpathyModelsError, RuntimeError):
    """
    An object was used while it is not open: an executor, router, provider session or
    backend before ``async with`` (or ``start()``) or after ``aclose()``.  The one error
    for that, whatever the object; backends raise its subclass `BackendClosedError`.
    """


class ConfigurationWarning(UserWarning):
    """
    A setting the code gave that works, but most likely not as meant: an unknown task
    type picking the tier (a capable model chosen for it), ``cache_ttl`` on an executor
    without a cache or on a request that samples (nothing cached), a router with a
    telemetry store used without ``async with`` (decisions without the stored evidence),
    a breaker over a shared state store used without ``async with`` (the successes it
    writes behind wait for their key's next call, and are lost at exit), a ``session=``
    whose connection pool is smaller than the calls in flight, a content-capture switch
    not understood (``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``), a provider
    without a key, no telemetry.

    The fix is in the calling code, so it is a `warnings.warn` warning rather than a
    log line: shown on stderr without any logging configured (once per line of the
    caller's code, Python's default), an error under ``-W error`` or pytest's
    ``filterwarnings = ["error"]``, and silenced with
    ``warnings.filterwarnings("ignore", category=ConfigurationWarning)``.  Each is
    also logged as a warning on the logger of the part that noticed it.
    """


class RecordValidationError(EmpathyModelsError, ValueError):
    """
    A record or serialized dict breaks an invariant.

    Args:
        message: what is wrong.
        path: names the field (``"latency_ms"``, ``"candidates[2].sample_size"``).
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ProviderError(EmpathyModelsError):
    """
    A model provider failed the call.

    The message never contains request headers or keys.

    Args:
        message: what failed.
        provider: the provider's name.
        model: the model asked for.
        status: the HTTP status, when there was one.
        retry_after: seconds, when the provider said when to come back.
        should_retry: the provider's own word on whether the same request may succeed
            if sent again (its ``x-should-retry: true`` or ``false`` header), None when
            it said nothing; `RetryPolicy` never retries an error it says ``False`` of.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model
        self.status = status
        self.retry_after = retry_after
        self.should_retry = should_retry

    def __reduce__(self) -> tuple[object, ...]:
        # the instance's attributes go too: what a subclass or the providers set on it
        # (`StreamInterruptedError.error`, a tool call's ``raw_arguments``)
        return (
            _rebuild_provider_error,
            (
                type(self),
                str(self),
                self.provider,
                self.model,
                self.status,
                self.retry_after,
                self.should_retry,
            ),
            dict(self.__dict__),
        )


def _rebuild_provider_error(
    cls: type[ProviderError],
    message: str,
    provider: str | None,
    model: str | None,
    status: int | None,
    retry_after: float | None,
    should_retry: bool | None = None,
) -> ProviderError:
    return cls(
        message,
        provider=provider,
        model=model,
        status=status,
        retry_after=retry_after,
        should_retry=should_retry,
    )


class ProviderTimeoutError(ProviderError, TimeoutError):
    """
    No complete answer before the deadline, or the server's own timeout: HTTP 408, or
    409 (a lock timeout, as the official SDKs read it; ``status`` says which).
    """


class ProviderConnectionError(ProviderError, ConnectionError):
    """
    The connection could not be made or broke before an answer, or the request was
    cancelled on the way (HTTP 499: a gateway's, or Gemini's ``CANCELLED``).
    """


class RateLimitedError(ProviderError):
    """HTTP 429; ``retry_after`` holds the provider's hint in seconds, if it gave one."""


class AuthenticationError(ProviderError, PermissionError):
    """
    HTTP 401, 402 or 403, or an account out of credit or disabled (OpenAI's 429
    ``insufficient_quota``; Anthropic's 400 "Your credit balance is too low ..." and
    "This organization has been disabled."), or a key or its region refused with a
    400 (Gemini's "API key not valid ...", "API key expired ...", "User location is not
    supported for the API use."): the key or the account cannot be used.
    """


class MissingAPIKeyError(AuthenticationError, ConfigurationError):
    """
    No API key is configured for the provider, so the request was never sent.

    A local misconfiguration, not the provider's answer: it is recorded with outcome
    ``not_sent``, which neither the router nor the breaker counts.  Catch it as an
    `AuthenticationError` or as a `ConfigurationError`.
    """


class ModelNotFoundError(ProviderError, LookupError):
    """
    HTTP 404, a 410 Gone (a model past its end of life), an unknown model id, or a 403
    ``model_not_found`` (OpenAI: the project may not use this model): one model is out
    of reach, not the provider.
    """


class InvalidRequestError(ProviderError, ValueError):
    """HTTP 400: the request itself is wrong; retrying it unchanged cannot help."""


class ContextWindowExceededError(InvalidRequestError):
    """The prompt and ``max_tokens`` do not fit the model's context window."""


class ContentPolicyError(InvalidRequestError):
    """The provider refused the content under its usage policy."""


class ServerError(ProviderError):
    """HTTP 5xx from the provider."""


class OverloadedError(ServerError):
    """HTTP 529 or an ``overloaded_error`` body: the provider sheds load."""


class InvalidResponseError(ProviderError):
    """
    The answer could not be understood: malformed JSON, missing fields, truncated body.

    ``billed``: when the provider answered with a status of success and its usage could
    still be read (an answer refused for another flaw, e.g. a tool call cut off by
    ``max_tokens`` whose arguments are not JSON), a `Completion` with that usage and no
    content: the provider bills it, and the executor records and charges it; else None.
    An error with a 2xx ``status`` and no ``billed`` (a body that is not JSON, JSON
    without the answer or its usage) is billed too: the executor records the request's
    estimate of the prompt for it, flagged as estimated, and charges budgets the
    prompt's worst case, as for a stream cut off before its usage.
    """

    # annotated for type checkers alone: `Completion` is imported only for them, so an
    # annotation at run time would break `typing.get_type_hints` on the class
    if TYPE_CHECKING:
        billed: Completion | None
    billed = None


class StreamInterruptedError(ProviderError):
    """
    A streamed answer failed after its first delta reached the caller.

    Nothing is retried or sent elsewhere then (the caller already holds part of this
    model's answer).  ``partial_text`` is the text delivered so far; ``input_tokens`` /
    ``output_tokens`` the usage known so far (output estimated from the text's size
    until the provider reports it); ``ttft_ms`` the time to the first delta of the
    attempt; ``request_id`` the run's id.  The underlying error (a
    `ProviderTimeoutError` for a stall, a `ServerError` for an error event, ...) is the
    ``__cause__`` and also ``error``.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        partial_text: str = "",
        input_tokens: int = 0,
        output_tokens: int = 0,
        ttft_ms: float | None = None,
        request_id: str | None = None,
        error: ProviderError | None = None,
    ) -> None:
        super().__init__(
            message, provider=provider, model=model, status=status, retry_after=retry_after
        )
        self.partial_text = partial_text
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.ttft_ms = ttft_ms
        self.request_id = request_id
        self.error = error

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_stream_interrupted,
            (
                str(self),
                self.provider,
                self.model,
                self.status,
                self.retry_after,
                self.partial_text,
                self.input_tokens,
                self.output_tokens,
                self.ttft_ms,
                self.request_id,
            ),
            dict(self.__dict__),  # ``error`` among them, as `ProviderError.__reduce__`
        )


def _rebuild_stream_interrupted(
    message: str,
    provider: str | None,
    model: str | None,
    status: int | None,
    retry_after: float | None,
    partial_text: str,
    input_tokens: int,
    output_tokens: int,
    ttft_ms: float | None,
    request_id: str | None,
) -> StreamInterruptedError:
    return StreamInterruptedError(
        message,
        provider=provider,
        model=model,
        status=status,
        retry_after=retry_after,
        partial_text=partial_text,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        ttft_ms=ttft_ms,
        request_id=request_id,
    )


class CircuitOpenError(EmpathyModelsError):
    """
    The circuit breaker for ``key`` rejected the call without reaching the provider.

    ``state`` is the breaker state that rejected it, ``retry_after`` the seconds until
    the breaker may admit a call again (``None`` when only a reset will), and
    ``last_error`` a short description of the failure that opened it.
    """

    def __init__(
        self,
        key: str,
        *,
        state: CircuitState,
        retry_after: float | None,
        last_error: str | None = None,
        reason: str | None = None,
    ) -> None:
        wait = "until reset" if retry_after is None else f"retry after {retry_after:.3f}s"
        detail = f"; {reason}" if reason else ""
        last = f"; last error: {last_error}" if last_error and last_error != reason else ""
        closing = _reset_hint(key) if state.value == "forced_open" else ""
        super().__init__(f"circuit {key!r} is {state.value} ({wait}){detail}{last}{closing}")
        self.key = key
        self.state = state
        self.retry_after = retry_after
        self.last_error = last_error
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_circuit_open,
            (self.key, self.state, self.retry_after, self.last_error, self.reason),
            self.__dict__,
        )


def _reset_hint(key: str) -> str:
    """
    How to close a key forced open (by an account error, such as a wrong API key, or by
    hand) before its time is up: it stays open for every worker sharing the store.
    """
    shell = f"{'-- ' if key.startswith('-') else ''}{shlex.quote(key)}"
    return (
        f"; once its cause is fixed, `CircuitBreaker.reset({key!r})` or `empathy-models "
        f"breaker reset --db <store> {shell}` closes it for every worker"
    )


def _rebuild_circuit_open(
    key: str,
    state: CircuitState,
    retry_after: float | None,
    last_error: str | None,
    reason: str | None,
) -> CircuitOpenError:
    return CircuitOpenError(
        key, state=state, retry_after=retry_after, last_error=last_error, reason=reason
    )


def _usd(amount: float, places: int) -> str:
    # dollars with ``places`` decimals, or as many as show an amount that small with two
    # significant digits (a $0.000001 budget is not "$0.0000")
    if 0.0 < abs(amount) < 10.0**-places:
        places = min(-math.floor(math.log10(abs(amount))) + 1, 15)
    return f"{amount:,.{places}f}"


class BudgetExceededError(EmpathyModelsError):
    """
    A spend budget (`empathy_models.limits.Budget`) cannot cover the call, and no
    cheaper candidate fits what is left.

    ``budget`` names the budget (with the scope value it was charged to, e.g.
    ``"workflow=docs"``), ``limit_usd`` its limit, ``remaining_usd`` what is left in the
    current window, ``needed_usd`` the estimate of the call refused and ``resets_at``
    (UTC epoch seconds) when the window ends.  No provider was called for the run: when
    routes before the refused one failed (an outage of the first model, then a budget
    that cannot cover the fallback), the run raises `AllRoutesFailedError` with their
    errors and this one last, which ``except* BudgetExceededError`` catches.
    """

    def __init__(
        self,
        budget: str,
        *,
        limit_usd: float,
        remaining_usd: float,
        needed_usd: float,
        resets_at: float,
        model: str | None = None,
    ) -> None:
        when = datetime.fromtimestamp(resets_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        target = f" for {model}" if model else ""
        super().__init__(
            f"budget {budget!r} (${_usd(limit_usd, 4)}) cannot cover the call{target}: it "
            f"needs up to ${_usd(needed_usd, 6)}, ${_usd(remaining_usd, 6)} is left; it "
            f"resets at {when}"
        )
        self.budget = budget
        self.limit_usd = limit_usd
        self.remaining_usd = remaining_usd
        self.needed_usd = needed_usd
        self.resets_at = resets_at
        self.model = model

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_budget,
            (
                self.budget,
                self.limit_usd,
                self.remaining_usd,
                self.needed_usd,
                self.resets_at,
                self.model,
            ),
            self.__dict__,
        )


def _rebuild_budget(
    budget: str,
    limit_usd: float,
    remaining_usd: float,
    needed_usd: float,
    resets_at: float,
    model: str | None,
) -> BudgetExceededError:
    return BudgetExceededError(
        budget,
        limit_usd=limit_usd,
        remaining_usd=remaining_usd,
        needed_usd=needed_usd,
        resets_at=resets_at,
        model=model,
    )


class NoModelMeetsConstraintsError(EmpathyModelsError, LookupError):
    """
    No candidate model satisfies the routing constraints and the policy is to raise.

    ``reasons`` maps every candidate model id to the reasons it was not chosen.
    """

    def __init__(
        self,
        message: str,
        *,
        reasons: Mapping[str, Sequence[str]],
        workflow: str | None = None,
        stage: str | None = None,
    ) -> None:
        lines = [message]
        lines.extend(f"  {model}: {'; '.join(why)}" for model, why in reasons.items())
        super().__init__("\n".join(lines))
        self._summary = message
        self.reasons = {model: tuple(why) for model, why in reasons.items()}
        self.workflow = workflow
        self.stage = stage

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_no_model,
            (self._summary, self.reasons, self.workflow, self.stage),
            self.__dict__,
        )


def _rebuild_no_model(
    message: str,
    reasons: Mapping[str, Sequence[str]],
    workflow: str | None,
    stage: str | None,
) -> NoModelMeetsConstraintsError:
    return NoModelMeetsConstraintsError(message, reasons=reasons, workflow=workflow, stage=stage)


class AllRoutesFailedError(ExceptionGroup[Exception], EmpathyModelsError):
    """
    No route answered: every route tried failed, or the run's deadline passed first.

    ``exceptions`` holds, in order, the error of each failed attempt (those an open
    circuit refused, and those the deadline left unsent, included) and of each call
    the limits refused before it went out (a `LocalRateLimitError`; a
    `BudgetExceededError`, whose route the run skipped for a cheaper one or one the
    budget does not cover); the message names the models tried, the number of attempts
    and the last error (or the deadline).  A run that only budgets refused raises the
    last `BudgetExceededError` instead.

    ``request_id`` is the run's id, which every record of its attempts carries
    (`LLMCallRecord.request_id`), so a failed run's calls can be found in telemetry
    (``None`` when the error was not raised by a run).

    Being an `ExceptionGroup`, it can be handled with ``except*`` by the class of the
    individual failures (``except* RateLimitedError:``); the groups it splits into keep
    its ``request_id``.
    """

    request_id: str | None = None
    # the run's number of attempts (its message's), for its OpenTelemetry span: None
    # when not raised by a run
    _attempts: int | None = None

    def derive(self, excs: Sequence[Exception]) -> AllRoutesFailedError:  # type: ignore[override]
        derived = AllRoutesFailedError(self.message, excs)
        derived.request_id = self.request_id
        return derived


class BackendError(EmpathyModelsError):
    """
    A telemetry or state-store backend failed.

    Args:
        message: what failed.
        target: names the file, URL (without credentials) or object concerned.
    """

    def __init__(self, message: str, *, target: str | None = None) -> None:
        super().__init__(message)
        self.target = target


class TelemetryError(BackendError):
    """A telemetry backend could not store or read records."""


class TelemetryRejectedError(TelemetryError, ValueError):
    """
    The store refused records for what they hold (a value it cannot store).

    Retrying the same records cannot help; the batching engine stores the others and
    retries the refused one with its values escaped or clamped.
    """


class StateStoreError(BackendError):
    """
    A circuit-state store could not apply or read a state.

    Args:
        message: what failed.
        target: as for `BackendError`.
        key: names the breaker key when the fault is that key's alone (its stored state
            cannot be read); the breaker then runs that key on a per-process fallback.
    """

    def __init__(self, message: str, *, target: str | None = None, key: str | None = None) -> None:
        super().__init__(message, target=target)
        self.key = key


class BackendClosedError(BackendError, NotOpenError):
    """The backend was used after ``aclose()``."""


class SchemaVersionError(BackendError):
    """The database was written by a newer version of the schema than this code knows."""


class AuthFileError(ConfigurationError):
    """
    The auth strategy file (or a backup of it) cannot be read, parsed or written.

    ``path`` is the file concerned.  The message says what is wrong and how to recover;
    it never quotes the file's contents.
    """

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_auth_file_error, (str(self), self.path), self.__dict__)


def _rebuild_auth_file_error(message: str, path: Path | None) -> AuthFileError:
    return AuthFileError(message, path=path)


class SourceFileError(EmpathyModelsError, OSError):
    """
    A file given to `count_lines_of_code` is missing, a directory, not a regular file,
    unreadable or binary.  ``path`` is the file concerned.
    """

    def __init__(self, message: str, *, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_source_file_error, (str(self), self.path), self.__dict__)


def _rebuild_source_file_error(message: str, path: Path | None) -> SourceFileError:
    return SourceFileError(message, path=path)
