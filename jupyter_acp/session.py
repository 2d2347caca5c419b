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
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from acp import PROTOCOL_VERSION, connect_to_agent, schema
from acp.exceptions import RequestError

from .agents import AgentSpec
from .client import AcpClient
from .errors import (
    AcpError,
    AgentError,
    BadRequest,
    SessionBusy,
    SessionNotReady,
    agent_refusal,
)
from .history import EventHistory, Subscriber, public_event, wire_json
from .linefilter import filtered_reader
from .model_choice import ModelChoice
from .modes import ModePolicy
from .notebooks.session_tools import NOTEBOOK_WRITES_REFUSED, is_notebook_tool_call
from .permissions import PendingPermission, PermissionDesk, choose
from .prompt_content import Image, build_prompt
from .quota_brake import QuotaBrake
from .sandbox.base import Sandbox, SandboxSpec
from .session_model import live_model
from .session_open import open_acp_session
from .session_types import SessionOptions, SessionState, TurnResult, UsageBook
from .shrink import TextBudget
from .usage import RecordOutcome, TurnUsage, UsageNormalizer

if TYPE_CHECKING:
    from .notebooks.session_tools import SessionNotebooks

log = logging.getLogger("jupyter_acp.session")

__all__ = ["AgentSession", "SessionOptions", "SessionState", "TurnResult", "public_event", "wire_json"]


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
        ledger: UsageBook,
        options: SessionOptions | None = None,
        on_activity: Callable[[], None] | None = None,
        on_audit: Callable[[str, dict[str, Any]], None] | None = None,
        session_id: str | None = None,
        metered_by_gateway: bool = False,
    ) -> None:
        self.id = session_id or uuid.uuid4().hex
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
        self.mode_policy = ModePolicy(self)
        self._stop_reason: str | None = None
        #: the config options as clients see them (the model's narrowed to the admin's list),
        #: and as the agent reported them
        self.config_options: list[dict[str, Any]] = []
        self.agent_config_options: list[dict[str, Any]] = []
        self.model_choice = ModelChoice(self.options.allowed_models)
        #: the first line of the first prompt, or the title the agent gave (session_info_update)
        self.title = ""
        #: the agent's slash commands (its latest ``available_commands_update``)
        self.available_commands: list[dict[str, Any]] = []
        #: how the agent got the conversation back at the last start (session_open.py)
        self.restore: str | None = None
        #: kept in the session store (set by the manager): resumable after its agent stops
        self.persisted = False
        #: set by the manager when it stops the session to keep it, suspended (not deleted)
        self.kept = False
        #: tokens and cost recorded before this server resumed the session (from the ledger)
        self.earlier_usage: dict[str, Any] = {}
        self.sandbox: Sandbox | None = None
        self.client: AcpClient | None = None
        #: the notebook tools (set by the manager; None: off), and the ``mcpServers`` given to
        #: the agent at this start (a fresh route each start)
        self.notebooks: SessionNotebooks | None = None
        self.mcp_servers: list[Any] = []
        self.conn: Any = None
        self.usage = UsageNormalizer()
        #: True when the LLM gateway meters this session: each of its LLM requests is recorded
        #: (``gateway_usage``), so the agent's own usage reports are shown but never recorded.
        self.metered_by_gateway = metered_by_gateway
        #: the sockets' fan-out of this session's events (``handlers.Fanout``), made by the
        #: first socket and dropped with the last one
        self.fanout: Any = None
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
        #: the running turn's quota refusal (``quota_refused``, quota_brake.py)
        self.quota_brake = QuotaBrake(self)
        self._replaying = False
        #: start, restart and stop one at a time (the manager's per-session lifecycle order)
        self._lock = asyncio.Lock()
        #: set by stop(), never cleared: a session that is stopped never runs an agent again,
        #: and a start that is under way gives up at its next step
        self._closed = asyncio.Event()
        self._closing = False  # (close_at_agent: session/close sent, stop() comes next)

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
    async def start(self, *, resume: bool = False) -> None:
        """Start the agent the first time (the manager does, once); ``resume``: a stored
        session's, which continues its conversation (session_open.py)."""
        async with self._lock:
            self._check_open()
            await self._start_agent(load=resume)

    async def resume(self) -> None:
        await self.start(resume=True)

    @property
    def closed(self) -> bool:
        """``stop()`` was called: this object never runs an agent again."""
        return self._closed.is_set()

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise SessionNotReady("This session was stopped; start a new one")

    async def _start_agent(self, *, load: bool) -> None:
        """Start the sandbox, connect, ``initialize`` and open (or load) the ACP session.

        Runs under the lifecycle lock. A ``stop()`` meanwhile sets ``_closed``: every step below
        races it, so the start gives up at once and nothing it started outlives the session."""
        self.state, self.error = SessionState.STARTING, None
        self._stop_reason = None
        self._emit("state", {"state": "starting", "error": None})
        try:
            await self._start(load)
        except Exception as e:
            reason = self._explain(e)
            await self._teardown()
            if self._closed.is_set():  # not the agent's failure: the session was stopped
                raise SessionNotReady("The session was stopped while its agent started") from None
            self._set_state(SessionState.ERROR, reason)
            if isinstance(e, AgentError | BadRequest):
                raise
            raise AgentError(reason) from e
        self._set_state(SessionState.READY)
        self._audit("started", sandbox=self.sandbox.kind if self.sandbox else None)

    async def _start(self, load: bool) -> None:
        self.sandbox = self._sandbox_factory()
        await self.sandbox.start()
        if self._closed.is_set():
            raise AgentError("The session was stopped while its agent started")
        self.client = AcpClient(self, self.sandbox, self.options.limits, refused_writes=(
            None if self.notebooks is None else NOTEBOOK_WRITES_REFUSED),
            on_terminal_output=lambda data: self.history.emit(  # (a snapshot: one kept per terminal)
                "terminal_output", data, key=f"terminal:{data['terminal_id']}"))
        self.mcp_servers = [] if self.notebooks is None or self.sandbox.transport is not None \
            else await self.notebooks.open(self, self.client.fs)
        if self.sandbox.transport is not None:  # a remote agent over a WebSocket
            self.conn = connect_to_agent(self.client.as_sdk_client(), self.sandbox.transport)
        else:
            assert self.sandbox.stdin is not None and self.sandbox.stdout is not None
            limits = self.options.limits
            reader, self._filter = filtered_reader(
                self.sandbox.stdout, limit=limits.max_message_bytes, on_drop=self._on_dropped_line,
                label=self.id, update_limit=max(limits.max_event_bytes - EVENT_MARGIN, 1024))
            self.conn = connect_to_agent(self.client.as_sdk_client(), self.sandbox.stdin, reader)
        self._watcher = asyncio.create_task(self._watch(self.sandbox), name=f"acp-watch-{self.id}")
        init = await self._bounded(
            self.conn.initialize(
                protocol_version=PROTOCOL_VERSION,
                client_capabilities=schema.ClientCapabilities(
                    fs=schema.FileSystemCapabilities(read_text_file=True, write_text_file=True),
                    terminal=self.sandbox.provides_terminals,
                ),
                client_info=schema.Implementation.model_validate(self.options.client_info),
            ),
            "initialize",
        )
        self.agent_info = _dump(init.agent_info) if init.agent_info else {}
        self.agent_capabilities = _dump(init.agent_capabilities) if init.agent_capabilities else {}
        await open_acp_session(self, restore=load)

    async def _bounded(self, aw: Any, what: str) -> Any:
        """Await an ACP request with the init timeout, racing the agent's death."""
        timeout = self.options.init_timeout
        task = asyncio.ensure_future(aw)
        watcher = self._watcher
        closed = asyncio.ensure_future(self._closed.wait())
        waiters = {task, closed} | ({watcher} if watcher is not None else set())
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
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
        if self._closed.is_set():
            raise AgentError(f"The session was stopped during {what}")
        raise AgentError(f"The agent stopped during {what}: {await self._death_reason()}")

    def _request_error(self, e: RequestError, what: str) -> AgentError:
        return agent_refusal(self.spec, e.code, e.data, str(e), what)

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
        self.mode_policy.reported(_dump(modes) if modes is not None else None)
        self._set_config([_dump(o) for o in config_options or []])

    def _set_config(self, options: list[dict[str, Any]]) -> None:
        self.agent_config_options = options
        self.config_options = self.model_choice.narrow(options)

    @property
    def models(self) -> dict[str, Any] | None:
        """The agent's model choice, narrowed to what the admin allows (model_choice.py)."""
        return self.model_choice.model(self.config_options)

    #: Seconds the agent has to answer ``session/close`` before it is stopped all the same.
    CLOSE_TIMEOUT = 5.0

    async def close_at_agent(self) -> bool:
        """Tell the agent the conversation is over (ACP ``session/close``) when it says it
        supports that and is idle; its own record of the conversation stays, so the session
        can be resumed. False when it was not told (no support, not running, or it failed)."""
        caps = self.agent_capabilities.get("sessionCapabilities") or {}
        if "close" not in caps or self.conn is None or self.state is not SessionState.READY:
            return False
        # no prompt goes after the close (the agent would not know the session: a 502); the
        # caller stops the session next
        self._closing = True
        try:  # (bounded short: an agent slow to close must not hold up a delete or a close)
            await asyncio.wait_for(self._bounded(self.conn.close_session(session_id=self.acp_session_id),
                                                 "session/close"), self.CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            log.info("Session %s: the agent did not answer session/close in %g s", self.id,
                     self.CLOSE_TIMEOUT)
            return False
        except AcpError as e:
            log.info("Session %s: session/close failed (%s)", self.id, e)
            return False
        return True

    async def stop(self, reason: str = "stopped by the user") -> None:
        """Stop the agent and remove the sandbox; the workspace stays. Final.

        A start or restart under way gives up (``_closed``); this waits for it to have undone
        what it started, so when ``stop`` returns no process of this session is left."""
        self._closed.set()
        self._cancel_pending_permissions()
        if self._turn_task is not None:
            self._turn_task.cancel()
        async with self._lock:
            if self.state is SessionState.STOPPED:
                return
            await self._stop_mode_guard()
            await self._teardown()
            self._set_state(SessionState.STOPPED)
        self._audit("stopped", reason=reason)

    async def _teardown(self) -> None:
        sandbox, self.sandbox = self.sandbox, None
        if self.notebooks is not None:  # (its runs in kernels are interrupted)
            await self.notebooks.close()
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
        self._check_open()
        async with self._lock:
            self._check_open()  # (stopped while this waited for another start or restart)
            if self.state is SessionState.BUSY:
                raise SessionBusy("A prompt turn is running; cancel it before restarting")
            self.state = SessionState.STARTING  # (no turn starts on the agent torn down here)
            self._cancel_pending_permissions()
            await self._stop_mode_guard()
            await self._teardown()
            await self._start_agent(load=True)

    # -- prompt turns --------------------------------------------------------------------------
    def _check_live(self) -> None:
        """An agent is there to ask (ready, or busy in a turn) and no stop is under way."""
        if self._closed.is_set() or self.conn is None or self.state not in (SessionState.READY,
                                                                            SessionState.BUSY):
            raise SessionNotReady(f"The session is {self.state.value}")

    def _check_ready(self) -> None:
        if self._closed.is_set() or self._closing:  # (stop() or close: the state says so only after)
            raise SessionNotReady("This session was stopped; start a new one")
        if self.state is SessionState.BUSY:
            raise SessionBusy("The agent is still answering the previous message; cancel it or wait")
        if self.state is not SessionState.READY:
            why = f": {self.error}" if self.error else ""
            raise SessionNotReady(f"The session is {self.state.value}{why}")

    async def prompt(self, text: str, images: list[Image] | None = None) -> TurnResult:
        """Run one prompt turn to its end; events stream to subscribers meanwhile.

        ``@path`` mentions of workspace files go to the agent as resources, ``images`` as image
        blocks (prompt_content.py). A turn's ``error`` event, if any, comes before its
        ``turn_end`` (the wire's ``chat:response``): a client may stop reading at the end of
        the turn."""
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("The message is empty")
        self._check_ready()
        blocks, attachments = await build_prompt(self, text, images or [])
        await self.ledger.acheck_quota(self.user)  # (in the ledger's thread: the loop goes on)
        self._check_ready()  # (the quota check may wait: the session may have changed meanwhile)
        self._set_state(SessionState.BUSY)
        self.turns += 1
        turn, started = self.turns, time.time()
        self._turn_text = TextBudget(self.options.limits.max_turn_text_bytes)
        self.usage.begin_turn()
        self.touch()
        if not self.title:
            self.title = text.strip().splitlines()[0][:100]
        self._emit("user_message", {"text": text, "turn": turn,
                                    **({"attachments": attachments} if attachments else {})})
        self._turn_task = asyncio.ensure_future(
            self.conn.prompt(session_id=self.acp_session_id, prompt=blocks)
        )
        watcher = self._watcher
        turn_task = self._turn_task
        abort = self.quota_brake.arm()  # (quota_refused)
        response = None
        try:
            done, _ = await asyncio.wait({turn_task, abort} | ({watcher} if watcher else set()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if turn_task.cancelled():  # stop() ended the turn
                # (why, for the clients that show the turn's end: sidebar, %%acp, ChatPanel)
                self._emit("error", {"message": "The session was stopped during the turn", "turn": turn})
                await self._finish_turn(turn, started, None)
                raise SessionNotReady("The session was stopped during the turn")
            if turn_task in done:
                response = turn_task.result()
            elif abort in done:  # a quota refusal's cancel that the agent ignored: ended here
                response = abort.result()
        except asyncio.CancelledError:
            # our caller went away (e.g. a closed HTTP request): end the turn at the agent too,
            # so the session does not stay busy with nobody listening
            if self.state is SessionState.BUSY and self.conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.conn.cancel(session_id=self.acp_session_id))
                await self._finish_turn(turn, started, None)
                self._set_state(SessionState.READY)
            raise
        except RequestError as e:
            if self.quota_brake.error is not None:  # the agent failed after a quota refusal: its end
                log.info("Session %s: the agent ended the quota-refused turn with an error: %s", self.id, e)
                response = schema.PromptResponse(stop_reason="cancelled")
            else:
                err = self._request_error(e, "the prompt")
                self._emit("error", {"message": str(err), "turn": turn})
                await self._finish_turn(turn, started, None)
                self._set_state(SessionState.READY)
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
            self._emit("error", {"message": f"The agent stopped during the turn: {reason}", "turn": turn})
            await self._finish_turn(turn, started, None)
            if self.state is not SessionState.STOPPED:
                self._set_state(SessionState.ERROR, reason)
            raise AgentError(f"The agent stopped during the turn: {reason}")
        result = await self._finish_turn(turn, started, response)
        self._set_state(SessionState.READY)
        return result

    async def gateway_usage(self, usage: TurnUsage) -> None:
        """One LLM request metered by the gateway: added to the running turn's total, and
        recorded (the source of truth of a gateway session). The gateway awaits this before the
        request's last byte reaches the agent, so a turn cannot end before its last request is
        counted; a ledger failure reaches the user at the end of the turn (``_finish_turn``)."""
        acc = self._gateway_turn
        for key in ("input_tokens", "output_tokens", "thought_tokens", "cached_read_tokens",
                    "cached_write_tokens", "total_tokens"):
            setattr(acc, key, getattr(acc, key) + getattr(usage, key))
        acc.model = usage.model or acc.model
        now = time.time()
        await self.record_usage(usage, turn=self.turns, started=now, ended=now)

    async def record_usage(self, usage: TurnUsage, *, turn: int, started: float, ended: float
                           ) -> RecordOutcome:
        """The one way this session's usage reaches the ledger (durable when this returns: in
        the database, or else its spool), from the session's turns, its gateway route and the
        manager's ``update_token_usage``."""
        return await self.ledger.arecord(user=self.user, session_id=self.id, agent=self.spec.name,
                                         turn=turn, usage=usage, started_at=started, ended_at=ended,
                                         owner=self)

    async def _finish_turn(self, turn: int, started: float, response: Any) -> TurnResult:
        """Record the turn's usage, then end the turn (``turn_end``).

        The record is durable — in the ledger's database, or else its spool — before the turn
        ends, and is awaited in the ledger's thread: a slow database delays this turn's end,
        never another session's stream. A ledger failure (this record's, or a gateway
        request's) becomes one ``error`` event before ``turn_end``, and the session goes on.
        If the session was stopped while the record was written, the turn still ends, then
        ``SessionNotReady`` is raised, so that no caller marks the stopped session ready."""
        quota_error = self.quota_brake.take()
        if quota_error is not None:  # the turn's one quota error, before its end (quota_refused)
            self._emit("error", {"message": quota_error, "turn": turn, "quota": True})
        usage = self.usage.end_turn(response)
        ended = time.time()
        text = self._turn_text.text()
        stopped_meanwhile = False
        if self.metered_by_gateway:
            usage, self._gateway_turn = self._gateway_turn, TurnUsage(source="gateway")
        elif usage.source != "none" or usage.cost:
            before = self.state
            await self.record_usage(usage, turn=turn, started=started, ended=ended)
            stopped_meanwhile = before is not SessionState.STOPPED and self.state is SessionState.STOPPED
        problem = self.ledger.take_problem(self)
        if problem is not None:
            self._emit("error", {**problem, "turn": turn})
        stop_reason = str(response.stop_reason) if response is not None else "error"
        result = TurnResult(text, stop_reason, usage, turn, ended - started, quota_error)
        self._turn_text = TextBudget(self.options.limits.max_turn_text_bytes)  # (not kept idle)
        self._emit("turn_end", result.to_dict())
        self.touch()
        if stopped_meanwhile:
            raise SessionNotReady("The session was stopped during the turn")
        return result

    async def cancel(self) -> bool:
        """Ask the agent to stop the running turn (ACP ``session/cancel``). False if idle."""
        if self.state is not SessionState.BUSY or self.conn is None:
            return False
        self._cancel_pending_permissions()
        if self.notebooks is not None:
            await self.notebooks.cancel()
        await self.conn.cancel(session_id=self.acp_session_id)
        self._emit("cancel_requested", {})
        return True

    #: Seconds an agent has to end its turn after the ``session/cancel`` of a quota refusal
    #: before the session ends the turn itself (``quota_refused``).
    QUOTA_CANCEL_GRACE = 3.0

    def quota_refused(self, message: str) -> None:
        """The LLM gateway refused one of this session's requests: the daily quota is used up.
        The turn is cancelled at the agent, and ended here if the agent does not end it within
        ``QUOTA_CANCEL_GRACE`` s (quota_brake.py)."""
        self.quota_brake.refused(message)

    async def set_mode(self, mode_id: str) -> None:
        """The user's mode change (ACP ``session/set_mode``), within what the admin allows."""
        self._check_live()
        await self.mode_policy.set_by_user(mode_id)

    @property
    def modes(self) -> dict[str, Any] | None:
        """The agent's modes for clients (``ModePolicy.modes``)."""
        return self.mode_policy.modes

    @property
    def policy_mode(self) -> str | None:
        return self.mode_policy.policy_mode

    def mode_allowed(self, mode_id: str | None) -> bool:
        return self.mode_policy.allowed(mode_id)

    async def _stop_mode_guard(self) -> None:
        await self.mode_policy.stop_guard(halting=self._stop_reason is not None)

    async def _halt(self, reason: str) -> None:
        """Stop an agent that broke the admin's policy: the session goes to ``error``."""
        self._stop_reason = reason
        self._cancel_pending_permissions()
        if self.state is SessionState.STOPPED:
            return
        await self._teardown()
        self._set_state(SessionState.ERROR, reason)

    async def set_config_option(self, config_id: str, value: str | bool, *, starting: bool = False) -> None:
        """ACP ``session/set_config_option`` (e.g. a model or reasoning-effort selector); a
        model outside the admin's ``allowed_models`` is refused. ``starting``: the session's
        own choice while it starts (session_open.py), not a user's."""
        if not starting:
            self._check_live()
        known = {o.get("id") for o in self.agent_config_options}
        if config_id not in known:
            raise BadRequest(f"Unknown config option {config_id!r}; available: "
                             f"{', '.join(sorted(k for k in known if k)) or 'none'}")
        self.model_choice.check(self.agent_config_options, config_id, value)
        try:
            resp = await self.conn.set_config_option(config_id=config_id, session_id=self.acp_session_id,
                                                     value=value)
        except RequestError as e:
            raise self._request_error(e, "the option change") from e
        if resp is not None and getattr(resp, "config_options", None):
            self._set_config([_dump(o) for o in resp.config_options])

    # -- the client's callbacks ----------------------------------------------------------------
    async def on_session_update(self, update: Any, meta: dict[str, Any] | None) -> None:
        kind = getattr(update, "session_update", None)
        if kind == "available_commands_update":
            self.available_commands = [_dump(c) for c in update.available_commands]
        elif kind == "session_info_update" and isinstance(getattr(update, "title", None), str):
            self.title = update.title.strip()[:100] or self.title
        if self._replaying:
            return  # session/load replays what our history already holds
        self.usage.on_update(update)
        if kind == "agent_message_chunk":
            content = getattr(update, "content", None)
            if isinstance(content, schema.TextContentBlock):  # (the SDK validated the update)
                self._turn_text.append(content.text)
                announced = self.spec.announced_mode(content.text)
                if announced:
                    self.mode_policy.agent_switched(announced)
        elif kind == "current_mode_update":
            self.mode_policy.agent_switched(update.current_mode_id)
        elif kind == "config_option_update":
            self._set_config([_dump(o) for o in update.config_options])
        self.last_activity = time.time()
        self._emit("session_update", _dump(update))

    async def on_permission_request(self, tool_call: schema.ToolCallUpdate,
                                    options: list[schema.PermissionOption]
                                    ) -> schema.RequestPermissionResponse:
        if self.notebooks is not None and is_notebook_tool_call(tool_call):
            return choose(options, allow=True)  # (the tools ask themselves: session_tools.py)
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
        """The seed design's ``getSessionStats``, kept locally (never asked of the agent):
        the session model of the API (``session_model.live_model``)."""
        return live_model(self)
