"""The error tree: one root, builtins where they fit, groups, pickling, clear messages."""

from __future__ import annotations

import inspect
import pickle

import pytest

import empathy_models
from empathy_models import exceptions as exc_module
from empathy_models.abc import Completion
from empathy_models.exceptions import (
    AllRoutesFailedError,
    AuthenticationError,
    AuthFileError,
    BackendClosedError,
    BackendError,
    BudgetExceededError,
    CircuitOpenError,
    ConfigurationError,
    ContentPolicyError,
    ContextWindowExceededError,
    EmpathyModelsError,
    InvalidRequestError,
    InvalidResponseError,
    ModelNotFoundError,
    NoModelMeetsConstraintsError,
    OverloadedError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitedError,
    RecordValidationError,
    SchemaVersionError,
    ServerError,
    SourceFileError,
    StateStoreError,
    StreamInterruptedError,
    TelemetryError,
)
from empathy_models.records import CircuitState

EXPORTED = [getattr(exc_module, name) for name in exc_module.__all__]
ERROR_CLASSES = [cls for cls in EXPORTED if not issubclass(cls, Warning)]
WARNING_CLASSES = [cls for cls in EXPORTED if issubclass(cls, Warning)]


def test_every_error_derives_from_the_root_and_is_exported() -> None:
    assert exc_module.__all__ == sorted(exc_module.__all__)
    for cls in ERROR_CLASSES:
        assert issubclass(cls, EmpathyModelsError), cls
        # exported by empathy_models.exceptions (ERROR_CLASSES is its __all__); the
        # bases and the errors a caller handles by the top level too, the others from
        # there only with a DeprecationWarning naming empathy_models.exceptions
        if cls.__name__ in empathy_models.__all__:
            assert getattr(empathy_models, cls.__name__) is cls, cls
        else:
            with pytest.warns(DeprecationWarning, match="empathy_models.exceptions"):
                assert getattr(empathy_models, cls.__name__) is cls, cls
    assert "EmpathyModelsError" in empathy_models.__all__


def test_every_warning_is_a_user_warning_exported_at_the_top_level() -> None:
    # shown by Python's default filters, with no logging set up
    assert [exc_module.ConfigurationWarning] == WARNING_CLASSES
    for cls in WARNING_CLASSES:
        assert issubclass(cls, UserWarning) and getattr(empathy_models, cls.__name__) is cls


def test_the_module_docstring_draws_every_error() -> None:
    doc = inspect.getdoc(exc_module) or ""
    for cls in EXPORTED:
        assert cls.__name__ in doc, f"{cls.__name__} missing from the drawn tree"


@pytest.mark.parametrize(
    ("cls", "parents"),
    [
        (ConfigurationError, (ValueError,)),
        (RecordValidationError, (ValueError,)),
        (ProviderTimeoutError, (ProviderError, TimeoutError)),
        (ProviderConnectionError, (ProviderError, ConnectionError, OSError)),
        (RateLimitedError, (ProviderError,)),
        (AuthenticationError, (ProviderError, PermissionError)),
        (ModelNotFoundError, (ProviderError, LookupError)),
        (InvalidRequestError, (ProviderError, ValueError)),
        (ContextWindowExceededError, (InvalidRequestError, ValueError)),
        (ContentPolicyError, (InvalidRequestError, ValueError)),
        (ServerError, (ProviderError,)),
        (OverloadedError, (ServerError, ProviderError)),
        (InvalidResponseError, (ProviderError,)),
        (NoModelMeetsConstraintsError, (LookupError,)),
        (AllRoutesFailedError, (ExceptionGroup,)),
        (TelemetryError, (BackendError,)),
        (StateStoreError, (BackendError,)),
        (BackendClosedError, (BackendError,)),
        (SchemaVersionError, (BackendError,)),
    ],
)
def test_subclasses_inherit_the_matching_builtin(
    cls: type[BaseException], parents: tuple[type[BaseException], ...]
) -> None:
    expected: tuple[type[BaseException], ...] = (EmpathyModelsError, *parents)
    for parent in expected:
        assert issubclass(cls, parent), f"{cls.__name__} is not a {parent.__name__}"


def test_a_provider_timeout_is_caught_as_a_plain_timeout() -> None:
    def call() -> None:
        raise ProviderTimeoutError("no answer in 30 s", provider="anthropic", model="m")

    with pytest.raises(TimeoutError) as info:
        call()
    assert info.value.provider == "anthropic"  # type: ignore[attr-defined]
    assert not isinstance(info.value, ConnectionError)


def test_provider_errors_carry_their_context() -> None:
    err = RateLimitedError(
        "429 from provider", provider="openai", model="gpt", status=429, retry_after=2.5
    )
    assert (err.provider, err.model, err.status, err.retry_after) == ("openai", "gpt", 429, 2.5)
    assert str(err) == "429 from provider"
    bare = ServerError("boom")
    assert (bare.provider, bare.model, bare.status, bare.retry_after) == (None, None, None, None)


