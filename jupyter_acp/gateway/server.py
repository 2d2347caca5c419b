"""The LLM gateway: the only way from a sandbox without network to the LLM, metered and capped.

Each session that uses it gets a *route*: a tornado HTTP server in the Jupyter server process,
listening on a unix socket of its own (a private directory, mounted into that session's sandbox
only). Inside the sandbox a tiny relay (``relay.py``) listens on ``127.0.0.1:<port>`` and
forwards to the socket, so the agent is simply configured with
``base_url = http://127.0.0.1:<port>/v1`` and a per-session dummy key.

For every request the route:

1. checks the dummy key (``Authorization: Bearer``, ``x-goog-api-key``, ``x-api-key`` or
   ``?key=``) — 401 otherwise;
2. refuses it with HTTP 429 (a JSON error in the agent's own API format, and
   ``x-should-retry: false`` so OpenAI clients do not retry) when the user's daily quota is
   used up, and tells the route's ``on_refused``: real agents retry a 429 anyway (for minutes),
   so the session ends the turn itself (``AgentSession.quota_refused``);
3. forwards it to the one upstream endpoint fixed when the session started — which must be an
   endpoint the admin allows — with the *real* credentials, which never enter the sandbox;
4. relays the response as it streams, while ``UsageMeter`` reads its ``usage`` block; for
   OpenAI streams it sets ``stream_options.include_usage`` so that the endpoint reports usage;
5. hands the usage to the route's ``on_usage`` (the session records it in the ledger, one
   record per LLM request, source ``gateway``) *before* the last byte reaches the agent,
   so that the agent's turn cannot end before its last request is counted.

Accounting rule: a session whose LLM traffic goes through the gateway is metered by the gateway
only — what the agent reports over ACP is shown (context window) but not recorded — so nothing
is counted twice and calls the agent never reports (hidden follow-up, memory, title calls) are
counted too.
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from tornado import httputil, web
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_unix_socket
from traitlets import Bool, Float, Integer, List, Unicode, default
from traitlets.config import LoggingConfigurable

from ..errors import BadRequest, QuotaExceeded
from ..refusals import RefusalLog
from ..usage import TurnUsage
from .endpoints import UNMETERED_SOURCE, endpoint_kind, estimate
from .meter import APIS, UsageMeter

log = logging.getLogger("jupyter_acp.gateway")

RELAY = Path(__file__).with_name("relay.py")
#: Headers never passed on (hop-by-hop, or rewritten by the gateway).
_DROP_REQUEST = {"host", "authorization", "x-goog-api-key", "x-api-key", "content-length", "connection",
                 "accept-encoding", "transfer-encoding", "keep-alive", "proxy-authorization", "te",
                 "upgrade", "cookie"}
_KEEP_RESPONSE = {"content-type", "cache-control", "retry-after", "x-request-id", "request-id",
                  "x-should-retry", "x-acp-quota",
                  "openai-processing-ms", "x-ratelimit-remaining-tokens", "x-ratelimit-remaining-requests"}

#: The header of an upstream quota refusal (a 429 of the JupyterHub service's gateway, whose
#: upstream is then this route's): the route calls ``on_refused`` as for its own refusal.
QUOTA_HEADER = "x-acp-quota"
#: Bytes of such a refusal's body read for its message (it is passed on whole).
MAX_REFUSAL_BYTES = 64 * 1024

#: Where agents send requests when the credentials name no endpoint.
DEFAULT_UPSTREAMS = {"openai": "https://api.openai.com/v1",
                     "gemini": "https://generativelanguage.googleapis.com",
                     "anthropic": "https://api.anthropic.com"}
#: The path prefix of the agent's base URL inside the sandbox (``http://127.0.0.1:<port><prefix>``).
AGENT_PREFIX = {"openai": "/v1", "gemini": "", "anthropic": ""}


def _error_body(api: str, status: int, message: str, kind: str) -> dict[str, Any]:
    """An error in the shape the agent's own SDK parses and shows."""
    if api == "gemini":
        status_name = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED"}
        return {"error": {"code": status, "message": message,
                          "status": status_name.get(status, "UNAVAILABLE")}}
    if api == "anthropic":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "code": kind}}


#: The route's usage and quota callbacks: coroutine functions (the session manager's: the ledger
#: works in its own threads, never on this event loop) or plain functions (tests, scripts).
UsageCallback = Callable[[TurnUsage], Awaitable[None] | None]
QuotaCallback = Callable[[], Awaitable[None] | None]


