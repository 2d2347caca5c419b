"""The admin's policy in the service: whose key each agent uses, and how many tokens a user gets.

Credentials (``c.AcpHub.credentials``) are per agent name, the name the single-user servers
ask a gateway token for::

    c.AcpHub.credentials = {
        "qwen": {"api": "openai", "api_key": {"file": "/etc/jupyterhub/secrets/dashscope"},
                 "base_url": "https://dashscope.aliyuncs.com/compatible-mode/v1",
                 "model": "qwen3-coder-plus"},
        "gemini": {"api": "gemini", "api_key": {"env": "GEMINI_API_KEY"}},
    }

``api_key`` is inline (a ``Secret``: its ``repr`` is masked and its value registered with
``logredact``) or a reference read with ``credentials.resolve`` at every request, so a rotated
key file is used at once. Errors never quote a value.

A user's daily limit (``limit_for``): the user's own entry in ``user_quotas``; else the largest
entry of the hub groups the user belongs to in ``group_quotas`` (0 there means unlimited, so it
is the largest); else ``daily_token_quota``. 0 means unlimited (``None`` to callers). Groups are
read from the hub API with the service's own token (``GET users/<name>``: the service's role
needs ``read:users:groups``), cached ``group_cache_seconds``; when the hub cannot be asked and
nothing is cached, the request is refused (``QuotaUnavailable``) rather than let through.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from traitlets import Dict, TraitError

from ..credentials import as_secret, resolve
from ..gateway.meter import APIS
from ..gateway.server import DEFAULT_UPSTREAMS
from ..logredact import ENV_NAME_RE, is_reference
from ..usage import QuotaUnavailable

log = logging.getLogger("jupyter_acp.hub")

FIELDS = ("api", "api_key", "base_url", "model")
#: Agent names the API accepts (they appear in URLs, logs and the admin page).
MAX_AGENT_CHARS = 128


def _check_agent(agent: str, fields: Any) -> dict[str, Any]:
    where = f"c.AcpHub.credentials[{agent!r}]"
    if not isinstance(fields, Mapping):
        raise TraitError(f"{where} must be a dict with 'api' and 'api_key', not a "
                         f"{type(fields).__name__} (value not shown)")
    unknown = sorted(set(map(str, fields)) - set(FIELDS))
    if unknown:
        raise TraitError(f"{where}: unknown field(s) {unknown}; known: {', '.join(FIELDS)}")
    api = fields.get("api")
    if api not in APIS:
        raise TraitError(f"{where}['api'] must be one of {', '.join(APIS)}")
    key = fields.get("api_key")
    if isinstance(key, str) and key:
        key = as_secret("api_key", key)
    elif isinstance(key, Mapping) and is_reference(key):
        kind, target = next(iter(key.items()))
        if kind == "env" and not ENV_NAME_RE.fullmatch(target):
            raise TraitError(f"{where}['api_key']: 'env' must name an environment variable")
        if kind == "file" and not target.startswith("/"):
            raise TraitError(f"{where}['api_key']: 'file' must be an absolute path")
        key = {kind: target}
    else:
        raise TraitError(f"{where}['api_key'] is required: a string or a reference {{'env': NAME}} / "
                         "{'file': PATH} (value not shown)")
    base_url = fields.get("base_url") or DEFAULT_UPSTREAMS[api]
    parts = urlsplit(str(base_url))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TraitError(f"{where}['base_url'] must be an http(s) URL")
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise TraitError(f"{where}['model'] must be a string")
    return {"api": api, "api_key": key, "base_url": str(base_url).rstrip("/"), "model": model or None}


class HubCredentials(Dict):
    """The ``credentials`` trait of the service: checked per agent; errors never quote values."""

    info_text = "a dict of agent names to {'api', 'api_key', 'base_url', 'model'}"

    def validate(self, obj: Any, value: Any) -> Any:
        if not isinstance(value, Mapping):
            self.error(obj, value)
        out = {}
        for agent, fields in value.items():
            name = str(agent)
            if not name or len(name) > MAX_AGENT_CHARS:
                raise TraitError(f"c.AcpHub.credentials: agent names are 1 to {MAX_AGENT_CHARS} characters")
            out[name] = _check_agent(name, fields)
        return out

    def error(self, obj: Any, value: Any, error: Exception | None = None, info: str | None = None) -> Any:
        raise TraitError(f"The {self.name!r} trait expected {self.info_text}, not a "
                         f"{type(value).__name__} (value not shown)")


def real_key(agent: str, spec: Mapping[str, Any]) -> str:
    """The agent's key now (a reference is read at every call; raises ``CredentialUnavailable``)."""
    return resolve(agent, "api_key", spec["api_key"])


class QuotaPolicy:
    """Works out each user's daily limit from the service's traits and the user's hub groups."""

    def __init__(self, *, default: int, users: Mapping[str, int], groups: Mapping[str, int],
                 hub_api_url: str, api_token: str, cache_seconds: float = 60.0) -> None:
        self.default = default
        self.users = dict(users)
        self.groups = dict(groups)
        self.hub_api_url = hub_api_url.rstrip("/")
        self._api_token = api_token
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._client = AsyncHTTPClient()

    async def groups_of(self, user: str) -> list[str]:
        """The user's hub groups (cached); ``QuotaUnavailable`` if the hub cannot say and
        nothing is cached (a stale entry is used while the hub is down)."""
        now = time.monotonic()
        cached = self._cache.get(user)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        url = f"{self.hub_api_url}/users/{quote(user, safe='')}"
        request = HTTPRequest(url, headers={"Authorization": f"token {self._api_token}"},
                              request_timeout=10, connect_timeout=5)
        try:
            response = await self._client.fetch(request, raise_error=False)
            if response.code == 404:  # (deleted from the hub meanwhile: no groups)
                groups: list[str] = []
            elif response.code != 200:
                raise OSError(f"HTTP {response.code}")
            else:
                model = json.loads(response.body)
                if "groups" not in model:
                    raise OSError("the user model has no groups: the service's role needs "
                                  "read:users:groups")
                groups = [str(g) for g in model.get("groups") or []]
        except (OSError, ValueError) as e:
            log.warning("Could not read the hub groups of %s (%s)", user, e)
            if cached is not None:
                return cached[1]
            raise QuotaUnavailable("The daily token quota cannot be worked out right now (the hub "
                                   "does not answer); try again in a minute") from None
        self._cache[user] = (now, groups)
        return groups

    async def limit_for(self, user: str) -> int | None:
        """Tokens ``user`` may use today (None: unlimited); see the module docstring."""
        if user in self.users:
            value = self.users[user]
        else:
            value = self.default
            if self.groups:
                entries = [self.groups[g] for g in await self.groups_of(user) if g in self.groups]
                if entries:
                    value = 0 if 0 in entries else max(entries)
        return value if value > 0 else None
