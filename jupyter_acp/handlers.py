"""REST and WebSocket handlers of ``{base_url}api/acp/`` (the contract: docs/api.md, openapi.yaml).

Every handler works for the Jupyter identity of the request (``current_user.username``) and only
sees that user's sessions: another user's session id answers 404 exactly like an unknown one, so
ids leak nothing. ``AcpError``s become JSON errors with their status and a message written for
the user; anything else is a logged 500 without details.
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
from .session import AgentSession
from .usage import utc_day

AUTH_RESOURCE = "acp"
#: Events per frame when a ``?batch=1`` socket replays the history on connect.
REPLAY_BATCH = 500
SESSION_ID = r"(?P<session_id>[^/]+)"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def acp_errors(method: F) -> F:
    """Turn ``AcpError`` into an HTTP error with the same status and message."""

    @functools.wraps(method)
    async def wrapper(self: AcpHandler, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except AcpError as e:
            raise web.HTTPError(e.status, e.message, reason=None) from None  # (no args: "%" stays as is)

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
        if isinstance(exc, web.HTTPError) and exc.get_message():
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"message": exc.get_message(), "reason": exc.reason}))
            return
        super().write_error(status_code, **kwargs)

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data, default=str))


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], *, required: bool = False,
           what: str = "") -> Any:
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
        capabilities = _field(data, "capabilities", list)
        if capabilities and not all(isinstance(c, str) for c in capabilities):
            raise BadRequest("capabilities must be a list of strings")
        session = await self.manager.create_user_session(
            self.username, _field(data, "agent", str), cwd=_field(data, "cwd", str),
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
        since = _since(self.get_argument("since", None))
        # the events' JSON is kept as sent: splice it in rather than parse and re-encode it
        self.set_header("Content-Type", "application/json")
        self.finish(f'{{"events": [{",".join(session.payloads(since))}], "last_seq": {session.last_seq}}}')


#: The largest ``since`` accepted: 2**53, the largest integer a JSON client (JavaScript) holds
#: exactly, and far more events than a session ever has.
MAX_SEQ = 2**53


def _since(value: str | None) -> int:
    if value is None or value == "":
        return 0
    try:
        since = int(value)
    except ValueError:
        raise BadRequest("'since' must be an event sequence number (an integer)") from None
    if since < 0:
        raise BadRequest("'since' must not be negative")
    if since > MAX_SEQ:
        raise BadRequest(f"'since' is larger than any event sequence number (at most {MAX_SEQ})")
    return since



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
        await session.set_config_option(config_id, value)
        self.write_json({"config_options": session.config_options})


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
        per_day = ledger.per_day(who)
        cap = ledger.max_tokens_per_user_per_day
        used = ledger.tokens_today(user) if who is not None else 0
        self.write_json({
            "user": who,
            "today": {"day": today, "total_tokens": 0, **_sum([d for d in per_day if d["day"] == today])},
            "quota": {"max_tokens_per_day": cap, "used_today": used,
                      "remaining": max(cap - used, 0) if cap and who is not None else None},
            "total": ledger.user_totals(who) if who is not None else _sum(per_day),
            "per_session": ledger.per_session(who),
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
        try:
            self.session = self.user_session(session_id)
        except SessionNotFound as e:
            raise web.HTTPError(404, e.message) from None
        res = super().get(session_id)
        if res is not None:
            await res

    def open(self, session_id: str) -> None:  # type: ignore[override]
        session = self.session
        assert session is not None
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
        fanout.add(self)
        self._fanout = fanout

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
            self.close(1013, "The client reads too slowly; reconnect with ?since=<last seq>")
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
        try:
            self.user_session(session.id)  # still there (not deleted meanwhile), else 404
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
                self.reply_error(f"Unknown frame type {kind!r}")
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

    def __init__(self, session: AgentSession, on_empty: Callable[[], None]) -> None:
        self.sockets: list[SessionSocket] = []
        self.session = session
        self._on_empty = on_empty
        self._pending: list[str] = []
        self._unsubscribe = session.subscribe(self._event)

    def _event(self, event: dict[str, Any]) -> None:
        self._pending.append(self.session.payload(event["seq"]))  # (serialized by the session)
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
