"""
Content blocks, tools and structured output: the provider-neutral values a request and
a response carry beyond plain text.

A `Message`'s ``content`` is a string or a sequence of blocks:

==================  =========================================================
block               meaning
==================  =========================================================
`TextBlock`         text
`ImageBlock`        an image: base64 ``data`` with its ``media_type``, or a ``url``
`ToolCall`          (assistant) a call of one of the request's tools
`ToolResult`        (user) the answer to a `ToolCall`, by ``tool_call_id``
==================  =========================================================

Tool results can also be sent as ``Message(role="tool", tool_call_id=..., content=...)``
(the OpenAI way); tool calls as ``Message(role="assistant", tool_calls=...)``.  The
providers convert either form to their own wire format, so a conversation started on
one provider can continue on another.

`Tool` describes a function the model may call (``parameters`` is a JSON Schema
object); `ResponseFormat` asks for JSON matching a schema.  Everything here is
immutable and validated on construction: bad input (JSON nested more than 100 levels
deep included) raises `RecordValidationError` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

import attrs
from attrs import field, frozen

from ._jsonschema import schema_problem
from ._validators import check, failure, instance_of, integer, number, optional_str, shown, text
from .exceptions import RecordValidationError

__all__ = [
    "IMAGE_MEDIA_TYPES",
    "ContentBlock",
    "ImageBlock",
    "ResponseFormat",
    "TextBlock",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "ToolResult",
]

IMAGE_MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
"""The image media types both APIs accept."""

_TOOL_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

ToolChoice: TypeAlias = str
"""``"auto"``, ``"none"``, ``"required"``, or the name of one of the request's tools."""


def _fail(message: str, path: str) -> RecordValidationError:
    return RecordValidationError(message, path=path)


_field_fail = failure(RecordValidationError)
_type_fail = failure(RecordValidationError, shown="type")  # the value itself may be large
_str = instance_of(_type_fail, str, why="must be a string")
_non_empty = text(_field_fail, strip=False)
_opt_str = optional_str(_type_fail)
_bool = instance_of(_field_fail, bool, why="must be True or False")


_MAX_NESTING: Final = 100
"""
How deeply objects and arrays may nest in a JSON value here (tool arguments, schemas,
``extra_body``): far beyond any real one, and shallow enough that copying, encoding
and comparing it never reaches Python's recursion limit.
"""


_JSON_INT_MAX: Final = int(sys.float_info.max)
"""
The largest magnitude of an integer in a JSON value here (about 1.8e308, 309 digits):
what a float64 holds, so every JSON decoder (the APIs', ``JSON.parse``) reads it as a
number, and far below the 640 digits Python's int-to-text limit can be lowered to
(``sys.set_int_max_str_digits``; 4,300 by default), so writing the request body never
fails on it.  Unsigned 64-bit values (a schema's ``"maximum": 2**64 - 1``) pass.
"""


