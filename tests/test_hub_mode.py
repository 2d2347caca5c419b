"""Hub mode of the single-user extension against a stand-in for the JupyterHub service.

A real Jupyter server (pytest-jupyter) runs jupyter-acp with ``hub_mode = "on"`` and a hub
token; ``HubStandIn`` plays the service on 127.0.0.1 (a tornado app in its own thread): it mints
and revokes gateway tokens, answers ``api/quota`` and ``api/usage``, and forwards its
``gateway/`` to ``fake_llm.py`` with the real key, or refuses with a 429 carrying
``x-acp-quota``. The agent is the hostile test agent, declared with an OpenAI ``llm_api``: it
dumps its environment and calls its LLM from inside its sandbox (bubblewrap where it runs,
else a local process), as any agent would. The real service and the real hub are tested
elsewhere (``test_hub_*``); this is the server's side of the contract (``hubclient.py``).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from attack import HOSTILE
from fake_llm import FakeLLM
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from traitlets.config import Config

from jupyter_acp.agents_builtin import python_ro_paths
from jupyter_acp.hubclient import HubConfigError, resolve_hub_mode
from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox
from jupyter_acp.testing import TokenPerUser, auth

pytestmark = pytest.mark.timeout(60)

HUB_TOKEN = "hub-token-of-alices-server-0123456789"
REAL_KEY = "sk-real-key-only-the-service-holds-77"
ADMIN_KEY = "sk-admin-key-in-the-users-own-config-55"
QUOTA_MESSAGE = "Daily token quota used up: 5000 of 5000 tokens today (UTC); it renews at midnight UTC"
PREFIX = "/services/jupyter-acp/"

#: Run inside the sandbox by the hostile agent (``sh``): its environment, and one LLM call
#: through the base URL and key it was given.
LLM_CALL = r"""
import json, os, urllib.error, urllib.request
body = {"model": os.environ.get("OPENAI_MODEL", "m"), "messages": [{"role": "user", "content": "hi"}]}
req = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions",
                             data=json.dumps(body).encode(),
                             headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
                                      "Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        status, text = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    status, text = e.code, e.read().decode()
