"""Hub mode: the single-user extension as a client of the JupyterHub service of jupyter-acp.

Under JupyterHub a user's server runs *as that user*: whatever it holds, the user holds. So in
hub mode it holds no LLM key, no ledger of record and no quota. The hub service
(``python -m jupyter_acp.hub``) holds them; this module asks it, authenticating with the
server's own ``JUPYTERHUB_API_TOKEN`` (``Authorization: token …``: the service learns the user
from the token, never from a name we send):

* ``POST api/gateway-tokens {session_id, agent}`` → a per-session *gateway token*, the
  service's gateway URL and the agent's default model. The manager opens the session's
  in-server gateway route (``gateway/server.py``) with that URL as its upstream and the token
  as its "real key": the sandbox still sees only the route's dummy key and a loopback URL;
* ``DELETE api/gateway-tokens/<token>`` when the session ends (best effort, bounded);
* ``GET api/quota`` before each prompt turn (``HubUsageBook.acheck_quota``);
* ``GET api/usage`` for ``GET /api/acp/usage`` (``usage_summary``, the same shape as the
  local answer).

Each LLM request is metered, admitted against the quota (atomically, across all of the user's
servers) and recorded by the service's gateway; a refusal there is a 429 with ``x-acp-quota``,
which the route turns into ``on_refused`` like a local quota refusal. So a hub-metered session
records nothing in the local ledger (``HubUsageBook``: its usage is shown, in its stats and
turn results, and never written here). A service that cannot be reached is a 503
(``HubUnavailable``, ``QuotaUnavailable``): such an agent does not start, and no turn starts,
rather than run un-metered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse

from .agents import AgentSpec
from .credentials import Secret
from .errors import (
    AgentUnavailable,
    BadRequest,
    HubRefused,
    HubUnavailable,
    UserCredentialsRefused,
)
from .gateway.meter import APIS
from .logredact import register
from .usage import LiveTotals, QuotaUnavailable, RecordOutcome, TurnUsage, utc_day
from .usage.admission import used_up
from .usage.schema import COUNTS

log = logging.getLogger("jupyter_acp.hub")

#: The environment variable JupyterHub gives every single-user server: its hub token.
HUB_TOKEN_ENV = "JUPYTERHUB_API_TOKEN"
#: Where the admin names the service for the servers (``c.Spawner.environment``).
SERVICE_URL_ENV = "JUPYTER_ACP_HUB_SERVICE_URL"
#: Largest answer of the service read as JSON (a usage table of a busy hub is well below it).
MAX_ANSWER_BYTES = 8 * 1024 * 1024


class HubConfigError(ValueError):
    """``hub_mode`` cannot be what the admin asked (said at start, the extension does not load)."""


def resolve_hub_mode(mode: str, url: str, env: Mapping[str, str]) -> tuple[bool, str]:
    """Whether hub mode is on, and a sentence saying why (for the start-up log line).

    ``auto``: on when the server was spawned by JupyterHub (``JUPYTERHUB_API_TOKEN`` and
    ``JUPYTERHUB_USER``) and a service URL is known. ``on`` without a URL or a hub token is a
    ``HubConfigError``: the server would otherwise run agents with no metering at all."""
    token, user = env.get(HUB_TOKEN_ENV), env.get("JUPYTERHUB_USER")
    if mode == "off":
        return False, "c.AcpExtension.hub_mode is 'off'"
    if mode == "on":
        missing = [what for what, ok in (
            (f"service URL (c.AcpExtension.hub_service_url or ${SERVICE_URL_ENV})", url),
            (f"hub token (${HUB_TOKEN_ENV}, set by JupyterHub for the servers it spawns)", token))
            if not ok]
        if missing:
            raise HubConfigError("c.AcpExtension.hub_mode is 'on' but this server has no "
                                 + " and no ".join(missing) + "; jupyter-acp is not loaded, so no "
                                 "agent runs un-metered. Set them, or set hub_mode to 'auto' or 'off'.")
    elif not (token and user and url):
        why = ("not spawned by JupyterHub" if not (token and user)
               else f"no service URL (${SERVICE_URL_ENV} or c.AcpExtension.hub_service_url)")
        return False, f"hub_mode 'auto': {why}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HubConfigError(f"c.AcpExtension.hub_service_url {url!r} is not an http(s) URL")
    return True, f"hub_mode {mode!r}"


@dataclass(frozen=True)
class GatewayGrant:
    """What the service gave one session: its gateway token and where to use it."""

    token: str
    """A ``Secret`` (masked by ``repr``); the route's "real key", never in the sandbox."""
    api: str
    base_url: str
    model: str | None = None
    expires_at: float | None = None


