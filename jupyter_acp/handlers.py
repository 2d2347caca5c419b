"""REST and WebSocket handlers of ``{base_url}api/acp/`` (the contract: docs/api.md, openapi.yaml).

Every handler works for the Jupyter identity of the request (``current_user.username``) and only
sees that user's sessions: another user's session id answers 404 exactly like an unknown one (the
socket: close code 4404, same reason), so ids leak nothing. ``AcpError``s become JSON errors
with their status and a message written for the user; anything else is a logged 500 without
details.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import ensure_async
from tornado import web, websocket

from .errors import AcpError, BadRequest, SessionBusy, SessionNotFound
from .manager import UserSessionManager
from .session import AgentSession, SessionState
from .usage import utc_day

AUTH_RESOURCE = "acp"
#: Events per frame when a ``?batch=1`` socket replays the history on connect.
REPLAY_BATCH = 500
SESSION_ID = r"(?P<session_id>[^/]+)"

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
#: The longest error message an answer carries: a longer one (quoting a 4 KiB cwd, an id of the
#: URL) is cut in the middle, keeping its start and its explanation at the end.
MAX_ERROR_CHARS = 1000

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def shorten(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` within ``limit`` characters, cut in the middle."""
    if len(message) <= limit:
        return message
    marker = " [...] "
    head = (limit - len(marker)) * 2 // 3
    return message[:head] + marker + message[len(message) - (limit - len(marker) - head):]


def acp_errors(method: F) -> F:
    """Turn ``AcpError`` into an HTTP error with the same status and message."""

    @functools.wraps(method)
    async def wrapper(self: AcpHandler, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except AcpError as e:
            # (no args: "%" stays as is; short: the message may quote the input, and is logged)
            raise web.HTTPError(e.status, shorten(e.message), reason=None) from None

    return wrapper  # type: ignore[return-value]


class AcpMixin(ExtensionHandlerMixin):
    """What REST and WebSocket handlers share: the manager, the user, session lookup."""

    auth_resource = AUTH_RESOURCE
    settings: dict[str, Any]
    current_user: Any

    @property
    def manager(self) -> UserSessionManager:
        return self.settings["acp_manager"]

    @property
    def username(self) -> str:
        """Who the request acts for: the server's owner, or the Jupyter identity (see
        ``AcpExtension.identity``)."""
        return self.settings.get("acp_owner") or self.current_user.username

    def user_session(self, session_id: str) -> AgentSession:
        return self.manager.get_user_session(self.username, session_id)

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """Path and query arguments as text, bytes that are not UTF-8 replaced (U+FFFD) instead
        of refused: tornado's refusal is an HTTPError raised wherever the argument is read, which
        for a socket's ``?since=`` is after the upgrade (the socket was dropped without a close
        frame). A replaced id is an unknown session (404), a replaced ``since`` not a number (400)."""
        return value.decode("utf-8", errors="replace")

    def session_model(self, session: AgentSession) -> dict[str, Any]:
        model = session.stats()
        root = os.path.realpath(self.manager.workspace_root(session.user))
        rel = os.path.relpath(os.path.realpath(session.sandbox_spec.workspace), root)
        model["cwd"] = "" if rel == "." else rel
        return model


class AcpHandler(AcpMixin, APIHandler):
    """Base of the REST handlers: JSON in, JSON out, size-capped bodies."""

    def json_body(self, required: bool = True) -> dict[str, Any]:
        cap = self.settings.get("acp_max_request_bytes") or 0
        body = self.request.body or b""
        if cap and len(body) > cap:
            raise web.HTTPError(413, f"The request body is larger than {cap} bytes")
        if not body.strip():
            if required:
                raise web.HTTPError(400, "A JSON object is required in the request body")
            return {}
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than the parser goes)
            raise web.HTTPError(400, "The request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "The request body must be a JSON object")
        return data

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """JSON errors like APIHandler's, with the message as written: tornado's ``log_message``
        doubles every "%" of an HTTPError without args (``get_message`` does not)."""
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and (message := exc.get_message()):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"message": shorten(message), "reason": exc.reason}))
            return
        super().write_error(status_code, **kwargs)

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data, default=str))


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], *, required: bool = False,
           what: str = "", max_chars: int | None = MAX_ID_CHARS) -> Any:
    """``data[key]`` if it is of ``kind`` (null is absent); a string is checked by ``_text``
    (``max_chars``: most are ids or names; None leaves the length to the caller)."""
    value = data.get(key)
    if value is None:
        if required:
            raise BadRequest(f"The field {key!r} is required{what}")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        names = names.replace("str", "a string").replace("bool", "a boolean").replace("dict", "an object")
        names = names.replace("list", "a list")
        raise BadRequest(f"The field {key!r} must be {names}")
    if isinstance(value, str):
        _text(value, f"The field {key!r}", max_chars)
    return value