def _json_copy(value: object, path: str, depth: int = 1, root: str | None = None) -> Any:
    """
    A deep copy of a JSON value as plain dicts and lists (anything else is refused, as
    are a number past what JSON holds, see `_JSON_INT_MAX`, and nesting deeper than
    `_MAX_NESTING`, a cycle included: that error names ``root``, the value's own path,
    not the deepest one).
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if isinstance(value, float):
            if not math.isfinite(value):
                raise _fail(f"{path} must be JSON: {shown(value)} is not a finite number", path)
        elif not -_JSON_INT_MAX <= value <= _JSON_INT_MAX:
            raise _fail(
                f"{path} must be JSON: {shown(value)} is past what a JSON number holds "
                "(at most about 1.8e308 in magnitude, as a float64)",
                path,
            )
        return value
    if root is None:
        root = path
    if depth > _MAX_NESTING and isinstance(value, Mapping | list | tuple):
        raise _fail(f"{root} must be JSON nested at most {_MAX_NESTING} levels deep", root)
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(f"{path} must be JSON: key {shown(key)} is not a string", path)
            copied[key] = _json_copy(item, f"{path}.{key}", depth + 1, root)
        return copied
    if isinstance(value, list | tuple):
        return [_json_copy(item, f"{path}[{i}]", depth + 1, root) for i, item in enumerate(value)]
    raise _fail(f"{path} must be JSON, got {type(value).__name__}", path)


def to_json(value: Any) -> Any:
    """Internal: a deep copy of a JSON value as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: to_json(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [to_json(item) for item in value]
    return value


def _json_object(path: str) -> Any:
    def convert(value: object) -> Any:
        if not isinstance(value, Mapping):
            raise _fail(f"{path} must be a JSON object (a dict), got {type(value).__name__}", path)
        return _json_copy(value, path)

    return convert


def _arguments(value: object) -> Any:
    return _json_object("arguments")(value)


def _schema(value: object) -> Any:
    schema = _json_object("response_format.schema")(value)
    problem = schema_problem(schema)
    if problem is not None:
        where, why = problem
        path = f"response_format.schema{where}"
        raise _fail(f"{path} {why}", path)
    return schema


# --------------------------------------------------------------------------- blocks


@frozen(kw_only=True)
class TextBlock:
    """A piece of text."""

    text: str = field(validator=_str)
    type: Literal["text"] = field(default="text", init=False)


@frozen(kw_only=True)
class ImageBlock:
    """
    An image, inline or by URL.  Build it with `from_bytes`, `from_base64` or `from_url`.

    The ``repr`` shows the size of the data, never the data.

    Args:
        media_type: one of `IMAGE_MEDIA_TYPES`, for inline ``data``.
        data: the image as base64.
        url: an ``http(s)`` URL the provider fetches, instead of ``data``.

    Raises:
        RecordValidationError: not exactly one of ``data`` and ``url``, or an invalid
            field.
    """

    media_type: str | None = field(default=None, validator=_opt_str)
    data: str | None = field(default=None, validator=_opt_str, repr=False)
    url: str | None = field(default=None, validator=_opt_str)
    type: Literal["image"] = field(default="image", init=False)

    def __attrs_post_init__(self) -> None:
        if (self.data is None) == (self.url is None):
            raise _fail("an ImageBlock needs exactly one of data (base64) and url", "image")
        if self.url is not None:
            if not self.url.startswith(("https://", "http://")):
                raise _fail(
                    f"image url must start with https:// or http://, got {self.url[:40]!r} "
                    "(use ImageBlock.from_bytes or from_base64 for inline data)",
                    "url",
                )
            if self.media_type is not None and self.media_type not in IMAGE_MEDIA_TYPES:
                raise _fail(self._media_type_message(), "media_type")
            return
        if self.media_type not in IMAGE_MEDIA_TYPES:
            raise _fail(self._media_type_message(), "media_type")
        if not self.data:
            raise _fail("image data is empty", "data")
        try:
            base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise _fail("image data must be base64 (standard alphabet, padded)", "data") from None

    def _media_type_message(self) -> str:
        allowed = ", ".join(sorted(IMAGE_MEDIA_TYPES))
        return f"image media_type must be one of {allowed}, got {shown(self.media_type)}"

    @classmethod
    def from_bytes(cls, data: bytes, media_type: str) -> ImageBlock:
        """An inline image from its raw bytes."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise _fail(f"data must be bytes, got {type(data).__name__}", "data")
        return cls(media_type=media_type, data=base64.b64encode(bytes(data)).decode("ascii"))

    @classmethod
    def from_base64(cls, data: str, media_type: str) -> ImageBlock:
        """An inline image from base64 text."""
        return cls(media_type=media_type, data=data)

    @classmethod
    def from_url(cls, url: str) -> ImageBlock:
        """An image the provider fetches from ``url``."""
        return cls(url=url)

    @property
    def data_url(self) -> str:
        """The image as OpenAI's ``image_url.url``: the URL, or a ``data:`` URL."""
        if self.url is not None:
            return self.url
        return f"data:{self.media_type};base64,{self.data}"


@frozen(kw_only=True)
class ToolCall:
    """
    A call the model made.

    Args:
        id: echo it in the `ToolResult`.
        name: the tool's name.
        arguments: parsed to a dict (a copy of what was given).
    """

    id: str = field(validator=_non_empty)
    name: str = field(validator=_non_empty)
    arguments: Mapping[str, Any] = field(factory=dict, converter=_arguments, eq=False)
    type: Literal["tool_call"] = field(default="tool_call", init=False)

    @property
    def arguments_json(self) -> str:
        """The arguments as a compact JSON string (OpenAI's ``function.arguments``)."""
        return json.dumps(to_json(self.arguments), separators=(",", ":"), ensure_ascii=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ToolCall):
            return NotImplemented
        return (self.id, self.name, to_json(self.arguments)) == (
            other.id,
            other.name,
            to_json(other.arguments),
        )

    def __hash__(self) -> int:
        return hash((self.id, self.name, self.arguments_json))


@frozen(kw_only=True)
class ToolCallDelta:
    """
    A piece of a tool call arriving in a stream (see `LLMStream.events`).

    ``index`` numbers the calls of one answer from 0, in order; the first piece of a
    call carries its ``id`` and ``name`` (None on the later pieces, except from a server
    that sends the name in pieces too: joined in order they are the name), and each
    piece a fragment of the ``arguments`` JSON text (possibly empty): joined in order
    they are the call's arguments.  The final `LLMResponse.tool_calls` holds the calls parsed.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    type: Literal["tool_call_delta"] = field(default="tool_call_delta", init=False)


def _result_content(value: object) -> str | tuple[TextBlock | ImageBlock, ...]:
    if isinstance(value, str):
        return value
    blocks = to_blocks(value, "content")
    for index, block in enumerate(blocks):
        if not isinstance(block, TextBlock | ImageBlock):
            raise _fail(
                f"a tool result holds text and image blocks only, got {type(block).__name__}",
                f"content[{index}]",
            )
    return blocks  # type: ignore[return-value]


@frozen(kw_only=True)
class ToolResult:
    """
    The answer to a tool call.

    Args:
        tool_call_id: the `ToolCall`'s ``id``.
        content: text, or text and image blocks.
        is_error: marks a failed call.
    """

    tool_call_id: str = field(validator=_non_empty)
    content: str | tuple[TextBlock | ImageBlock, ...] = field(converter=_result_content)
    is_error: bool = field(default=False, validator=_bool)
    type: Literal["tool_result"] = field(default="tool_result", init=False)

    @property
    def text(self) -> str:
        """The result's text (text blocks joined)."""
        return text_of(self.content)


ContentBlock: TypeAlias = TextBlock | ImageBlock | ToolCall | ToolResult
"""A block of a message's content."""

_BLOCK_TYPES: Final = (TextBlock, ImageBlock, ToolCall, ToolResult)


def _image_from_dict(item: Mapping[str, Any], path: str) -> ImageBlock:
    if item.get("type") == "image_url":  # OpenAI: {"image_url": {"url": ...}}
        spec = item.get("image_url")
        url = spec.get("url") if isinstance(spec, Mapping) else spec
        if not isinstance(url, str):
            raise _fail(f"{path}.image_url.url must be a string", path)
        if url.startswith("data:"):
            header, _, data = url.partition(",")
            media_type = header[5:].removesuffix(";base64")
            if not header.endswith(";base64"):
                raise _fail(f"{path}: a data URL image must be base64 encoded", path)
            return ImageBlock(media_type=media_type, data=data)
        return ImageBlock(url=url)
    source = item.get("source")  # Anthropic: {"source": {"type": "base64" | "url", ...}}
    if not isinstance(source, Mapping):
        raise _fail(f"{path}.source must be an object", path)
    if source.get("type") == "url":
        return ImageBlock(url=source.get("url"))
    return ImageBlock(media_type=source.get("media_type"), data=source.get("data"))


def plain_of(item: object) -> object:
    """
    ``item`` as plain data: an SDK's object (a pydantic model, such as the openai SDK's
    ``ChatCompletionMessage`` or the anthropic SDK's content blocks: anything not a
    mapping with a ``model_dump`` method) as its dict without the fields left null;
    anything else as is.
    """
    dump = getattr(item, "model_dump", None)
    if dump is None or isinstance(item, Mapping | type) or not callable(dump):
        return item
    try:
        return dump(exclude_none=True)
    except TypeError:  # a model_dump without pydantic's options
        return dump()


def block_of(item: object, path: str = "content[0]") -> ContentBlock:
    """
    ``item`` as a block: a block is returned as is; a dict in either API's shape
    (``{"type": "text", "text": ...}``, OpenAI ``image_url``, Anthropic ``image``,
    ``tool_use`` and ``tool_result``), or an SDK's block object (`plain_of`), is
    converted.
    """
    if isinstance(item, _BLOCK_TYPES):
        return item
    item = plain_of(item)
    if isinstance(item, str):
        return TextBlock(text=item)
    if not isinstance(item, Mapping):
        raise _fail(f"{path} must be a content block or a dict, got {type(item).__name__}", path)
    kind = item.get("type")
    try:
        if kind == "text":
            return TextBlock(text=item.get("text"))  # type: ignore[arg-type]
        if kind in ("image", "image_url"):
            return _image_from_dict(item, path)
        if kind == "tool_use":
            return ToolCall(id=item.get("id"), name=item.get("name"), arguments=item.get("input"))  # type: ignore[arg-type]
        if kind == "tool_result":
            return ToolResult(
                tool_call_id=item.get("tool_use_id"),  # type: ignore[arg-type]
                content=item.get("content", ""),
                # null or left out: not an error; anything but a boolean is refused
                is_error=False if (flag := item.get("is_error")) is None else flag,
            )
    except RecordValidationError as exc:
        raise _fail(f"{path}: {exc}", f"{path}.{exc.path or ''}".rstrip(".")) from None
    raise _fail(
        f"{path}.type must be one of 'text', 'image', 'image_url', 'tool_use', 'tool_result'; "
        f"got {shown(kind)}",
        path,
    )


def to_blocks(value: object, path: str = "content") -> tuple[ContentBlock, ...]:
    """A sequence of blocks (or block dicts) as a tuple of blocks."""
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise _fail(
            f"{path} must be a string or a list of content blocks, got {type(value).__name__}",
            path,
        )
    return tuple(block_of(item, f"{path}[{i}]") for i, item in enumerate(value))


def text_of(content: str | Sequence[object]) -> str:
    """The text of a content: the string, or its text blocks (and tool results) joined."""
    if isinstance(content, str):
        return content
    return "".join(b.text for b in content if isinstance(b, TextBlock | ToolResult))


def tool_call_of(item: object, path: str) -> ToolCall:
    """
    ``item`` as a `ToolCall`: a `ToolCall`, an OpenAI ``tool_calls`` entry
    (``{"id", "type": "function", "function": {"name", "arguments": "<json>"}}``) or an
    Anthropic ``tool_use`` block (or an SDK's object of either, `plain_of`).
    """
    if isinstance(item, ToolCall):
        return item
    item = plain_of(item)
    if not isinstance(item, Mapping):
        raise _fail(f"{path} must be a ToolCall or a dict, got {type(item).__name__}", path)
    if item.get("type") == "tool_use":
        block = block_of(item, path)
        assert isinstance(block, ToolCall)
        return block
    function = item.get("function")
    if not isinstance(function, Mapping):
        raise _fail(f"{path}.function must be an object with name and arguments", path)
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise _fail(f"{path}.function.arguments is not valid JSON", path) from None
    try:
        return ToolCall(id=item.get("id"), name=function.get("name"), arguments=arguments)  # type: ignore[arg-type]
    except RecordValidationError as exc:
        raise _fail(f"{path}: {exc}", path) from None


# --------------------------------------------------------------------------- tools


def _tool_name(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not _TOOL_NAME.fullmatch(value):
        raise _fail(
            f"Tool.name must be 1-64 letters, digits, '_' or '-' (as both APIs require), "
            f"got {shown(value)}",
            "name",
        )


def _strict(spec: Mapping[str, Any], *, default: bool) -> Any:
    """``spec``'s ``strict``: ``default`` when absent, False when null (as OpenAI reads it)."""
    value = spec.get("strict", default)
    return False if value is None else value


def _parameters(value: object) -> Mapping[str, Any]:
    if value is None:
        value = {"type": "object", "properties": {}}
    schema = _json_object("parameters")(value)
    if schema.get("type", "object") != "object":
        raise _fail(
            "Tool.parameters must be a JSON Schema of type 'object' (the arguments are an "
            f"object), got type {shown(schema.get('type'))}",
            "parameters",
        )
    return schema  # type: ignore[no-any-return]


@frozen(kw_only=True)
class Tool:
    """
    A function the model may call.

    Args:
        name: 1-64 letters, digits, ``_`` or ``-`` (as both APIs require).
        description: what the function does, for the model.
        parameters: the JSON Schema of its arguments (an ``"object"`` schema; default: no
            arguments).  OpenAI receives it as ``tools[].function.parameters`` (with
            ``strict`` when set), Anthropic as ``tools[].input_schema``.
        strict: sent to OpenAI with the parameters.

    Raises:
        RecordValidationError: an invalid field, naming it.
    """

    name: str = field(validator=_tool_name)
    description: str | None = field(default=None, validator=_opt_str)
    parameters: Mapping[str, Any] = field(default=None, converter=_parameters, eq=False)
    strict: bool = field(default=False, validator=_bool)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tool):
            return NotImplemented
        return (self.name, self.description, self.strict, to_json(self.parameters)) == (
            other.name,
            other.description,
            other.strict,
            to_json(other.parameters),
        )

    def __hash__(self) -> int:
        return hash((self.name, self.description, self.strict))

    @classmethod
    def of(cls, item: object, path: str = "tools[0]") -> Tool:
        """
        ``item`` as a `Tool`.

        Args:
            item: a `Tool`, or a dict in either API's shape (OpenAI ``{"type": "function",
                "function": {...}}`` or Anthropic ``{"name", "input_schema"}``, its
                ``"type": "custom"`` allowed) or as `Tool`'s own fields.
            path: where the item sits in the request, named in errors.

        Raises:
            RecordValidationError: anything else, or an invalid field; a dict of another
                ``type`` (a server tool the provider runs itself, such as Anthropic's
                ``web_search_20250305``: no function the caller answers, and its options
                would be lost), saying to send it with ``extra_body``.
        """
        if isinstance(item, Tool):
            return item
        if not isinstance(item, Mapping):
            raise _fail(f"{path} must be a Tool or a dict, got {type(item).__name__}", path)
        kind = item.get("type")
        if kind is not None and kind not in ("function", "custom"):
            raise _fail(
                f"{path} has type {shown(kind)}: a server tool, which the provider runs "
                "itself, is no function the model calls for you to answer; send it in the "
                "API's own shape with extra_body={'tools': [...]} (the functions too, as "
                "that list takes the place of tools)",
                f"{path}.type",
            )
        spec = item.get("function") if item.get("type") == "function" else item
        if not isinstance(spec, Mapping):
            raise _fail(f"{path}.function must be an object", path)
        try:
            return cls(
                name=spec.get("name"),  # type: ignore[arg-type]
                description=spec.get("description"),
                parameters=spec.get("parameters", spec.get("input_schema")),
                strict=_strict(spec, default=False),
            )
        except RecordValidationError as exc:
            raise _fail(f"{path}: {exc}", f"{path}.{exc.path or ''}".rstrip(".")) from None


# --------------------------------------------------------------------------- structured output


def _schema_name(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not _TOOL_NAME.fullmatch(value):
        raise _fail(
            f"ResponseFormat.name must be 1-64 letters, digits, '_' or '-', got {shown(value)}",
            "name",
        )


@frozen(kw_only=True)
class ResponseFormat:
    """
    Ask for a JSON answer matching ``schema``.

    OpenAI receives ``response_format={"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}}``; Anthropic its structured-outputs parameter
    ``output_config={"format": {"type": "json_schema", "schema": ...}}``.  The answer's
    text is parsed and checked against the schema: `LLMResponse.parsed` holds the value
    when it validates.

    Args:
        schema: a JSON Schema object.  The keywords the answer is checked by
            (``type``, ``properties``, ``patternProperties``, ``required``,
            ``additionalProperties``, ``items``, ``prefixItems``, ``enum``, ``const``,
            ``anyOf`` / ``oneOf`` / ``allOf``, ``$ref``, the length, item-count and number
            bounds, ``pattern`` and ``multipleOf``; others are sent and not checked) must
            have the values JSON Schema 2020-12 gives them, and a ``$ref`` must point
            into the schema (``#/$defs/...``).  A ``pattern`` (or ``patternProperties``
            key) whose search time can grow exponentially with the string, such as
            ``^(a+)+$``, is refused: the answer is text the model wrote, and ``re`` has
            no timeout (see the README's "Patterns in a JSON schema").
        name: the schema's name sent to OpenAI (1-64 letters, digits, ``_`` or ``-``).
        strict: (default true) asks OpenAI for exact adherence, which needs
            ``additionalProperties: false`` and every property required.

    Raises:
        RecordValidationError: an invalid field, naming it (for the schema, the path of
            the keyword in it: ``response_format.schema.properties.age.minimum``).
    """

    schema: Mapping[str, Any] = field(converter=_schema, eq=False)
    name: str = field(default="response", validator=_schema_name)
    strict: bool = field(default=True, validator=_bool)

    @classmethod
    def of(cls, value: object) -> ResponseFormat:
        """
        ``value`` as a `ResponseFormat`: one, a JSON Schema dict, OpenAI's whole
        ``{"type": "json_schema", "json_schema": {...}}`` parameter, or Anthropic's
        ``output_config.format``, ``{"type": "json_schema", "schema": {...}}`` (no JSON
        Schema has the type ``"json_schema"``, so neither is taken for one).
        """
        if isinstance(value, ResponseFormat):
            return value
        if not isinstance(value, Mapping):
            raise _fail(
                "response_format must be a JSON Schema dict or a ResponseFormat, got "
                f"{type(value).__name__}",
                "response_format",
            )
        if value.get("type") == "json_schema" and isinstance(value.get("json_schema"), Mapping):
            spec = value["json_schema"]
            return cls(
                schema=spec.get("schema", {}),
                name=spec.get("name", "response"),
                strict=_strict(spec, default=True),
            )
        if value.get("type") == "json_schema" and isinstance(value.get("schema"), Mapping):
            return cls(schema=value["schema"])
        if value.get("type") == "json_object":
            raise _fail(
                "response_format {'type': 'json_object'} is not supported: pass a JSON Schema",
                "response_format",
            )
        return cls(schema=value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ResponseFormat):
            return NotImplemented
        return (self.name, self.strict, to_json(self.schema)) == (
            other.name,
            other.strict,
            to_json(other.schema),
        )

    def __hash__(self) -> int:
        return hash((self.name, self.strict))


# --------------------------------------------------------------------------- request options

_TOOL_CHOICES: Final = ("auto", "none", "required")


def to_tools(value: object) -> tuple[Tool, ...]:
    """``tools`` as a tuple of `Tool` (None: none); names must be unique."""
    if value is None:
        return ()
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise _fail(f"tools must be a list of Tool, got {type(value).__name__}", "tools")
    tools = tuple(Tool.of(item, f"tools[{i}]") for i, item in enumerate(value))
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        if tool.name in seen:
            raise _fail(f"tools[{index}]: the tool name {tool.name!r} is used twice", "tools")
        seen.add(tool.name)
    return tools


_SDK_CHOICES: Final = {"auto": "auto", "none": "none", "any": "required"}
"""Anthropic's ``tool_choice`` types without a name, by the string each stands for."""


def to_tool_choice(value: object) -> Any:
    """
    ``tool_choice`` as its string when given as either API's own object for it (OpenAI's
    ``{"type": "function", "function": {"name": ...}}``, Anthropic's ``{"type": "tool",
    "name": ...}`` and ``{"type": "auto" | "any" | "none"}``, ``"any"`` being
    ``"required"``); anything else as it is, for `check_options` to judge (an object
    with options, such as Anthropic's ``disable_parallel_tool_use``, is refused there:
    ``extra_body`` carries those).
    """
    if not isinstance(value, Mapping):
        return value
    kind, keys = value.get("type"), set(value)
    function = value.get("function")
    if kind == "function" and keys == {"type", "function"} and isinstance(function, Mapping):
        return function.get("name") if set(function) == {"name"} else value
    if kind == "tool" and keys == {"type", "name"}:
        return value["name"]
    if isinstance(kind, str) and kind in _SDK_CHOICES and keys == {"type"}:
        return _SDK_CHOICES[kind]
    return value


def to_response_format(value: object) -> ResponseFormat | None:
    """
    ``response_format`` as a `ResponseFormat`; None, and OpenAI's ``{"type": "text"}``
    (its default), are plain text: None.
    """
    if value is None or (isinstance(value, Mapping) and dict(value) == {"type": "text"}):
        return None
    return ResponseFormat.of(value)


def to_stop(value: object) -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (a string is one sequence)."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    if isinstance(items, bytes | Mapping) or not isinstance(items, Iterable):
        raise _fail(f"stop must be a string or a list of strings, got {shown(value)}", "stop")
    stop = tuple(items)
    for item in stop:
        if not isinstance(item, str) or not item:
            raise _fail(f"stop sequences must be non-empty strings, got {shown(item)}", "stop")
    return stop


def to_extra_body(value: object) -> Mapping[str, Any] | None:
    """``extra_body`` as a read-only JSON object (None: nothing extra)."""
    if value is None:
        return None
    return _json_object("extra_body")(value)  # type: ignore[no-any-return]


_top_p = number(
    _field_fail, low=0, high=1, finite=False, optional=True, why="must be a number between 0 and 1"
)
_seed = integer(
    _field_fail,
    low=-(2**63),
    high=2**63 - 1,  # a 64-bit integer, what the APIs take
    optional=True,
    type_why="must be an integer",
    why="must be an integer from -2**63 to 2**63 - 1",
)


def check_options(
    *,
    tools: tuple[Tool, ...],
    tool_choice: object,
    top_p: object,
    seed: object,
) -> tuple[object, object]:
    """
    Raise `RecordValidationError` for a bad ``tool_choice``, ``top_p`` or ``seed``.

    Returns:
        ``top_p`` and ``seed``, numbers of other types (numpy's) as the plain ones.
    """
    if tool_choice is not None:
        names = [tool.name for tool in tools]
        if not isinstance(tool_choice, str) or (
            tool_choice not in _TOOL_CHOICES and tool_choice not in names
        ):
            choices = ", ".join(map(repr, (*_TOOL_CHOICES, *names)))
            hint = (
                " (either API's own object for one of them is read too, without options: "
                "send those with extra_body={'tool_choice': {...}})"
                if isinstance(tool_choice, Mapping)
                else ""
            )
            raise _fail(
                f"tool_choice must be one of {choices}; got {shown(tool_choice)}{hint}",
                "tool_choice",
            )
        if tool_choice != "none" and not tools:
            raise _fail(f"tool_choice={shown(tool_choice)} needs tools", "tool_choice")
    return check(_top_p, "top_p", top_p), check(_seed, "seed", seed)
