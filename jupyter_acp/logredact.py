"""Keep credentials out of every log line of the server process, whoever writes the line.

The admin's LLM keys live in the server's configuration, and the configuration gets logged:
with ``--debug`` traitlets' ``Application._config_changed`` logs ``"Config changed: %r"`` with
the whole ``Config`` — every section of every class, ``c.AgentConfigManager.credentials``
included — once per application that loads it (the ServerApp and every extension app), and
``catch_config_error`` logs ``"Config at the time: %s"``. Agents echo what they were given on
stderr (logged at debug), an upstream error may quote a URL. Filters on loggers or handlers
cannot catch all of that: each application makes its own logger and handlers, and an admin
may add more (``c.ServerApp.logging_config``). So the redaction sits where every record is
made: ``install()`` wraps ``logging``'s record factory (once per process) and

1. replaces every ``Config`` among a record's arguments by a copy in which credentials are
   masked by *structure*: ``AgentConfigManager.credentials`` (inline values; references to an
   environment variable or a file stay readable), the ``env`` of admin-defined agents, and any
   key named like a secret (``token``, ``password``, ``*_secret``, ``api_key``, ...). This needs
   no knowledge of the values, so it holds whatever the admin wrote, parsable or not;
2. replaces every *known* secret value (``register``: the admin's inline keys, and the values
   read from environment variables and files at session start) wherever it appears in the
   formatted message, the traceback or the stack text of any record.

Where this cannot reach: the ServerApp reads its own config files before it imports any
extension, and traitlets may log that config then — with ``--debug`` when the config holds a
lazy value (``c.X.y.update(...)``), or on a config error; it also quotes both values when a
``.py`` and a ``.json`` file in one directory set the same option. Keys given by reference are
never in the config. Inline keys written as ``Secret("...")`` (``jupyter_acp.credentials``) are
masked by their ``repr`` there too, and importing that module installs the factory from that
moment on; a JSON config can name ``log_filter`` in ``c.ServerApp.logging_config`` instead.
``install`` notes the plain inline keys the ServerApp's config already held when it ran
(``exposed_before_install``), and the extension warns about them at start.

User-supplied credentials are not registered: a user could otherwise blank any word of the
admin's logs by "supplying" it as a key; no code path logs them.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

#: What a secret is replaced by in a log line.
MASK = "<secret>"
#: Values shorter than this are never searched for in free text: a 3-letter "key" would blank
#: every occurrence of those letters in the log. The structural masking still hides them.
MIN_SECRET_CHARS = 8
#: Distinct values remembered (rotated keys pile up; the oldest are dropped first).
MAX_SECRETS = 256
#: Config keys, in any section, whose values are masked wholesale.
SECRET_KEY_RE = re.compile(r"(?i)^(?:.*_)?(?:token|password|passwd|secret|api_?key|credentials?)$")
#: The credential fields whose values are secrets (registered for free-text redaction).
SECRET_FIELDS = ("api_key", "access_token", "refresh_token")
REF_KINDS = ("env", "file")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_lock = threading.Lock()
_secrets: OrderedDict[str, None] = OrderedDict()
_pattern: re.Pattern[str] | None = None
_installed = False
#: Whether the record factory went in before the ServerApp could log its config.
installed_early = False
#: ``agent.field`` of plain (not ``Secret``) inline keys the ServerApp's config held when
#: ``install`` ran late: the ServerApp may have logged them before (see the module docstring).
exposed_before_install: list[str] = []


class _Masked:
    """A stand-in whose repr is the mask (``{'api_key': <secret>}`` in a logged dict)."""

    def __repr__(self) -> str:
        return MASK

    __str__ = __repr__


MASKED = _Masked()


# -- known values ----------------------------------------------------------------------------------
def register(value: Any) -> None:
    """Remember a secret value: from now on it is masked wherever a log line contains it."""
    global _pattern
    if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
        return
    value = str(value)
    with _lock:
        if value in _secrets:
            _secrets.move_to_end(value)
            return
        _secrets[value] = None
        while len(_secrets) > MAX_SECRETS:
            _secrets.popitem(last=False)
        ordered = sorted(_secrets, key=len, reverse=True)  # a key containing another goes first
        _pattern = re.compile("|".join(re.escape(s) for s in ordered))


def redact(text: str) -> str:
    """``text`` with every registered secret replaced by the mask."""
    pattern = _pattern
    return pattern.sub(MASK, text) if pattern is not None and text else text


def _redact_obj(obj: Any) -> Any:
    """A copy of a logged object (an event dict) with secrets masked in its strings."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, Mapping):
        return {k: _redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redact_obj(v) for v in obj]
    return obj


