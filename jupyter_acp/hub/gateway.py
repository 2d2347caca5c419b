"""The service's LLM gateway: one port for every user's sessions, keyed by gateway tokens.

The in-server gateway (``jupyter_acp.gateway.server``) gives each session a socket of its own
and a key fixed at open time. Here one tornado handler serves every session: it reads the key
the request presents (the gateway token the single-user server's route sends as its "real
key"), checks it (``tokens.TokenSigner.verify``: signature, expiry, revocation), and builds that
request's ``GatewayRoute`` from the token's claims — the user and the session come from the
token only — with the real key and the upstream of the token's agent. Everything after that is
the reused ``ProxyHandler``: forwarding, streaming, metering, error shapes.

Paths: only the endpoints whose usage the meter reads, or that cost nothing, are forwarded — the
rule of every gateway route (``gateway/endpoints.py``, applied by ``ProxyHandler``); the admin's
``c.AcpHub.gateway_paths`` can narrow that per API. The real key would open every endpoint of
the account — files, batches, fine-tuning — whose cost the meter does not read; a user, who
holds the gateway token their server holds, must not reach them with the admin's key.

Quota: ``check_quota`` is an *admission* in the ledger (``UsageLedger.aadmit``): a lease that
reserves ``request_reserve_tokens`` for the request, granted in one database transaction per
user, so two servers of a user (or two service replicas) cannot both slip past the limit;
``on_usage`` settles the lease with the request's metered usage (record inserted and lease
deleted in one transaction); a request that ends without usage (upstream error, client gone, no
usage block) releases its lease in ``on_finish``. A refusal is HTTP 429 in the API's own error
shape with ``x-acp-quota: exceeded`` (``unavailable`` when the quota cannot be checked), which
the single-user side recognises, and ``x-should-retry: false``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tornado.httpclient import AsyncHTTPClient
from traitlets import Integer

from ..credentials import CredentialUnavailable
from ..errors import QuotaExceeded
from ..gateway.server import GatewayRoute, LlmGateway, ProxyHandler, _error_body
from ..usage import QuotaUnavailable, TurnUsage
from .policy import real_key
from .tokens import InvalidToken

if TYPE_CHECKING:
    from .app import AcpHub

log = logging.getLogger("jupyter_acp.hub.gateway")
#: Strong references to the lease releases under way (the event loop keeps only weak ones).
_releases: set[asyncio.Task[Any]] = set()
#: The gateway requests under way (a stopping service waits for them: ``AcpHub._serve``).
in_flight: set[HubGatewayHandler] = set()
#: Each user's requests under way (``AcpHub.max_requests_per_user``).
_per_user: Counter[str] = Counter()


async def drain(timeout: float) -> int:
    """Wait up to ``timeout`` s for the requests under way, then for their lease releases;
    returns how many requests were still running."""
    deadline = time.monotonic() + timeout
    while in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 (a shutdown, polled)
        await asyncio.sleep(0.05)
    left = len(in_flight)
    if _releases:
        await asyncio.wait(list(_releases), timeout=max(1.0, deadline - time.monotonic()))
    return left

def compile_paths(paths: Mapping[str, Iterable[str]]) -> dict[str, list[re.Pattern[str]]]:
    """``{api: ["METHOD regex", ...]}`` as patterns matched against ``"METHOD /path"``."""
    out: dict[str, list[re.Pattern[str]]] = {}
    for api, rules in paths.items():
        out[api] = []
        for rule in rules:
            method, _, path = rule.strip().partition(" ")
            out[api].append(re.compile(re.escape(method.upper()) + " " + path.strip()))
    return out


class ServiceGateway(LlmGateway):
    """The in-server gateway's settings (``c.LlmGateway.request_timeout``, ``max_request_bytes``
    apply), with an upstream client sized for every user of the hub rather than one server's."""

    max_upstream_requests = Integer(
        1000,
        help="""LLM requests of all users the service forwards at once; more wait in a queue (and
        fail after ``connect_timeout`` there). Each holds two sockets: raise the service's open
        file limit (``ulimit -n``) to more than twice this.""",
    ).tag(config=True)

    @property
    def client(self) -> AsyncHTTPClient:
        if self._client is None:
            self._client = AsyncHTTPClient(force_instance=True, max_clients=self.max_upstream_requests)
        return self._client