async def _settle(result: Awaitable[None] | None) -> None:
    """Await a callback's result if it is awaitable (see ``UsageCallback``)."""
    if inspect.isawaitable(result):
        await result


@dataclass
class GatewayRoute:
    """One session's way out: its socket, its dummy key, its fixed upstream."""

    session_id: str
    user: str
    api: str
    upstream: str
    """The real endpoint's base URL (e.g. ``https://…/v1``); fixed for the session's life."""
    socket_path: str
    dummy_key: str
    on_usage: UsageCallback
    check_quota: QuotaCallback
    on_refused: Callable[[str], None] | None = None
    """Told each quota refusal's message (the session ends its turn: agents retry a 429)."""
    _real_key: str = field(repr=False, default="")
    _server: HTTPServer | None = field(repr=False, default=None)
    requests: int = 0

    @property
    def agent_base_url(self) -> str:
        """The base URL the agent is given (``{port}`` is filled in by the relay)."""
        return "http://127.0.0.1:{port}" + AGENT_PREFIX[self.api]

    def __repr__(self) -> str:  # never the keys
        return f"GatewayRoute(session={self.session_id!r}, api={self.api!r}, upstream={self.upstream!r})"


class LlmGateway(LoggingConfigurable):
    """Opens and closes per-session routes; holds the admin's gateway settings."""

    enabled = Bool(
        True,
        help="""Send the LLM traffic of sandboxed agents through the server (when the agent
        speaks a known LLM API and has an ``api_key``): the real key stays out of the sandbox,
        the sandbox needs no network, and every request is metered and held to the daily
        quota. False: agents get the real credentials and need ``network`` to reach the LLM.""",
    ).tag(config=True)

    allowed_endpoints = List(
        Unicode(),
        help="""URL prefixes of LLM endpoints that user-supplied ``base_url`` credentials may
        name, e.g. ``["https://dashscope.aliyuncs.com/compatible-mode/v1"]``. Endpoints in the
        admin's own ``c.AgentConfigManager.credentials`` and each agent's default endpoint are
        always allowed. Empty: users may not choose an endpoint of their own.""",
    ).tag(config=True)

    socket_dir = Unicode(
        help="""Directory holding each route's private socket directory. Keep the path short
        (unix socket paths are limited to about 100 bytes). Default: the system temp dir.""",
    ).tag(config=True)

    @default("socket_dir")
    def _default_socket_dir(self) -> str:
        return tempfile.gettempdir()

    request_timeout = Float(
        900.0, help="Seconds one LLM request (a whole streamed answer) may take upstream."
    ).tag(config=True)

    max_request_bytes = Integer(
        16 * 1024 * 1024,
        help="""Largest request body (bytes) an agent may send to its LLM through the gateway;
        a larger one gets HTTP 413. The body is held in the server's memory while it is
        forwarded, so this bounds what one agent can make the server hold per request.""",
    ).tag(config=True)

    max_connections_per_session = Integer(
        8,
        help="""Connections one session's agent may hold open to the gateway at once; more are
        closed at once. Real agents use one or two; without a bound, one agent could hold
        every upstream slot and slow every other user's LLM requests.""",
    ).tag(config=True)

    relay_python = Unicode(
        help="""The Python that runs the relay inside the sandbox (stdlib only; it must exist
        inside the sandbox too). Default: ``/usr/bin/python3`` when present, else the server's.""",
    ).tag(config=True)

    @default("relay_python")
    def _default_relay_python(self) -> str:
        return system_python()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.routes: dict[str, GatewayRoute] = {}
        self._client: AsyncHTTPClient | None = None

    @property
    def client(self) -> AsyncHTTPClient:
        if self._client is None:
            self._client = AsyncHTTPClient(force_instance=True, max_clients=64)
        return self._client

    # -- policy --------------------------------------------------------------------------------
    def check_endpoint(self, url: str, trusted: list[str]) -> None:
        """Refuse an upstream the admin does not allow (``BadRequest`` naming the setting)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BadRequest(f"base_url {url!r} is not an http(s) URL")
        norm = url.rstrip("/") + "/"
        for prefix in [*trusted, *self.allowed_endpoints]:
            if prefix and norm.startswith(prefix.rstrip("/") + "/"):
                return
        raise BadRequest(f"The LLM endpoint {url!r} is not allowed on this server; an admin can "
                         "add it to c.LlmGateway.allowed_endpoints")

    # -- routes --------------------------------------------------------------------------------
    def open_route(self, *, session_id: str, user: str, api: str, upstream: str, api_key: str,
                   on_usage: UsageCallback, check_quota: QuotaCallback,
                   on_refused: Callable[[str], None] | None = None) -> GatewayRoute:
        if api not in APIS:
            raise ValueError(f"Unknown LLM API {api!r}")
        # private (mkdtemp's 0700): the sandbox reaches it as the same uid (bubblewrap maps it),
        # or the Docker backend gives it to the container's user (DockerSandbox.chown_rw_paths)
        os.makedirs(self.socket_dir, mode=0o700, exist_ok=True)  # (an admin's may not exist yet)
        directory = tempfile.mkdtemp(prefix="jacp-llm-", dir=self.socket_dir)
        path = os.path.join(directory, "llm.sock")
        route = GatewayRoute(session_id=session_id, user=user, api=api, upstream=upstream.rstrip("/"),
                             socket_path=path, dummy_key=f"jacp-{secrets.token_urlsafe(24)}",
                             on_usage=on_usage, check_quota=check_quota, on_refused=on_refused,
                             _real_key=api_key)
        app = web.Application([(r"/(.*)", ProxyHandler, {"route": route, "gateway": self})])
        server = _BoundedHTTPServer(app, max_body_size=self.max_request_bytes)
        server.max_connections = self.max_connections_per_session
        server.label = session_id
        server.add_socket(bind_unix_socket(path, mode=0o600))
        route._server = server
        self.routes[session_id] = route
        log.info("LLM gateway route for session %s (%s API, upstream %s)", session_id, api, route.upstream)
        return route

    def close_route(self, session_id: str) -> None:
        route = self.routes.pop(session_id, None)
        if route is None:
            return
        if route._server is not None:
            route._server.stop()
            route._server = None
        shutil.rmtree(os.path.dirname(route.socket_path), ignore_errors=True)

    def close(self) -> None:
        for session_id in list(self.routes):
            self.close_route(session_id)
        if self._client is not None:
            self._client.close()
            self._client = None

    def relay_argv(self, route: GatewayRoute, argv: list[str], env_templates: dict[str, str], *,
                   socket_dir: str | None = None) -> list[str]:
        """The sandbox command: the relay, which sets ``env_templates`` and execs ``argv``.
        ``socket_dir``: where the sandbox shows the route's socket directory (default: its
        host path)."""
        socket = route.socket_path if socket_dir is None else \
            os.path.join(socket_dir, os.path.basename(route.socket_path))
        cmd = [self.relay_python, "-I", str(RELAY), "--socket", socket]
        for name, value in env_templates.items():
            cmd += ["--env", f"{name}={value}"]
        return [*cmd, "--", *argv]

    def sandbox_paths(self, route: GatewayRoute) -> tuple[list[str], list[str]]:
        """(read-only, read-write) host paths the sandbox needs for the relay and the socket."""
        return [str(RELAY.parent)], [os.path.dirname(route.socket_path)]


def system_python() -> str:
    """The Python a stdlib relay runs with inside a sandbox: the system's ``python3`` (which
    every sandbox has, e.g. the sandbox image's), else the server's own."""
    return shutil.which("python3", path="/usr/bin:/bin") or sys.executable


class _BoundedHTTPServer(HTTPServer):
    """One route's HTTP server: at most ``max_connections`` open at once (more are closed)."""

    max_connections = 8
    label = ""
    refusals: RefusalLog | None = None

    def handle_stream(self, stream: Any, address: Any) -> None:
        # ``_connections``: tornado's own set of this server's open HTTP/1 connections
        if len(self._connections) >= self.max_connections:
            if self.refusals is None:
                self.refusals = RefusalLog(self.label, logger=log)
            self.refusals.warning("more than %d connections to the LLM gateway; one was closed",
                                  self.max_connections)
            stream.close()
            return
        super().handle_stream(stream, address)


