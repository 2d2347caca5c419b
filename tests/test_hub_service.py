"""The JupyterHub service (``jupyter_acp.hub``) without a running hub.

A tiny fake hub API on 127.0.0.1 (``fake_hub.py``) answers what the service asks the hub: whose
token is this, with which scopes, and the user's groups. The fake LLM (``fake_llm.py``) is the
upstream. The tests against a real JupyterHub are in other modules; here: tokens, the gateway's
metering and quota, identities, the API's scopes, CSV, the admin page, the program.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import (
    GEMINI_KEY,
    HOSTILE,
    REAL_KEY,
    SERVICE_TOKEN,
    FakeHub,
    Service,
    billed_equals,
    service_config,
    unix_http,
)
from fake_llm import FakeLLM
from tornado import web
from tornado.httpclient import AsyncHTTPClient
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from jupyter_acp.gateway import LlmGateway
from jupyter_acp.hub import AcpHub
from jupyter_acp.hub.app import redacted_uri
from jupyter_acp.hub.tokens import InvalidToken, TokenSigner
from jupyter_acp.usage import TurnUsage


@pytest.fixture
async def service(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("ACP_TEST_GEMINI_KEY", GEMINI_KEY)
    fake_hub = FakeHub()
    api_url = fake_hub.start()
    hub = AcpHub(config=service_config(tmp_path, fake, api_url))
    hub.init_components()
    server = hub.make_server()
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    svc = Service(hub, f"http://127.0.0.1:{sockets[0].getsockname()[1]}{hub.base_url}", fake, fake_hub)
    yield svc
    server.stop()
    fake_hub.server.stop()
    svc.client.close()
    hub.gateway.close()
    hub.ledger.close()


# -- gateway tokens ---------------------------------------------------------------------------------
def test_tokens_sign_verify_and_refuse_tampering() -> None:
    signer = TokenSigner(b"x" * 64)
    token, claims = signer.mint("alice", "s1", "qwen", 60)
    assert signer.verify(token) == claims and claims.user == "alice"
    head, payload, mac = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["u"] = "bob"
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    for bad in (f"{head}.{forged_payload}.{mac}", token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),
                TokenSigner(b"y" * 64).mint("alice", "s1", "qwen", 60)[0], "", "jacpg1..", "x" * 5000):
        with pytest.raises(InvalidToken):
            signer.verify(bad)
    with pytest.raises(InvalidToken, match="expired"):
        signer.verify(token, now=time.time() + 61)
    signer.revoke(claims)
    with pytest.raises(InvalidToken, match="revoked"):
        signer.verify(token)
    assert signer.decode(token) == claims  # (still decodable: a second DELETE is fine)


def test_access_log_never_shows_a_token() -> None:
    assert redacted_uri("/services/jupyter-acp/api/gateway-tokens/jacpg1.abc.def") == \
        "/services/jupyter-acp/api/gateway-tokens/<secret>"
    assert redacted_uri("/s/gateway/v1beta/models/m:generateContent?alt=sse&key=jacpg1.a.b") == \
        "/s/gateway/v1beta/models/m:generateContent?alt=sse&key=<secret>"
    assert redacted_uri("/s/oauth_callback?code=abc&state=def") == \
        "/s/oauth_callback?code=<secret>&state=<secret>"


async def test_mint_takes_the_user_from_the_hub_token_only(service: Service) -> None:
    response = await service.call("POST", "api/gateway-tokens", "tok-alice",
                                  {"session_id": "s1", "agent": "qwen", "user": "bob", "name": "bob"})
    assert response.code == 201
    minted = json.loads(response.body)
    assert minted["api"] == "openai" and minted["model"] == "fake-model"
    assert minted["base_url"] == service.url + "gateway"
    assert minted["expires_at"] > time.time() + 6 * 86400
    assert REAL_KEY not in response.body.decode()
    assert service.hub.signer.verify(minted["token"]).user == "alice"
    # a filtered scope for oneself works; for someone else, or no scope: 403; no token: 401
    assert (await service.call("POST", "api/gateway-tokens", "tok-alice-filtered",
                               {"session_id": "s2", "agent": "qwen"})).code == 201
    for token, code in (("tok-wrongfilter", 403), ("tok-nouse", 403), ("not-a-hub-token", 401),
                        (None, 401)):
        response = await service.call("POST", "api/gateway-tokens", token,
                                      {"session_id": "s3", "agent": "qwen"})
        assert response.code == code, token
        assert "message" in json.loads(response.body)
    assert (await service.call("POST", "api/gateway-tokens", "tok-alice",
                               {"session_id": "s1", "agent": "nope"})).code == 404
    assert (await service.call("POST", "api/gateway-tokens", "tok-alice",
                               {"session_id": "../x y", "agent": "qwen"})).code == 400


# -- the gateway ------------------------------------------------------------------------------------
async def test_openai_stream_through_the_in_server_route_and_the_service(service: Service) -> None:
    """The whole hub-mode chain: in-server route (unix socket) → service gateway → fake LLM."""
    minted = await service.mint("tok-alice", "sess-a")
    gateway = LlmGateway()
    recorded: list[TurnUsage] = []
    route = gateway.open_route(session_id="sess-a", user="alice", api=minted["api"],
                               upstream=minted["base_url"], api_key=minted["token"],
                               on_usage=recorded.append, check_quota=lambda: None)
    try:
        status, body = await unix_http(route.socket_path, "/v1/chat/completions",
                                       {"Authorization": f"Bearer {route.dummy_key}"},
                                       {"model": "m", "stream": True,
                                        "messages": [{"role": "user", "content": "hello there"}]})
    finally:
        gateway.close()
    assert status == 200 and b"Hello" in body and b"[DONE]" in body
    (request,) = service.fake.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {REAL_KEY}"  # added by the service only
    assert request.body["stream_options"] == {"include_usage": True}
    (row,) = (await service.usage("tok-alice"))["rows"]
    assert row["session_id"] == "sess-a"
    billed_equals(service.fake, row)
    assert recorded[0].total_tokens == row["total_tokens"]  # the route sees the same usage
    assert await asyncio.to_thread(service.hub.ledger.turns, "sess-a") != []


async def test_gemini_stream_is_metered(service: Service) -> None:
    minted = await service.mint("tok-bob", "sess-g", "gem")
    assert minted["api"] == "gemini"
    response = await service.client.fetch(
        service.url + "gateway/v1beta/models/gemini-x:streamGenerateContent?alt=sse", method="POST",
        headers={"x-goog-api-key": minted["token"], "Content-Type": "application/json"},
        body=json.dumps({"contents": [{"role": "user", "parts": [{"text": "hi gemini"}]}]}))
    assert response.code == 200 and b"usageMetadata" in response.body
    (request,) = service.fake.requests
    assert request.headers["x-goog-api-key"] == GEMINI_KEY
    (row,) = (await service.usage("tok-bob", "by=user,agent"))["rows"]
    assert (row["user"], row["agent"]) == ("bob", "gem")
    billed_equals(service.fake, row)


async def test_quota_refusal_is_429_with_the_header(service: Service) -> None:
    minted = await service.mint("tok-carol", "sess-c")  # carol: 1 token a day
    assert (await service.chat(minted["token"])).code == 200  # admitted at 0 used
    refused = await service.chat(minted["token"])
    assert refused.code == 429
    assert refused.headers["x-acp-quota"] == "exceeded"
    assert refused.headers["x-should-retry"] == "false"
    assert "Daily token quota used up" in json.loads(refused.body)["error"]["message"]
    assert len(service.fake.requests) == 1  # the refused request never reached the LLM
    quota = json.loads((await service.call("GET", "api/quota", "tok-carol")).body)
    assert quota["limit"] == 1 and quota["remaining"] == 0 and quota["user"] == "carol"
    assert quota["used_today"] == service.fake.billed()["total"]
    # in the gemini shape for a gemini token
    gem = await service.mint("tok-carol", "sess-c2", "gem")
    response = await service.client.fetch(
        service.url + "gateway/v1beta/models/g:generateContent", method="POST", raise_error=False,
        headers={"x-goog-api-key": gem["token"]}, body=json.dumps({"contents": []}))
    assert response.code == 429 and json.loads(response.body)["error"]["status"] == "RESOURCE_EXHAUSTED"
    # nothing is left leased: the admitted request's lease was settled with its usage
    assert await asyncio.to_thread(_live_leases, service) == 0


async def test_a_refusal_ends_the_turn_through_the_in_server_route(service: Service) -> None:
    """The route of a hub-mode server sees the service's 429 (x-acp-quota) and calls on_refused."""
    minted = await service.mint("tok-carol", "sess-cr")
    refusals: list[str] = []
    gateway = LlmGateway()
    route = gateway.open_route(session_id="sess-cr", user="carol", api="openai", upstream=minted["base_url"],
                               api_key=minted["token"], on_usage=lambda u: None, check_quota=lambda: None,
                               on_refused=refusals.append)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        first = await unix_http(route.socket_path, "/v1/chat/completions",
                                {"Authorization": f"Bearer {route.dummy_key}"}, body)
        second = await unix_http(route.socket_path, "/v1/chat/completions",
                                 {"Authorization": f"Bearer {route.dummy_key}"}, body)
    finally:
        gateway.close()
    assert first[0] == 200 and second[0] == 429
    assert len(refusals) == 1 and refusals[0].startswith("Daily token quota used up")