class HubGatewayHandler(ProxyHandler):
    """``{prefix}gateway/<LLM API path>``: the LLM proxy of every user's sessions."""

    path_prefix = ""

    def initialize(self, gateway: LlmGateway, route: GatewayRoute | None = None, *,  # type: ignore[override]
                   hub: AcpHub) -> None:
        super().initialize(gateway, route)
        self.hub = hub
        self._lease: str | None = None
        self._refusal = "exceeded"
        self._counted: str | None = None
        self._started = time.time()

    def _guess_api(self) -> str:
        """The API a refused request speaks (for its error's shape), from the header its key
        came in: no route says it yet."""
        if self.request.headers.get("x-goog-api-key") or self.get_query_argument("key", ""):
            return "gemini"
        if self.request.headers.get("x-api-key"):
            return "anthropic"
        return "openai"

    def _stub_route(self) -> None:
        """A route for a request refused before it has one (its errors' shape needs an API)."""
        self.route = GatewayRoute(session_id="-", user="-", api=self._guess_api(), upstream="",
                                  socket_path="", dummy_key="", on_usage=lambda u: None,
                                  check_quota=lambda: None)

    def _refuse(self, status: int, message: str, kind: str) -> None:
        self._stub_route()
        self._fail(status, message, kind)

    async def prepare(self) -> None:
        in_flight.add(self)
        presented = self._presented_key()
        try:
            claims = self.hub.signer.verify(presented)
        except InvalidToken as e:
            log.warning("Gateway: refused a request from %s: invalid gateway token (%s)",
                        self.request.remote_ip, e)
            self._refuse(401, "Invalid gateway token for the jupyter-acp service", "invalid_api_key")
            return
        spec = self.hub.credentials.get(claims.agent)
        if spec is None:
            log.warning("Gateway: user %s asked for agent %r, which has no credentials any more",
                        claims.user, claims.agent)
            self._refuse(403, f"The jupyter-acp service has no credentials for the agent "
                              f"{claims.agent!r} any more", "permission_denied")
            return
        try:
            key = real_key(claims.agent, spec)
        except CredentialUnavailable as e:
            log.error("Gateway: %s", e)
            self._refuse(503, "The jupyter-acp service cannot read this agent's key right now; an "
                              "admin finds why in the service's log", "service_unavailable")
            return
        path = "/" + (self.path_args[0] if self.path_args else "")
        rules = self.hub.gateway_patterns.get(spec["api"])  # (None: endpoints.py's alone)
        if rules is not None and not any(rule.fullmatch(f"{self.request.method} {path}") for rule in rules):
            log.warning("Gateway: refused %s %s of %s (not an endpoint the gateway forwards)",
                        self.request.method, path[:200], claims.user)
            self._refuse(404, f"{self.request.method} {path[:200]} is not available through the "
                              "jupyter-acp gateway", "not_found")
            return
        cap = self.hub.max_requests_per_user
        if cap and _per_user[claims.user] >= cap:
            log.warning("Gateway: %s has %d LLM requests under way; one more was refused", claims.user, cap)
            self._busy(cap)
            return
        _per_user[claims.user] += 1
        self._counted = claims.user
        self.claims = claims
        self.route = GatewayRoute(session_id=claims.session_id, user=claims.user, api=spec["api"],
                                  upstream=spec["base_url"], socket_path="", dummy_key=presented,
                                  on_usage=self._on_usage, check_quota=self._check_quota,
                                  _real_key=key)

    def _busy(self, cap: int) -> None:
        """429 *without* ``x-acp-quota`` and with ``Retry-After``: a client retries this one."""
        self._stub_route()
        self.set_status(429)
        self.set_header("Content-Type", "application/json")
        self.set_header("Retry-After", "1")
        self.finish(json.dumps(_error_body(self.route.api, 429, f"More than {cap} LLM requests of yours "
                                           "are under way; retry when one ends", "rate_limit_exceeded")))

    def _fail(self, status: int, message: str, kind: str) -> None:
        if status == 429:  # (only a quota refusal comes here with 429: upstream ones are relayed)
            self.set_header("x-acp-quota", self._refusal)
        super()._fail(status, message, kind)

    async def _check_quota(self) -> None:
        user = self.claims.user
        try:
            limit = await self.hub.policy.limit_for(user)
            self._lease = await self.hub.ledger.aadmit(user, limit, reserve=self.hub.request_reserve_tokens,
                                                       timeout=self.hub.admission_timeout)
        except QuotaExceeded as e:
            self._refusal = "unavailable" if isinstance(e, QuotaUnavailable) else "exceeded"
            raise

    async def _on_usage(self, usage: TurnUsage) -> None:
        lease, self._lease = self._lease, None
        claims = self.claims
        fields: dict[str, Any] = {"user": claims.user, "session_id": claims.session_id,
                                  "agent": claims.agent, "turn": 0, "usage": usage,
                                  "started_at": self._started}
        if lease is None:  # (never: usage follows an admission; kept so that nothing goes unrecorded)
            await self.hub.ledger.arecord(**fields)
        else:
            await self.hub.ledger.asettle(lease, **fields)

    def on_finish(self) -> None:
        """Release the lease of a request that ended without usage to settle it with."""
        in_flight.discard(self)
        if self._counted is not None:
            _per_user[self._counted] -= 1
            if _per_user[self._counted] <= 0:
                del _per_user[self._counted]
            self._counted = None
        lease, self._lease = self._lease, None
        if lease is not None:
            task = asyncio.ensure_future(self._release(lease))
            _releases.add(task)
            task.add_done_callback(_releases.discard)

    async def _release(self, lease: str) -> None:
        try:
            await self.hub.ledger.asettle(lease)
        except Exception:  # (it expires by itself: the ledger drops expired leases)
            log.exception("Gateway: could not release lease %s", lease)
