"""The jupyter-server extension: wires ``UserSessionManager`` into a running Jupyter server.

A JupyterHub admin installs the package with pip; the server enables the extension through
``jupyter-config/server-config/jupyter_acp.json`` (installed as shared data) and every option is
a traitlets option (``c.AcpExtension.*`` here, and the classes listed in ``classes``:
``c.UserSessionManager.*``, ``c.AgentConfigManager.*``, ``c.UsageLedger.*``, ``c.DockerSandbox.*``,
``c.BubblewrapSandbox.*``), all shown by ``jupyter server --help-all``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import getpass
import logging
import os
from pathlib import Path
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, PasswordIdentityProvider
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import url_path_join
from traitlets import Bool, Enum, Float, Integer, List, Type, Unicode, default

from . import __version__, logredact
from .agents import AgentConfigManager
from .gateway import LlmGateway
from .handlers import handlers
from .hubclient import HUB_TOKEN_ENV, SERVICE_URL_ENV, HubClient, HubConfigError, resolve_hub_mode
from .limits import return_large_blocks_to_the_os
from .manager import UserSessionManager
from .notebooks.channel import NotebookTools
from .sandbox.bubblewrap import BubblewrapSettings
from .session_store import SessionStore
from .usage import UsageLedger

# Credentials never reach a log line from here on (see ``logredact``). jupyter_server imports
# this module (``_jupyter_server_extension_points``) before it links any extension app, and each
# of them logs the whole config at debug level as it links.
logredact.install()

EVENTS_DIR = Path(__file__).parent / "events"
#: The audit event schemas (``jupyter_acp/events/*.yaml``), by the manager's event name.
EVENT_SCHEMAS = {
    "started": "https://events.jupyter.org/jupyter_acp/session/v1",
    "stopped": "https://events.jupyter.org/jupyter_acp/session/v1",
    "permission": "https://events.jupyter.org/jupyter_acp/permission/v1",
}


def _sandbox_classes() -> list[type]:
    classes: list[type] = [BubblewrapSettings]  # c.BubblewrapSandbox.*
    with contextlib.suppress(ImportError):  # the docker SDK is an optional extra
        from .sandbox.docker import DockerSandbox

        classes.insert(0, DockerSandbox)
    return classes


class AcpExtension(ExtensionApp):
    """Agent Client Protocol agents for Jupyter users: REST + WebSocket API under ``api/acp/``."""

    name = "jupyter_acp"
    app_name = "jupyter-acp"
    description = __doc__
    version = __version__
    load_other_extensions = True
    classes = [UserSessionManager, AgentConfigManager, UsageLedger, SessionStore, LlmGateway,
               NotebookTools, *_sandbox_classes()]

    admin_users = List(
        Unicode(),
        help="""Usernames that may read every user's token usage (``GET /api/acp/usage?all=1``
        or ``?user=NAME``). Under JupyterHub, hub admins (the user model's ``admin`` flag) are
        admins too. Empty (the default): only hub admins.""",
    ).tag(config=True)

    admin_scopes = List(
        Unicode(),
        ["admin:users"],
        help="""JupyterHub scopes that make a user an admin of jupyter-acp (reading everyone's
        usage), checked against the ``scopes`` of the hub user model of the request.""",
    ).tag(config=True)

    max_message_bytes = Integer(
        1024 * 1024,
        help="""Largest prompt a user may send, in bytes of UTF-8 (REST body or WebSocket
        frame). A larger one is refused with 413. 0 means no limit beyond the server's
        ``max_body_size``.""",
    ).tag(config=True)

    max_request_bytes = Integer(
        4 * 1024 * 1024,
        help="""Largest JSON body of any ``api/acp`` request, in bytes; larger is refused with
        413 before it is parsed. 0 means no limit beyond the server's ``max_body_size``.""",
    ).tag(config=True)

    identity = Enum(
        ["auto", "user", "owner"],
        "auto",
        help="""Whose sessions a request sees. ``user``: the Jupyter identity's username (an
        identity provider that names real users: JupyterHub's, or a custom one). ``owner``: every
        authenticated request acts for the server's single owner (``owner_name``) — right for a
        personal server with a shared token, whose default identity provider invents a new
        anonymous name for each token request (a kernel calling the API would never see its own
        sessions). ``auto``: ``owner`` with Jupyter's own token/password identity providers,
        ``user`` with any other.""",
    ).tag(config=True)

    owner_name = Unicode(
        help="""The user name of the server's owner when ``identity`` resolves to ``owner``
        (usage records and workspaces are kept under it). Default: ``$JUPYTERHUB_USER``, else the
        operating-system user running the server.""",
    ).tag(config=True)

    @default("owner_name")
    def _default_owner_name(self) -> str:
        return os.environ.get("JUPYTERHUB_USER") or getpass.getuser()

    max_socket_buffer_bytes = Integer(
        64 * 1024 * 1024,
        help="""Bytes of events a session WebSocket may have queued for a client that reads too
        slowly; beyond it the socket is closed (code 1013) and the client resumes with
        ``?since=<last seq>`` from the history. 0 means no limit.""",
    ).tag(config=True)

    gc_freeze = Bool(
        True,
        help="""Once the server has started, move every object it holds (the modules of
        jupyter-server, its extensions, the ACP schema: ~250,000 objects) out of reach of Python's
        cyclic garbage collector (``gc.freeze()``). They live as long as the server anyway, and
        every full collection walked them all: 0.25-0.6 s during which no session streamed
        anything (bench/scale.py, 200 users). Objects created later are collected as usual.""",
    ).tag(config=True)

    malloc_mmap_threshold = Integer(
        256 * 1024,
        help="""Blocks of this many bytes or more are allocated with ``mmap`` and given back to
        the system when freed (glibc's ``M_MMAP_THRESHOLD``). Left to glibc, large blocks come
        from the heap after the first few are freed, and an agent's flood of multi-megabyte
        messages left the server ~900 MiB larger for good. 0: glibc's default.""",
    ).tag(config=True)

    hub_mode = Enum(
        ["auto", "on", "off"],
        "auto",
        help="""Whether the JupyterHub service of jupyter-acp (``python -m jupyter_acp.hub``)
        holds the LLM keys, meters every LLM request, keeps the ledger and enforces the quota,
        out of the user's reach: a single-user server runs as its user, who can read all it
        holds. In hub mode this server holds no key: each session of an agent with an LLM gets
        a gateway token from the service, the quota is the service's and ``GET
        /api/acp/usage`` answers from it; an agent that needs the service does not start while
        it is unreachable (503). ``auto``: on when the server was spawned by JupyterHub
        (``JUPYTERHUB_API_TOKEN`` and ``JUPYTERHUB_USER`` set) and ``hub_service_url`` is known.
        ``on``: required (the extension does not load without a URL and a hub token). ``off``:
        this server meters itself, as a personal server does.""",
    ).tag(config=True)

    hub_service_url = Unicode(
        help="""The URL of the jupyter-acp hub service as this server reaches it, e.g.
        ``http://127.0.0.1:10101/services/jupyter-acp/``. Default: ``$JUPYTER_ACP_HUB_SERVICE_URL``
        (the admin sets it for every server with ``c.Spawner.environment``).""",
    ).tag(config=True)

    @default("hub_service_url")
    def _default_hub_service_url(self) -> str:
        return os.environ.get(SERVICE_URL_ENV, "")

    hub_allow_user_credentials = Bool(
        False,
        help="""In hub mode, let users start agents with their own ``api_key`` / ``base_url``.
        Off by default: the hub service meters and caps only the requests that go through its
        own gateway, so a session with the user's own key would be outside the hub's quota and
        usage tables (it is then metered by this server alone, in the user's reach).""",
    ).tag(config=True)

    hub_request_timeout = Float(
        10.0,
        help="Seconds one request to the jupyter-acp hub service may take (hub mode).",
    ).tag(config=True)

    session_manager_class = Type(
        UserSessionManager,
        klass=UserSessionManager,
        help="The UserSessionManager (sub)class that owns the agent sessions.",
    ).tag(config=True)

    def initialize_settings(self) -> None:
        # set by ExtensionApp._link_jupyter_server_extension before it calls this (and so before
        # the manager's callbacks can run); jupyter_server itself asserts the same
        assert self.serverapp is not None
        self._adopt_loggers()
        manager = self.session_manager_class(parent=self, log=self.log)
        if "root_dir" not in self.config.get("UserSessionManager", {}):
            manager.root_dir = self.serverapp.root_dir  # workspaces default to what Jupyter serves
        manager.on_activity = self._activity
        manager.on_audit = self._audit
        manager.notebooks.serverapp = self.serverapp  # (its rooms, contents root and kernels)
        self.manager = manager
        self._tasks: set[asyncio.Future[Any]] = set()
        event_logger = getattr(self.serverapp, "event_logger", None)
        if event_logger is not None:
            for schema in sorted(EVENTS_DIR.glob("*.yaml")):
                event_logger.register_event_schema(schema)
        self.settings.update(
            acp_manager=manager,
            acp_extension=self,
            acp_admin_users=set(self.admin_users),
            acp_admin_scopes=set(self.admin_scopes),
            acp_owner=self._owner(),
            acp_max_message_bytes=self.max_message_bytes,
            acp_max_request_bytes=self.max_request_bytes,
            acp_max_socket_buffer_bytes=self.max_socket_buffer_bytes,
        )
        self._start_hub_mode(manager)
        self._check_credentials(manager.agents)
        self.log.info("jupyter-acp %s: agents %s; sandboxes %s", __version__,
                      ", ".join(s.name for s, ok, _ in manager.agents.list_agents() if ok) or "none",
                      ", ".join(b["kind"] for b in manager.backends() if b["available"]) or "none")

    def _start_hub_mode(self, manager: UserSessionManager) -> None:
        """Decide hub mode once, say which mode is on, and give the manager the service's client.

        In hub mode the admin credentials of this server's own configuration are ignored (with
        one warning): the user can read whatever this server holds."""
        try:
            on, why = resolve_hub_mode(self.hub_mode, self.hub_service_url, os.environ)
        except HubConfigError as e:
            self.log.error("jupyter-acp: %s", e)
            raise
        if not on:
            self.log.info("jupyter-acp: hub mode off (%s): this server meters agents itself", why)
            return
        manager.hub = HubClient(self.hub_service_url, os.environ[HUB_TOKEN_ENV],
                                allow_user_credentials=self.hub_allow_user_credentials,
                                timeout=self.hub_request_timeout)
        self.log.info("jupyter-acp: hub mode on (%s): LLM keys, metering, quota and usage come "
                      "from the JupyterHub service at %s", why, manager.hub.url)
        agents = manager.agents
        if agents.credentials or agents.credentials_from_env:
            self.log.warning(
                "jupyter-acp: hub mode: c.AgentConfigManager.credentials%s of this server are "
                "ignored: the user this server runs as could read them. Give the keys to the hub "
                "service (c.AcpHub.credentials) instead.",
                " and credentials_from_env" if agents.credentials_from_env else "")
            agents.credentials = {}
            agents.credentials_from_env = False

    def _check_credentials(self, agents: AgentConfigManager) -> None:
        """Say at start what would refuse sessions later (an unset variable, an unreadable
        file), and whether inline keys may have been logged before jupyter-acp was loaded."""
        for problem in agents.credential_problems():
            self.log.warning("jupyter-acp: %s", problem)
        exposed = logredact.exposed_before_install
        assert self.serverapp is not None  # (called from initialize_settings)
        if exposed and self.serverapp.log.isEnabledFor(logging.DEBUG):
            self.log.warning(
                "jupyter-acp: the server may have logged inline keys of "
                "c.AgentConfigManager.credentials (%s) at debug level before jupyter-acp was "
                "loaded to mask them (traitlets logs the server's config as it reads it). Give "
                "them by reference ({'env': NAME} or {'file': PATH}) or as "
                "Secret('...') from jupyter_acp.credentials; see docs/security.md.",
                ", ".join(exposed))

    def _adopt_loggers(self) -> None:
        """Send our modules' loggers (``jupyter_acp.gateway``, ``.session``, ``.sandbox``, ...)
        to the server's own handlers, at the server's level: they are not children of the
        server's logger, so their lines (routes opened, quota refusals, sandbox output) were
        lost, even with ``--debug``. They still propagate, so a handler on the root logger
        (pytest's, an admin's) sees them as before."""
        ours = logging.getLogger("jupyter_acp")
        ours.setLevel(self.log.getEffectiveLevel())
        self._adopted = [h for h in self.log.handlers if h not in ours.handlers]
        for handler in self._adopted:
            ours.addHandler(handler)

    def _owner(self) -> str | None:
        """The single user every request acts for, or None to use each request's identity."""
        mode = self.identity
        if mode == "auto":
            provider = type(getattr(self.serverapp, "identity_provider", None))
            mode = "owner" if provider in (IdentityProvider, PasswordIdentityProvider) else "user"
        return self.owner_name if mode == "owner" else None

    def initialize_handlers(self) -> None:
        self.handlers.extend((url_path_join("api/acp", path), cls) for path, cls in handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        """Called once the server's event loop runs: orphan cleanup, then idle culling."""
        try:
            await self.manager.start_backends()
        except Exception:
            self.log.exception("jupyter-acp: could not prepare the sandbox backends")
        self.manager.start_monitor()
        self.spawn(self.manager.notebooks.preload())
        return_large_blocks_to_the_os(self.malloc_mmap_threshold)
        if self.gc_freeze:
            gc.collect()  # (what is garbage now is freed, not frozen)
            gc.freeze()
            self.log.info("jupyter-acp: %d objects of the started server moved out of the garbage "
                          "collector's reach (AcpExtension.gc_freeze)", gc.get_freeze_count())

    def spawn(self, coro: Any) -> asyncio.Future[Any]:
        """Run a task the server owns (a WebSocket-started turn): kept alive, errors logged."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.log.debug("An API task ended with %r", t.exception())

        task.add_done_callback(done)
        return task

    def _activity(self) -> None:
        from jupyter_server._tz import utcnow

        now = utcnow()
        assert self.serverapp is not None  # (the manager calls this once initialize_settings ran)
        settings = self.serverapp.web_app.settings  # (self.settings was merged into it at start)
        settings["acp_last_activity"] = now
        settings.setdefault("last_activity_times", {})["acp"] = now  # ServerApp.last_activity()

    def _audit(self, name: str, data: dict[str, Any]) -> None:
        schema_id = EVENT_SCHEMAS.get(name)
        event_logger = getattr(self.serverapp, "event_logger", None)
        if schema_id is None or event_logger is None:
            return
        payload = {k: str(v) for k, v in data.items() if v is not None}
        if name != "permission":
            payload["action"] = name
        event_logger.emit(schema_id=schema_id, data=payload)

    async def stop_extension(self) -> None:
        """Stop every agent session and sandbox (the server is stopping): nothing is left."""
        self.log.info("jupyter-acp: stopping %d agent sessions", len(self.manager.all_sessions()))
        await self.manager.shutdown()
        if self.manager.hub is not None:
            self.manager.hub.close()
        for task in list(self._tasks):
            task.cancel()
        self.manager.ledger.close()
        for handler in getattr(self, "_adopted", []):
            logging.getLogger("jupyter_acp").removeHandler(handler)


main = launch_new_instance = AcpExtension.launch_instance
"""``jupyter acp``: a Jupyter server with the extension; ``jupyter acp --help-all`` lists every option."""


if __name__ == "__main__":
    main()