def _text(value: str, what: str, max_chars: int | None = MAX_ID_CHARS, max_bytes: int | None = None) -> str:
    """An id, name, path or credential: valid Unicode without NUL, within its bounds. JSON can
    carry a lone surrogate (``"\\ud800"``) and NUL, which no name has and which fail where the
    text meets the OS (a path, the agent's environment) with a 500 or a failed start."""
    if max_chars is not None and len(value) > max_chars:
        raise BadRequest(f"{what} is longer than {max_chars} characters")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadRequest(f"{what} is not valid Unicode text (it holds a lone surrogate)") from None
    if max_bytes is not None and size > max_bytes:
        raise BadRequest(f"{what} is larger than {max_bytes} bytes")
    if "\x00" in value:
        raise BadRequest(f"{what} must not contain a NUL character")
    return value


def check_message(settings: dict[str, Any], message: Any) -> str:
    """A prompt: a non-empty string within ``max_message_bytes``."""
    if not isinstance(message, str):
        raise BadRequest("The field 'message' is required and must be a string")
    if not message.strip():
        raise BadRequest("The message is empty")
    cap = settings.get("acp_max_message_bytes") or 0
    if cap and len(message.encode("utf-8", "surrogatepass")) > cap:
        raise AcpError(f"The message is larger than {cap} bytes", status=413)
    return message


# -- REST -----------------------------------------------------------------------------------------
class AgentsHandler(AcpHandler):
    @web.authenticated
    @authorized
    @acp_errors
    async def get(self) -> None:
        agents = self.manager.agents
        default = None
        with contextlib.suppress(AcpError):
            default = agents.get_available(None).name
        out = []
        for spec, ok, why in agents.list_agents():
            if ok and not spec.url:
                try:
                    self.manager.backend_for(spec)
                except AcpError as e:
                    ok, why = False, e.message
            out.append({"name": spec.name, "display_name": spec.display_name,
                        "description": spec.description, "demo": spec.demo,
                        "capabilities": list(spec.capabilities), "available": ok,
                        "reason": "" if ok else why, "default": spec.name == default,
                        "source": spec.source})
        self.write_json({"agents": out, "default": default, "backends": self.manager.backends()})


class SessionsHandler(AcpHandler):
    @web.authenticated
    @authorized
    @acp_errors
    async def get(self) -> None:
        sessions = self.manager.get_user_sessions(self.username)
        self.write_json({"sessions": [self.session_model(s) for s in sessions]})

    @web.authenticated
    @authorized
    @acp_errors
    async def post(self) -> None:
        data = self.json_body(required=False)
        unknown = set(data) - {"agent", "cwd", "credentials", "new", "capabilities"}
        if unknown:
            raise BadRequest(f"Unknown fields: {', '.join(sorted(unknown))}")
        credentials = _field(data, "credentials", dict)
        if credentials and not all(isinstance(k, str) and isinstance(v, str) for k, v in credentials.items()):
            raise BadRequest("credentials must map names to string values")
        for name, value in (credentials or {}).items():  # (names: the manager knows them)
            _text(value, f"The credential {_text(name, 'A credential name')!r}", None, MAX_CREDENTIAL_BYTES)
        capabilities = _field(data, "capabilities", list)
        if capabilities and not all(isinstance(c, str) for c in capabilities):
            raise BadRequest("capabilities must be a list of strings")
        if capabilities and len(capabilities) > MAX_CAPABILITIES:
            raise BadRequest(f"At most {MAX_CAPABILITIES} capabilities may be asked for")
        for capability in capabilities or ():
            _text(capability, "A capability")
        session = await self.manager.create_user_session(
            # (cwd: the manager bounds it in bytes, PATH_MAX and NAME_MAX)
            self.username, _field(data, "agent", str), cwd=_field(data, "cwd", str, max_chars=None),
            credentials=credentials, new=bool(_field(data, "new", bool)), capabilities=capabilities)
        self.write_json(self.session_model(session), status=201)


