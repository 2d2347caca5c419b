"""A fake JupyterHub API and a client for the jupyter-acp hub service, for tests without a hub.

``FakeHub`` answers what the service asks the hub: ``GET /hub/api/user`` (whose token is this,
with which scopes: what ``HubAuth.user_for_token`` reads) and ``GET /hub/api/users/<name>`` (the
user's groups, asked with the service's own token). ``TOKENS`` is its whole database.
``Service`` is a running ``AcpHub`` and a client for it (see ``tests/test_hub_service.py``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from fake_llm import FakeLLM
from tornado import web
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets.config import Config

from jupyter_acp.hub import AcpHub

REAL_KEY = "sk-real-hub-key-never-in-a-server-4242"
GEMINI_KEY = "gm-real-hub-key-never-in-a-server-4343"
SERVICE_TOKEN = "service-token-of-jupyter-acp"
USE = "custom:acp:use"
READ = "custom:acp-usage:read"
HOSTILE = '<script>alert("x")</script>&\'=1+2'
#: hub token → (user, the token's scopes); the fake hub's whole database
TOKENS: dict[str, tuple[str, list[str]]] = {
    "tok-alice": ("alice", [USE, "read:users:name!user=alice"]),
    "tok-alice-filtered": ("alice", [f"{USE}!user=alice"]),
    "tok-bob": ("bob", [USE]),
    "tok-carol": ("carol", [USE]),
    "tok-dave": ("dave", [USE]),
    "tok-erin": ("erin", [USE]),
    "tok-nouse": ("mallory", ["read:users:name!user=mallory"]),
    "tok-wrongfilter": ("mallory", [f"{USE}!user=alice"]),
    "tok-admin": ("admin", [USE, READ, "admin:users"]),
    "tok-hostile": (HOSTILE, [USE]),
}
GROUPS = {"dave": ["small", "big"], "erin": ["big"], "alice": ["unlimited"]}


class FakeHub:
    """The hub API as the service uses it; counts the group look-ups."""

    def __init__(self) -> None:
        self.group_lookups = 0
        self.down = False
        fake = self

        class User(web.RequestHandler):
            def get(self) -> None:
                token = self.request.headers.get("Authorization", "").partition(" ")[2]
                if fake.down or token not in TOKENS:
                    raise web.HTTPError(403)
                name, scopes = TOKENS[token]
                self.finish({"kind": "user", "name": name, "admin": False, "scopes": scopes,
                             "session_id": None, "token_id": "a1"})

        class Users(web.RequestHandler):
            def get(self, name: str) -> None:
                if fake.down:
                    raise web.HTTPError(503)
                if self.request.headers.get("Authorization") != f"token {SERVICE_TOKEN}":
                    raise web.HTTPError(403)
                fake.group_lookups += 1
                self.finish({"kind": "user", "name": name, "groups": GROUPS.get(name, [])})

        self.app = web.Application([(r"/hub/api/user", User), (r"/hub/api/users/([^/]+)", Users)])

    def start(self) -> str:
        sockets = bind_sockets(0, "127.0.0.1")
        self.server = HTTPServer(self.app)
        self.server.add_sockets(sockets)
        return f"http://127.0.0.1:{sockets[0].getsockname()[1]}/hub/api"


def service_config(tmp_path: Path, fake: FakeLLM, api_url: str, **traits: Any) -> Config:
    c = Config()
    c.AcpHub.data_dir = str(tmp_path / "data")
    c.AcpHub.db_url = f"sqlite:///{tmp_path / 'data' / 'usage.sqlite'}"
    c.AcpHub.credentials = {
        "qwen": {"api": "openai", "api_key": REAL_KEY, "base_url": fake.url + "/v1", "model": "fake-model"},
        "gem": {"api": "gemini", "api_key": {"env": "ACP_TEST_GEMINI_KEY"}, "base_url": fake.url},
        "dead": {"api": "openai", "api_key": REAL_KEY, "base_url": f"http://127.0.0.1:{closed_port()}/v1"},
        "missing": {"api": "openai", "api_key": {"file": "/nonexistent/acp-key"}},
    }
    c.AcpHub.user_quotas = {"carol": 1, "alice": 0}
    c.AcpHub.group_quotas = {"small": 1, "big": 10**9, "unlimited": 0}
    c.AcpHub.daily_token_quota = 10**7
    c.AcpHub.admission_timeout = 0.5
    c.HubOAuth.api_url = api_url
    c.HubOAuth.api_token = SERVICE_TOKEN
    for name, value in traits.items():
        setattr(c.AcpHub, name, value)
    return c


def closed_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    sock = bind_sockets(0, "127.0.0.1")[0]
    port = sock.getsockname()[1]
    sock.close()
    return port


class Service:
    """A running service in this test's event loop, and a client for it."""

    def __init__(self, hub: AcpHub, url: str, fake: FakeLLM, fake_hub: FakeHub) -> None:
        self.hub, self.url, self.fake, self.fake_hub = hub, url, fake, fake_hub
        self.client = AsyncHTTPClient(force_instance=True)

    async def call(self, method: str, path: str, token: str | None = None, body: Any = None,
                   headers: dict[str, str] | None = None, follow: bool = True) -> HTTPResponse:
        hdrs = {"Authorization": f"token {token}"} if token else {}
        hdrs.update(headers or {})
        data = json.dumps(body) if body is not None else ("{}" if method == "POST" else None)
        return await self.client.fetch(self.url + path, method=method, headers=hdrs, body=data,
                                       raise_error=False, allow_nonstandard_methods=True,
                                       follow_redirects=follow)

    async def mint(self, token: str, session_id: str = "s1", agent: str = "qwen") -> dict[str, Any]:
        response = await self.call("POST", "api/gateway-tokens", token, {"session_id": session_id,
                                                                           "agent": agent})
        assert response.code == 201, response.body
        return json.loads(response.body)

    async def chat(self, gateway_token: str, text: str = "hi", stream: bool = False,
                   header: str = "Authorization") -> HTTPResponse:
        value = f"Bearer {gateway_token}" if header == "Authorization" else gateway_token
        body = {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}
        return await self.client.fetch(self.url + "gateway/chat/completions", method="POST",
                                       headers={header: value, "Content-Type": "application/json"},
                                       body=json.dumps(body), raise_error=False)

    async def usage(self, token: str, query: str = "by=session") -> Any:
        response = await self.call("GET", f"api/usage?{query}", token)
        assert response.code == 200, response.body
        return json.loads(response.body)


def billed_equals(fake: FakeLLM, row: dict[str, Any]) -> None:
    billed = fake.billed()
    assert billed["requests"] > 0
    assert (row["input_tokens"], row["output_tokens"], row["total_tokens"], row["requests"]) == \
        (billed["input"], billed["output"], billed["total"], billed["requests"])


async def unix_http(socket_path: str, path: str, headers: dict[str, str], body: Any) -> tuple[int, bytes]:
    """One request over the in-server route's unix socket (what the sandbox relay carries)."""
    raw = json.dumps(body).encode()
    reader, writer = await asyncio.open_unix_connection(socket_path)
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(raw)}",
            "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + raw)
    data = await reader.read()
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]
