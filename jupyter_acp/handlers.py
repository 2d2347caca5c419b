"""REST and WebSocket handlers of ``{base_url}api/acp/`` (the contract: docs/api.md, openapi.yaml).

Every handler works for the Jupyter identity of the request (``current_user.username``) and only
sees that user's sessions: another user's session id answers 404 exactly like an unknown one (the
socket: close code 4404, same reason), so ids leak nothing. ``AcpError``s become JSON errors
with their status and a message written for the user; anything else is a logged 500 without
details. Request bodies and client frames are the pydantic models of ``api_models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
from collections.abc import Callable
from typing import Any

from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.extension.handler import ExtensionHandlerMixin
from jupyter_server.utils import ensure_async
from tornado import web, websocket

from .api_models import MAX_CAPABILITIES as MAX_CAPABILITIES
from .api_models import MAX_CREDENTIAL_BYTES as MAX_CREDENTIAL_BYTES
from .api_models import MAX_ID_CHARS as MAX_ID_CHARS
from .api_models import MAX_SEQ as MAX_SEQ
from .api_models import (
    ConfigChange,
    M,
    ModeChange,
    NewSession,
    PermissionAnswer,
    PermissionFrame,
    Prompt,
    check_choice,
    parse,
    parse_since,
)
from .errors import AcpError, BadRequest, SessionBusy, SessionNotFound
from .manager import UserSessionManager
from .session import AgentSession, SessionState
from .usage import utc_day

AUTH_RESOURCE = "acp"
#: Events per frame when a ``?batch=1`` socket replays the history on connect.
REPLAY_BATCH = 500
SESSION_ID = r"(?P<session_id>[^/]+)"
# (the bounds of a request's fields are api_models': the MAX_* imported above, for callers here)

#: The longest error message an answer carries: a longer one (quoting a 4 KiB cwd, an id of the
#: URL) is cut in the middle, keeping its start and its explanation at the end.
MAX_ERROR_CHARS = 1000


def shorten(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` within ``limit`` characters, cut in the middle."""
    if len(message) <= limit:
        return message
    marker = " [...] "
    head = (limit - len(marker)) * 2 // 3
    return message[:head] + marker + message[len(message) - (limit - len(marker) - head):]