class SessionHandler(AcpHandler):
    @web.authenticated
    @authorized
    @acp_errors
    async def get(self, session_id: str) -> None:
        self.write_json(self.session_model(self.user_session(session_id)))

    @web.authenticated
    @authorized
    @acp_errors
    async def delete(self, session_id: str) -> None:
        await self.manager.delete_user_session(self.username, session_id)
        self.set_status(204)
        self.finish()


class RestartHandler(AcpHandler):
    @web.authenticated
    @authorized
    @acp_errors
    async def post(self, session_id: str) -> None:
        session = await self.manager.restart_user_session(self.username, session_id)
        self.write_json(self.session_model(session))


class MessagesHandler(AcpHandler):
    @web.authenticated
    @authorized
    @acp_errors
    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        message = check_message(self.settings, self.json_body().get("message"))
        result = await session.prompt(message)
        self.write_json(result.to_dict())


class CancelHandler(AcpHandler):
    @web.authenticated
    @authorized
    @acp_errors
    async def post(self, session_id: str) -> None:
        cancelled = await self.user_session(session_id).cancel()
        self.write_json({"cancelled": cancelled})


class HistoryHandler(AcpHandler):
    @web.authenticated
    @authorized
    @acp_errors
    async def get(self, session_id: str) -> None:
        session = self.user_session(session_id)
        since = _since(self.get_argument("since", None, strip=False))
        # the events' JSON is kept as sent: splice it in rather than parse and re-encode it
        self.set_header("Content-Type", "application/json")
        self.finish(f'{{"events": [{",".join(session.payloads(since))}], "last_seq": {session.last_seq}}}')


#: The largest ``since`` accepted: 2**53, the largest integer a JSON client (JavaScript) holds
#: exactly, and far more events than a session ever has.
MAX_SEQ = 2**53


def _since(value: str | None) -> int:
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



class PermissionHandler(AcpHandler):
    @web.authenticated
    @authorized
    @acp_errors
    async def post(self, session_id: str, request_id: str) -> None:
        session = self.user_session(session_id)
        data = self.json_body(required=False)
        session.answer_permission(request_id, _field(data, "option_id", str))
        self.set_status(204)
        self.finish()


class ModeHandler(AcpHandler):
    def mode_model(self, session: AgentSession) -> dict[str, Any]:
        modes = session.modes or {}
        return {"current": modes.get("currentModeId"), "available": modes.get("availableModes", [])}

    @web.authenticated
    @authorized
    @acp_errors
    async def get(self, session_id: str) -> None:
        self.write_json(self.mode_model(self.user_session(session_id)))

    @web.authenticated
    @authorized
    @acp_errors
    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        await session.set_mode(_field(self.json_body(), "mode_id", str, required=True))
        self.write_json(self.mode_model(session))


class ConfigHandler(AcpHandler):
    @web.authenticated
    @authorized
    @acp_errors
    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        data = self.json_body()
        config_id = _field(data, "config_id", str, required=True)
        value = _field(data, "value", (str, bool), required=True)
        _check_choice(session.config_options, config_id, value)
        await session.set_config_option(config_id, value)
        self.write_json({"config_options": session.config_options})


def _check_choice(options: list[dict[str, Any]], config_id: str, value: str | bool) -> None:
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


