"""The service's REST API (``{prefix}api/…``), authenticated with hub tokens only.

Every request names its caller with ``Authorization: token <hub token>`` (or ``bearer``); the
service asks the hub who that is (``HubAuth.user_for_token``: name, kind and the *token's*
scopes) and trusts nothing else: a user name in a body or a query is at most a filter, checked
against the scopes. No cookie authenticates the API (so no cross-site request can use it).

Scopes (custom, declared in ``c.JupyterHub.custom_scopes``):

* ``custom:acp:use`` — mint and revoke one's own gateway tokens, read one's own quota and usage
  (a filtered ``custom:acp:use!user=<name>`` counts for that user only);
* ``custom:acp-usage:read`` — read everyone's usage (``GET api/usage?user=…``, the admin page).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from jupyterhub.services.auth import check_scopes  # type: ignore[import-untyped]
from tornado import web

from ..errors import AcpError
from ..usage import utc_day
from .reports import ausage_rows, parse_by, parse_day, to_csv
from .tokens import SESSION_ID_RE, InvalidToken

if TYPE_CHECKING:
    from .app import AcpHub

log = logging.getLogger("jupyter_acp.hub")
USE_SCOPE = "custom:acp:use"
READ_SCOPE = "custom:acp-usage:read"
#: The largest request body the API reads (a gateway token request is tiny).
MAX_API_BODY = 16 * 1024


def can_use(model: dict[str, Any]) -> bool:
    """A user's token with ``custom:acp:use`` for that user."""
    return model.get("kind", "user") == "user" and bool(
        check_scopes({f"{USE_SCOPE}!user={model['name']}"}, set(model.get("scopes") or ())))


def can_read_all(model: dict[str, Any]) -> bool:
    """A token (a user's or a service's) with the unfiltered ``custom:acp-usage:read``."""
    return bool(check_scopes({READ_SCOPE}, set(model.get("scopes") or ())))


class ApiError(web.HTTPError):
    """An API error: its message goes in the JSON body (``{"message": …}``), never in the
    status line (it may quote what the client sent)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status)
        self.message = message


class ApiHandler(web.RequestHandler):
    """JSON in and out; the caller from the hub token in the Authorization header only."""

    caller: dict[str, Any]

    def initialize(self, hub: AcpHub) -> None:
        self.hub = hub

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def check_xsrf_cookie(self) -> None:
        """Cookies never authenticate the API: nothing for a cross-site form to ride on."""

    async def prepare(self) -> None:
        match = self.hub.hub_auth.auth_header_pat.match(self.request.headers.get("Authorization", ""))
        token = match.group(1).strip() if match else ""
        model = await self.hub.hub_auth.user_for_token(token, sync=False) if token else None
        if not model:
            raise ApiError(401, "A hub token is required (Authorization: token …)")
        self.caller = model

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        message = error.message if isinstance(error, ApiError | AcpError) else self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": message}))

    def require_use(self) -> str:
        if not can_use(self.caller):
            raise ApiError(403, f"This token lacks the scope {USE_SCOPE}")
        return str(self.caller["name"])

    def body(self) -> dict[str, Any]:
        if len(self.request.body) > MAX_API_BODY:
            raise ApiError(413, "Request body too large")
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            raise ApiError(400, "The body is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The body must be a JSON object")
        return data

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))

    async def _run(self, coro: Any) -> Any:
        try:
            return await coro
        except AcpError as e:
            raise ApiError(e.status, e.message) from e


class GatewayTokensHandler(ApiHandler):
    """``POST api/gateway-tokens``: a gateway token for one session of the caller."""

    async def post(self) -> None:
        user = self.require_use()
        data = self.body()  # (a "user" in it, or anything else but these two, is ignored)
        session_id, agent = data.get("session_id"), data.get("agent")
        if not isinstance(session_id, str) or not SESSION_ID_RE.fullmatch(session_id):
            raise ApiError(400, "session_id must be 1 to 64 characters of A-Z a-z 0-9 . _ : @ -")
        if not isinstance(agent, str) or agent not in self.hub.credentials:
            raise ApiError(404, f"The jupyter-acp service has no credentials for the agent "
                                            f"{str(agent)[:128]!r}")
        spec = self.hub.credentials[agent]
        token, claims = self.hub.signer.mint(user, session_id, agent, self.hub.gateway_token_lifetime)
        log.info("Gateway token %s for %s, session %s, agent %s", claims.token_id, user, session_id, agent)
        self.send_json({"token": token, "api": spec["api"], "base_url": self.hub.gateway_base(self.request),
                        "model": spec["model"], "expires_at": claims.expires_at}, 201)


class GatewayTokenHandler(ApiHandler):
    """``DELETE api/gateway-tokens/<token>``: revoke one of the caller's gateway tokens."""

    async def delete(self, token: str) -> None:
        user = self.require_use()
        try:
            claims = self.hub.signer.decode(token)
        except InvalidToken:
            raise ApiError(404, "No such gateway token") from None
        if claims.user != user:  # (another user's token is not found, as if it did not exist)
            raise ApiError(404, "No such gateway token")
        self.hub.signer.revoke(claims)
        log.info("Gateway token %s of %s (session %s) revoked", claims.token_id, user, claims.session_id)
        self.set_status(204)
        self.finish()


class QuotaHandler(ApiHandler):
    """``GET api/quota``: the caller's tokens today and daily limit."""

    async def get(self) -> None:
        user = self.require_use()
        used = await self._run(self.hub.ledger.atokens_today(user))
        limit = await self._run(self.hub.policy.limit_for(user))
        self.send_json({"user": user, "used_today": used, "limit": limit,
                        "remaining": None if limit is None else max(0, limit - used), "day": utc_day()})


class UsageHandler(ApiHandler):
    """``GET api/usage?by=…&user=…&since=…&until=…&format=json|csv``."""

    async def get(self) -> None:
        read_all = can_read_all(self.caller)
        if not read_all and not can_use(self.caller):
            raise ApiError(403, f"This token lacks the scope {USE_SCOPE} or {READ_SCOPE}")
        user = self.get_query_argument("user", None)
        if not read_all:
            if user is not None and user != self.caller["name"]:
                raise ApiError(403, f"Reading another user's usage needs the scope {READ_SCOPE}")
            user = str(self.caller["name"])
        try:
            by = parse_by(self.get_query_argument("by", "day"))
            since = parse_day(self.get_query_argument("since", None))
            until = parse_day(self.get_query_argument("until", None))
        except ValueError as e:
            raise ApiError(400, f"{e} (dates are YYYY-MM-DD)") from None
        fmt = self.get_query_argument("format", "json")
        if fmt not in ("json", "csv"):
            raise ApiError(400, "format must be json or csv")
        rows = await self._run(ausage_rows(self.hub.ledger, by, user=user, since=since, until=until))
        if fmt == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            self.set_header("Content-Disposition", f'attachment; filename="acp-usage-by-{"-".join(by)}.csv"')
            self.finish(to_csv(by, rows))
            return
        self.send_json({"by": by, "user": user, "since": since, "until": until, "rows": rows})