print(json.dumps({"env": dict(os.environ), "status": status, "body": text}))
"""


class HubStandIn:
    """The hub service's HTTP API, as ``hubclient`` uses it; everything it was asked is kept."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.minted: dict[str, dict[str, Any]] = {}
        self.revoked: list[str] = []
        self.presented: list[str] = []
        self.usage_queries: list[dict[str, str]] = []
        self.quota: dict[str, Any] = {"used_today": 1200, "limit": 5000, "remaining": 3800}
        self.refuse = False
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hub-stand-in", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}"

    def start(self) -> HubStandIn:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        stand_in = self

        class Base(web.RequestHandler):
            def prepare(self) -> None:
                if not self.request.path.startswith(PREFIX + "gateway/") and \
                        self.request.headers.get("Authorization") != f"token {HUB_TOKEN}":
                    raise web.HTTPError(403)

            def write_error(self, status_code: int, **kwargs: Any) -> None:
                self.finish({"message": self._reason})

        class Tokens(Base):
            def post(self) -> None:
                body = json.loads(self.request.body)
                if body["agent"] != "llm":
                    self.set_status(404)
                    self.finish({"message": f"no credentials for {body['agent']}"})
                    return
                token = f"gwt-{len(stand_in.minted)}-{body['session_id']}"
                stand_in.minted[token] = body
                self.set_status(201)
                self.finish({"token": token, "api": "openai", "base_url": stand_in.url + "gateway",
                             "model": "fake-model", "expires_at": time.time() + 3600})

            def delete(self, token: str) -> None:
                stand_in.revoked.append(token)
                self.set_status(204)

        class Quota(Base):
            def get(self) -> None:
                self.finish({"user": "alice", "day": time.strftime("%Y-%m-%d", time.gmtime()),
                             **stand_in.quota})

        class Usage(Base):
            def get(self) -> None:
                query = {k: self.get_argument(k) for k in self.request.arguments}
                stand_in.usage_queries.append(query)
                day = time.strftime("%Y-%m-%d", time.gmtime())
                rows = {"day": [{"user": "alice", "day": day, "input_tokens": 1000, "output_tokens": 200,
                                 "total_tokens": 1200, "cost": 0.0, "turns": 3}],
                        "session": [{"user": "alice", "session_id": "s1", "agent": "llm",
                                     "input_tokens": 1000, "output_tokens": 200, "total_tokens": 1200,
                                     "cost": 0.0, "turns": 3}]}[query["by"]]
                self.finish(json.dumps({"rows": rows}))

        class Gateway(Base):
            async def post(self, path: str) -> None:
                token = self.request.headers.get("Authorization", "").removeprefix("Bearer ")
                stand_in.presented.append(token)
                if token not in stand_in.minted or token in stand_in.revoked:
                    raise web.HTTPError(401)
                if stand_in.refuse:
                    self.set_status(429)
                    self.set_header("x-acp-quota", "exceeded")
                    self.set_header("x-should-retry", "false")
                    self.finish({"error": {"message": QUOTA_MESSAGE, "type": "insufficient_quota",
                                           "code": "insufficient_quota"}})
                    return
                response = await stand_in._client.fetch(
                    f"{stand_in.upstream}/v1/{path}", method="POST", body=self.request.body,
                    headers={"Authorization": f"Bearer {REAL_KEY}", "Content-Type": "application/json"},
                    raise_error=False)
                self.set_status(response.code)
                self.set_header("Content-Type", response.headers.get("Content-Type", "application/json"))
                self.finish(response.body)

        async def setup() -> None:
            app = web.Application([(PREFIX + "api/gateway-tokens", Tokens),
                                   (PREFIX + "api/gateway-tokens/([^/]+)", Tokens),
                                   (PREFIX + "api/quota", Quota), (PREFIX + "api/usage", Usage),
                                   (PREFIX + "gateway/(.*)", Gateway)])
            self._server = HTTPServer(app)
            sockets = bind_sockets(0, "127.0.0.1")
            self._server.add_sockets(sockets)
            self.port = sockets[0].getsockname()[1]
            self._client = AsyncHTTPClient(force_instance=True)

        self._loop.run_until_complete(setup())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        """The service goes down: its port closes."""
        if not self._thread.is_alive():
            return

        async def halt() -> None:
            self._server.stop()
            await self._server.close_all_connections()
            self._client.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(halt()))
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def hub(fake: FakeLLM) -> Any:
    stand_in = HubStandIn(fake.url).start()
    yield stand_in
    stand_in.stop()


@pytest.fixture
def jp_server_config(tmp_path: Path, hub: HubStandIn, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "llm_call.py").write_text(LLM_CALL)
    agent = {"command": [sys.executable, str(HOSTILE)], "display_name": "Hostile agent with an LLM",
             "ro_paths": [*python_ro_paths(), str(HOSTILE.parent), str(scripts)], "llm_api": "openai",
             "credential_env": {"api_key": "OPENAI_API_KEY", "base_url": "OPENAI_BASE_URL",
                                "model": "OPENAI_MODEL"}}
    bwrap, _ = BubblewrapSandbox.available()
    return Config({
        "ServerApp": {"jpserver_extensions": {"jupyter_acp": True, "jupyter_server_terminals": False},
                      "identity_provider_class": TokenPerUser, "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": "bubblewrap" if bwrap else "local", "allow_unsandboxed": True,
                               "workspace_template": "{root_dir}/{username}",
                               "agent_home_dir": str(tmp_path / "homes"), "monitor_interval": 0},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
        "AcpExtension": {"hub_mode": "on", "hub_service_url": hub.url, "hub_request_timeout": 5.0},
        "AgentConfigManager": {"agents": {"llm": agent, "unknown-to-hub": agent},
                               "credentials": {"llm": {"api_key": ADMIN_KEY}}},
    })


