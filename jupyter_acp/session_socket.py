"""The session WebSocket ``{base_url}api/acp/sessions/{id}/ws`` (the contract: docs/api.md).

A live session's events, history first (``?since=``), then live through one ``Fanout`` per
session; chat, cancel, permission answers and mode changes in. A suspended session (stored,
its agent not running: session_store.py) gets its model and stored history, then the close
code ``CLOSE_GONE`` with ``SUSPENDED_REASON``: the client resumes it over REST and reconnects.
Like the REST handlers (handlers.py), it only sees the user's own sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from jupyter_server.auth.decorator import ws_authenticated
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.utils import ensure_async
from tornado import web, websocket

from .api_models import ModeChange, PermissionFrame, PromptWithImages, parse, parse_since
from .errors import AcpError, BadRequest, SessionBusy, SessionNotFound
from .handlers_base import AUTH_RESOURCE, AcpMixin, images_of, shorten
from .session import AgentSession, SessionState
from .session_store import StoredSession

#: Statuses of the errors a prompt is refused with before its turn begins (so no session event
#: says why): the socket that sent it gets a socket-only ``error`` frame.
REFUSALS = frozenset({400, 403, 409, 413, 429, 503})
#: Events per frame when a ``?batch=1`` socket replays the history on connect.
REPLAY_BATCH = 500


# -- WebSocket ------------------------------------------------------------------------------------
#: Close code (docs/api.md): the session does not exist for this user — unknown, another user's
#: (the same code and reason: ids leak nothing), or ended (deleted, culled, server stopping) —
#: so reconnecting cannot help. An HTTP 404 before the upgrade would reach a browser as a bare
#: 1006 (no status), indistinguishable from a network drop.
CLOSE_GONE = 4404
#: Close code: the client read too slowly (``max_socket_buffer_bytes``); it reconnects with ``?since=``.
CLOSE_SLOW = 1013
GONE_REASON = "No such session: it ended, was cleaned up after being idle, or never existed"
#: (a close reason is at most 123 bytes: a WebSocket control frame's payload)
STOPPED_REASON = "The session has ended; unless it was deleted, it is listed as suspended and can be resumed"
SUSPENDED_REASON = "The session is suspended; resume it (POST .../resume) to continue"


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
        with contextlib.suppress(SessionNotFound, AcpError):
            found = await self.any_session(session_id)  # (live, else suspended, else live again)
            if isinstance(found, AgentSession):
                self.session = found
            else:  # a suspended session: its stored history, then the close (``open``)
                self.stored_hello = await self.stored_model(found)
                since = 0
                with contextlib.suppress(BadRequest):
                    since = parse_since(self.get_argument("since", None))
                self.stored_events = [p for _, p in await self.manager.store.events(found.id, since)]
                self.stored = found
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
        if session is None and self.stored is not None:
            self._replay_stored()
            return
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

    stored: StoredSession | None = None
    stored_hello: dict[str, Any] = {}
    stored_events: list[str] = []

    def _replay_stored(self) -> None:
        """A suspended session: its model, its stored history, then ``CLOSE_GONE`` saying so
        (the client resumes it with ``POST .../resume`` and connects again)."""
        self.send({"type": "hello", "data": self.stored_hello})
        for payload in self.stored_events:
            self.send_payload(payload)
        self.send({"type": "history:end", "data": {"last_seq": self.stored_hello.get("last_seq", 0)}})
        self.close(CLOSE_GONE, SUSPENDED_REASON)

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
                body = parse(PromptWithImages, {k: v for k, v in data.items() if k != "type"},
                             max_message_bytes=cap)
                if session.state.value == "busy":
                    raise SessionBusy("The agent is still answering the previous message; cancel it or wait")
                ext = self.settings["acp_extension"]
                task = ext.spawn(session.prompt(body.message, images_of(body)))
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
        # errors of the turn itself are session events already; refusals before the turn began
        # (a bad mention or image, busy, the quota or its database) reach this socket only
        if isinstance(error, AcpError) and error.status in REFUSALS:
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
            # a session kept by the store (closed, culled, the server stopping) says "resume
            # me"; one deleted says it has ended
            reason = SUSPENDED_REASON if self.session.kept else STOPPED_REASON
            for socket in list(self.sockets):
                socket.end(reason)

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