class UsageHandler(AcpHandler):
    def is_admin(self) -> bool:
        if self.username in self.settings.get("acp_admin_users", set()):
            return True
        hub_user = getattr(self.current_user, "hub_user", None)  # JupyterHub's identity provider
        if not isinstance(hub_user, dict):
            return False
        scopes = set(hub_user.get("scopes") or ())
        return bool(hub_user.get("admin")) or bool(scopes & self.settings.get("acp_admin_scopes", set()))

    @web.authenticated
    @authorized
    @acp_errors
    async def get(self) -> None:
        ledger = self.manager.ledger
        everyone = self.get_argument("all", "") not in ("", "0", "false")
        user = self.get_argument("user", None) or self.username
        if (everyone or user != self.username) and not self.is_admin():
            raise web.HTTPError(403, "Only an admin may read other users' usage")
        who = None if everyone else user
        today = utc_day()
        # each query in the ledger's threads: a slow database delays this answer, not the server
        # (one that cannot be read is a 503, LedgerUnavailable). ``used_today`` and ``total``
        # count the usage waiting in the ledger's spool too; the per-day and per-session rows
        # are the database's.
        per_day = await ledger.aper_day(who)
        cap = ledger.max_tokens_per_user_per_day
        used = await ledger.atokens_today(user) if who is not None else 0
        total = await ledger.auser_totals(who) if who is not None else _sum(per_day)
        per_session = await ledger.aper_session(who)
        self.write_json({
            "user": who,
            "today": {"day": today, "total_tokens": 0, **_sum([d for d in per_day if d["day"] == today])},
            "quota": {"max_tokens_per_day": cap, "used_today": used,
                      "remaining": max(cap - used, 0) if cap and who is not None else None},
            "total": total,
            "per_session": per_session,
            "per_day": per_day,
        })