async def service_checks_quota() -> None:
    """The route's quota check for a hub-metered session: none here. The service's gateway
    admits each request against the quota atomically (across all the user's servers) and
    answers 429 with ``x-acp-quota``; asking ``api/quota`` first would only add a round trip."""


class HubClient:
    """The service's client for one single-user server (its hub token is the server's)."""

    def __init__(self, url: str, token: str, *, allow_user_credentials: bool = False,
                 timeout: float = 10.0, revoke_timeout: float = 5.0) -> None:
        self.url = url if url.endswith("/") else url + "/"
        register(token)  # (never in a log line)
        self._token = Secret(token)
        self.allow_user_credentials = allow_user_credentials
        self.timeout = timeout
        self.revoke_timeout = revoke_timeout
        self.book = HubUsageBook(self)
        self._client: AsyncHTTPClient | None = None
        self._revoking: set[asyncio.Task[bool]] = set()

    def __repr__(self) -> str:
        return f"HubClient({self.url!r})"

    @property
    def client(self) -> AsyncHTTPClient:
        if self._client is None:
            self._client = AsyncHTTPClient(force_instance=True, max_clients=32,
                                           max_body_size=MAX_ANSWER_BYTES)
        return self._client

    def close(self) -> None:
        for task in list(self._revoking):
            task.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- HTTP ----------------------------------------------------------------------------------
    async def _call(self, method: str, path: str, *, body: Any = None,
                    params: Mapping[str, str] | None = None, timeout: float | None = None
                    ) -> tuple[int, Any]:
        """(status, JSON or None) of one call; ``HubUnavailable`` when the service cannot be
        reached or fails (5xx, not JSON), ``HubRefused`` when it refuses our token (401/403)."""
        url = self.url + path + (f"?{urlencode(params)}" if params else "")
        headers = {"Authorization": f"token {self._token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = HTTPRequest(url, method=method, headers=headers,
                              body=json.dumps(body) if body is not None else None,
                              request_timeout=timeout or self.timeout,
                              connect_timeout=min(timeout or self.timeout, 5.0),
                              follow_redirects=False)
        try:
            response = await self.client.fetch(request, raise_error=False)
        except Exception as e:  # refused, reset, timed out, DNS: not reachable
            raise self._down(type(e).__name__) from None
        if response.code == 599:
            raise self._down(type(response.error).__name__ if response.error else "no answer")
        data = _json(response)
        message = _message(data) or response.reason or ""
        if response.code >= 500 or response.code in (300, 301, 302, 303, 307, 308):
            raise self._down(f"HTTP {response.code}{': ' + message if message else ''}")
        if response.code in (401, 403):
            raise HubRefused(f"The jupyter-acp hub service refused this request: {message or 'forbidden'} "
                             "(an admin: the server's hub token needs the scope custom:acp:use)")
        return response.code, data

    def _down(self, why: str) -> HubUnavailable:
        log.warning("jupyter-acp hub service %s: %s", self.url, why)
        return HubUnavailable(f"The jupyter-acp hub service cannot be reached ({why}), so agents "
                              "that use an LLM cannot start or run for now; try again in a minute, "
                              "or ask your admin")

    # -- which sessions the service meters -----------------------------------------------------
    def meters(self, spec: AgentSpec, user_credentials: Mapping[str, str] | None) -> bool:
        """Whether the service meters a session of ``spec``: every agent that speaks an LLM
        API (``llm_api``), unless the user brings their own key and the admin lets them
        (``allow_user_credentials``: that session then runs as without a hub, on the local
        gateway, ledger and quota). Refuses a user's ``api_key`` / ``base_url`` otherwise:
        the service meters only its own gateway."""
        if not spec.llm_api or spec.url:
            return False
        own = sorted(k for k in ("api_key", "base_url") if (user_credentials or {}).get(k))
        if not own:
            return True
        if self.allow_user_credentials:
            return False
        raise UserCredentialsRefused(
            f"{spec.display_name} gets its LLM key and endpoint from the JupyterHub service of "
            f"jupyter-acp here, which meters its use; your own {' and '.join(own)} cannot be used "
            "(an admin may allow it with c.AcpExtension.hub_allow_user_credentials)")

    async def grant(self, session_id: str, spec: AgentSpec) -> GatewayGrant:
        """A gateway token for one session of ``spec`` (``POST api/gateway-tokens``)."""
        status, data = await self._call("POST", "api/gateway-tokens",
                                        body={"session_id": session_id, "agent": spec.name})
        if status == 404:
            raise AgentUnavailable(
                f"The JupyterHub service of jupyter-acp has no LLM credentials for "
                f"{spec.display_name} ({_message(data) or 'not configured'}); ask your admin to add "
                f"them to c.AcpHub.credentials[{spec.name!r}]")
        if status not in (200, 201) or not isinstance(data, dict):
            raise self._down(f"HTTP {status} to a gateway token request")
        token, api, base_url, model = (data.get(k) for k in ("token", "api", "base_url", "model"))
        parts = urlsplit(base_url) if isinstance(base_url, str) else None
        if (not isinstance(token, str) or not token or api not in APIS or parts is None
                or parts.scheme not in ("http", "https") or not parts.netloc
                or not (model is None or isinstance(model, str))):
            raise self._down("an unreadable gateway token answer")
        if api != spec.llm_api:
            raise AgentUnavailable(
                f"The JupyterHub service serves {spec.display_name} through the {api} API, but the "
                f"agent speaks {spec.llm_api}; an admin must make them agree")
        expires = data.get("expires_at")
        return GatewayGrant(token=Secret(token), api=api, base_url=str(base_url), model=model or None,
                            expires_at=float(expires) if isinstance(expires, int | float) else None)

    @staticmethod
    def launch_credentials(grant: GatewayGrant, creds: Mapping[str, str]) -> dict[str, str]:
        """The session's credentials: the user's own fields (e.g. ``model``), the gateway
        token as its key and the service's gateway as its endpoint, the service's default
        model unless the user chose one."""
        merged = {k: v for k, v in creds.items() if k not in ("api_key", "base_url")}
        merged.update(api_key=grant.token, base_url=grant.base_url)
        if grant.model and not merged.get("model"):
            merged["model"] = grant.model
        return merged

    async def revoke(self, token: str) -> bool:
        """Revoke a session's gateway token (``DELETE``); best effort: never raises, bounded
        by ``revoke_timeout`` (the token expires anyway). True when the service confirmed."""
        try:
            status, _ = await self._call("DELETE", f"api/gateway-tokens/{quote(token, safe='')}",
                                         timeout=self.revoke_timeout)
        except HubUnavailable:
            log.warning("jupyter-acp: could not revoke a gateway token at the hub service; it "
                        "stays valid until it expires")
            return False
        except Exception as e:
            log.warning("jupyter-acp: could not revoke a gateway token at the hub service (%s); "
                        "it stays valid until it expires", e)
            return False
        return status in (200, 204, 404)

    def revoke_soon(self, token: str) -> asyncio.Task[bool]:
        """``revoke`` in the background (the server keeps the task until it ends)."""
        task = asyncio.ensure_future(self.revoke(token))
        self._revoking.add(task)
        task.add_done_callback(self._revoking.discard)
        return task

    # -- quota and usage -----------------------------------------------------------------------
    async def quota(self) -> dict[str, Any]:
        """``GET api/quota``: ``{user, used_today, limit, remaining, day}``."""
        status, data = await self._call("GET", "api/quota")
        if status != 200 or not isinstance(data, dict):
            raise self._down(f"HTTP {status} to a quota request")
        return data

    async def check_quota(self) -> None:
        """``QuotaExceeded`` when the user has no tokens left today; ``QuotaUnavailable``
        (503) when the service cannot say: a service that is down is no way around it."""
        try:
            quota = await self.quota()
        except HubUnavailable:
            raise QuotaUnavailable("The jupyter-acp hub service cannot be reached, so your daily "
                                   "token quota cannot be checked; try again in a minute") from None
        remaining, limit = quota.get("remaining"), quota.get("limit")
        if isinstance(remaining, int | float) and remaining <= 0:
            raise used_up(int(quota.get("used_today") or 0), int(limit or 0))

    async def usage(self, by: str, user: str | None = None) -> list[dict[str, Any]]:
        """``GET api/usage?by=…`` as rows (the service answers a list, or ``{"rows": [...]}``)."""
        params = {"by": by, "format": "json", **({"user": user} if user else {})}
        status, data = await self._call("GET", "api/usage", params=params)
        if status == 400:
            raise BadRequest(_message(data) or "The hub service refused the usage query")
        if isinstance(data, dict):
            data = next((data[k] for k in ("rows", "usage", "data") if isinstance(data.get(k), list)), None)
        if status != 200 or not isinstance(data, list):
            raise self._down(f"HTTP {status} to a usage request")
        return [row for row in data if isinstance(row, dict)]

    async def usage_summary(self, user: str | None) -> dict[str, Any]:
        """``GET /api/acp/usage``'s answer (``handlers.UsageHandler``) from the service: the
        same shape as the local one, for the sidebar and ``%acp usage``. ``user`` None: every
        user the service lets this server's token read."""
        quota, per_day, per_session = await asyncio.gather(
            self.quota(), self.usage("day", user), self.usage("session", user))
        day = quota.get("day") if isinstance(quota.get("day"), str) else utc_day()
        todays = _sums([d for d in per_day if d.get("day") == day])
        if user is not None and quota.get("user") not in (None, user):  # another user's (an admin)
            quota = {"used_today": todays.get("total_tokens", 0), "limit": None, "remaining": None}
        limit, used = quota.get("limit"), quota.get("used_today")
        return {
            "user": user,
            "today": {"day": day, "total_tokens": 0, **todays},
            "quota": {"max_tokens_per_day": limit if isinstance(limit, int) else 0,
                      "used_today": used if isinstance(used, int) and user is not None else 0,
                      "remaining": quota.get("remaining") if user is not None else None},
            "total": _sums(per_day),
            "per_session": per_session,
            "per_day": per_day,
            "source": "hub",
        }


