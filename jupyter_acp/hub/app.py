"""``AcpHub``: the jupyter-acp JupyterHub service (``jupyter-acp-hub`` / ``python -m jupyter_acp.hub``).

It runs on the admin's side of the trust boundary (as the hub's user, never as a hub user) and
holds what the single-user servers must not: the real LLM keys (``c.AcpHub.credentials``), the
usage ledger (``db_url``: SQLite on one host, PostgreSQL in production), the quotas (per user
and per hub group, admitted atomically in the database), the LLM gateway every user's sessions
go through, the admin page and the REST API (``api.py``). See docs/jupyterhub.md.

JupyterHub starts it as a hub-managed service and passes, in the environment, where to listen
(``JUPYTERHUB_SERVICE_URL``), its URL prefix (``JUPYTERHUB_SERVICE_PREFIX``), its own API token
(``JUPYTERHUB_API_TOKEN``) and the hub API (``JUPYTERHUB_API_URL``), plus the OAuth client
settings of the admin page. An externally managed service gets the same variables from the
admin. Configuration: ``jupyter_acp_hub_config.py`` in the working directory (or ``--config``),
options ``c.AcpHub.*``, ``c.UsageLedger.*``, ``c.LlmGateway.*`` (timeouts, body size) and
``c.HubOAuth.*``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jupyter_core.paths import jupyter_data_dir
from jupyterhub.services.auth import HubOAuth  # type: ignore[import-untyped]
from tornado import httputil, web
from tornado.httpserver import HTTPServer
from traitlets import Dict, Float, Integer, List, Unicode, default
from traitlets.config import Application, catch_config_error

from .. import __version__
from ..gateway import LlmGateway
from ..usage import UsageLedger
from .admin import AdminCsvHandler, AdminHandler, OAuthCallbackHandler
from .api import GatewayTokenHandler, GatewayTokensHandler, QuotaHandler, UsageHandler
from .gateway import HubGatewayHandler, ServiceGateway, compile_paths, drain
from .policy import HubCredentials, QuotaPolicy
from .tokens import TokenSigner, load_secret

#: The environment variable naming the config file (when ``--config`` does not).
CONFIG_ENV = "JUPYTER_ACP_HUB_CONFIG"
_REDACT_PATH = re.compile(r"(api/gateway-tokens/)[^/?]+")
_REDACT_QUERY = re.compile(r"([?&](?:key|token|code|state)=)[^&]*")


def redacted_uri(uri: str) -> str:
    """A request's URI for the access log: no gateway token (DELETE puts it in the path), no
    ``?key=`` / ``?token=`` value, no OAuth ``code`` / ``state``."""
    return _REDACT_QUERY.sub(r"\1<secret>", _REDACT_PATH.sub(r"\1<secret>", uri))


def _log_request(handler: web.RequestHandler) -> None:
    status = handler.get_status()
    logger = logging.getLogger("jupyter_acp.hub.access")
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    logger.log(level, "%d %s %s (%s) %.2fms", status, handler.request.method,
               redacted_uri(handler.request.uri or ""), handler.request.remote_ip,
               1000.0 * handler.request.request_time())


class AcpHub(Application):
    """The jupyter-acp hub service: LLM keys, gateway, ledger, quotas, admin page, REST API."""

    name = "jupyter-acp-hub"
    version = __version__
    description = __doc__.split("\n")[0]
    classes = [UsageLedger, LlmGateway, ServiceGateway, HubOAuth]
    aliases = {"config": "AcpHub.config_file", "db-url": "AcpHub.db_url", "bind-url": "AcpHub.bind_url",
               "log-level": "Application.log_level"}

    @default("log_level")
    def _default_log_level(self) -> int:
        return logging.INFO  # (a service's log is its audit trail: tokens minted, refusals)

    config_file = Unicode(
        help="""The config file to load. Default: $JUPYTER_ACP_HUB_CONFIG, else
        ``jupyter_acp_hub_config.py`` in the working directory (skipped when missing there).""",
    ).tag(config=True)

    @default("config_file")
    def _default_config_file(self) -> str:
        return os.environ.get(CONFIG_ENV) or "jupyter_acp_hub_config.py"

    credentials = HubCredentials(
        help="""The LLM credentials per agent name (the name single-user servers ask a gateway
        token for): {"api": "openai"|"gemini"|"anthropic", "api_key": "<key>" or {"env": NAME}
        or {"file": PATH}, "base_url": "<the API's base URL>" (default: the API's public
        endpoint), "model": "<model>" (optional)}. References are read at every request.""",
    ).tag(config=True)

    data_dir = Unicode(
        help="""Where the service keeps its files (the SQLite ledger, the token secret), made
        0700. Default: ``jupyter_acp_hub`` in the Jupyter data directory of the service's user.""",
    ).tag(config=True)

    @default("data_dir")
    def _default_data_dir(self) -> str:
        return str(Path(jupyter_data_dir()) / "jupyter_acp_hub")

    db_url = Unicode(
        help="""SQLAlchemy URL of the usage ledger, e.g. ``postgresql+psycopg://acp@db/acp``.
        Default: ``sqlite:///<data_dir>/usage.sqlite`` (created 0600).""",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self) -> str:
        return f"sqlite:///{Path(self.data_dir) / 'usage.sqlite'}"

    daily_token_quota = Integer(
        0, help="""Tokens a user may use per UTC day, unless user_quotas or group_quotas say
        otherwise; 0: unlimited.""",
    ).tag(config=True)

    user_quotas = Dict(
        value_trait=Integer(), key_trait=Unicode(),
        help="""Daily token limit per hub user name (0: unlimited). A user's limit is their own
        entry here; else the largest entry in group_quotas of the hub groups they belong to;
        else daily_token_quota.""",
    ).tag(config=True)

    group_quotas = Dict(
        value_trait=Integer(), key_trait=Unicode(),
        help="""Daily token limit per hub group (0: unlimited, which counts as the largest). Needs
        the service's role to have the scope read:users:groups.""",
    ).tag(config=True)

    group_cache_seconds = Float(60.0, help="Seconds a user's hub groups are cached.").tag(config=True)

    gateway_token_lifetime = Float(
        7 * 24 * 3600.0, help="Seconds a gateway token is valid (a session's life; revoked at its end).",
    ).tag(config=True)

    token_secret_file = Unicode(
        help="""File holding the secret that signs gateway tokens (and the admin page's cookies);
        made with a random secret, mode 0600, when missing. Replicas of the service share it.
        Default: ``<data_dir>/token-secret``.""",
    ).tag(config=True)

    @default("token_secret_file")
    def _default_secret_file(self) -> str:
        return str(Path(self.data_dir) / "token-secret")

    request_reserve_tokens = Integer(
        8192,
        help="""Tokens reserved for each LLM request while it runs (its lease). Near a user's
        limit only one request runs at a time; farther, as many as their reserves fit.""",
    ).tag(config=True)

    admission_timeout = Float(
        30.0, help="Seconds an LLM request waits for its admission near the quota before its 429.",
    ).tag(config=True)

    bind_url = Unicode(help="Where to listen. Default: $JUPYTERHUB_SERVICE_URL, else http://127.0.0.1:10101.",
                       ).tag(config=True)

    @default("bind_url")
    def _default_bind_url(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_URL") or "http://127.0.0.1:10101"

    base_url = Unicode(help="URL prefix. Default: $JUPYTERHUB_SERVICE_PREFIX, else /services/jupyter-acp/.",
                       ).tag(config=True)

    @default("base_url")
    def _default_base_url(self) -> str:
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX") or "/services/jupyter-acp/"

    gateway_url = Unicode(
        help="""The gateway's base URL handed to single-user servers with each token (e.g.
        ``http://hub.internal:10101/services/jupyter-acp/gateway``). Default: the URL the
        server asked the token at, with ``gateway`` in place of ``api/gateway-tokens``.""",
    ).tag(config=True)

    gateway_paths = Dict(
        key_trait=Unicode(), value_trait=List(Unicode()),
        help="""Narrows, per API, the endpoints the gateway forwards: ``"METHOD regex"`` matched
        against the path below the API's base URL, e.g. ``{"openai": ["POST /chat/completions"]}``
        forbids the Responses API. Whatever is listed, only endpoints whose usage the gateway
        meters (or that cost nothing) are forwarded (``jupyter_acp/gateway/endpoints.py``).
        Empty: all of those.""",
    ).tag(config=True)

    max_requests_per_user = Integer(
        16,
        help="""LLM requests one user may have under way at once, across all their servers and
        sessions; one more gets a 429 with Retry-After (not a quota refusal). 0: no limit. Keeps
        one user from holding every upstream connection of the service.""",
    ).tag(config=True)

    shutdown_timeout = Float(
        10.0, help="Seconds a stopping service waits for the LLM requests under way.",
    ).tag(config=True)

    admin_days = Integer(30, help="Days the admin page shows by default.").tag(config=True)

    # -- set up ----------------------------------------------------------------------------------
    @catch_config_error
    def initialize(self, argv: Any = None) -> None:
        super().initialize(argv)
        if self.config_file:
            path = Path(self.config_file)
            if path.exists():
                self.load_config_file(path.name, path=str(path.parent.resolve()))
            elif "config_file" in self.config.get("AcpHub", {}) or os.environ.get(CONFIG_ENV):
                self.log.critical("The config file %s does not exist", path)
                self.exit(1)
        self._setup_logging()
        self.init_components()

    def _setup_logging(self) -> None:
        for name in ("jupyter_acp", "tornado"):
            logger = logging.getLogger(name)
            logger.handlers = list(self.log.handlers)
            # (tornado's and HubOAuth's info lines are noise: cookies set, xsrf checks skipped)
            quiet = name == "tornado" and self.log.level >= logging.INFO
            logger.setLevel(logging.WARNING if quiet else self.log.level)
            logger.propagate = False

    def init_components(self) -> None:
        """The ledger (connected, migrated), the signer, the gateway, hub auth, quota policy."""
        if not self.base_url.endswith("/"):
            self.base_url += "/"
        data = Path(self.data_dir)
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        secret = load_secret(Path(self.token_secret_file))
        self.signer = TokenSigner(secret)
        self.cookie_secret = hmac.new(secret, b"jupyter-acp admin cookies", hashlib.sha256).digest()
        self.ledger = UsageLedger(parent=self, db_url=self.db_url)
        _ = self.ledger.engine  # connect and migrate now: a wrong db_url fails at start
        self.gateway = ServiceGateway(parent=self)
        self.gateway_patterns = compile_paths(self.gateway_paths)
        auth_kwargs: dict[str, Any] = {"base_url": self.base_url}
        auth_config = self.config.get("HubOAuth", {})
        if "cache_max_age" not in auth_config:
            auth_kwargs["cache_max_age"] = 60  # a revoked hub token works here at most this long
        if "oauth_client_id" not in auth_config and not os.environ.get("JUPYTERHUB_CLIENT_ID"):
            # (an externally managed service: the hub names a service's OAuth client so)
            name = os.environ.get("JUPYTERHUB_SERVICE_NAME") or "jupyter-acp"
            auth_kwargs["oauth_client_id"] = f"service-{name}"
        self.hub_auth = HubOAuth(parent=self, **auth_kwargs)
        self.policy = QuotaPolicy(default=self.daily_token_quota, users=self.user_quotas,
                                  groups=self.group_quotas, hub_api_url=self.hub_auth.api_url,
                                  api_token=self.hub_auth.api_token, cache_seconds=self.group_cache_seconds)
        if not self.credentials:
            self.log.warning("c.AcpHub.credentials is empty: no agent can reach an LLM through the service")
        if self.group_quotas and not self.hub_auth.api_token:
            self.log.warning("c.AcpHub.group_quotas is set but the service has no hub token "
                             "($JUPYTERHUB_API_TOKEN): users without a quota of their own are refused")

    def gateway_base(self, request: httputil.HTTPServerRequest) -> str:
        """The gateway's base URL for a server that asked at ``request``."""
        if self.gateway_url:
            return self.gateway_url.rstrip("/")
        return f"{request.protocol}://{request.host}{self.base_url}gateway"

    def make_app(self) -> web.Application:
        prefix = re.escape(self.base_url)
        hub = {"hub": self}
        handlers: list[Any] = [
            (prefix + "api/gateway-tokens", GatewayTokensHandler, hub),
            (prefix + r"api/gateway-tokens/([^/]+)", GatewayTokenHandler, hub),
            (prefix + "api/quota", QuotaHandler, hub),
            (prefix + "api/usage", UsageHandler, hub),
            (prefix + "gateway/(.*)", HubGatewayHandler, {"gateway": self.gateway, "hub": self}),
            (prefix + "oauth_callback", OAuthCallbackHandler, hub),
            (prefix + r"admin/usage\.csv", AdminCsvHandler, hub),
            (prefix + "(?:admin)?", AdminHandler, hub),
            (re.escape(self.base_url.rstrip("/")), web.RedirectHandler, {"url": self.base_url}),
        ]
        return web.Application(handlers, cookie_secret=self.cookie_secret, log_function=_log_request,
                               xsrf_cookies=False)

    def make_server(self) -> HTTPServer:
        return HTTPServer(self.make_app(), xheaders=True, max_body_size=self.gateway.max_request_bytes)

    # -- run -------------------------------------------------------------------------------------
    def start(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        parts = urlsplit(self.bind_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        server = self.make_server()
        server.listen(port, parts.hostname or "127.0.0.1")
        self.log.info("jupyter-acp hub service %s at %s%s (ledger %s, %d agent(s) with credentials)",
                      __version__, self.bind_url.rstrip("/"), self.base_url,
                      self.ledger.db_url.split("@")[-1], len(self.credentials))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        self.log.info("Stopping: waiting up to %g s for the LLM requests under way", self.shutdown_timeout)
        server.stop()
        left = await drain(self.shutdown_timeout)
        self.gateway.close()  # (cuts what still runs: those handlers finish and release their leases)
        await drain(2.0)
        if left:
            self.log.warning("Stopped %d LLM request(s) under way; their usage is not recorded", left)
        await asyncio.to_thread(self.ledger.close)


def main(argv: list[str] | None = None) -> None:
    """The console script ``jupyter-acp-hub``."""
    app = AcpHub.instance()
    app.initialize(argv)
    app.start()