def _sum(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


# -- WebSocket ------------------------------------------------------------------------------------
#: Close code (docs/api.md): the session does not exist for this user — unknown, another user's
#: (the same code and reason: ids leak nothing), or ended (deleted, culled, server stopping) —
#: so reconnecting cannot help. An HTTP 404 before the upgrade would reach a browser as a bare
#: 1006 (no status), indistinguishable from a network drop.
CLOSE_GONE = 4404
#: Close code: the client read too slowly (``max_socket_buffer_bytes``); it reconnects with ``?since=``.
CLOSE_SLOW = 1013
GONE_REASON = "No such session: it ended, was cleaned up after being idle, or never existed"
STOPPED_REASON = "The session has ended: it was stopped, cleaned up after being idle, or the server stopped"


class SessionSocket(AcpMixin, JupyterHandler, websocket.WebSocketHandler):
    """``sessions/{id}/ws``: a session's events live (history first), and chat/cancel/answers in."""

    session: AgentSession | None = None

    def get_login_url(self) -> str:
        """A socket cannot follow a login redirect: refuse it like the REST API does (403)."""
        raise web.HTTPError(403)

    @ws_authenticated
    async def get(self, session_id: str) -> None:
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "execute", AUTH_RESOURCE))
        if not allowed:
            raise web.HTTPError(403)
        # an unknown (or another user's, or ended) session is not refused here with HTTP 404: a
        # browser only sees "1006, failed" for any refused upgrade, and would reconnect forever.
        # The socket opens and is closed at once with CLOSE_GONE (``open``), which it can tell.
        with contextlib.suppress(SessionNotFound):
            self.session = self.user_session(session_id)
        res = super().get(session_id)
        if res is not None:
            await res

    def end(self, reason: str) -> None:
        """Close with ``CLOSE_GONE``: the session does not exist (any more) for this user, so a
        client must not reconnect. Sent after whatever was queued before (e.g. its last events)."""
        self.close_subscription()
        self.close(CLOSE_GONE, reason)

    def open(self, session_id: str) -> None:
        session = self.session
        # (looked up again: the session may have been deleted while the upgrade was answered)
        if session is None or not self._exists(session):
            self.end(GONE_REASON)
            return
        # events are small frames sent one by one: with Nagle's algorithm on (tornado's default)
        # each waits for the client's delayed ACK, ~40 ms per turn (measured by bench/relay.py)
        self.set_nodelay(True)
        try:
            since = _since(self.get_argument("since", None))
        except BadRequest:
            since = 0
        self.batch = self.get_argument("batch", "0") in ("1", "true")
        fanouts: dict[str, Fanout] = self.settings.setdefault("acp_fanouts", {})
        fanout = fanouts.get(session.id)
        if fanout is None:
            fanout = fanouts[session.id] = Fanout(session, lambda: fanouts.pop(session.id, None))
        # events emitted but not yet sent are in the history already: send them to the other
        # sockets now, so that this one gets them once (by the replay below), not twice
        fanout.flush()
        # one synchronous block: no event can slip between the replay and the subscription
        self.send({"type": "hello", "data": self.session_model(session)})
        replay = session.payloads(since)
        if self.batch:
            for start in range(0, len(replay), REPLAY_BATCH):
                self.send_payload(_array(replay[start:start + REPLAY_BATCH]))
        else:
            for payload in replay:
                self.send_payload(payload)
        self.send({"type": "history:end", "data": {"last_seq": session.last_seq}})
        if session.state is SessionState.STOPPED:  # (its history ends with that: nothing follows)
            self.end(STOPPED_REASON)
            return
        fanout.add(self)
        self._fanout = fanout

    def _exists(self, session: AgentSession) -> bool:
        """Whether the manager still has ``session`` for this user (a deleted or culled one is
        removed from it before it is stopped)."""
        try:
            return self.user_session(session.id) is session
        except SessionNotFound:
            return False

    _buffered = 0
    _fanout: Fanout | None = None
    batch = False

    def send(self, message: dict[str, Any]) -> None:
        """Send a frame of this socket only (hello, a refusal, pong), after the session's
        events emitted before it: a client sees everything in the order it happened."""
        if self._fanout is not None:
            self._fanout.flush()
        self.send_payload(json.dumps(message, default=str))

    def send_payload(self, payload: str) -> None:
        """Queue one frame. A client that reads slower than the agent writes would make the
        server buffer without bound: past ``max_socket_buffer_bytes`` it is disconnected (1013)
        and resumes with ``?since=`` — nothing is lost, the history holds every event."""
        if self.ws_connection is None or self.ws_connection.is_closing():
            self.close_subscription()
            return
        cap = self.settings.get("acp_max_socket_buffer_bytes") or 0
        if cap and self._buffered > cap:
            self.close_subscription()
            self.close(CLOSE_SLOW, "The client reads too slowly; reconnect with ?since=<last seq>")
            return
        try:
            future = self.write_message(payload)
        except websocket.WebSocketClosedError:
            self.close_subscription()
            return
        size = len(payload)
        self._buffered += size
        future.add_done_callback(lambda _: self._flushed(size))

    def _flushed(self, size: int) -> None:
        self._buffered -= size

    def reply_error(self, message: str, status: int = 400) -> None:
        self.send({"type": "error", "data": {"message": message, "status": status}})

    async def on_message(self, raw: str | bytes) -> None:
        session = self.session
        assert session is not None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than the parser goes)
            return self.reply_error("The frame is not valid JSON")
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            return self.reply_error("A frame must be a JSON object with a string 'type'")
        kind = data["type"]
        if not self._exists(session):  # deleted, its stop still under way: say it once, and go
            return self.end(STOPPED_REASON)
        try:
            if kind == "ping":
                self.send({"type": "pong"})
            elif kind == "chat:message":
                message = check_message(self.settings, data.get("message"))
                if session.state.value == "busy":
                    raise SessionBusy("The agent is still answering the previous message; cancel it or wait")
                ext = self.settings["acp_extension"]
                task = ext.spawn(session.prompt(message))
                task.add_done_callback(self._turn_done)
            elif kind == "cancel":
                await session.cancel()
            elif kind == "permission:answer":
                request_id = _field(data, "request_id", str, required=True)
                session.answer_permission(request_id, _field(data, "option_id", str))
            elif kind == "mode":
                await session.set_mode(_field(data, "mode_id", str, required=True))
            else:
                self.reply_error(f"Unknown frame type {shorten(kind, 80)!r}")
        except AcpError as e:
            self.reply_error(e.message, e.status)

    def _turn_done(self, task: Any) -> None:
        if task.cancelled():
            return
        error = task.exception()
        # errors of the turn itself are session events already; refusals reach this socket only
        if isinstance(error, AcpError) and error.status in (400, 409, 413, 429):
            self.reply_error(error.message, error.status)

    def close_subscription(self) -> None:
        fanout, self._fanout = self._fanout, None
        if fanout is not None:
            fanout.remove(self)

    def on_close(self) -> None:
        self.close_subscription()


