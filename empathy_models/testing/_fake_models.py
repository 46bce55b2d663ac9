"""
The models endpoints as `FakeLLMServer` answers them, in each API's shape: ``GET
/v1/models`` (the models it has a behaviour for, by id) and ``GET /v1/models/{id}``
(any model it serves: every one when it has a default behaviour).
"""

from __future__ import annotations

from typing import Any, Final

from ._fake_wire import ANTHROPIC, Api

__all__ = ["model_list", "model_object"]

CREATED: Final = 1_700_000_000
"""When every model the fake lists was made (a Unix time: 2023-11-14T22:13:20Z)."""


def model_object(api: Api, model: str) -> dict[str, Any]:
    """One model as the API describes it."""
    if api == ANTHROPIC:
        return {
            "type": "model",
            "id": model,
            "display_name": model,
            "created_at": "2023-11-14T22:13:20Z",
        }
    return {"id": model, "object": "model", "created": CREATED, "owned_by": "system"}


def model_list(api: Api, models: list[str]) -> dict[str, Any]:
    """The list of ``models`` as the API pages it (one page, all of them)."""
    data = [model_object(api, model) for model in models]
    if api == ANTHROPIC:
        return {
            "data": data,
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
    return {"object": "list", "data": data}
