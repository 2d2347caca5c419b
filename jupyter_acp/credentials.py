"""The admin's credentials: given inline or by reference, resolved at session start, never shown.

``c.AgentConfigManager.credentials`` maps an agent to its credential fields. A field's value is
either the value itself or a *reference* to where the server reads it when a session starts::

    c.AgentConfigManager.credentials = {"qwen": {
        "api_key": {"env": "DASHSCOPE_API_KEY"},       # an environment variable of the server
        # "api_key": {"file": "/run/secrets/qwen_key"},  # a file (Docker/Kubernetes secrets)
        "base_url": "https://dashscope.aliyuncs.com/compatible-mode/v1",
    }}

A reference keeps the key out of the configuration (which traitlets logs, the admin may commit,
``--show-config`` prints). Files are read at every session start, so a rotated key is used by
the next session without a restart; a trailing newline is dropped. An unset variable or an
unreadable file refuses the session with an error naming the agent, the field and the reference
(never a value), and is reported as a warning when the server starts.

Inline values are wrapped in ``Secret`` (a ``str`` whose ``repr`` is masked) when the trait is
set, and secret fields are registered with ``logredact`` so that no log line shows them. The
trait's own errors never quote the value they refuse (traitlets' default message does). An
admin may write an inline key as ``Secret("...")`` in ``jupyter_server_config.py``: the
ServerApp then logs it masked even before it loads extensions (see ``logredact``), and this
import installs the log redaction at once.
"""

from __future__ import annotations

import ast
import os
import stat
from collections.abc import Mapping
from typing import Any

from traitlets import Dict, TraitError

from . import logredact
from .errors import AgentUnavailable
from .logredact import ENV_NAME_RE, MASK, REF_KINDS, SECRET_FIELDS, is_reference, register

logredact.install()  # a config file importing ``Secret`` masks every log line from there on

#: Credential fields a user (or admin) may supply; the seed design's ``UserCredentials``.
CREDENTIAL_FIELDS = ("type", "api_key", "base_url", "model", "access_token", "refresh_token")
#: A secret file larger than this is refused (a key is a line; ``/dev/zero`` is a mistake).
MAX_SECRET_FILE_BYTES = 64 * 1024


class Secret(str):
    """A credential value: an ordinary ``str`` to every use (env, headers, JSON), but shown as
    ``<secret>`` by ``repr`` — so a dict of credentials logged with ``%r`` or ``%s`` shows no
    key. (``%s`` of the value itself shows it: ``logredact`` catches that.)"""

    __slots__ = ()

    def __repr__(self) -> str:
        return MASK

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: Any) -> Secret:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (Secret, (str(self),))


def as_secret(field: str, value: str) -> Secret:
    """``value`` wrapped, and registered for redaction when ``field`` holds a secret."""
    if field in SECRET_FIELDS:
        register(value)
    return value if isinstance(value, Secret) else Secret(value)


class CredentialUnavailable(AgentUnavailable):
    """An admin credential given by reference cannot be read (HTTP 422 to the user)."""

    def __init__(self, agent: str, field: str, where: str, why: str) -> None:
        super().__init__(f"Agent {agent!r} cannot start: its credential {field!r} is read from "
                         f"{where}, {why} (see c.AgentConfigManager.credentials)")
        self.agent, self.field = agent, field


def describe_reference(ref: Mapping[str, str]) -> str:
    """``the environment variable NAME`` or ``the file PATH``."""
    kind, target = next(iter(ref.items()))
    return f"the environment variable {target}" if kind == "env" else f"the file {target}"


# -- validation (config time) ----------------------------------------------------------------------
def _check_field(agent: str, field: str, value: Any) -> Any:
    """One field's value, checked: None, an inline ``Secret``, or a reference (a plain dict)."""
    where = f"c.AgentConfigManager.credentials[{agent!r}][{field!r}]"
    if field not in CREDENTIAL_FIELDS:
        raise TraitError(f"{where}: unknown credential field; known: {', '.join(CREDENTIAL_FIELDS)}")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return as_secret(field, value)
    if not isinstance(value, Mapping):
        raise TraitError(f"{where} must be a string or a reference {{'env': NAME}} / "
                         f"{{'file': PATH}}, not a {type(value).__name__} (value not shown)")
    if not is_reference(value):
        raise TraitError(f"{where}: a reference has exactly one key, 'env' or 'file', whose value "
                         f"is a string; got the keys {sorted(map(str, value))}")
    kind, target = next(iter(value.items()))
    # (a refused name or path is not quoted: it may be the key, put in the wrong place)
    if kind == "env" and not ENV_NAME_RE.fullmatch(target):
        raise TraitError(f"{where}: 'env' must name an environment variable ([A-Za-z_][A-Za-z0-9_]*)")
    if kind == "file" and not os.path.isabs(os.path.expanduser(target)):
        raise TraitError(f"{where}: 'file' must be an absolute path")
    assert kind in REF_KINDS
    return {kind: target}