class ProxyHandler(web.RequestHandler):
    """Checks, forwards and meters one agent request (see the module docstring).

    One handler serves one route (``initialize(route=…)``: a session's own socket). A server
    that serves many routes on one port (the JupyterHub service's gateway) subclasses it and
    sets ``self.route`` in ``prepare`` from the presented key (``resolve_route``), and sets
    ``path_prefix`` to the part of the path its routes' agents put before the LLM API's."""

    SUPPORTED_METHODS = ("GET", "POST")
    route: GatewayRoute
    #: None: the route's API's own prefix (``AGENT_PREFIX``), as an agent in a sandbox sends it.
    path_prefix: str | None = None

    def initialize(self, gateway: LlmGateway, route: GatewayRoute | None = None) -> None:
        if route is not None:
            self.route = route
        self.gateway = gateway
        self._status_line: httputil.ResponseStartLine | None = None
        self._held: bytes | None = None
        self._quota_body: bytearray | None = None  # an upstream quota refusal's (QUOTA_HEADER)

    def _fail(self, status: int, message: str, kind: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        if status == 429:
            self.set_header("x-should-retry", "false")
        self.finish(json.dumps(_error_body(self.route.api, status, message, kind)))

    def _presented_key(self) -> str:
        auth = self.request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        for name in ("x-goog-api-key", "x-api-key"):
            if self.request.headers.get(name):
                return self.request.headers[name].strip()
        return self.get_query_argument("key", "")

    async def get(self, path: str) -> None:
        await self._proxy(path)

    async def post(self, path: str) -> None:
        await self._proxy(path)

    async def _proxy(self, path: str) -> None:
        route = self.route
        if not hmac.compare_digest(self._presented_key().encode(), route.dummy_key.encode()):
            log.warning("LLM gateway: refused a request with a wrong key (session %s)", route.session_id)
            self._fail(401, "Invalid API key for this session's LLM gateway", "invalid_api_key")
            return
        prefix = AGENT_PREFIX[route.api] if self.path_prefix is None else self.path_prefix
        full = "/" + path
        if prefix and not (full == prefix or full.startswith(prefix + "/")):
            self._fail(404, f"Unknown path {full!r}: the LLM API is under {prefix}", "not_found")
            return
        query = [(k, v) for k, v in parse_qsl(self.request.query, keep_blank_values=True) if k != "key"]
        relative = full[len(prefix):]
        url = route.upstream + relative + (f"?{urlencode(query)}" if query else "")
        if not url.startswith(route.upstream):  # defence in depth: never another host
            self._fail(403, "That endpoint is not allowed", "forbidden")
            return
        kind = endpoint_kind(route.api, self.request.method or "", relative)
        if kind is None:  # its usage could not be metered: never forwarded (see endpoints.py)
            self._refusals().warning("LLM gateway: refused %s %s, an endpoint it cannot meter",
                                     self.request.method, full[:200])
            self._fail(404, f"The LLM gateway does not forward {self.request.method} {full[:200]}: "
                       "it cannot meter that endpoint's usage", "not_found")
            return
        try:
            await _settle(route.check_quota())
        except QuotaExceeded as e:
            log.info("LLM gateway: quota refusal for %s (session %s)", route.user, route.session_id)
            self._fail(429, str(e), "insufficient_quota")
            if route.on_refused is not None:  # agents retry a 429 for minutes: the session ends the turn
                try:
                    route.on_refused(str(e))
                except Exception:
                    log.exception("LLM gateway: could not end the refused turn of session %s",
                                  route.session_id)
            return
        body = self._body(self.request.body, relative)
        headers = httputil.HTTPHeaders()
        for name, value in self.request.headers.get_all():
            if name.lower() not in _DROP_REQUEST:
                headers.add(name, value)
        if route.api == "openai":
            headers["Authorization"] = f"Bearer {route._real_key}"
        elif route.api == "gemini":
            headers["x-goog-api-key"] = route._real_key
        else:
            headers["x-api-key"] = route._real_key
        meter = UsageMeter(route.api)
        route.requests += 1

        received = 0

        def on_chunk(chunk: bytes) -> None:
            nonlocal received
            received += len(chunk)
            meter.feed(chunk)
            if self._quota_body is not None and len(self._quota_body) < MAX_REFUSAL_BYTES:
                self._quota_body += chunk
            if self._held is not None:  # hold the latest chunk until the usage is recorded
                self._write(self._held)
            self._held = chunk

        request = HTTPRequest(url, method=self.request.method, headers=headers,
                              body=body if self.request.method == "POST" else None,
                              request_timeout=self.gateway.request_timeout, connect_timeout=30,
                              streaming_callback=on_chunk, header_callback=self._on_header,
                              decompress_response=True, follow_redirects=False)
        try:
            response = await self.gateway.client.fetch(request, raise_error=False)
        except Exception as e:
            log.warning("LLM gateway: upstream %s failed for session %s: %s", route.upstream,
                        route.session_id, type(e).__name__)
            if not self._headers_written:
                self._fail(502, f"The LLM endpoint could not be reached ({type(e).__name__})", "bad_gateway")
            else:
                self._flush_held()
                self.finish()
            return
        usage = meter.result()
        if usage is None and kind == "billed" and 200 <= response.code < 300:
            await self._unmetered(estimate(len(body), received, meter.model), full)
            return
        if usage is not None and usage.total_tokens:
            try:
                await _settle(route.on_usage(usage))
            except Exception:
                log.exception("LLM gateway: could not record usage of session %s", route.session_id)
        log.debug("LLM gateway: %s %s -> %s (%s tokens) for session %s", self.request.method, full,
                  response.code, usage.total_tokens if usage else 0, route.session_id)
        if self._quota_body is not None and response.code == 429:
            self._refused_upstream(bytes(self._quota_body))  # (before the agent sees the 429)
        if self._status_line is None:
            self.set_status(response.code)
        self._flush_held()
        if not self._finished:
            self.finish()

    def _refusals(self) -> RefusalLog:
        """The route's rate-limited log of refusals (an agent may send thousands)."""
        server = self.route._server
        if isinstance(server, _BoundedHTTPServer):
            if server.refusals is None:
                server.refusals = RefusalLog(self.route.session_id, logger=log)
            return server.refusals
        return RefusalLog(self.route.session_id, logger=log)

    async def _unmetered(self, usage: TurnUsage, full: str) -> None:
        """A billed response without readable usage: record the flagged estimate, and do not
        deliver the response's end (``endpoints.py`` says why)."""
        route = self.route
        self._refusals().warning("LLM gateway: no usage in the response to %s; recorded an estimate "
                                 "(%d tokens, source %s) and cut the response", full[:200],
                                 usage.total_tokens, UNMETERED_SOURCE)
        try:
            await _settle(route.on_usage(usage))
        except Exception:
            log.exception("LLM gateway: could not record usage of session %s", route.session_id)
        self._held = None
        if not self._headers_written:
            self._fail(502, "The LLM endpoint's response carried no usage the gateway could meter",
                       "bad_gateway")
            return
        connection = self.request.connection
        stream = getattr(connection, "stream", None)
        if stream is not None:
            stream.close()  # an incomplete body: the agent sees a failed request
        self._finished = True  # nothing more may be written (tornado would finish the response)

    def _body(self, raw: bytes, relative: str) -> bytes:
        """Ask OpenAI chat-completions endpoints for the usage of a streamed answer (the
        Responses API always reports it, and refuses the option)."""
        if self.route.api != "openai" or relative != "/chat/completions" or not raw:
            return raw
        try:
            data = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(data, dict) and data.get("stream") is True:
            options = data.get("stream_options")
            if not isinstance(options, dict):
                options = data["stream_options"] = {}
            if options.get("include_usage") is not True:
                options["include_usage"] = True
                return json.dumps(data).encode()
        return raw

    def _on_header(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if line.startswith("HTTP/"):
            self._status_line = httputil.parse_response_start_line(line)
            return
        if not line:
            if self._status_line is not None and self._status_line.code != 100:
                self.set_status(self._status_line.code, self._status_line.reason or None)
            return
        name, _, value = line.partition(":")
        if name.strip().lower() == QUOTA_HEADER and self._status_line is not None \
                and self._status_line.code == 429:
            self._quota_body = bytearray()
        if name.strip().lower() in _KEEP_RESPONSE and self._status_line is not None \
                and self._status_line.code != 100:
            self.set_header(name.strip(), value.strip())

    def _refused_upstream(self, body: bytes) -> None:
        """The upstream (the hub service's gateway) refused the request for the user's quota:
        the body goes to the agent unchanged, and the route's ``on_refused`` gets its message
        (the session ends the turn, as for a refusal of the route's own quota check)."""
        route = self.route
        log.info("LLM gateway: the upstream refused a request of %s for the quota (session %s)",
                 route.user, route.session_id)
        if route.on_refused is None:
            return
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        if not isinstance(message, str) or not message:
            message = "Daily token quota used up (refused by the jupyter-acp hub service)"
        try:
            route.on_refused(message[:2000])
        except Exception:
            log.exception("LLM gateway: could not end the refused turn of session %s", route.session_id)

    def _write(self, chunk: bytes) -> None:
        if self._finished or self.request.connection is None:
            return
        with contextlib.suppress(Exception):
            self.write(chunk)
            future = self.flush()
            future.add_done_callback(lambda f: f.exception())  # a vanished agent is fine

    def _flush_held(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._write(held)