class Fanout:
    """One subscription per session, shared by all its sockets: each event is serialized once,
    whatever the number of sockets (several tabs, the sidebar and a ChatPanel).

    Events are sent at the end of the event-loop step that emitted them (``call_soon``), so a
    burst (an agent writes many chunks at once, they arrive in one read) goes out together:
    a socket opened with ``?batch=1`` gets it as one frame, a JSON array of the events, instead
    of one frame each. Per frame, tornado and the kernel cost ~70 µs of the server's CPU
    (a write future, a task, a ``send``): that, not the JSON, bounds the events/s a session
    can stream (bench/fanout.py). A lone event is still a plain object frame.
    """

    def __init__(self, session: AgentSession, on_empty: Callable[[], object]) -> None:
        self.sockets: list[SessionSocket] = []
        self.session = session
        self._on_empty = on_empty
        self._pending: list[str] = []
        #: the session emitted its final ``stopped`` state: after sending it, close the sockets
        self._ended = False
        self._unsubscribe = session.subscribe(self._event)

    def _event(self, event: dict[str, Any]) -> None:
        self._pending.append(self.session.payload(event["seq"]))  # (serialized by the session)
        if event["type"] == "state" and (event.get("data") or {}).get("state") == SessionState.STOPPED.value:
            # the manager has removed the session (delete, cull, shutdown): no client can use
            # anything after this (at most the end of a turn whose usage was being recorded)
            self._ended = True
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send the pending events to every socket (a no-op when none are pending)."""
        payloads, self._pending = self._pending, []
        if not payloads:
            return
        batched = _array(payloads) if len(payloads) > 1 else None
        for socket in list(self.sockets):
            if socket.batch and batched is not None:
                socket.send_payload(batched)
                continue
            for payload in payloads:
                socket.send_payload(payload)
        if self._ended:  # (the close frame goes after the events just queued, ``stopped`` last)
            for socket in list(self.sockets):
                socket.end(STOPPED_REASON)

    def add(self, socket: SessionSocket) -> None:
        self.sockets.append(socket)

    def remove(self, socket: SessionSocket) -> None:
        with contextlib.suppress(ValueError):
            self.sockets.remove(socket)
        if not self.sockets:
            self._pending = []  # (in the history: a socket that comes back replays them)
            self._unsubscribe()
            self._on_empty()


def _array(payloads: list[str]) -> str:
    """A JSON array of JSON texts, without parsing them."""
    return f"[{','.join(payloads)}]"


def handlers() -> list[tuple[str, type]]:
    """The routes, relative to ``{base_url}api/acp``."""
    return [
        ("agents", AgentsHandler),
        ("sessions", SessionsHandler),
        (f"sessions/{SESSION_ID}", SessionHandler),
        (f"sessions/{SESSION_ID}/restart", RestartHandler),
        (f"sessions/{SESSION_ID}/messages", MessagesHandler),
        (f"sessions/{SESSION_ID}/cancel", CancelHandler),
        (f"sessions/{SESSION_ID}/history", HistoryHandler),
        (f"sessions/{SESSION_ID}/permissions/(?P<request_id>[^/]+)", PermissionHandler),
        (f"sessions/{SESSION_ID}/mode", ModeHandler),
        (f"sessions/{SESSION_ID}/config", ConfigHandler),
        (f"sessions/{SESSION_ID}/ws", SessionSocket),
        ("usage", UsageHandler),
    ]
