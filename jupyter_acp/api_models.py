"""The request bodies of the REST API and the WebSocket's client frames, as pydantic models.

openapi.yaml states the same fields and bounds (tests/test_server.py checks that the models'
JSON schemas agree with it; tests/test_fuzz_bounds.py probes each bound against a server).
``parse`` validates a body and turns pydantic's errors into one ``BadRequest`` whose message is
written for the user (``The field 'agent' is longer than 256 characters``), never pydantic's
own text, nor the input quoted back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictBool,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from .agents import CREDENTIAL_FIELDS
from .errors import AcpError, BadRequest

# The bounds of what a request may carry. openapi.yaml states each one (``maxLength``,
# ``x-maxBytes``, ``maxItems``); tests/test_fuzz_bounds.py checks that the numbers agree and
# probes each bound from both sides against a running server.
#: The longest id or name: a session or permission request id (the server's: 32 and 16 hex
#: digits), an agent, mode, config option or value, permission option or capability (short words
#: of the agent's). Past it a request is refused, so that no error quotes a megabyte back.
MAX_ID_CHARS = 256
#: The largest credential value (a key, a token, a URL): it goes into the agent's environment,
#: where Linux refuses one string over 128 KiB (MAX_ARG_STRLEN) with a failed start.
MAX_CREDENTIAL_BYTES = 16 * 1024
#: The most capabilities a new session may ask for (an agent lists a handful).
MAX_CAPABILITIES = 32
#: The largest ``since`` accepted: 2**53, the largest integer a JSON client (JavaScript) holds
#: exactly, and far more events than a session ever has.
MAX_SEQ = 2**53
#: What no name, path or credential holds: NUL, and lone surrogates (JSON can carry both; they
#: fail where the text meets the OS, a path or the agent's environment, with a 500 or a failed start).
TEXT_PATTERN = "^[^\\x00\\ud800-\\udfff]*$"


@dataclass(frozen=True)
class Text:
    """Metadata of a string field: no NUL (lone surrogates pydantic refuses itself), at most
    ``max_bytes`` bytes of UTF-8 (``x-maxBytes`` in the JSON schema)."""

    max_bytes: int | None = None
    #: whether the JSON schema states the text pattern (not of a dict's keys: pydantic would
    #: turn it into ``patternProperties``)
    pattern: bool = True

    def __get_pydantic_core_schema__(self, source: Any,
                                     handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema,
                                     handler: GetJsonSchemaHandler) -> dict[str, Any]:
        out = handler(schema)
        if self.pattern:
            out["pattern"] = TEXT_PATTERN
        if self.max_bytes is not None:
            out["x-maxBytes"] = self.max_bytes
        return out

    def check(self, value: str) -> str:
        if "\x00" in value:
            raise PydanticCustomError("nul", "NUL")
        if self.max_bytes is not None and len(value.encode("utf-8")) > self.max_bytes:
            raise PydanticCustomError("too_many_bytes", "bytes", {"max_bytes": self.max_bytes})
        return value


#: An id or name (openapi.yaml: ``Id``).
Id = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_ID_CHARS), Text()]
#: An agent's name: empty is the default agent.
AgentName = Annotated[str, StringConstraints(strict=True, max_length=MAX_ID_CHARS), Text()]
#: A working directory: the manager bounds it in bytes (PATH_MAX, NAME_MAX) and says which.
Cwd = Annotated[str, StringConstraints(strict=True), Text()]
CredentialName = Annotated[str, StringConstraints(strict=True, max_length=MAX_ID_CHARS), Text(pattern=False)]
Credential = Annotated[str, StringConstraints(strict=True, max_length=MAX_CREDENTIAL_BYTES),
                       Text(max_bytes=MAX_CREDENTIAL_BYTES)]

Credentials = Annotated[dict[CredentialName, Credential], Field(max_length=len(CREDENTIAL_FIELDS))]


class Body(BaseModel):
    """A JSON object of a request (null fields are absent ones: ``parse`` drops them)."""

    model_config = ConfigDict(strict=True, frozen=True)
    #: what an error names for an item of a list or an object field (else "The field 'name'")
    items: ClassVar[dict[str, str]] = {}
    #: what an error says when an item of a list or an object field has the wrong type
    item_types: ClassVar[dict[str, str]] = {}


class NewSession(Body):
    """``POST sessions``."""

    model_config = ConfigDict(extra="forbid")
    agent: AgentName | None = None
    cwd: Cwd | None = None
    #: (names: the manager knows them, and refuses another)
    credentials: Credentials | None = None
    new: StrictBool = False
    capabilities: Annotated[list[Id], Field(max_length=MAX_CAPABILITIES)] | None = None

    items: ClassVar[dict[str, str]] = {"credentials": "The credential {key!r}",
                                       "capabilities": "A capability"}
    item_types: ClassVar[dict[str, str]] = {"credentials": "credentials must map names to string values",
                                            "capabilities": "capabilities must be a list of strings"}


#: Images one prompt may carry (prompt_content.MAX_IMAGES: the same bound, checked again there).
MAX_IMAGES = 4


class Prompt(Body):
    """``POST sessions/{id}/messages`` and the ``chat:message`` frame: a prompt, not blank, within
    the server's ``max_message_bytes`` (``parse``'s context; larger is a 413)."""

    message: str = Field(json_schema_extra={"type": "string", "minLength": 1, "pattern": "\\S"})

    @field_validator("message", mode="plain")
    @classmethod
    def _prompt(cls, message: Any, info: ValidationInfo) -> str:
        if not isinstance(message, str):  # (any string: a prompt is the agent's to read)
            raise PydanticCustomError("string_type", "string")
        if not message.strip():
            raise PydanticCustomError("blank", "blank")
        cap = (info.context or {}).get("max_message_bytes") or 0
        if cap and len(message.encode("utf-8", "surrogatepass")) > cap:
            raise AcpError(f"The message is larger than {cap} bytes", status=413)  # (not wrapped)
        return message


class ImageIn(Body):
    """An image of a prompt (pasted or dropped in the sidebar): checked in prompt_content.py."""

    mime_type: Annotated[str, StringConstraints(strict=True, max_length=64)]
    #: base64 of at most prompt_content.MAX_IMAGE_BYTES (3 MiB) decoded
    data: Annotated[str, StringConstraints(strict=True, min_length=1, max_length=4 * 1024 * 1024)]


class PromptWithImages(Prompt):
    """A prompt that may carry images (``images``: at most ``MAX_IMAGES``)."""

    images: Annotated[list[ImageIn], Field(max_length=MAX_IMAGES)] | None = None

    items: ClassVar[dict[str, str]] = {"images": "An image"}
    item_types: ClassVar[dict[str, str]] = {"images": "images must be a list of objects"}


class ModelChange(Body):
    """``POST sessions/{id}/model``: one of the session's ``models.available`` values."""

    model: Id