@pytest.mark.parametrize(
    "error",
    [
        ProviderError("x", provider="p", model="m", status=500, retry_after=None),
        RateLimitedError("slow down", provider="p", model="m", status=429, retry_after=1.5),
        ProviderTimeoutError("late", provider="p", model="m"),
        OverloadedError("overloaded", provider="p", status=529, retry_after=3.0),
        ContextWindowExceededError("too long", provider="p", model="m", status=400),
    ],
    ids=lambda e: type(e).__name__,
)
def test_provider_errors_survive_pickling(error: ProviderError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert (back.provider, back.model, back.status, back.retry_after) == (
        error.provider,
        error.model,
        error.status,
        error.retry_after,
    )


def test_a_stream_interrupted_error_keeps_its_error_when_pickled() -> None:
    # its ``error`` (the cause the README tells callers to read) came back None, and
    # what the cause itself carried (a tool call's raw arguments) was lost with it
    cause = InvalidResponseError("arguments are not JSON", provider="p", model="m", status=200)
    cause.raw_arguments = '{"city": '  # type: ignore[attr-defined]  # as the reader sets it
    err = StreamInterruptedError(
        "the stream failed after 2 delta(s)",
        provider="p",
        model="m",
        partial_text="hel",
        input_tokens=3,
        output_tokens=1,
        ttft_ms=12.5,
        request_id="run-1",
        error=cause,
    )
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is StreamInterruptedError and str(back) == str(err)
    assert (back.partial_text, back.input_tokens, back.output_tokens) == ("hel", 3, 1)
    assert (back.ttft_ms, back.request_id) == (12.5, "run-1")
    assert type(back.error) is InvalidResponseError and str(back.error) == str(cause)
    assert back.error.status == 200
    assert back.error.raw_arguments == '{"city": '  # type: ignore[attr-defined]


def test_circuit_open_error_message_attributes_and_pickling() -> None:
    err = CircuitOpenError(
        "anthropic:m",
        state=CircuitState.OPEN,
        retry_after=12.5,
        last_error="ServerError 503",
        reason="5 consecutive failures",
    )
    message = str(err)
    assert "'anthropic:m'" in message and "open" in message and "12.500s" in message
    assert "5 consecutive failures" in message and "ServerError 503" in message
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is CircuitOpenError and str(back) == message
    assert (back.key, back.state, back.retry_after, back.last_error, back.reason) == (
        "anthropic:m",
        CircuitState.OPEN,
        12.5,
        "ServerError 503",
        "5 consecutive failures",
    )
    held = CircuitOpenError("k", state=CircuitState.FORCED_OPEN, retry_after=None)
    assert "until reset" in str(held)


def test_no_model_meets_constraints_lists_reasons_and_pickles() -> None:
    err = NoModelMeetsConstraintsError(
        "no model for docs/outline",
        reasons={"m-cheap": ["success rate 0.81 < 0.95"], "m-big": ["cost", "latency"]},
        workflow="docs",
        stage="outline",
    )
    lines = str(err).splitlines()
    assert lines == [
        "no model for docs/outline",
        "  m-cheap: success rate 0.81 < 0.95",
        "  m-big: cost; latency",
    ]
    assert err.reasons == {"m-cheap": ("success rate 0.81 < 0.95",), "m-big": ("cost", "latency")}
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err)
    assert (back.reasons, back.workflow, back.stage) == (err.reasons, "docs", "outline")


def test_pickling_keeps_what_an_error_holds_beyond_its_arguments() -> None:
    """
    A stream's underlying ``error``, a malformed answer's ``billed`` usage and the notes
    a caller added (`add_note`) come back from pickling (a process pool, a queue).
    """
    cause = ServerError("overloaded", provider="p", model="m", status=500)
    interrupted = StreamInterruptedError("cut", provider="p", partial_text="Hel", error=cause)
    malformed = InvalidResponseError("tool call cut off", provider="p", status=200)
    malformed.billed = Completion(content="", model="m", input_tokens=12, output_tokens=34)
    errors: list[Exception] = [
        interrupted,
        malformed,
        RateLimitedError("429", provider="p", retry_after=2.0),
        CircuitOpenError("p:m", state=CircuitState.OPEN, retry_after=1.0),
        BudgetExceededError(
            "global/day", limit_usd=1.0, remaining_usd=0.0, needed_usd=0.5, resets_at=0.0
        ),
        NoModelMeetsConstraintsError("none", reasons={"m": ["cost"]}),
        AuthFileError("unreadable", path="/tmp/auth.json"),
        SourceFileError("binary", path="/tmp/a.bin"),
    ]
    for error in errors:
        error.add_note(f"tenant 42 ({type(error).__name__})")
    back = pickle.loads(pickle.dumps(errors))
    for before, after in zip(errors, back, strict=True):
        assert type(after) is type(before) and str(after) == str(before)
        assert after.__notes__ == before.__notes__
    again, billed = back[0], back[1]
    assert isinstance(again, StreamInterruptedError) and again.partial_text == "Hel"
    assert isinstance(again.error, ServerError) and again.error.status == 500
    assert isinstance(billed, InvalidResponseError) and billed.billed == malformed.billed