# -- configs ---------------------------------------------------------------------------------------
def is_reference(value: Any) -> bool:
    """Whether a credential value is a reference: ``{"env": NAME}`` or ``{"file": PATH}``."""
    return (isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in REF_KINDS
            and isinstance(next(iter(value.values())), str))


def _showable_reference(value: Any) -> bool:
    """A reference as it should be (a variable name, an absolute path), so shown as it is; a
    malformed one may be the key put in the wrong place."""
    if not is_reference(value):
        return False
    kind, target = next(iter(value.items()))
    return bool(ENV_NAME_RE.fullmatch(target)) if kind == "env" else target.startswith(("/", "~/"))


def _mask_credentials(value: Any) -> Any:
    """``AgentConfigManager.credentials`` as it may be shown: references kept, values masked."""
    if not isinstance(value, Mapping):
        return MASKED  # a command-line string, a lazy value: whatever it holds stays hidden
    out: dict[Any, Any] = {}
    for agent, fields in value.items():
        if isinstance(fields, Mapping):
            out[agent] = {k: dict(v) if _showable_reference(v) else MASKED for k, v in fields.items()}
        else:
            out[agent] = MASKED
    return out


def _mask_agents(value: Any) -> Any:
    """``AgentConfigManager.agents`` with every ``env`` value masked (keys may be put there)."""
    if not isinstance(value, Mapping):
        return MASKED
    out: dict[Any, Any] = {}
    for name, spec in value.items():
        if isinstance(spec, Mapping):
            spec = dict(spec)
            if "env" in spec:
                env = spec["env"]
                spec["env"] = {k: MASKED for k in env} if isinstance(env, Mapping) else MASKED
        out[name] = spec
    return out


def mask_config(obj: Any, section: str = "") -> Any:
    """A copy of a config (or part of one) safe to log (see the module docstring, 1.)."""
    if not isinstance(obj, Mapping):
        return obj
    out: dict[Any, Any] = {}
    for key, value in obj.items():
        if section == "AgentConfigManager" and key == "credentials":
            out[key] = _mask_credentials(value)
        elif section == "AgentConfigManager" and key == "agents":
            out[key] = _mask_agents(value)
        elif isinstance(key, str) and SECRET_KEY_RE.match(key) and value:
            out[key] = MASKED
        elif isinstance(value, Mapping):
            out[key] = mask_config(value, key if isinstance(key, str) else "")
        else:
            out[key] = value
    return out


def harvest_config(obj: Any) -> None:
    """Register the inline secret values of every ``AgentConfigManager.credentials`` in a config
    (at any depth: traitlets allows ``c.Parent.AgentConfigManager``)."""
    if not isinstance(obj, Mapping):
        return
    for key, value in obj.items():
        if key == "AgentConfigManager" and isinstance(value, Mapping):
            creds = value.get("credentials")
            if isinstance(creds, str):  # from the command line, not parsed yet
                register(creds)
                with contextlib.suppress(Exception):
                    creds = ast.literal_eval(creds)
            harvest_credentials(creds)
        if isinstance(value, Mapping):
            harvest_config(value)


def harvest_credentials(creds: Any) -> None:
    """Register the inline secret fields of a ``{agent: {field: value}}`` mapping."""
    if not isinstance(creds, Mapping):
        return
    for fields in creds.values():
        if isinstance(fields, Mapping):
            for name, value in fields.items():
                if name in SECRET_FIELDS:
                    register(value)


