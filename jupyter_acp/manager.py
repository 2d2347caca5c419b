"""UserSessionManager: every agent session of every Jupyter user, keyed by username.

It keeps the operations of the seed design (DESIGN.md §1) under Python names —
``create_user_session`` (reuses the user's live session of the same agent unless ``new``),
``get_user_session``, ``get_user_sessions``, ``delete_user_session``, ``send_message``,
``update_token_usage``, ``get_session_stats``, ``cleanup(max_age)`` run by a periodic monitor —
and decides, from the admin's traits, where and how an agent runs: which sandbox backend, which
limits, which workspace. Every lookup takes the username: a session of another user is reported
as not found (never "forbidden"), so its existence does not leak.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Bool, Dict, Enum, Float, Instance, Integer, TraitError, Unicode, default, validate

from .agents import AgentConfigManager, AgentSpec
from .errors import (
    AcpError,
    AgentUnavailable,
    BadRequest,
    PathOutsideWorkspace,
    SandboxError,
    SessionNotFound,
    SessionNotReady,
    TooManySessions,
)
from .gateway import LlmGateway
from .gateway.plan import Launch, plan_launch, uses_gateway
from .hubclient import GatewayGrant, HubClient, service_checks_quota
from .idle_culling import IdleCulling
from .limit_traits import SessionLimits
from .notebooks.channel import NotebookTools
from .notebooks.session_tools import SessionNotebooks
from .sandbox import backend
from .sandbox.base import SYSTEM_PATH, Sandbox, SandboxBackend, SandboxSpec
from .sandbox.remote import RemoteAgent
from .session import AgentSession, SessionOptions, SessionState, TurnResult
from .session_store import StoredSession
from .stored_sessions import StoredSessions
from .usage import TurnUsage, UsageLedger
from .usernames import safe_username
from .workspace_fs import NAME_MAX, PATH_MAX

#: Backends tried, best first, when the admin leaves ``sandbox`` empty.
BACKEND_PREFERENCE = ("docker", "bubblewrap", "local")

class UserSessionManager(SessionLimits, StoredSessions, IdleCulling):
    """Holds the live agent sessions of all users and applies the admin's limits to them."""

    # -- capacity (the idle culling is idle_culling.py) -----------------------------------------
    max_sessions_per_user = Integer(
        5,
        help="""How many live agent sessions one user may have at once (stopped ones do not
        count). 0 means unlimited.""",
    ).tag(config=True)

    # -- where agents run ----------------------------------------------------------------------
    sandbox = Enum(
        ["", *BACKEND_PREFERENCE],
        default_value="",
        help="""Sandbox backend of agent sessions: ``docker`` (a container per session),
        ``bubblewrap`` (Linux namespaces, no daemon) or ``local`` (no isolation). Empty: the
        best one that works on this host, in that order; ``local`` is then used only for the
        demo agent unless ``allow_unsandboxed`` is True.""",
    ).tag(config=True)

    allow_unsandboxed = Bool(
        False,
        help="""Allow real agents to run as plain local processes with the server's rights
        (no isolation, no limits). Leave False on any shared server.""",
    ).tag(config=True)

    allow_unsandboxed_terminals = Bool(
        False,
        help="""Offer ACP terminals to agents that run without isolation (the ``local``
        sandbox, including the demo agent there). Such a terminal runs the agent's commands on
        this host with the server's rights, so by default none is advertised and every
        ``terminal/create`` is refused. Isolated sandboxes (docker, bubblewrap) always offer
        terminals, which run inside them. Leave False on any shared server.""",
    ).tag(config=True)

    root_dir = Unicode(
        help="The Jupyter server's root directory (set by the extension; default: the cwd).",
    ).tag(config=True)

    @default("root_dir")
    def _default_root_dir(self) -> str:
        return os.getcwd()

    workspace_template = Unicode(
        "{root_dir}",
        help="""The directory an agent of a user may read and write (its sandbox's only
        writable mount). ``{root_dir}`` is the Jupyter root directory and ``{username}`` the
        user's name made path-safe, e.g. ``/srv/work/{username}``. Created when missing; a
        session's ``cwd`` must lie inside it.""",
    ).tag(config=True)

    agent_home_dir = Unicode(
        help="""Where each session gets a private, writable home directory for the agent's
        settings and caches (deleted when the session is deleted). Default: ``acp-homes`` in
        the Jupyter runtime directory.""",
    ).tag(config=True)

    @default("agent_home_dir")
    def _default_agent_home_dir(self) -> str:
        return str(Path(jupyter_runtime_dir()) / "acp-homes")

    # -- agent behaviour -----------------------------------------------------------------------
    permission_policy = Enum(
        ["ask", "allow", "deny"],
        default_value="ask",
        help="""What happens when an agent asks permission (e.g. to write a file): ``ask`` the
        user, or ``allow`` / ``deny`` every request without asking. It also sets the mode every
        agent starts in (e.g. Qwen Code's ``default`` for ``ask``, ``auto-edit`` for ``allow``,
        ``plan`` for ``deny``) and bounds the modes users may switch to (see ``allowed_modes``).""",
    ).tag(config=True)

    allowed_modes = Dict(
        help="""The agent modes (ACP ``session/set_mode``) users may switch to, by agent name
        (``"*"``: every agent not named), e.g. ``{"qwen": ["plan", "default", "yolo"]}``. An
        agent missing here gets the modes no more permissive than ``permission_policy``: with
        ``ask``, none that edits or runs commands without asking (no ``yolo``, ``auto``,
        ``auto-edit``, ``bypassPermissions``, ``full-access``). The policy's own starting mode
        is always allowed. An agent that switches itself to another mode is switched back.""",
    ).tag(config=True)

    @validate("allowed_modes", "allowed_models")
    def _valid_allowed_modes(self, proposal: Any) -> dict[str, list[str]]:
        value = proposal["value"]
        for name, modes in value.items():
            if not isinstance(modes, list | tuple) or not all(isinstance(m, str) for m in modes):
                raise TraitError(f"{proposal['trait'].name}[{name!r}] must be a list of ids")
        return {name: list(modes) for name, modes in value.items()}

    permission_timeout = Float(
        300.0,
        help="Seconds a permission request waits for the user's answer before it is rejected.",
    ).tag(config=True)

    init_timeout = Float(
        60.0,
        help="""Seconds an agent may take to start and answer ``initialize`` and
        ``session/new``. Prompt turns have no fixed timeout (they stream until done or cancelled).""",
    ).tag(config=True)

    max_history = Integer(
        10_000, help="Events of a session kept for clients that reconnect (older ones are dropped)."
    ).tag(config=True)

    @validate("max_sessions_per_user", "max_history")
    def _non_negative(self, proposal: Any) -> int:
        if proposal["value"] < 0:
            raise TraitError(f"{proposal['trait'].name} must be >= 0")
        return proposal["value"]

    agents = Instance(AgentConfigManager)
    ledger = Instance(UsageLedger)
    gateway = Instance(LlmGateway)
    notebooks = Instance(NotebookTools)

    @default("notebooks")
    def _default_notebooks(self) -> NotebookTools:
        return NotebookTools(parent=self)

    @default("gateway")
    def _default_gateway(self) -> LlmGateway:
        return LlmGateway(parent=self)

    @default("agents")
    def _default_agents(self) -> AgentConfigManager:
        return AgentConfigManager(parent=self)

    @default("ledger")
    def _default_ledger(self) -> UsageLedger:
        return UsageLedger(parent=self)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sessions: dict[str, AgentSession] = {}
        #: sessions deleted but not yet torn down, and starts admitted but not yet listed, per
        #: user: both count against ``max_sessions_per_user`` (their agents may be running)
        self._stopping: dict[str, AgentSession] = {}
        self._admitted: dict[str, int] = {}
        self._shutting_down = False
        self._started_backends: set[SandboxBackend] = set()
        #: each live session's notebook tools (its socket directory, its edits), by session id
        self._notebooks: dict[str, SessionNotebooks] = {}
        #: Called on agent activity (the extension keeps ``acp_last_activity`` fresh with it).
        self.on_activity: Callable[[], None] | None = None
        #: Called with (event name, data) for audit events (the extension's event logger).
        self.on_audit: Callable[[str, dict[str, Any]], None] | None = None
        #: Hub mode (set by the extension): the JupyterHub service that meters the sessions of
        #: agents with an LLM (``hubclient``); None: this server meters everything itself.
        self.hub: HubClient | None = None
        #: the gateway token of each session the service meters (revoked when it ends)
        self._hub_grants: dict[str, GatewayGrant] = {}
        #: one resume at a time per stored session (a second waits, then finds it live)
        self._resuming: dict[str, asyncio.Lock] = {}
        #: a resumed session's stored events (seq, bytes), handed to the store when it is listed
        self._stored_sizes: dict[str, list[tuple[int, int]]] = {}

    # -- sandbox choice ------------------------------------------------------------------------
    def backend_for(self, spec: AgentSpec) -> SandboxBackend:
        """The sandbox class an agent runs in, or ``AgentUnavailable`` explaining why none fits."""
        if self.sandbox:
            cls = backend(self.sandbox)
            ok, why = cls.available(parent=self)
            if not ok:
                raise SandboxError(f"The {self.sandbox} sandbox cannot run here: {why}")
            if not cls.isolated and not (spec.demo or self.allow_unsandboxed):
                raise AgentUnavailable(
                    f"{spec.display_name} would run without a sandbox; an admin must set "
                    "c.UserSessionManager.allow_unsandboxed = True or choose another sandbox")
            return cls
        reasons = []
        for kind in BACKEND_PREFERENCE:
            cls = backend(kind)
            if not cls.isolated and not (spec.demo or self.allow_unsandboxed):
                continue
            ok, why = cls.available(parent=self)
            if ok:
                return cls
            reasons.append(f"{kind}: {why}")
        raise AgentUnavailable(f"No sandbox can run {spec.display_name} here ({'; '.join(reasons)})")

    def backends(self) -> list[dict[str, Any]]:
        """Every backend with whether it works here (for admins and ``GET /api/acp/agents``)."""
        out = []
        for kind in BACKEND_PREFERENCE:
            ok, why = backend(kind).available(parent=self)
            out.append({"kind": kind, "available": ok, "reason": why})
        return out

    def workspace_root(self, username: str) -> Path:
        path = self.workspace_template.format(root_dir=self.root_dir, username=safe_username(username))
        return Path(os.path.abspath(os.path.expanduser(path)))

    def workspace_for(self, username: str, cwd: str | None) -> Path:
        """The session workspace: ``cwd`` (relative to the user's root, like Jupyter API paths)."""
        root = self.workspace_root(username)
        root.mkdir(parents=True, exist_ok=True)
        if not cwd:
            return root
        if not isinstance(cwd, str) or "\x00" in cwd:
            raise BadRequest("cwd must be a path inside your workspace")
        try:
            cwd.encode()
        except UnicodeEncodeError:  # (a lone surrogate: no file system name can hold it)
            raise BadRequest("cwd is not valid Unicode") from None
        if len(cwd.encode(errors="surrogatepass")) > PATH_MAX or any(
                len(part.encode(errors="surrogatepass")) > NAME_MAX for part in cwd.split("/")):
            raise BadRequest(f"cwd is too long (at most {PATH_MAX} bytes, {NAME_MAX} per "
                             "directory name)")
        # relative: like Jupyter API paths, from the user's root; absolute: must lie inside it
        target = Path(os.path.realpath(root / cwd))
        real_root = Path(os.path.realpath(root))
        if target != real_root and real_root not in target.parents:
            raise PathOutsideWorkspace(f"cwd {cwd!r} is outside your workspace")
        if not os.path.isdir(target):  # (False, not ENAMETOOLONG, past PATH_MAX with the root)
            raise BadRequest(f"cwd {cwd!r} is not a directory in your workspace")
        return target

    # -- the seed's operations -----------------------------------------------------------------
    async def create_user_session(
        self,
        username: str,
        agent: str | None = None,
        *,
        cwd: str | None = None,
        credentials: dict[str, str] | None = None,
        new: bool = False,
        capabilities: list[str] | None = None,
    ) -> AgentSession:
        """Start an agent session for ``username`` (or return their live one of that agent)."""
        spec = (self.agents.select_best_agent(capabilities) if capabilities and not agent
                else self.agents.get_available(agent))
        workspace = self.workspace_for(username, cwd)
        if not new:
            for session in self._sessions.values():
                if (session.user == username and session.spec.name == spec.name
                        and session.sandbox_spec.workspace == workspace
                        and session.state in (SessionState.READY, SessionState.BUSY)):
                    return session
        return await self._admitted_create(username, spec, workspace, credentials)

    async def _admitted_create(self, username: str, spec: AgentSpec, workspace: Path,
                               credentials: dict[str, str] | None,
                               stored: StoredSession | None = None) -> AgentSession:
        """``_create`` within ``max_sessions_per_user`` (a new session, or a resumed one)."""
        if self._shutting_down:
            raise SessionNotReady("The server is stopping; start the session again once it is back")
        held = self.sessions_held(username)
        if self.max_sessions_per_user and held >= self.max_sessions_per_user:
            raise TooManySessions(
                f"You already have {held} agent sessions (the limit is "
                f"{self.max_sessions_per_user}); stop one first")
        # admitted from here on (no await between the count and this): a concurrent create of
        # the same user counts this one even before it is listed
        self._admit(username, +1)
        listed = False

        def on_listed() -> None:
            nonlocal listed
            listed = True
            self._admit(username, -1)

        try:
            return await self._create(username, spec, workspace, credentials, on_listed, stored)
        finally:
            if not listed:
                self._admit(username, -1)

    def _admit(self, username: str, delta: int) -> None:
        count = self._admitted.get(username, 0) + delta
        if count:
            self._admitted[username] = count
        else:
            self._admitted.pop(username, None)

    def sessions_held(self, username: str) -> int:
        """How many agents ``username`` may have running now: live sessions, sessions being
        started, and deleted ones whose agent is still being stopped."""
        live = sum(1 for s in self._sessions.values()
                   if s.user == username and s.state is not SessionState.STOPPED)
        stopping = sum(1 for s in self._stopping.values() if s.user == username)
        return live + stopping + self._admitted.get(username, 0)

    async def _create(self, username: str, spec: AgentSpec, workspace: Path,
                      credentials: dict[str, str] | None, on_listed: Callable[[], None],
                      stored: StoredSession | None = None) -> AgentSession:
        hub = self.hub if self.hub is not None and self.hub.meters(spec, credentials) else None
        if hub is not None and not uses_gateway(self.gateway, spec, {"api_key": "hub"}):
            raise AgentUnavailable(
                f"{spec.display_name} cannot be metered by the JupyterHub service here: its LLM "
                "traffic must go through the server's gateway (c.LlmGateway.enabled, and the "
                "agent's credential_env must map api_key and base_url)")
        creds = self._credentials(spec, credentials)
        cls: SandboxBackend = RemoteAgent if spec.url else self.backend_for(spec)
        await self._backend_started(cls)
        spec = spec.for_policy(self.permission_policy)  # started in the policy's mode
        if self._gets_notebook_tools(spec):
            spec = spec.with_notebook_tools()
        # built in one step: first the id, the home and the launch (which may open a gateway
        # route whose callbacks reach the session once it exists), then the session itself
        session_id = stored.id if stored is not None else uuid.uuid4().hex
        home = self._make_home(session_id, reuse=stored is not None)

        def undo() -> None:
            """What this start made goes; a resumed session's home stays (the agent's record)."""
            if stored is None:
                self._remove_home(session_id)
            self._close_route(session_id)

        try:
            if hub is not None:  # a gateway token of the service's, its "real key" (hubclient)
                grant = self._hub_grants[session_id] = await hub.grant(session_id, spec)
                creds = hub.launch_credentials(grant, creds)
            session = self._build(session_id, username, spec, cls, creds, workspace, home)
            if self._shutting_down:  # (the server began to stop while this one was prepared)
                raise SessionNotReady("The server is stopping; start the session again once it is back")
            if stored is not None:
                await self._seed(session, stored)
        except BaseException:
            undo()
            raise
        self._sessions[session.id] = session  # counts against the limit while it starts
        on_listed()
        session.persisted = self.store.enabled
        self.store.track(session, self._stored_sizes.pop(session.id, ()))
        self.log.info("%s %s for %s in a %s sandbox (session %s)", "Resuming" if stored else "Starting",
                      spec.name, username, cls.kind, session.id)
        try:
            await (session.resume() if stored is not None else session.start())
        except BaseException:
            self._sessions.pop(session.id, None)
            if stored is None:  # a new session that never started: nothing to keep
                self.store.end(session, keep=False)
            elif not session.closed:  # a resume that failed: it stays suspended
                self.store.end(session, keep=True)  # (its history says why)
            # (else whoever stopped it — a delete, a cull, the server stopping — settles its record)
            undo()
            raise
        return session

    def _credentials(self, spec: AgentSpec, credentials: dict[str, str] | None) -> dict[str, str]:
        """The admin's credentials for ``spec`` overlaid with the user's (``BadRequest`` for a
        field users may not set)."""
        try:
            return self.agents.credentials_for(spec, credentials)
        except ValueError as e:
            raise BadRequest(str(e)) from None

    def _build(self, session_id: str, username: str, spec: AgentSpec, cls: SandboxBackend,
               creds: dict[str, str], workspace: Path, home: Path) -> AgentSession:
        """The session, whole: its launch (which may open a gateway route, whose callbacks reach
        the session once it exists), its sandbox spec and factory, its options."""
        session: AgentSession
        spec.write_home(home)
        # the one switch of hub mode: a session the service meters (it holds a gateway token)
        # records to ``HubUsageBook`` (nothing written here, quota asked of the service), its
        # route trusts the service's gateway as its endpoint and leaves the quota to it
        grant = self._hub_grants.get(session_id)
        book = self.hub.book if grant is not None and self.hub is not None else self.ledger
        trusted = {"base_url": grant.base_url} if grant else self.agents.admin_credentials(spec)
        launch = plan_launch(self.gateway, spec, creds, trusted,
                             session_id=session_id, user=username,
                             on_usage=lambda usage: session.gateway_usage(usage),
                             check_quota=(service_checks_quota if grant
                                          else lambda: self.ledger.acheck_quota(username)),
                             on_refused=lambda message: session.quota_refused(message),
                             gateway_target=cls.gateway_target)
        notebooks = self._notebooks_for(session_id, spec, cls, launch)
        nb_ro, nb_rw = notebooks.sandbox_paths() if notebooks else ([], [])
        sandbox_spec = SandboxSpec(
            argv=launch.argv,
            workspace=workspace,
            env={**self._agent_env(spec, launch.credentials, home), **launch.env},
            limits=self.limits_for(spec),
            labels={"user": username, "session": session_id, "agent": spec.name},
            ro_paths=[*launch.ro_paths, *nb_ro],
            rw_paths=[*launch.rw_paths, *nb_rw],
            home=str(home),
            gateway_dir=launch.gateway_dir or (notebooks.directory if notebooks else None),
        )
        factory: Callable[[], Sandbox]
        if url := spec.url:
            token = creds.get("access_token")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            factory = lambda: RemoteAgent(sandbox_spec, url, headers)  # noqa: E731
        else:
            factory = lambda: cls.create(sandbox_spec, parent=self)  # noqa: E731
        session = AgentSession(
            user=username, spec=spec, sandbox_factory=factory, sandbox_spec=sandbox_spec,
            ledger=book, session_id=session_id, metered_by_gateway=launch.route is not None,
            options=SessionOptions(permission_policy=self.permission_policy,
                                   permission_timeout=self.permission_timeout,
                                   init_timeout=self.init_timeout, max_history=self.max_history,
                                   limits=self.input_limits(),
                                   allowed_modes=self.allowed_modes.get(spec.name,
                                                                        self.allowed_modes.get("*")),
                                   allowed_models=self.allowed_models.get(spec.name,
                                                                          self.allowed_models.get("*"))),
            on_activity=self._activity, on_audit=self._audit,
        )
        session.notebooks = notebooks
        return session

    def _gets_notebook_tools(self, spec: AgentSpec) -> bool:
        """On, and not a remote agent (it cannot start a stdio server next to us)."""
        return self.notebooks.enabled and not spec.url

    def _notebooks_for(self, session_id: str, spec: AgentSpec, cls: SandboxBackend,
                       launch: Launch) -> SessionNotebooks | None:
        """The session's notebook tools (None: ``_gets_notebook_tools`` says no). Their socket
        goes in the session's socket directory: its gateway route's, else one of their own."""
        if not self._gets_notebook_tools(spec):
            return None
        own = launch.gateway_dir is None
        notebooks = self._notebooks[session_id] = SessionNotebooks(
            self.notebooks, directory=launch.gateway_dir or self.notebooks.make_dir(), own_dir=own,
            # (a backend that shows the socket directory at a fixed path mounts it itself)
            writable_path=own and cls.gateway_target is None, sandbox_dir=cls.gateway_target)
        return notebooks

    def _agent_env(self, spec: AgentSpec, creds: dict[str, str], home: Path) -> dict[str, str]:
        """The agent's whole environment: never the server's own (it may hold secrets), and
        no more of the host than it needs: PATH is the system directories plus the directory
        of the agent's own executable, not the server's PATH."""
        path = SYSTEM_PATH.split(":")
        exe = spec.executable()
        if exe and os.path.dirname(exe) not in path:
            path.insert(0, os.path.dirname(exe))
        env = {
            "PATH": ":".join(path),
            "HOME": str(home),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "TERM": "dumb",
            "NO_COLOR": "1",
        }
        env.update(spec.env)
        env.update(spec.credentials_env(creds))
        return env

    def _make_home(self, session_id: str, *, reuse: bool = False) -> Path:
        """A private home: the homes directory and each home are the server user's only (0700),
        so another account on the host cannot read an agent's settings or what it caches.
        ``reuse``: a resumed session's home, kept since it was suspended (the agent keeps its
        own record of the conversation there), else a new one."""
        homes = Path(self.agent_home_dir)
        homes.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(homes, 0o700)  # (also when an earlier version created it with the umask's mode)
        home = homes / session_id
        if reuse and home.is_dir() and not home.is_symlink():
            os.chmod(home, 0o700)
            return home
        home.mkdir(mode=0o700)
        return home

    def _remove_home(self, session_id: str) -> None:
        shutil.rmtree(Path(self.agent_home_dir) / session_id, ignore_errors=True)

    async def start_backends(self) -> None:
        """At server start: each backend that can run here cleans up after an earlier run of
        this server (orphaned containers) and warms up (Docker's pool), before any session."""
        for kind in [self.sandbox] if self.sandbox else BACKEND_PREFERENCE:
            cls = backend(kind)
            ok, _ = await asyncio.to_thread(cls.available, parent=self)
            if ok:
                await self._backend_started(cls)

    async def _backend_started(self, cls: SandboxBackend) -> None:
        if cls not in self._started_backends:
            self._started_backends.add(cls)
            await cls.on_manager_start(parent=self)

    def get_user_session(self, username: str, session_id: str) -> AgentSession:
        """The session ``session_id`` of ``username``; another user's is "not found"."""
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is None or session.user != username:
            raise SessionNotFound(str(session_id))
        return session

    def get_user_sessions(self, username: str) -> list[AgentSession]:
        return sorted((s for s in self._sessions.values() if s.user == username), key=lambda s: s.created)

    def all_sessions(self) -> list[AgentSession]:
        return list(self._sessions.values())

    async def delete_user_session(self, username: str, session_id: str) -> None:
        """Forget a session, live or suspended: its agent stopped, its sandbox, home and stored
        history removed; the workspace stays."""
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if session is not None and session.user == username:
            await session.close_at_agent()
            await self._delete(session, "deleted by the user")
            return
        stopping = self._stopping.get(session_id) if isinstance(session_id, str) else None
        if stopping is not None and stopping.user == username:  # (being culled or closed)
            self.store.forget(session_id)  # hidden at once; its suspension cannot bring it back
            await stopping.stop("deleted by the user")  # (returns once the stop under way is done)
            await self._forget(session_id)
            return
        stored = await self.get_suspended(username, session_id)
        await self._forget(stored.id)

    async def _delete(self, session: AgentSession, reason: str, *, forget: bool = True) -> None:
        """Unlist the session at once (no request finds it any more), then stop its agent; it
        counts against its user's limit until its agent, home and route are gone. The session
        stops for good: a restart under way gives up (``AgentSession.stop``). ``forget``: its
        stored history and home go too; else (an idle cull, the server stopping, a close) it
        is kept, suspended, to be resumed (when the store is enabled)."""
        self._sessions.pop(session.id, None)
        self._stopping[session.id] = session
        keep = session.kept = not forget and self.store.enabled
        try:
            await session.stop(reason)
        finally:
            # (bounded: a slow or locked database must not hold up a delete; the store goes on)
            await asyncio.wait({self.store.end(session, keep=keep)}, timeout=self.STORE_WAIT)
            if not keep:
                self._remove_home(session.id)
            revoking = self._close_route(session.id)
            self._stopping.pop(session.id, None)
            if revoking is not None:  # (best effort, and a short wait: the token expires anyway)
                await asyncio.wait({revoking}, timeout=self.HUB_REVOKE_WAIT)

    #: Seconds a deletion, cull or close waits for the session store to settle the session's
    #: record (it goes on in the background while the database cannot be written).
    STORE_WAIT = 1.0

    #: Seconds a deletion waits for the hub service to confirm its gateway token's revocation
    #: (it goes on in the background for up to ``HubClient.revoke_timeout``).
    HUB_REVOKE_WAIT = 2.0

    def _close_route(self, session_id: str) -> asyncio.Task[bool] | None:
        """Close the session's gateway route and, in hub mode, start revoking its gateway
        token at the service (the task; None when it had none)."""
        if (notebooks := self._notebooks.pop(session_id, None)) is not None:
            notebooks.discard()
        self.gateway.close_route(session_id)
        grant = self._hub_grants.pop(session_id, None)
        if grant is None or self.hub is None:
            return None
        return self.hub.revoke_soon(grant.token)

    async def restart_user_session(self, username: str, session_id: str) -> AgentSession:
        session = self.get_user_session(username, session_id)
        try:
            await session.restart()
        except AcpError:
            if session.id not in self._sessions:  # deleted meanwhile: it is gone, not "not ready"
                raise SessionNotFound(session_id) from None
            raise
        if session.id not in self._sessions:
            raise SessionNotFound(session_id)
        return session

    async def send_message(self, username: str, session_id: str, message: str) -> TurnResult:
        """One prompt turn; events stream to the session's subscribers while it runs."""
        return await self.get_user_session(username, session_id).prompt(message)

    async def update_token_usage(self, username: str, session_id: str,
                                 usage: dict[str, Any] | TurnUsage, *, turn: int | None = None
                                 ) -> int | None:
        """Record usage reported out of band (e.g. by an LLM gateway) for one of the user's
        sessions. Returns the database record's id; None when the database could not be written
        and the record waits in the ledger's spool (it is counted all the same)."""
        session = self.get_user_session(username, session_id)
        if isinstance(usage, dict):
            try:
                usage = TurnUsage(**usage)
            except TypeError as e:
                raise BadRequest(f"Invalid usage record: {e}") from None
        now = time.time()
        outcome = await session.record_usage(usage, turn=turn if turn is not None else session.turns,
                                             started=now, ended=now)
        return outcome.id

    def get_session_stats(self, username: str, session_id: str) -> dict[str, Any]:
        return self.get_user_session(username, session_id).stats()

    async def shutdown(self) -> None:
        """Stop the monitor and every session (the server is stopping); no new one starts."""
        self._shutting_down = True
        await self.stop_monitor()
        sessions = list(self._sessions.values())
        stopping = list(self._stopping.values())
        results = await asyncio.gather(*(self._delete(s, "the server is stopping", forget=False)
                                         for s in sessions),
                                       *(s.stop("the server is stopping") for s in stopping),
                                       return_exceptions=True)
        results = results[:len(sessions)]
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, BaseException):
                self.log.warning("Could not stop session %s cleanly: %s", session.id, result)
        for cls in sorted(self._started_backends, key=lambda c: c.kind):
            try:
                await cls.on_manager_stop(parent=self)
            except Exception:
                self.log.exception("Could not clean up the %s sandbox backend", cls.kind)
        self._started_backends.clear()
        await self.store.close()
        self.gateway.close()

    def _activity(self) -> None:
        if self.on_activity is not None:
            self.on_activity()

    def _audit(self, name: str, data: dict[str, Any]) -> None:
        if self.on_audit is not None:
            try:
                self.on_audit(name, data)
            except Exception:
                self.log.exception("Could not emit the audit event %s", name)
