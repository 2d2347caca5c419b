"""The manager's sessions whose agent is not running: suspended ones (session_store.py).

A mixin of ``UserSessionManager`` (like ``limit_traits.SessionLimits``), the half of the one
owner of session lifecycle that deals with stored sessions: list them, resume one (through the
manager's own admission and ``_create``), close a live one into a suspended one, forget them
(the user's delete, the store's retention). Live sessions are the manager's (manager.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from traitlets import Dict, Instance, default
from traitlets.config import LoggingConfigurable

from .errors import AcpError, BadRequest, PathOutsideWorkspace, SessionBusy, SessionNotFound
from .session_model import stored_model
from .session_store import SessionStore, StoredSession
from .usage.ledger import LedgerUnavailable

if TYPE_CHECKING:
    from .agents import AgentConfigManager, AgentSpec
    from .session import AgentSession
    from .usage import UsageLedger


class StoredSessions(LoggingConfigurable):
    """Suspended sessions: listed, resumed, closed into, forgotten."""

    store = Instance(SessionStore)

    @default("store")
    def _default_store(self) -> SessionStore:
        return SessionStore(self.ledger, parent=self)

    allowed_models = Dict(
        help="""The models (an agent's config option of category ``model``) users may choose,
        by agent name (``"*"``: every agent not named), e.g. ``{"qwen": ["qwen3-coder-plus"]}``.
        Clients see only these; an agent that starts on another is switched to the first of
        them. An agent missing here: every model it offers.""",
    ).tag(config=True)

    if TYPE_CHECKING:  # the manager's, used here
        agents: AgentConfigManager
        ledger: UsageLedger
        _sessions: dict[str, AgentSession]
        _stopping: dict[str, AgentSession]
        _resuming: dict[str, asyncio.Lock]
        _stored_sizes: dict[str, list[tuple[int, int]]]
        STORE_WAIT: float

        def workspace_root(self, username: str) -> Path: ...
        def _credentials(self, spec: AgentSpec, credentials: dict[str, str] | None) -> dict[str, str]: ...
        def _remove_home(self, session_id: str) -> None: ...
        async def _admitted_create(self, username: str, spec: AgentSpec, workspace: Path,
                                   credentials: dict[str, str] | None,
                                   stored: StoredSession | None = None) -> AgentSession: ...
        async def _delete(self, session: AgentSession, reason: str, *, forget: bool = True) -> None: ...

    async def suspended_sessions(self, username: str) -> list[StoredSession]:
        """The user's stored sessions that are not live on this server: resumable. None while
        the database cannot be read (the live sessions are listed all the same)."""
        if not self.store.enabled:
            return []
        try:
            stored = await self.store.of_user(username)
        except LedgerUnavailable:
            return []
        return [s for s in stored if s.id not in self._sessions and s.id not in self._stopping]

    async def get_suspended(self, username: str, session_id: str) -> StoredSession:
        """The user's stored, not live, session ``session_id`` (another user's: not found)."""
        stored = (await self.store.get(username, session_id)
                  if self.store.enabled and isinstance(session_id, str) else None)
        if stored is None or session_id in self._sessions:
            raise SessionNotFound(str(session_id))
        return stored

    async def stored_model(self, stored: StoredSession) -> dict[str, Any]:
        """The API's model of a suspended session (session_model.py), its usage from the ledger."""
        totals: dict[str, Any] = {}
        with contextlib.suppress(AcpError):
            totals = await self.ledger.asession_totals(stored.id)
        demo = False
        with contextlib.suppress(AcpError):
            demo = self.agents.get(stored.agent).demo
        allowed = self.allowed_models.get(stored.agent, self.allowed_models.get("*"))
        return stored_model(stored, totals, demo=demo, allowed_models=allowed)

    async def resume_user_session(self, username: str, session_id: str,
                                  credentials: dict[str, str] | None = None) -> AgentSession:
        """Start the agent of a suspended session again (a fresh sandbox, its home, its
        history) and continue the conversation at the agent (session_open.py). A live session
        is returned as it is."""
        lock = self._resuming.setdefault(session_id, asyncio.Lock())
        try:
            async with lock:
                live = self._sessions.get(session_id)
                if live is not None and live.user == username:
                    if credentials:  # (not used: the agent runs; refused all the same if bad)
                        self._credentials(live.spec, credentials)
                    return live
                # (checked before any wait: its agent still stops, and two agents never share a
                # session's home; a stop cannot begin meanwhile, only live sessions are stopped)
                if session_id in self._stopping:
                    raise SessionBusy("The session is being stopped; resume it again in a moment")
                stored = await self.get_suspended(username, session_id)
                spec = self.agents.get_available(stored.agent)
                workspace = self.stored_workspace(username, stored)
                return await self._admitted_create(username, spec, workspace, credentials, stored)
        finally:
            if not lock.locked():
                self._resuming.pop(session_id, None)

    def stored_workspace(self, username: str, stored: StoredSession) -> Path:
        """A stored session's workspace, if it is still a directory inside the user's (the
        admin may have moved the workspaces since)."""
        root = os.path.realpath(self.workspace_root(username))
        path = os.path.realpath(stored.cwd)
        if path != root and not path.startswith(root + os.sep):
            raise PathOutsideWorkspace("This session's directory is no longer inside your workspace")
        if not os.path.isdir(path):
            raise BadRequest("This session's directory no longer exists; start a new session")
        return Path(stored.cwd)

    async def close_user_session(self, username: str, session_id: str) -> None:
        """End the session's agent (ACP ``session/close`` where it has it) and keep the session,
        suspended and resumable. A suspended session stays as it is."""
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None or session.user != username:
            await self.get_suspended(username, session_id)  # (SessionNotFound if unknown)
            return
        await session.close_at_agent()
        await self._delete(session, "closed by the user", forget=False)

    async def _seed(self, session: AgentSession, stored: StoredSession) -> None:
        """Give a resumed session what it was: its history (numbered on from it), turns,
        title, the agent's ACP session id and config (session_open.py restores from them)."""
        keep = session.options.max_history or None  # (what its history can hold; 0: none)
        events = await self.store.events(stored.id, last=keep) if keep else []
        sizes = self._stored_sizes[session.id] = await self.store.sizes(stored.id)
        session.history.restore(events, max([stored.last_seq, *(seq for seq, _ in sizes[-1:])]))
        session.turns, session.title, session.created = stored.turns, stored.title, stored.created
        session.acp_session_id = stored.acp_session_id
        meta = stored.meta
        session._set_config([o for o in meta.get("config_options") or [] if isinstance(o, dict)])
        session.available_commands = list(meta.get("available_commands") or [])
        if session.ledger is self.ledger:
            with contextlib.suppress(AcpError):
                session.earlier_usage = await self.ledger.asession_totals(stored.id)

    async def _forget(self, session_id: str) -> None:
        await asyncio.wait({self.store.forget(session_id)}, timeout=self.STORE_WAIT)
        await asyncio.to_thread(self._remove_home, session_id)

    async def purge_expired(self) -> list[str]:
        """Forget the stored sessions past the store's retention (and each user's beyond its
        cap): records, histories and agent homes. Live sessions are never purged."""
        if not self.store.enabled:
            return []
        gone = []
        for stored in await self.store.expired():
            if stored.id in self._sessions or stored.id in self._stopping:
                continue
            self.log.info("Deleting stored session %s of %s (past the retention)", stored.id, stored.user)
            await self._forget(stored.id)
            gone.append(stored.id)
        return gone

    # -- monitor and shutdown ------------------------------------------------------------------