# -- the record factory ----------------------------------------------------------------------------
_config_class: type | None = None


def _is_config(obj: Any) -> bool:
    """Whether ``obj`` is a traitlets ``Config`` (imported once, at the first record)."""
    global _config_class
    if _config_class is None:
        from traitlets.config import Config

        _config_class = Config
    return isinstance(obj, _config_class)


def _safe_arg(arg: Any) -> Any:
    if _is_config(arg):
        harvest_config(arg)
        return mask_config(arg)
    return arg


def scrub(record: logging.LogRecord) -> None:
    """Mask credentials in one record, in place (never raises: logging must go on)."""
    try:
        if _is_config(record.args):  # ``log.debug("%r", config)``: logging unwraps a lone mapping
            record.args = _safe_arg(record.args)
        elif isinstance(record.args, tuple) and any(_is_config(a) for a in record.args):
            record.args = tuple(_safe_arg(a) for a in record.args)
        elif isinstance(record.args, Mapping) and any(_is_config(a) for a in record.args.values()):
            record.args = {k: _safe_arg(v) for k, v in record.args.items()}
        if _is_config(record.msg):
            record.msg = _safe_arg(record.msg)
        if _pattern is None:
            return
        if isinstance(record.msg, str) or record.args:
            text = record.getMessage()
            if _pattern.search(text):
                record.msg, record.args = redact(text), None
        elif _pattern.search(str(record.msg)):  # a structured record (an event's dict)
            record.msg = _redact_obj(record.msg)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            if _pattern.search(text):
                record.exc_text = redact(text)  # formatters use exc_text when it is set
        if record.stack_info and _pattern.search(record.stack_info):
            record.stack_info = redact(record.stack_info)
    except Exception:  # a record we cannot read is left as it is
        pass


def install(*, early: bool = False) -> None:
    """Wrap the process's log record factory with ``scrub`` (once; later calls do nothing).

    ``early``: called while the ServerApp reads its config (``log_filter``); otherwise early
    when no ServerApp exists yet (``jupyter acp``, a config file importing ``Secret``, tests)."""
    global _installed, installed_early
    with _lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            scrub(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
        server = _running_server()
        installed_early = early or server is None
    if server is not None:
        with contextlib.suppress(Exception):
            harvest_config(server.config)
            if not installed_early:
                exposed_before_install.extend(_plain_inline_keys(server.config))


def _running_server() -> Any:
    """The ServerApp of this process, if one was made (jupyter_server is not imported for it)."""
    serverapp = sys.modules.get("jupyter_server.serverapp")
    if serverapp is None or not serverapp.ServerApp.initialized():
        return None
    return serverapp.ServerApp.instance()


def _plain_inline_keys(config: Any) -> list[str]:
    """``agent.field`` of every secret field given inline as a plain ``str`` (a ``Secret``'s
    repr is masked); all of them when the credentials are an unparsed command-line string."""
    section = config.get("AgentConfigManager") if isinstance(config, Mapping) else None
    creds = section.get("credentials") if isinstance(section, Mapping) else None
    if creds is None:
        return []
    if not isinstance(creds, Mapping):
        return ["all (a command-line string)"]
    return [f"{agent}.{key}" for agent, fields in creds.items() if isinstance(fields, Mapping)
            for key, value in fields.items()
            if key in SECRET_FIELDS and isinstance(value, str) and type(value).__repr__ is str.__repr__]


class RedactingFilter(logging.Filter):
    """``scrub`` as a filter, for records made before ``install`` (returned by ``log_filter``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub(record)
        return True


def log_filter(**_: Any) -> logging.Filter:
    """A ``dictConfig`` filter factory: naming it in ``c.ServerApp.logging_config``
    (``{"filters": {"jupyter_acp": {"()": "jupyter_acp.logredact.log_filter"}}}``) installs
    the record factory while the ServerApp reads that config, before it can log it."""
    install(early=True)
    return RedactingFilter()


def known_secrets() -> Iterable[str]:
    """The registered values (for tests)."""
    with _lock:
        return list(_secrets)