@pytest.fixture
def api(jp_fetch: Any) -> Any:
    async def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"method": method, "headers": auth("alice"), "raise_error": False}
        if method == "POST":
            kwargs["body"] = json.dumps(body or {})
        resp = await jp_fetch("api", "acp", *path.split("/"), **kwargs)
        return resp.code, json.loads(resp.body) if resp.body else None

    return call


def llm_call(scripts: Path) -> str:
    return json.dumps({"op": "sh", "cmd": f"{sys.executable} {scripts / 'llm_call.py'}"})


def test_hub_mode_is_decided_once_from_the_environment() -> None:
    hub_env = {"JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_USER": "alice"}
    assert resolve_hub_mode("auto", "http://127.0.0.1:1/s/", hub_env)[0] is True
    assert resolve_hub_mode("auto", "", hub_env)[0] is False  # no service known
    assert resolve_hub_mode("auto", "http://127.0.0.1:1/s/", {})[0] is False  # not under a hub
    assert resolve_hub_mode("off", "http://127.0.0.1:1/s/", hub_env)[0] is False
    assert resolve_hub_mode("on", "http://127.0.0.1:1/s/", {"JUPYTERHUB_API_TOKEN": "t"})[0] is True
    with pytest.raises(HubConfigError, match="no service URL"):
        resolve_hub_mode("on", "", hub_env)
    with pytest.raises(HubConfigError, match="JUPYTERHUB_API_TOKEN"):
        resolve_hub_mode("on", "http://127.0.0.1:1/s/", {})
    with pytest.raises(HubConfigError, match="not an http"):
        resolve_hub_mode("on", "ftp://x/", hub_env)


def test_which_sessions_the_service_meters() -> None:
    from jupyter_acp.agents import AgentSpec
    from jupyter_acp.errors import UserCredentialsRefused
    from jupyter_acp.hubclient import HubClient

    llm = AgentSpec.from_dict("llm", {"command": ["x"], "llm_api": "openai"})
    demo = AgentSpec.from_dict("demo", {"command": ["x"], "demo": True})
    strict, lenient = (HubClient("http://127.0.0.1:1/s", HUB_TOKEN, allow_user_credentials=allow)
                       for allow in (False, True))
    assert strict.url == "http://127.0.0.1:1/s/" and HUB_TOKEN not in repr(strict)
    assert strict.meters(llm, None) and strict.meters(llm, {"model": "m", "api_key": ""})
    assert not strict.meters(demo, {"api_key": "own"})  # not an LLM agent: as without a hub
    with pytest.raises(UserCredentialsRefused):
        strict.meters(llm, {"api_key": "own"})
    assert not lenient.meters(llm, {"api_key": "own"})  # allowed: the user's own, metered locally
    assert lenient.meters(llm, {"model": "m"})