def _live_leases(service: Service) -> int:
    from sqlalchemy import func, select

    from jupyter_acp.usage.schema import leases_table

    with service.hub.ledger.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(leases_table)).scalar_one())


async def test_group_quotas_take_the_largest_and_users_their_own(service: Service) -> None:
    policy = service.hub.policy
    assert await policy.limit_for("carol") == 1  # own entry
    assert await policy.limit_for("alice") is None  # own entry 0: unlimited
    assert await policy.limit_for("dave") == 10**9  # small (1) and big (1e9): the largest
    assert await policy.limit_for("frank") == 10**7  # no group entry: the default
    lookups = service.fake_hub.group_lookups
    assert await policy.limit_for("dave") == 10**9 and service.fake_hub.group_lookups == lookups  # cached
    service.hub.policy.groups["small"] = 0  # 0 in a group: unlimited, the largest of all
    policy._cache.clear()
    assert await policy.limit_for("dave") is None
    service.fake_hub.down = True  # the hub down and nothing cached: refused, not let through
    policy._cache.clear()
    token, _ = service.hub.signer.mint("erin", "sess-e", "qwen", 60)
    refused = await service.chat(token)
    assert refused.code == 429 and refused.headers["x-acp-quota"] == "unavailable"
    assert service.fake.requests == []