def test_validation_and_backend_errors_keep_path_and_target_when_pickled() -> None:
    rve = pickle.loads(pickle.dumps(RecordValidationError("bad", path="candidates[0].model")))
    assert (str(rve), rve.path) == ("bad", "candidates[0].model")
    closed = pickle.loads(pickle.dumps(BackendClosedError("closed", target="calls.db")))
    assert (type(closed), str(closed), closed.target) == (BackendClosedError, "closed", "calls.db")


def _all_failed() -> AllRoutesFailedError:
    return AllRoutesFailedError(
        "every route failed",
        [
            RateLimitedError("429", provider="anthropic", retry_after=4.0),
            ProviderTimeoutError("late", provider="openai"),
            ServerError("503", provider="other", status=503),
        ],
    )


def test_all_routes_failed_works_with_except_star() -> None:
    rate_limited: list[BaseException] = []
    timeouts: list[BaseException] = []
    with pytest.raises(AllRoutesFailedError) as rest:
        try:
            raise _all_failed()
        except* RateLimitedError as group:
            rate_limited.extend(group.exceptions)
            assert isinstance(group, AllRoutesFailedError)
        except* TimeoutError as group:
            timeouts.extend(group.exceptions)
    assert [type(e) for e in rate_limited] == [RateLimitedError]
    assert [type(e) for e in timeouts] == [ProviderTimeoutError]
    assert [type(e) for e in rest.value.exceptions] == [ServerError]
    assert rest.value.message == "every route failed"


def test_all_routes_failed_is_caught_by_the_root_and_split_keeps_its_type() -> None:
    with pytest.raises(EmpathyModelsError):
        raise _all_failed()
    match, rest = _all_failed().split(ProviderError)
    assert isinstance(match, AllRoutesFailedError) and rest is None
    assert len(match.exceptions) == 3


def test_all_routes_failed_survives_pickling() -> None:
    back = pickle.loads(pickle.dumps(_all_failed()))
    assert type(back) is AllRoutesFailedError
    assert [type(e) for e in back.exceptions] == [
        RateLimitedError,
        ProviderTimeoutError,
        ServerError,
    ]
    first = back.exceptions[0]
    assert isinstance(first, RateLimitedError) and first.retry_after == 4.0


async def test_every_object_used_while_not_open_raises_not_open_error() -> None:
    from empathy_models import (
        AdaptiveModelRouter,
        CircuitBreaker,
        EmpathyLLMExecutor,
        ModelRegistry,
        NotOpenError,
        OpenAIProvider,
    )
    from empathy_models.abc import CompletionRequest
    from empathy_models.backends import MemoryTelemetryBackend
    from empathy_models.sync import SyncExecutor
    from empathy_models.testing.fakes import FakeProvider

    failures: list[BaseException] = []

    async def expect(call: object) -> None:
        try:
            await call  # type: ignore[misc]
        except NotOpenError as exc:
            assert isinstance(exc, RuntimeError)  # what callers caught before
            failures.append(exc)

    executor = EmpathyLLMExecutor([FakeProvider(name="openai")], telemetry_store="memory://")
    await expect(executor.run("x"))  # never entered
    async with executor:
        pass
    await expect(executor.run("x"))  # closed
    router = AdaptiveModelRouter(ModelRegistry.default())
    await router.aclose()
    await expect(router.start())
    breaker = CircuitBreaker()
    async with breaker:
        pass
    await expect(breaker.admit("k"))
    backend = MemoryTelemetryBackend()
    async with backend:
        pass
    await expect(backend.recent())
    request = CompletionRequest(model="gpt-4o-mini", messages="x", max_tokens=8)
    await expect(OpenAIProvider(api_key="sk-test").complete(request))  # no session
    assert len(failures) == 6
    sync = SyncExecutor([FakeProvider(name="openai")], telemetry_store="memory://")
    sync.close()
    with pytest.raises(NotOpenError, match="closed"):
        sync.run("x")


def test_a_budget_error_shows_amounts_too_small_for_its_places() -> None:
    # a budget of a millionth of a dollar (a test, a per-request cap) reads as what it is
    error = BudgetExceededError(
        "user_id=bob/day", limit_usd=0.000001, remaining_usd=2e-9, needed_usd=0.004019,
        resets_at=0.0,
    )  # fmt: skip
    assert "($0.0000010)" in str(error)
    assert "up to $0.004019, $0.0000000020 is left" in str(error)
    assert "($12.5000)" in str(BudgetExceededError("b", limit_usd=12.5, remaining_usd=0.0,
                                                   needed_usd=1.0, resets_at=0.0))  # fmt: skip