def check_credentials(value: Any) -> dict[str, dict[str, Any]]:
    """The trait's value, checked and with inline values wrapped (errors name agent and field)."""
    if not isinstance(value, Mapping):
        raise TraitError("c.AgentConfigManager.credentials must be a dict of agent names to dicts "
                         f"of credential fields, not a {type(value).__name__} (value not shown)")
    out: dict[str, dict[str, Any]] = {}
    for agent, fields in value.items():
        if not isinstance(fields, Mapping):
            raise TraitError(f"c.AgentConfigManager.credentials[{agent!r}] must be a dict of "
                             f"credential fields, not a {type(fields).__name__} (value not shown)")
        checked = {str(k): _check_field(str(agent), str(k), v) for k, v in fields.items()}
        out[str(agent)] = {k: v for k, v in checked.items() if v is not None}
    return out


class Credentials(Dict):
    """The ``credentials`` trait: checked by ``check_credentials``; its errors never quote the
    value (traitlets' own say ``expected a dict, not the str '<the key>'``)."""

    info_text = "a dict of agent names to dicts of credential fields"

    def validate(self, obj: Any, value: Any) -> Any:
        return check_credentials(value)

    def error(self, obj: Any, value: Any, error: Exception | None = None, info: str | None = None) -> Any:
        raise TraitError(f"The {self.name!r} trait expected {self.info_text}, not a "
                         f"{type(value).__name__} (value not shown)")

    def from_string(self, s: str) -> Any:
        """A command-line value: a Python dict literal (``--AgentConfigManager.credentials=...``)."""
        try:
            value = ast.literal_eval(s)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = None
        if not isinstance(value, dict):
            raise TraitError(f"--AgentConfigManager.{self.name} must be a Python dict literal "
                             "(value not shown)")
        return value

    def from_string_list(self, s_list: list[str]) -> Any:
        """Repeated ``--AgentConfigManager.credentials agent=...`` (traitlets quotes bad items)."""
        try:
            return super().from_string_list(s_list)
        except Exception:
            raise TraitError(f"--AgentConfigManager.{self.name}: each item must have the form "
                             "agent=<dict literal> (value not shown)") from None


# -- resolution (session start) --------------------------------------------------------------------
def _read_secret_file(path: str) -> tuple[str | None, str]:
    """The text of a secret file, or None and why not. Opened non-blocking and checked to be a
    regular file first, so a FIFO cannot hang the server; a symlink is followed (Kubernetes
    mounts secrets as links)."""
    try:
        fd = os.open(os.path.expanduser(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return None, f"which cannot be read ({e.strerror})"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "which is not a regular file"
        data = os.read(fd, MAX_SECRET_FILE_BYTES + 1)
    except OSError as e:
        return None, f"which cannot be read ({e.strerror})"
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE_BYTES:
        return None, f"which is larger than {MAX_SECRET_FILE_BYTES} bytes"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError:
        return None, "which is not UTF-8 text"


def resolve(agent: str, field: str, value: Any) -> Secret:
    """One field's value now: inline as it is; a reference read (raises ``CredentialUnavailable``)."""
    if not is_reference(value):
        return as_secret(field, str(value))
    kind, target = next(iter(value.items()))
    if kind == "env":
        text, why = os.environ.get(target), "which is not set"
    else:
        text, why = _read_secret_file(target)
    if text is None:
        raise CredentialUnavailable(agent, field, describe_reference(value), why)
    text = text.rstrip("\r\n")  # `echo KEY > file` and editors end a file with a newline
    if not text:
        raise CredentialUnavailable(agent, field, describe_reference(value), "which is empty")
    return as_secret(field, text)


def resolve_all(agent: str, fields: Mapping[str, Any]) -> dict[str, str]:
    """Every field of one agent resolved (the first unavailable reference raises)."""
    return {key: resolve(agent, key, value) for key, value in fields.items() if value}


def problems(credentials: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What would refuse a session now (unset variables, unreadable files): for a warning at
    server start. Reading the references also registers their values for redaction."""
    out = []
    for agent, fields in credentials.items():
        for key, value in fields.items():
            if is_reference(value):
                try:
                    resolve(agent, key, value)
                except CredentialUnavailable as e:
                    out.append(str(e))
    return out