async def test_upstream_failure_releases_the_lease(service: Service) -> None:
    token, _ = service.hub.signer.mint("dave", "sess-d", "dead", 60)
    response = await service.chat(token)
    assert response.code == 502 and json.loads(response.body)["error"]["code"] == "bad_gateway"
    for _ in range(100):
        if await asyncio.to_thread(_live_leases, service) == 0:
            break
        await asyncio.sleep(0.02)
    assert await asyncio.to_thread(_live_leases, service) == 0


async def test_only_metered_endpoints_are_forwarded(service: Service) -> None:
    """The admin's key must not open the account's unmetered endpoints to a user."""
    openai, _ = service.hub.signer.mint("bob", "sess-p", "qwen", 60)
    gemini, _ = service.hub.signer.mint("bob", "sess-p", "gem", 60)
    for method, path, token in (("POST", "files", openai), ("POST", "batches", openai),
                                ("GET", "fine_tuning/jobs", openai),
                                ("POST", "chat/completions/../../files", openai),
                                ("POST", "v1beta/cachedContents", gemini),
                                ("POST", "v1beta/models/g:embedContent", gemini)):
        response = await service.client.fetch(
            service.url + "gateway/" + path, method=method, raise_error=False,
            headers={"Authorization": f"Bearer {token}", "x-goog-api-key": token},
            body="{}" if method == "POST" else None)
        assert response.code == 404, (method, path)
    assert service.fake.requests == []
    models = await service.client.fetch(service.url + "gateway/models",
                                        headers={"Authorization": f"Bearer {openai}"})
    assert json.loads(models.body)["data"][0]["id"] == "fake-model"


async def test_one_user_cannot_hold_every_upstream_slot(service: Service) -> None:
    """``max_requests_per_user``: one more is a 429 to retry (not a quota refusal)."""
    release = asyncio.Event()
    waiting: list[int] = []

    class Slow(web.RequestHandler):
        async def post(self, _: str) -> None:
            waiting.append(1)
            await release.wait()
            self.finish({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                  "total_tokens": 2}})

    sockets = bind_sockets(0, "127.0.0.1")
    slow = HTTPServer(web.Application([(r"/v1/(.*)", Slow)]))
    slow.add_sockets(sockets)
    service.hub.credentials["slow"] = {"api": "openai", "api_key": REAL_KEY, "model": None,
                                       "base_url": f"http://127.0.0.1:{sockets[0].getsockname()[1]}/v1"}
    service.hub.max_requests_per_user = 2
    token, _ = service.hub.signer.mint("bob", "sess-slow", "slow", 60)
    other, _ = service.hub.signer.mint("erin", "sess-slow", "slow", 60)
    try:
        running = [asyncio.ensure_future(service.chat(token)) for _ in range(2)]
        for _ in range(200):
            if len(waiting) == 2:
                break
            await asyncio.sleep(0.02)
        busy = await service.chat(token)
        assert busy.code == 429 and "x-acp-quota" not in busy.headers and busy.headers["Retry-After"] == "1"
        assert json.loads(busy.body)["error"]["code"] == "rate_limit_exceeded"
        elsewhere = asyncio.ensure_future(service.chat(other))  # another user is not held back
        for _ in range(200):
            if len(waiting) == 3:
                break
            await asyncio.sleep(0.02)
        assert len(waiting) == 3
        release.set()
        assert [r.code for r in await asyncio.gather(*running, elsewhere)] == [200, 200, 200]
        assert (await service.chat(token)).code == 200  # the slots are free again
    finally:
        release.set()
        slow.stop()