class Resume(Body):
    """``POST sessions/{id}/resume``: the user's own credentials, if the session used some
    (they are never stored)."""

    model_config = ConfigDict(extra="forbid")
    credentials: Credentials | None = None


class PermissionAnswer(Body):
    """``POST sessions/{id}/permissions/{request_id}``: null or absent rejects."""

    option_id: Id | None = None


class PermissionFrame(PermissionAnswer):
    """The ``permission:answer`` frame."""

    request_id: Id


class ModeChange(Body):
    """``POST sessions/{id}/mode`` and the ``mode`` frame."""

    mode_id: Id


class ConfigChange(Body):
    """``POST sessions/{id}/config``."""

    config_id: Id
    value: Id | StrictBool


M = TypeVar("M", bound=Body)
TYPE_NAMES = {"string_type": "a string", "bool_type": "a boolean", "dict_type": "an object",
              "list_type": "a list"}


def parse(model: type[M], data: dict[str, Any], **context: Any) -> M:
    """``data`` as a ``model``, or a ``BadRequest`` with the first problem's message."""
    try:
        return model.model_validate({k: v for k, v in data.items() if v is not None}, context=context)
    except ValidationError as e:
        raise BadRequest(_message(model, e.errors(include_url=False))) from None


def _message(model: type[Body], errors: list[Any]) -> str:
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"Unknown fields: {', '.join(unknown)}"
    field = str(errors[0]["loc"][0])
    mine = [e for e in errors if e["loc"][0] == field]
    if model is Prompt and mine[0]["type"] != "blank":
        return "The field 'message' is required and must be a string"
    if mine[0]["type"] == "missing":
        return f"The field {field!r} is required"
    problems = [e for e in mine if e["type"] not in TYPE_NAMES] or mine
    error = problems[0]
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx") or {}
    what = f"The field {field!r}"
    if field in model.items and len(loc) > 1:  # an item of credentials or capabilities
        if kind in TYPE_NAMES:
            return model.item_types[field]
        what = "A credential name" if loc[-1] == "[key]" else model.items[field].format(key=loc[1])
    elif kind in TYPE_NAMES:
        return f"{what} must be {' or '.join(TYPE_NAMES[e['type']] for e in mine)}"
    if kind == "too_long" and field == "capabilities":
        return f"At most {MAX_CAPABILITIES} capabilities may be asked for"
    return {
        "string_too_long": f"{what} is longer than {ctx.get('max_length')} characters",
        "too_long": f"{what} has more than {ctx.get('max_length')} entries",
        "string_too_short": f"{what} is empty",
        "string_unicode": f"{what} is not valid Unicode text (it holds a lone surrogate)",
        "nul": f"{what} must not contain a NUL character",
        "too_many_bytes": f"{what} is larger than {ctx.get('max_bytes')} bytes",
        "blank": "The message is empty",
    }.get(kind, f"{what} is not valid")


def parse_since(value: str | None) -> int:
    """``?since=``: decimal digits, at most ``MAX_SEQ`` (empty: 0). Not Python's ``int()``,
    which also takes signs, spaces, "1_0" and any script's digits ("٣")."""
    if value is None or value == "":
        return 0
    if value.startswith("-") and value[1:].isascii() and value[1:].isdigit():
        raise BadRequest("'since' must not be negative")
    if not (value.isascii() and value.isdigit()):
        raise BadRequest("'since' must be an event sequence number (an integer)")
    if len(value.lstrip("0")) > len(str(MAX_SEQ)) or int(value) > MAX_SEQ:
        raise BadRequest(f"'since' is larger than any event sequence number (at most {MAX_SEQ})")
    return int(value)


def check_choice(options: list[dict[str, Any]], config_id: str, value: str | bool) -> None:
    """A value of a select option must be one of its choices: the agent would refuse another
    with an "invalid params" error, a 502 for what is the user's mistake. (An unknown
    ``config_id``, or an option of another kind, is left to the session and the agent.)"""
    option = next((o for o in options if o.get("id") == config_id), None)
    if option is None or option.get("type") != "select" or not isinstance(option.get("options"), list):
        return
    choices = []
    for entry in option["options"]:  # (choices, or groups of them)
        group = entry.get("options") if isinstance(entry, dict) else None
        members = group if isinstance(group, list) else [entry]
        choices += [c.get("value") for c in members if isinstance(c, dict)]
    if value not in choices:
        raise BadRequest(f"{value!r} is not a choice of {config_id!r}; choose one of: "
                         f"{', '.join(str(c) for c in choices)}")
