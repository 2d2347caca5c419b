"""One agent session: one sandboxed agent process, one ACP connection, one event stream.

State machine::

    starting ──> ready <──> busy
        │          │          │
        └──────────┴──────────┴──> error (reason kept; ``restart`` goes back to starting)
                   └─────────────> stopped (final)

Everything that happens is an *event* with a sequence number (``history.EventHistory``: a
bounded history of each event's wire JSON, fanned out to subscribers; what the agent sends is
cut to ``max_event_bytes`` there), and a turn's reply text is cut to ``max_turn_text_bytes``.

Prompt turns are not cut by a fixed timeout: they stream until the agent ends them, the user
cancels, or the agent dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from acp import PROTOCOL_VERSION, connect_to_agent, schema, text_block
from acp.exceptions import RequestError

from .agents import AgentSpec
from .client import AcpClient
from .errors import (
    AgentError,
    AuthenticationRequired,
    BadRequest,
    ModeNotAllowed,
    SessionBusy,
    SessionNotReady,
)
from .history import EventHistory, Subscriber, public_event, wire_json
from .limits import AgentInputLimits
from .linefilter import filtered_reader
from .permissions import PendingPermission, PermissionDesk
from .sandbox.base import Sandbox, SandboxSpec
from .shrink import TextBudget
from .usage import TurnUsage, UsageLedger, UsageNormalizer

log = logging.getLogger("jupyter_acp.session")

__all__ = ["AgentSession", "SessionOptions", "SessionState", "TurnResult", "public_event", "wire_json"]


class SessionState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPED = "stopped"
    ERROR = "error"


@dataclass
class TurnResult:
    """What one prompt turn produced."""

    text: str
    stop_reason: str
    usage: TurnUsage
    turn: int
    duration: float

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "stop_reason": self.stop_reason, "usage": self.usage.to_dict(),
                "turn": self.turn, "duration": round(self.duration, 6)}


@dataclass
class SessionOptions:
    """Per-session settings decided by the manager (from the admin's config)."""

    permission_policy: str = "ask"
    """``ask`` the user, or ``allow`` / ``deny`` every request without asking."""
    permission_timeout: float = 300.0
    init_timeout: float = 60.0
    max_history: int = 10_000
    limits: AgentInputLimits = field(default_factory=AgentInputLimits)
    """What the agent may make the server hold or do (bytes, files, terminals)."""
    allowed_modes: list[str] | None = None
    """The admin's list of modes this agent may be in; None: those within the policy's level."""
    client_info: dict[str, str] = field(default_factory=lambda: {"name": "jupyter-acp", "version": "0.1.0"})


#: Bytes an event adds around an agent's update (seq, type, time): updates are cut this much
#: below ``max_event_bytes`` as they come in (linefilter.py), so that their event fits.
EVENT_MARGIN = 4096

def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


class AgentSession:
    """A live agent for one user. Created and owned by ``UserSessionManager``."""

    def __init__(
        self,
        *,
        user: str,
        spec: AgentSpec,
        sandbox_factory: Callable[[], Sandbox],
        sandbox_spec: SandboxSpec,
        ledger: UsageLedger,
        options: SessionOptions | None = None,
        on_activity: Callable[[], None] | None = None,
        on_audit: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex
        self.user = user
        self.spec = spec
        self.sandbox_spec = sandbox_spec
        self._sandbox_factory = sandbox_factory
        self.ledger = ledger
        self.options = options or SessionOptions()
        self._on_activity = on_activity
        self._on_audit = on_audit
        self.state = SessionState.STARTING
        self.error: str | None = None
        self.created = time.time()
        self.last_activity = self.created
        self.turns = 0
        self.acp_session_id: str | None = None
        self.agent_info: dict[str, Any] = {}
        self.agent_capabilities: dict[str, Any] = {}
        #: the agent's modes as clients see them: only the allowed ones in ``availableModes``,
        #: the others in ``forbiddenModes`` (``_agent_modes``: as the agent reported them)
        self.modes: dict[str, Any] | None = None
        self._agent_modes: dict[str, Any] | None = None
        #: the mode the admin's policy puts the agent in (None: the agent has no known modes)
        self.policy_mode: str | None = None
        self._mode_guard: asyncio.Task[None] | None = None
        self._mode_reverts = 0
        self._stop_reason: str | None = None
        self.config_options: list[dict[str, Any]] = []
        self.sandbox: Sandbox | None = None
        self.client: AcpClient | None = None
        self.conn: Any = None
        self.usage = UsageNormalizer()
        #: True when the LLM gateway meters this session: it records every LLM request in the
        #: ledger itself, so the agent's own usage reports are shown but never recorded.
        self.metered_by_gateway = False
        self._gateway_turn = TurnUsage(source="gateway")
        limits = self.options.limits
        self.history = EventHistory(max_events=self.options.max_history, max_bytes=limits.max_history_bytes,
                                    max_event_bytes=limits.max_event_bytes, label=self.id)
        self.permissions = PermissionDesk(
            policy=self.options.permission_policy, timeout=self.options.permission_timeout,
            max_pending=limits.max_pending_permissions, emit=self._emit, audit=self._audit, label=self.id)
        self._watcher: asyncio.Task[None] | None = None
        self._filter: asyncio.Task[None] | None = None
        self._turn_text = TextBudget(self.options.limits.max_turn_text_bytes)
        self._turn_task: asyncio.Task[Any] | None = None
        self._replaying = False
        self._lock = asyncio.Lock()

    # -- events (history.py) ------------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        """The sequence number of the latest event (0 before the first)."""
        return self.history.seq

    def payloads(self, since: int = 0) -> list[str]:
        return self.history.payloads(since)

    def payload(self, seq: int) -> str:
        return self.history.payload(seq)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        return self.history.events(since)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        return self.history.subscribe(callback)

    def _emit(self, type_: str, data: dict[str, Any]) -> dict[str, Any]:
        return self.history.emit(type_, data)

    def _set_state(self, state: SessionState, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self._emit("state", {"state": state.value, "error": error})

    def touch(self) -> None:
        self.last_activity = time.time()
        if self._on_activity is not None:
            self._on_activity()

    def _audit(self, name: str, **data: Any) -> None:
        if self._on_audit is not None:
            self._on_audit(name, {"user": self.user, "session_id": self.id, "agent": self.spec.name, **data})

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self, *, load: bool = False) -> None:
        """Start the sandbox, connect, ``initialize`` and open (or load) the ACP session."""
        self.state, self.error = SessionState.STARTING, None
        self._stop_reason = None
        self._emit("state", {"state": "starting", "error": None})
        try:
            await self._start(load)
        except Exception as e:
            reason = self._explain(e)
            await self._teardown()
            self._set_state(SessionState.ERROR, reason)
            if isinstance(e, AgentError | BadRequest):
                raise
            raise AgentError(reason) from e
        self._set_state(SessionState.READY)
        self._audit("started", sandbox=self.sandbox.kind if self.sandbox else None)

    async def _start(self, load: bool) -> None:
        self.sandbox = self._sandbox_factory()
        await self.sandbox.start()
        self.client = AcpClient(self, self.sandbox, self.options.limits)
        if self.sandbox.transport is not None:  # a remote agent over a WebSocket
            self.conn = connect_to_agent(self.client, self.sandbox.transport)
        else:
            assert self.sandbox.stdin is not None and self.sandbox.stdout is not None
            limits = self.options.limits
            reader, self._filter = filtered_reader(
                self.sandbox.stdout, limit=limits.max_message_bytes, on_drop=self._on_dropped_line,
                label=self.id, update_limit=max(limits.max_event_bytes - EVENT_MARGIN, 1024))
            self.conn = connect_to_agent(self.client, self.sandbox.stdin, reader)
        self._watcher = asyncio.create_task(self._watch(self.sandbox), name=f"acp-watch-{self.id}")
        init = await self._bounded(
            self.conn.initialize(
                protocol_version=PROTOCOL_VERSION,
                client_capabilities=schema.ClientCapabilities(
                    fs=schema.FileSystemCapabilities(read_text_file=True, write_text_file=True),
                    terminal=self.sandbox.provides_terminals,
                ),
                client_info=schema.Implementation(**self.options.client_info),
            ),
            "initialize",
        )
        self.agent_info = _dump(init.agent_info) if init.agent_info else {}
        self.agent_capabilities = _dump(init.agent_capabilities) if init.agent_capabilities else {}
        cwd = self.sandbox.workspace_path
        if load and self.acp_session_id and self.agent_capabilities.get("loadSession"):
            self._replaying = True
            try:
                resp = await self._bounded(
                    self.conn.load_session(cwd=cwd, session_id=self.acp_session_id, mcp_servers=[]),
                    "session/load",
                )
                self._set_modes(getattr(resp, "modes", None), getattr(resp, "config_options", None))
                await self._apply_mode_policy(new=False)
                return
            except AgentError as e:
                log.warning("session/load failed for %s (%s); opening a new ACP session", self.id, e)
            finally:
                self._replaying = False
        resp = await self._bounded(self.conn.new_session(cwd=cwd, mcp_servers=[]), "session/new")
        self.acp_session_id = resp.session_id
        self._set_modes(resp.modes, getattr(resp, "config_options", None))
        await self._apply_mode_policy(new=True)

    async def _bounded(self, aw: Any, what: str) -> Any:
        """Await an ACP request with the init timeout, racing the agent's death."""
        timeout = self.options.init_timeout
        task = asyncio.ensure_future(aw)
        watcher = self._watcher
        waiters = {task} | ({watcher} if watcher is not None else set())
        done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            try:
                return task.result()
            except RequestError as e:
                raise self._request_error(e, what) from e
            except ConnectionError:
                pass  # the agent went away: explained below
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if not done:
            raise AgentError(f"The agent did not answer {what} within {timeout:g} s")
        raise AgentError(f"The agent stopped during {what}: {await self._death_reason()}")

    def _request_error(self, e: RequestError, what: str) -> AgentError:
        if e.code == -32000:
            env = self.spec.credential_env
            action = {"session/new": "start a session", "session/load": "resume the session",
                      "initialize": "start"}.get(what, what)
            extra = [k for k in ("base_url", "model") if k in env]
            also = f" (and {', '.join(map(repr, extra))} for another endpoint)" if extra else ""
            fields = "'api_key'" + also
            reads = ", ".join(env[k] for k in ("api_key", *extra) if k in env)
            return AuthenticationRequired(
                f"{self.spec.display_name} needs an API key to {action}: pass {fields} in the "
                f"credentials when you start the session, or ask your admin to set "
                f"c.AgentConfigManager.credentials[{self.spec.name!r}]"
                + (f" (the agent reads {reads})" if reads else "")
            )
        detail = e.data.get("details") if isinstance(e.data, dict) else None
        return AgentError(f"The agent refused {what}: {e}" + (f" ({detail})" if detail else ""))

    async def _death_reason(self) -> str:
        if self._watcher is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._watcher), 2.0)
        if self.sandbox is None:
            return self._stop_reason or "the agent is gone"
        status = await self.sandbox.poll()
        if status is None:  # the process lives but the connection broke: it cannot be trusted
            await self.sandbox.stop()
            return "the connection to the agent broke (it closed its output or broke the protocol)"
        return self.sandbox.exit_reason(status)

    def _explain(self, e: BaseException) -> str:
        if isinstance(e, AgentError | BadRequest):
            return str(e)
        return f"Could not start {self.spec.display_name}: {e}"

    async def _watch(self, sandbox: Sandbox) -> None:
        """Turn the agent's death into the ``error`` state (unless we stopped it)."""
        status = await sandbox.wait()
        if self.sandbox is sandbox and self.state in (SessionState.READY, SessionState.BUSY,
                                                      SessionState.STARTING):
            reason = sandbox.exit_reason(status)
            log.warning("Agent of session %s (user %s) died: %s", self.id, self.user, reason)
            self._cancel_pending_permissions()
            if self.state is not SessionState.STARTING:
                self._set_state(SessionState.ERROR, reason)

    def _on_dropped_line(self, what: str, size: int) -> None:
        self._emit("error", {"message": f"The agent sent {what}; it was dropped (protocol error)"})

    def _set_modes(self, modes: Any, config_options: Any = None) -> None:
        self._agent_modes = _dump(modes) if modes is not None else None
        self._publish_modes()
        self.config_options = [_dump(o) for o in config_options or []]

    # -- modes: the admin's permission policy decides which ones the agent may be in ----------
    def _available_mode_ids(self) -> list[str]:
        return [m.get("id") for m in (self._agent_modes or {}).get("availableModes", [])
                if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def mode_allowed(self, mode_id: str | None) -> bool:
        """Whether the admin lets this session be in ``mode_id`` (the policy's mode always)."""
        if mode_id is None:
            return False
        if mode_id == self.policy_mode:
            return True
        if self.options.allowed_modes is not None:
            return mode_id in self.options.allowed_modes
        return self.spec.mode_permitted(mode_id, self.options.permission_policy)

    def _publish_modes(self) -> None:
        """``modes`` for clients: the agent's, with the forbidden ones moved out of the list."""
        raw = self._agent_modes
        if raw is None:
            self.modes = None
            return
        listed = [m for m in raw.get("availableModes", []) if isinstance(m, dict)]
        self.modes = {**raw, "availableModes": [m for m in listed if self.mode_allowed(m.get("id"))],
                      "forbiddenModes": [m for m in listed if not self.mode_allowed(m.get("id"))]}

    def _record_mode(self, mode_id: str) -> None:
        if self._agent_modes is not None:
            self._agent_modes["currentModeId"] = mode_id
            self._publish_modes()

    async def _apply_mode_policy(self, *, new: bool) -> None:
        """Put a starting agent in the policy's mode (or, resuming, in an allowed one).

        The launch already asked for that mode (``AgentSpec.for_policy``); this checks what the
        agent reports and fixes it with ``session/set_mode``. An agent that cannot be put in an
        allowed mode is not started: running it would break the admin's promise silently."""
        if self._agent_modes is None:  # an agent without modes: the policy applies per request
            return
        policy = self.options.permission_policy
        available = self._available_mode_ids()
        self.policy_mode = self.spec.policy_mode(policy, available)
        current = self._agent_modes.get("currentModeId")
        if self.policy_mode is None:
            if self.options.allowed_modes is None or current not in self.options.allowed_modes:
                raise AgentError(
                    f"{self.spec.display_name} offers no mode known to match the permission policy "
                    f"{policy!r} (its modes: {', '.join(map(str, available)) or 'none'}); an admin "
                    f"can declare them with mode_levels in c.AgentConfigManager.agents or list "
                    f"them in c.UserSessionManager.allowed_modes")
            self.policy_mode = current
        target = self.policy_mode if new else (current if self.mode_allowed(current) else self.policy_mode)
        self._publish_modes()
        if current != target:
            log.info("Session %s: %s started in mode %r; switching it to %r (permission policy %r)",
                     self.id, self.spec.name, current, target, policy)
            try:
                await self._bounded(self.conn.set_session_mode(session_id=self.acp_session_id,
                                                               mode_id=target), "session/set_mode")
            except AgentError as e:
                raise AgentError(f"{self.spec.display_name} started in the mode {current!r} and "
                                 f"could not be put in {target!r}, which the permission policy "
                                 f"{policy!r} requires: {e}") from e
            self._record_mode(target)

    async def stop(self, reason: str = "stopped by the user") -> None:
        """Stop the agent and remove the sandbox; the workspace stays. Final."""
        if self.state is SessionState.STOPPED:
            return
        self._cancel_pending_permissions()
        if self._turn_task is not None:
            self._turn_task.cancel()
        await self._stop_mode_guard()
        await self._teardown()
        self._set_state(SessionState.STOPPED)
        self._audit("stopped", reason=reason)

    async def _teardown(self) -> None:
        sandbox, self.sandbox = self.sandbox, None
        if self.client is not None:
            await self.client.close()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
            self.conn = None
        if self._filter is not None:
            self._filter.cancel()
            self._filter = None
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher
            self._watcher = None
        if sandbox is not None:
            try:
                await sandbox.stop()
            finally:
                await sandbox.remove()

    async def restart(self) -> None:
        """Start a fresh agent process; continue the conversation through session/load if possible."""
        if self.state is SessionState.STOPPED:
            raise SessionNotReady("This session was stopped; start a new one")
        if self.state is SessionState.BUSY:
            raise SessionBusy("A prompt turn is running; cancel it before restarting")
        async with self._lock:
            self._cancel_pending_permissions()
            await self._stop_mode_guard()
            await self._teardown()
            await self.start(load=True)

    # -- prompt turns --------------------------------------------------------------------------
    async def prompt(self, text: str) -> TurnResult:
        """Run one prompt turn to its end; events stream to subscribers meanwhile."""
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("The message is empty")
        if self.state is SessionState.BUSY:
            raise SessionBusy("The agent is still answering the previous message; cancel it or wait")
        if self.state is not SessionState.READY:
            why = f": {self.error}" if self.error else ""
            raise SessionNotReady(f"The session is {self.state.value}{why}")
        self.ledger.check_quota(self.user)
        self._set_state(SessionState.BUSY)
        self.turns += 1
        turn, started = self.turns, time.time()
        self._turn_text = TextBudget(self.options.limits.max_turn_text_bytes)
        self.usage.begin_turn()
        self.touch()
        self._emit("user_message", {"text": text, "turn": turn})
        self._turn_task = asyncio.ensure_future(
            self.conn.prompt(session_id=self.acp_session_id, prompt=[text_block(text)])
        )
        watcher = self._watcher
        turn_task = self._turn_task
        response = None
        try:
            done, _ = await asyncio.wait({turn_task} | ({watcher} if watcher else set()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if turn_task.cancelled():  # stop() ended the turn
                self._finish_turn(turn, started, None)
                raise SessionNotReady("The session was stopped during the turn")
            if turn_task in done:
                response = turn_task.result()
        except asyncio.CancelledError:
            # our caller went away (e.g. a closed HTTP request): end the turn at the agent too,
            # so the session does not stay busy with nobody listening
            if self.state is SessionState.BUSY and self.conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.conn.cancel(session_id=self.acp_session_id))
                self._finish_turn(turn, started, None)
                self._set_state(SessionState.READY)
            raise
        except RequestError as e:
            self._finish_turn(turn, started, None)
            self._set_state(SessionState.READY)
            err = self._request_error(e, "the prompt")
            self._emit("error", {"message": str(err), "turn": turn})
            raise err from e
        except ConnectionError:
            response = None
        finally:
            self._turn_task = None
            if not turn_task.done():  # the agent died first, or we were cancelled: nobody awaits it
                turn_task.cancel()
                turn_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if response is None:  # the agent died mid-turn
            reason = await self._death_reason()
            self._finish_turn(turn, started, None)
            if self.state is not SessionState.STOPPED:
                self._set_state(SessionState.ERROR, reason)
            self._emit("error", {"message": f"The agent stopped during the turn: {reason}", "turn": turn})
            raise AgentError(f"The agent stopped during the turn: {reason}")
        result = self._finish_turn(turn, started, response)
        self._set_state(SessionState.READY)
        return result

    def add_gateway_usage(self, usage: TurnUsage) -> None:
        """Add one gateway-metered LLM request to the running turn's total (already in the ledger)."""
        acc = self._gateway_turn
        for key in ("input_tokens", "output_tokens", "thought_tokens", "cached_read_tokens",
                    "cached_write_tokens", "total_tokens"):
            setattr(acc, key, getattr(acc, key) + getattr(usage, key))
        acc.model = usage.model or acc.model

    def _finish_turn(self, turn: int, started: float, response: Any) -> TurnResult:
        usage = self.usage.end_turn(response)
        ended = time.time()
        if self.metered_by_gateway:
            usage, self._gateway_turn = self._gateway_turn, TurnUsage(source="gateway")
        elif usage.source != "none" or usage.cost:
            self.ledger.record(user=self.user, session_id=self.id, agent=self.spec.name, turn=turn,
                               usage=usage, started_at=started, ended_at=ended)
        stop_reason = str(response.stop_reason) if response is not None else "error"
        result = TurnResult(self._turn_text.text(), stop_reason, usage, turn, ended - started)
        self._turn_text = TextBudget(self.options.limits.max_turn_text_bytes)  # (not kept idle)
        self._emit("turn_end", result.to_dict())
        self.touch()
        return result

    async def cancel(self) -> bool:
        """Ask the agent to stop the running turn (ACP ``session/cancel``). False if idle."""
        if self.state is not SessionState.BUSY or self.conn is None:
            return False
        self._cancel_pending_permissions()
        await self.conn.cancel(session_id=self.acp_session_id)
        self._emit("cancel_requested", {})
        return True

    async def set_mode(self, mode_id: str) -> None:
        """The user's mode change (ACP ``session/set_mode``), within what the admin allows."""
        if self.state not in (SessionState.READY, SessionState.BUSY):
            raise SessionNotReady(f"The session is {self.state.value}")
        allowed = [m["id"] for m in (self.modes or {}).get("availableModes", [])]
        if mode_id not in self._available_mode_ids():
            raise BadRequest(f"Unknown mode {mode_id!r}; available: {', '.join(allowed) or 'none'}")
        if not self.mode_allowed(mode_id):
            raise ModeNotAllowed(
                f"Your admin does not allow the mode {mode_id!r} of {self.spec.display_name} "
                f"(permission policy {self.options.permission_policy!r}); allowed: "
                f"{', '.join(allowed) or 'none'}")
        try:
            await self.conn.set_session_mode(session_id=self.acp_session_id, mode_id=mode_id)
        except RequestError as e:
            raise self._request_error(e, "the mode change") from e
        self._record_mode(mode_id)

    def _on_mode_update(self, mode_id: str) -> None:
        """The agent says it is now in ``mode_id``: if the admin does not allow that mode, put
        it back in the policy's mode (in a task: this runs inside the agent's notification)."""
        self._record_mode(mode_id)
        if self.mode_allowed(mode_id) or self.policy_mode is None:
            return
        if self._mode_guard is None or self._mode_guard.done():
            self._mode_guard = asyncio.create_task(self._restore_mode(), name=f"acp-mode-{self.id}")

    #: Self-switches into forbidden modes a session undoes before it stops the agent instead.
    MAX_MODE_REVERTS = 50

    async def _restore_mode(self) -> None:
        target = self.policy_mode
        assert target is not None
        while self.conn is not None and not self.mode_allowed(current := (self._agent_modes or {}).get(
                "currentModeId")):
            self._mode_reverts += 1
            log.warning("Session %s (user %s): %s switched itself to the mode %r, which the "
                        "permission policy %r does not allow; switching it back to %r", self.id,
                        self.user, self.spec.name, current, self.options.permission_policy, target)
            try:
                if self._mode_reverts > self.MAX_MODE_REVERTS:
                    raise AgentError(f"it switched itself to a forbidden mode {self._mode_reverts} times")
                await self._bounded(self.conn.set_session_mode(session_id=self.acp_session_id,
                                                               mode_id=target), "session/set_mode")
            except Exception as e:
                reason = (f"{self.spec.display_name} switched itself to the mode {current!r}, which "
                          f"your admin does not allow, and could not be switched back ({e}); the "
                          f"agent was stopped")
                self._emit("error", {"message": reason, "mode": current, "restored": None})
                await self._halt(reason)
                return
            self._record_mode(target)
            self._emit("session_update", {"sessionUpdate": "current_mode_update", "currentModeId": target})
            self._emit("error", {"message": f"{self.spec.display_name} switched itself to the mode "
                                            f"{current!r}, which your admin does not allow; it was "
                                            f"switched back to {target!r}.",
                                 "mode": current, "restored": target})

    async def _stop_mode_guard(self) -> None:
        """End a running mode restore: cancelled, unless it is stopping the agent (awaited)."""
        guard = self._mode_guard
        if guard is None or guard is asyncio.current_task():
            return
        if self._stop_reason is None:
            guard.cancel()
        with contextlib.suppress(BaseException):
            await guard

    async def _halt(self, reason: str) -> None:
        """Stop an agent that broke the admin's policy: the session goes to ``error``."""
        self._stop_reason = reason
        self._cancel_pending_permissions()
        if self.state is SessionState.STOPPED:
            return
        await self._teardown()
        self._set_state(SessionState.ERROR, reason)

    async def set_config_option(self, config_id: str, value: str | bool) -> None:
        """ACP ``session/set_config_option`` (e.g. a model or reasoning-effort selector)."""
        if self.state not in (SessionState.READY, SessionState.BUSY):
            raise SessionNotReady(f"The session is {self.state.value}")
        known = {o.get("id") for o in self.config_options}
        if config_id not in known:
            raise BadRequest(f"Unknown config option {config_id!r}; available: "
                             f"{', '.join(sorted(k for k in known if k)) or 'none'}")
        try:
            resp = await self.conn.set_config_option(config_id=config_id, session_id=self.acp_session_id,
                                                     value=value)
        except RequestError as e:
            raise self._request_error(e, "the option change") from e
        if resp is not None and getattr(resp, "config_options", None):
            self.config_options = [_dump(o) for o in resp.config_options]

    # -- the client's callbacks ----------------------------------------------------------------
    async def on_session_update(self, update: Any, meta: dict[str, Any] | None) -> None:
        if self._replaying:
            return  # session/load replays what our history already holds
        self.usage.on_update(update)
        kind = getattr(update, "session_update", None)
        if kind == "agent_message_chunk":
            content = getattr(update, "content", None)
            if getattr(content, "type", None) == "text":
                self._turn_text.append(content.text)
                announced = self.spec.announced_mode(content.text)
                if announced and self._agent_modes is not None:
                    self._on_mode_update(announced)
        elif kind == "current_mode_update" and self._agent_modes is not None:
            self._on_mode_update(update.current_mode_id)
        elif kind == "config_option_update":
            self.config_options = [_dump(o) for o in update.config_options]
        self.last_activity = time.time()
        self._emit("session_update", _dump(update))

    async def on_permission_request(self, tool_call: schema.ToolCallUpdate,
                                    options: list[schema.PermissionOption]
                                    ) -> schema.RequestPermissionResponse:
        return await self.permissions.ask(tool_call, options)

    @property
    def pending(self) -> dict[str, PendingPermission]:
        """The permission requests waiting for the user, by request id."""
        return self.permissions.pending

    def answer_permission(self, request_id: str, option_id: str | None) -> None:
        """The user's answer: an option id, or None to dismiss (reject)."""
        self.permissions.answer(request_id, option_id)

    def _cancel_pending_permissions(self) -> None:
        self.permissions.cancel_all()

    # -- stats ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The seed design's ``getSessionStats``, kept locally (never asked of the agent)."""
        totals = self.ledger.session_totals(self.id)
        limits = self.sandbox_spec.limits
        return {
            "id": self.id,
            "user": self.user,
            "agent": self.spec.name,
            "agent_display_name": self.spec.display_name,
            "demo": self.spec.demo,
            "state": self.state.value,
            "error": self.error,
            "created": self.created,
            "last_activity": self.last_activity,
            "turns": self.turns,
            "tokens": {k: totals[k] for k in ("input_tokens", "output_tokens", "thought_tokens",
                                               "cached_read_tokens", "total_tokens")},
            "cost": totals["cost"],
            "currency": self.usage.currency,
            "context": {"used": self.usage.context_used, "size": self.usage.context_size},
            "workspace": str(self.sandbox_spec.workspace),
            "sandbox": self.sandbox.kind if self.sandbox else None,
            "limits": {"mem_limit": limits.mem_limit, "cpu_limit": limits.cpu_limit,
                       "pids_limit": limits.pids_limit, "disk_limit": limits.disk_limit,
                       "network": limits.network,
                       "enforced": self.sandbox.limits_enforced() if self.sandbox else {}},
            "modes": self.modes,
            "config_options": self.config_options,
            "agent_info": self.agent_info,
            "acp_session_id": self.acp_session_id,
            "pending_permissions": [p.public() for p in self.pending.values()],
            "last_seq": self.history.seq,
        }