async def test_an_unreadable_key_is_a_503_that_names_no_path(service: Service) -> None:
    token, _ = service.hub.signer.mint("bob", "sess-m", "missing", 60)
    response = await service.chat(token)
    assert response.code == 503 and b"/nonexistent" not in response.body


# -- revocation, expiry, forgery --------------------------------------------------------------------
async def test_revoked_and_expired_tokens_are_refused(service: Service) -> None:
    minted = await service.mint("tok-alice", "sess-r")
    assert (await service.chat(minted["token"])).code == 200
    # bob cannot revoke alice's token (not found, as if it did not exist)
    assert (await service.call("DELETE", f"api/gateway-tokens/{minted['token']}", "tok-bob")).code == 404
    assert (await service.call("DELETE", f"api/gateway-tokens/{minted['token']}", "tok-alice")).code == 204
    assert (await service.call("DELETE", f"api/gateway-tokens/{minted['token']}", "tok-alice")).code == 204
    assert (await service.call("DELETE", "api/gateway-tokens/jacpg1.forged.mac", "tok-alice")).code == 404
    refused = await service.chat(minted["token"])
    assert refused.code == 401 and json.loads(refused.body)["error"]["code"] == "invalid_api_key"
    expired, _ = service.hub.signer.mint("alice", "sess-x", "qwen", -1)
    assert (await service.chat(expired)).code == 401
    assert len(service.fake.requests) == 1