async def test_a_session_reaches_its_llm_only_through_the_service(
        api: Any, hub: HubStandIn, fake: FakeLLM, tmp_path: Path, jp_serverapp: Any) -> None:
    manager = jp_serverapp.web_app.settings["acp_manager"]
    assert manager.hub is not None and manager.agents.credentials == {}  # the admin key: ignored
    status, session = await api("POST", "sessions", {"agent": "llm", "new": True})
    assert status == 201, session
    sid = session["id"]
    (token, minted), = hub.minted.items()
    assert minted == {"session_id": sid, "agent": "llm"}

    # the sandbox sees a loopback URL and the route's dummy key: no gateway token, no real or
    # admin key, no hub token
    call = {"message": llm_call(tmp_path / "scripts")}
    status, result = await api("POST", f"sessions/{sid}/messages", call)
    assert status == 200, result
    report = json.loads(json.loads(result["text"])["output"])
    env = report["env"]
    assert report["status"] == 200 and "Hello from the fake LLM" in report["body"]
    assert env["OPENAI_API_KEY"].startswith("jacp-") and env["OPENAI_BASE_URL"].startswith("http://127.0.0.1:")
    assert env["OPENAI_MODEL"] == "fake-model"  # the service's default model
    dumped = json.dumps(env)
    for secret in (token, REAL_KEY, ADMIN_KEY, HUB_TOKEN, hub.url):
        assert secret not in dumped
    assert not any(k.startswith("JUPYTERHUB") for k in env)
    # the route presented the gateway token to the service, which used the real key upstream
    assert hub.presented == [token]
    assert [r.headers.get("authorization") for r in fake.requests] == [f"Bearer {REAL_KEY}"]

    # the usage is shown (turn, stats) but not written to the local ledger: the service did
    billed = fake.billed()["total"]
    assert result["usage"]["total_tokens"] == billed and result["usage"]["source"] == "gateway"
    assert (await api("GET", f"sessions/{sid}"))[1]["tokens"]["total_tokens"] == billed
    assert await manager.ledger.aper_day("alice") == []

    # a quota refusal of the service's gateway ends the turn with the quota's error
    hub.refuse = True
    status, result = await api("POST", f"sessions/{sid}/messages", call)
    assert status == 200 and result["error"] == QUOTA_MESSAGE, result
    assert json.loads(json.loads(result["text"])["output"])["status"] == 429  # the body, unchanged
    assert QUOTA_MESSAGE in json.loads(json.loads(result["text"])["output"])["body"]
    events = (await api("GET", f"sessions/{sid}/history"))[1]["events"]
    errors = [e["data"] for e in events if e["type"] == "error"]
    assert errors == [{"message": QUOTA_MESSAGE, "turn": 2, "quota": True}]

    # the quota is asked of the service before a turn starts
    hub.quota = {"used_today": 5000, "limit": 5000, "remaining": 0}
    before = len(hub.presented)
    status, error = await api("POST", f"sessions/{sid}/messages", call)
    assert status == 429 and "Daily token quota used up: 5000 of 5000" in error["message"]
    assert len(hub.presented) == before  # the agent was never asked

    # the token is revoked when the session ends
    assert (await api("DELETE", f"sessions/{sid}"))[0] == 204
    assert hub.revoked == [token]


async def test_usage_and_credentials_come_from_the_service(api: Any, hub: HubStandIn) -> None:
    status, usage = await api("GET", "usage")
    assert status == 200, usage
    assert usage["quota"] == {"max_tokens_per_day": 5000, "used_today": 1200, "remaining": 3800}
    assert usage["today"]["total_tokens"] == 1200 and usage["total"]["turns"] == 3
    assert usage["per_day"][0]["total_tokens"] == 1200 and usage["per_session"][0]["session_id"] == "s1"
    assert sorted(q["by"] for q in hub.usage_queries) == ["day", "session"]
    assert all(q["user"] == "alice" for q in hub.usage_queries)

    # the user's own key or endpoint would bypass the service's metering: refused
    for creds in ({"api_key": "sk-users-own"}, {"base_url": "http://127.0.0.1:1/v1"}):
        status, error = await api("POST", "sessions", {"agent": "llm", "new": True, "credentials": creds})
        assert status == 403 and "hub_allow_user_credentials" in error["message"], error
    # an agent the service has no credentials for
    status, error = await api("POST", "sessions", {"agent": "unknown-to-hub", "new": True})
    assert status == 422 and "c.AcpHub.credentials" in error["message"], error
    assert len(hub.minted) == 0 and (await api("GET", "sessions"))[1]["sessions"] == []


async def test_a_service_that_is_down_starts_no_agent(api: Any, hub: HubStandIn, tmp_path: Path) -> None:
    hub.stop()
    status, error = await api("POST", "sessions", {"agent": "llm", "new": True})
    assert status == 503 and "hub service cannot be reached" in error["message"], error
    assert (await api("GET", "sessions"))[1]["sessions"] == []
    assert not list((tmp_path / "homes").iterdir())  # nothing was started, nothing is left
    assert (await api("GET", "usage"))[0] == 503
    # agents without an LLM work as without a hub
    status, session = await api("POST", "sessions", {"agent": "demo", "new": True})
    assert status == 201, session
    status, result = await api("POST", f"sessions/{session['id']}/messages", {"message": "hello"})
    assert status == 200, result