def api_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """What every REST method is (``AcpHandler`` applies it to each): refused unless logged in
    (403) and authorized for ``acp``, and its ``AcpError`` an HTTP error of the same status and
    message (logged by tornado as a 4xx/5xx, not as an uncaught exception)."""

    @functools.wraps(method)
    async def wrapper(self: AcpHandler, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except AcpError as e:
            # (no args: "%" stays as is; short: the message may quote the input, and is logged)
            raise web.HTTPError(e.status, shorten(e.message), reason=None) from None

    return web.authenticated(authorized(wrapper))


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
    """Base of the REST handlers: JSON in (``body``: a model of api_models), JSON out; each HTTP
    method a subclass defines is wrapped in ``api_method``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("get", "post", "put", "patch", "delete"):
            if name in vars(cls):
                setattr(cls, name, api_method(vars(cls)[name]))

    def body(self, model: type[M], required: bool = True) -> M:
        """The request's JSON object as ``model`` (a ``BadRequest`` saying what is wrong)."""
        return parse(model, self.json_body(required),
                     max_message_bytes=self.settings.get("acp_max_message_bytes"))

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


# -- REST -----------------------------------------------------------------------------------------
class AgentsHandler(AcpHandler):
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
    async def get(self) -> None:
        sessions = self.manager.get_user_sessions(self.username)
        self.write_json({"sessions": [self.session_model(s) for s in sessions]})

    async def post(self) -> None:
        body = self.body(NewSession, required=False)
        session = await self.manager.create_user_session(
            self.username, body.agent, cwd=body.cwd, credentials=body.credentials, new=body.new,
            capabilities=body.capabilities)
        self.write_json(self.session_model(session), status=201)


class SessionHandler(AcpHandler):
    async def get(self, session_id: str) -> None:
        self.write_json(self.session_model(self.user_session(session_id)))

    async def delete(self, session_id: str) -> None:
        await self.manager.delete_user_session(self.username, session_id)
        self.set_status(204)
        self.finish()


class RestartHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        session = await self.manager.restart_user_session(self.username, session_id)
        self.write_json(self.session_model(session))


class MessagesHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        result = await session.prompt(self.body(Prompt).message)
        self.write_json(result.to_dict())


class CancelHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        cancelled = await self.user_session(session_id).cancel()
        self.write_json({"cancelled": cancelled})


class HistoryHandler(AcpHandler):
    async def get(self, session_id: str) -> None:
        session = self.user_session(session_id)
        since = parse_since(self.get_argument("since", None, strip=False))
        # the events' JSON is kept as sent: splice it in rather than parse and re-encode it
        self.set_header("Content-Type", "application/json")
        self.finish(f'{{"events": [{",".join(session.payloads(since))}], "last_seq": {session.last_seq}}}')


class PermissionHandler(AcpHandler):
    async def post(self, session_id: str, request_id: str) -> None:
        session = self.user_session(session_id)
        session.answer_permission(request_id, self.body(PermissionAnswer, required=False).option_id)
        self.set_status(204)
        self.finish()


class ModeHandler(AcpHandler):
    def mode_model(self, session: AgentSession) -> dict[str, Any]:
        modes = session.modes or {}
        return {"current": modes.get("currentModeId"), "available": modes.get("availableModes", [])}

    async def get(self, session_id: str) -> None:
        self.write_json(self.mode_model(self.user_session(session_id)))

    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        await session.set_mode(self.body(ModeChange).mode_id)
        self.write_json(self.mode_model(session))


class ConfigHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        body = self.body(ConfigChange)
        check_choice(session.config_options, body.config_id, body.value)
        await session.set_config_option(body.config_id, body.value)
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

    async def get(self) -> None:
        ledger = self.manager.ledger
        everyone = self.get_argument("all", "") not in ("", "0", "false")
        user = self.get_argument("user", None) or self.username
        if (everyone or user != self.username) and not self.is_admin():
            raise web.HTTPError(403, "Only an admin may read other users' usage")
        who = None if everyone else user
        if self.manager.hub is not None:  # hub mode: the service's ledger is the record
            self.write_json(await self.manager.hub.usage_summary(who))
            return
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


class SessionSocket(WebSocketMixin, AcpMixin, JupyterHandler, websocket.WebSocketHandler):
    """``sessions/{id}/ws``: a session's events live (history first), and chat/cancel/answers in.

    jupyter_server's ``WebSocketMixin`` pings an open socket every ``ws_ping_interval`` ms (the
    server's setting, 30 s by default) and closes one whose client has not answered (pong) for
    ``ws_ping_timeout`` ms: an idle socket stays open through proxies, a vanished client is dropped.
    """

    session: AgentSession | None = None

    def get_login_url(self) -> str:
        """A socket cannot follow a login redirect: refuse it like the REST API does (403)."""
        raise web.HTTPError(403)

    def get_websocket_protocol(self) -> websocket.WebSocketProtocol | None:
        """Tornado's protocol without pings of its own: the mixin's ``ping_interval`` is in ms,
        which tornado would read as seconds (and log that the timeout exceeds the interval)."""
        protocol = super().get_websocket_protocol()
        if isinstance(protocol, websocket.WebSocketProtocol13):
            protocol.params.ping_interval = protocol.params.ping_timeout = None
        return protocol

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
        super().open(session_id)  # (WebSocketMixin: the keep-alive pings)
        session = self.session
        # (looked up again: the session may have been deleted while the upgrade was answered)
        if session is None or not self._exists(session):
            self.end(GONE_REASON)
            return
        # events are small frames sent one by one: with Nagle's algorithm on (tornado's default)
        # each waits for the client's delayed ACK, ~40 ms per turn (measured by bench/relay.py)
        self.set_nodelay(True)
        try:
            since = parse_since(self.get_argument("since", None))
        except BadRequest:
            since = 0
        self.batch = self.get_argument("batch", "0") in ("1", "true")
        fanout = session.fanout  # (one per session, shared by its sockets; see Fanout)
        if fanout is None:
            fanout = session.fanout = Fanout(session, lambda: setattr(session, "fanout", None))
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
                cap = self.settings.get("acp_max_message_bytes")
                message = parse(Prompt, data, max_message_bytes=cap).message
                if session.state.value == "busy":
                    raise SessionBusy("The agent is still answering the previous message; cancel it or wait")
                ext = self.settings["acp_extension"]
                task = ext.spawn(session.prompt(message))
                task.add_done_callback(self._turn_done)
            elif kind == "cancel":
                await session.cancel()
            elif kind == "permission:answer":
                answer = parse(PermissionFrame, data)
                session.answer_permission(answer.request_id, answer.option_id)
            elif kind == "mode":
                await session.set_mode(parse(ModeChange, data).mode_id)
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
        if self.ping_callback is not None:  # (WebSocketMixin's; it would stop at its next ping)
            self.ping_callback.stop()
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