async def test_forged_and_tampered_tokens_are_refused(service: Service) -> None:
    minted = await service.mint("tok-alice", "sess-f")
    head, payload, mac = minted["token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["u"] = "admin"
    as_admin = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    other_secret, _ = TokenSigner(b"z" * 64).mint("alice", "sess-f", "qwen", 3600)
    altered = f"{head}.{payload}.{mac[:-1]}{'B' if mac[-1] == 'A' else 'A'}"
    for bad in (f"{head}.{as_admin}.{mac}", altered, other_secret, REAL_KEY, "tok-alice", ""):
        response = await service.chat(bad)
        assert response.code == 401, bad
        if bad:
            response = await service.chat(bad, header="x-api-key")
            assert response.code == 401 and json.loads(response.body)["type"] == "error"  # anthropic's shape
    assert service.fake.requests == []


# -- reading usage ----------------------------------------------------------------------------------
async def test_usage_is_private_without_the_read_scope_and_csv_is_safe(service: Service) -> None:
    for hub_token, session in (("tok-alice", "sa"), ("tok-bob", "sb"), ("tok-hostile", "sh")):
        minted = await service.mint(hub_token, session)
        assert (await service.chat(minted["token"])).code == 200
    mine = await service.usage("tok-alice", "by=user")
    assert [r["user"] for r in mine["rows"]] == ["alice"]
    assert (await service.call("GET", "api/usage?user=bob", "tok-alice")).code == 403
    assert (await service.call("GET", "api/usage?user=alice", "tok-alice")).code == 200
    assert (await service.call("GET", "api/usage", "tok-nouse")).code == 403
    everyone = await service.usage("tok-admin", "by=user")
    assert sorted(r["user"] for r in everyone["rows"]) == sorted(["alice", "bob", HOSTILE])
    assert sum(r["total_tokens"] for r in everyone["rows"]) == service.fake.billed()["total"]
    only_bob = await service.usage("tok-admin", "by=day&user=bob")
    assert only_bob["rows"][0]["requests"] == 1
    response = await service.call("GET", "api/usage?by=user,day&format=csv", "tok-admin")
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/csv")
    lines = response.body.decode().splitlines()
    assert lines[0].startswith("user,day,input_tokens,output_tokens")
    assert len(lines) == 4 and any(line.startswith("alice,") for line in lines)
    hostile_line = next(line for line in lines if "script" in line)
    assert hostile_line.startswith('"<script>')  # (starts with "<": no formula, quoted for the comma)
    for query in ("by=week", "since=yesterday", "format=xml"):
        assert (await service.call("GET", f"api/usage?{query}", "tok-admin")).code == 400


async def test_admin_page_needs_the_scope_and_escapes_names(service: Service) -> None:
    minted = await service.mint("tok-hostile", "sh")
    assert (await service.chat(minted["token"])).code == 200
    login = await service.call("GET", "admin", follow=False)  # a browser without a cookie: OAuth
    assert login.code == 302 and "/hub/api/oauth2/authorize?" in login.headers["Location"]
    for token in ("tok-alice", "tok-hostile"):
        response = await service.call("GET", "admin", token)
        assert response.code == 403 and b"custom:acp-usage:read" in response.body
        assert b"<script>" not in response.body
    response = await service.call("GET", "", "tok-admin")
    assert response.code == 200
    page = response.body.decode()
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<svg" in page and "<rect" in page and "admin/usage.csv?by=user" in page
    assert "script-src" not in response.headers["Content-Security-Policy"]  # default-src 'none'
    csv = await service.call("GET", "admin/usage.csv?by=user", "tok-admin")
    assert csv.code == 200 and csv.body.decode().splitlines()[1].startswith('"<script>')
    assert (await service.call("GET", "admin/usage.csv?by=user", "tok-alice")).code == 403


def test_csv_cells_that_would_be_formulas_are_quoted() -> None:
    from jupyter_acp.hub.reports import to_csv

    text = to_csv(["user"], [{"user": "=HYPERLINK(1)", "input_tokens": 1}, {"user": "-2+3"}])
    assert "'=HYPERLINK(1)" in text and "'-2+3" in text


# -- the program ------------------------------------------------------------------------------------
async def test_python_m_jupyter_acp_hub_runs_from_the_hub_environment(tmp_path: Path, fake: FakeLLM) -> None:
    """Started as JupyterHub starts a managed service: env for address, prefix, token and API."""
    fake_hub = FakeHub()
    api_url = fake_hub.start()
    port = bind_sockets(0, "127.0.0.1")[0]
    number = port.getsockname()[1]
    port.close()
    (tmp_path / "jupyter_acp_hub_config.py").write_text(
        f"c.AcpHub.data_dir = {str(tmp_path / 'data')!r}\n"
        f"c.AcpHub.credentials = {{'qwen': {{'api': 'openai', 'api_key': {{'env': 'QWEN_KEY'}},"
        f" 'base_url': {fake.url + '/v1'!r}}}}}\n")
    env = {**os.environ, "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{number}",
           "JUPYTERHUB_SERVICE_PREFIX": "/services/acp/", "JUPYTERHUB_API_TOKEN": SERVICE_TOKEN,
           "JUPYTERHUB_API_URL": api_url, "JUPYTERHUB_SERVICE_NAME": "acp", "QWEN_KEY": REAL_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_acp.hub"], cwd=tmp_path, env=env,  # noqa: ASYNC220
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = AsyncHTTPClient(force_instance=True)
    base = f"http://127.0.0.1:{number}/services/acp/"
    try:
        for _ in range(1200):  # (imports take seconds on a loaded machine)
            try:
                response = await client.fetch(base + "api/quota", raise_error=False,
                                              headers={"Authorization": "token tok-alice"})
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                await asyncio.sleep(0.05)
        assert response.code == 200 and json.loads(response.body)["user"] == "alice"
        minted = json.loads((await client.fetch(base + "api/gateway-tokens", method="POST",
                                                headers={"Authorization": "token tok-bob"},
                                                body=json.dumps({"session_id": "p1", "agent": "qwen"}))).body)
        assert minted["base_url"] == base + "gateway"
        chat = await client.fetch(minted["base_url"] + "/chat/completions", method="POST",
                                  headers={"Authorization": f"Bearer {minted['token']}"},
                                  body=json.dumps({"messages": [{"role": "user", "content": "x"}]}))
        assert chat.code == 200
        assert (tmp_path / "data" / "usage.sqlite").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "data" / "token-secret").stat().st_mode & 0o777 == 0o600
    finally:
        client.close()
        fake_hub.server.stop()
        proc.terminate()
        out = await asyncio.to_thread(proc.communicate, timeout=20)
    log = out[0].decode()
    assert proc.returncode == 0, log
    assert REAL_KEY not in log and minted["token"] not in log and "tok-bob" not in log
    assert "gateway token" in log.lower()