class HubUsageBook:
    """What a hub-metered session records its usage to (``AgentSession.ledger``): the one
    switch between "the local ledger is the record" and "the service is".

    Its ``arecord`` writes nothing — the service's gateway recorded each LLM request already —
    and keeps the session's totals in memory for its stats; its ``acheck_quota`` asks the
    service. Sessions the service does not meter (the demo agent) use the local ledger."""

    def __init__(self, client: HubClient) -> None:
        self.client = client
        self._live: weakref.WeakKeyDictionary[Any, LiveTotals] = weakref.WeakKeyDictionary()

    async def acheck_quota(self, user: str) -> None:
        await self.client.check_quota()

    async def arecord(self, *, user: str, session_id: str, agent: str, turn: int, usage: TurnUsage,
                      started_at: float, ended_at: float | None = None, owner: Any = None
                      ) -> RecordOutcome:
        if owner is not None:
            live = self._live.get(owner)
            if live is None:
                live = self._live[owner] = LiveTotals()
            for key in COUNTS:
                live.tokens[key] += getattr(usage, key)
            live.cost += usage.cost
        return RecordOutcome(uid="", error="recorded by the jupyter-acp hub service")

    def take_problem(self, owner: Any) -> dict[str, Any] | None:
        return None

    def live_totals(self, owner: Any) -> dict[str, Any]:
        live = self._live.get(owner) or LiveTotals()
        return {**live.tokens, "cost": live.cost}


def _json(response: HTTPResponse) -> Any:
    if not response.body:
        return None
    try:
        return json.loads(response.body)
    except ValueError:
        return None


def _message(data: Any) -> str:
    """The service's error sentence (JupyterHub's ``{"message"}``, or an ``error`` object)."""
    if isinstance(data, dict):
        for value in (data.get("message"), (data.get("error") or {}).get("message")
                      if isinstance(data.get("error"), dict) else data.get("error")):
            if isinstance(value, str) and value:
                return value[:500]
    return ""


def _sums(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out
