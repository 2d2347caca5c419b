"""The LLM gateway against the fake LLM: forwarding, metering, quota, key checks, the relay.

Requests are sent the way an agent's do: over the route's unix socket (directly, or through
the in-sandbox relay on 127.0.0.1), with the session's dummy key. The fake LLM records what
reached the "endpoint" and what it billed; the ledger must hold exactly that.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import acp_require
from fake_llm import FakeLLM

from jupyter_acp.errors import BadRequest
from jupyter_acp.gateway import LlmGateway, UsageMeter
from jupyter_acp.gateway.server import RELAY
from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox
from jupyter_acp.testing import dechunk
from jupyter_acp.usage import TurnUsage, UsageLedger

REAL_KEY = "sk-real-never-in-the-sandbox-4242"
#: A minimal "agent" for the relay tests: optionally checks that the fake LLM is *not* reachable
#: directly, then asks the gateway (at $BASE, with $KEY) and prints the reply and its pid.
CLIENT = """
import json, os, sys, urllib.request as u
if sys.argv[1:]:
    try:
        u.urlopen(sys.argv[1], timeout=2)
        print("LEAK")
    except OSError:
        pass
body = json.dumps({"messages": [{"role": "user", "content": os.environ["ASK"]}]}).encode()
req = u.Request(os.environ["BASE"] + "/chat/completions", data=body,
                headers={"Authorization": "Bearer " + os.environ["KEY"], "Content-Type": "application/json"})
print(json.load(u.urlopen(req))["choices"][0]["message"]["content"], os.getpid())
"""


def open_route(gateway: LlmGateway, ledger: UsageLedger, upstream: str, api: str = "openai"):
    def on_usage(usage: TurnUsage) -> None:
        now = time.time()
        ledger.record(user="alice", session_id="s1", agent="qwen", turn=1, usage=usage, started_at=now)

    return gateway.open_route(session_id="s1", user="alice", api=api, upstream=upstream, api_key=REAL_KEY,
                              on_usage=on_usage, check_quota=lambda: ledger.check_quota("alice"))


async def http(socket_path: str, method: str, path: str, headers: dict[str, str], body: object = None
               ) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a unix socket (what the relay carries), de-chunked."""
    raw = json.dumps(body).encode() if body is not None else b""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
            f"Content-Length: {len(raw)}", "Content-Type: application/json",
            *(f"{k}: {v}" for k, v in headers.items())]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()  # (else the socket may outlive the test's loop: a ResourceWarning)
    header_blob, _, payload = data.partition(b"\r\n\r\n")
    lines = header_blob.decode().split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if hdrs.get("transfer-encoding") == "chunked":
        payload = dechunk(payload)
    return status, hdrs, payload


def billed_equals_ledger(fake: FakeLLM, ledger: UsageLedger) -> None:
    billed = fake.billed()
    totals = ledger.session_totals("s1")
    assert billed["requests"] > 0
    assert (totals["input_tokens"], totals["output_tokens"], totals["total_tokens"]) == \
        (billed["input"], billed["output"], billed["total"])


async def test_openai_json_forwarded_with_the_real_key_and_metered(fake, gateway, acp_ledger):
    route = open_route(gateway, acp_ledger, fake.url + "/v1")
    status, _, body = await http(route.socket_path, "POST", "/v1/chat/completions",
                                 {"Authorization": f"Bearer {route.dummy_key}"},
                                 {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200
    reply = json.loads(body)
    assert reply["choices"][0]["message"]["content"].startswith("Hello from the fake LLM")
    (req,) = fake.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {REAL_KEY}"  # the real key, added by the gateway
    billed_equals_ledger(fake, acp_ledger)
    (record,) = acp_ledger.turns("s1")
    assert record["source"] == "gateway" and record["model"] == "m"


async def test_openai_stream_gets_include_usage_and_is_metered_exactly(fake, gateway, acp_ledger):
    route = open_route(gateway, acp_ledger, fake.url + "/v1")
    for words in ("one", "two three four"):
        status, hdrs, body = await http(
            route.socket_path, "POST", "/v1/chat/completions",
            {"Authorization": f"Bearer {route.dummy_key}"},
            {"model": "m", "stream": True, "messages": [{"role": "user", "content": words}]})
        assert status == 200 and hdrs["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(c["delta"].get("content", "") for e in events[:-1]
                       for c in json.loads(e)["choices"])
        assert text.endswith(words)
        # the agent asked for no usage; the gateway asked the endpoint for it
        assert fake.requests[-1].body["stream_options"] == {"include_usage": True}
    billed_equals_ledger(fake, acp_ledger)
    assert len(acp_ledger.turns("s1")) == 2 and acp_ledger.session_totals("s1")["turns"] == 1


async def test_gemini_sse_is_metered_from_the_last_usage_metadata(fake, gateway, acp_ledger):
    route = open_route(gateway, acp_ledger, fake.url, api="gemini")
    assert route.agent_base_url == "http://127.0.0.1:{port}"
    status, _, body = await http(
        route.socket_path, "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        {"x-goog-api-key": route.dummy_key},
        {"contents": [{"role": "user", "parts": [{"text": "hello gemini"}]}]})
    assert status == 200
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    assert len(events) > 1  # streamed, with cumulative usageMetadata on each event
    assert fake.requests[0].headers["x-goog-api-key"] == REAL_KEY
    billed_equals_ledger(fake, acp_ledger)
    assert acp_ledger.turns("s1")[0]["model"] == "gemini-2.5-flash"


async def test_wrong_or_missing_key_is_refused_before_the_endpoint(fake, gateway, acp_ledger):
    route = open_route(gateway, acp_ledger, fake.url + "/v1")
    for headers in ({"Authorization": f"Bearer {REAL_KEY}"}, {}, {"x-api-key": "guess"}):
        status, _, body = await http(route.socket_path, "POST", "/v1/chat/completions", headers,
                                     {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 401
        assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert fake.requests == [] and acp_ledger.session_totals("s1")["total_tokens"] == 0


async def test_quota_refusal_is_a_429_the_agent_can_show(fake, gateway, tmp_path):
    ledger = UsageLedger(db_url=f"sqlite:///{tmp_path / 'q.sqlite'}", max_tokens_per_user_per_day=10)
    route = open_route(gateway, ledger, fake.url + "/v1")
    ask = {"messages": [{"role": "user", "content": "use up the quota please"}]}
    headers = {"Authorization": f"Bearer {route.dummy_key}"}
    status, _, _ = await http(route.socket_path, "POST", "/v1/chat/completions", headers, ask)
    assert status == 200  # under the cap when it started; it used more than 10 tokens
    status, hdrs, body = await http(route.socket_path, "POST", "/v1/chat/completions", headers, ask)
    assert status == 429 and hdrs["x-should-retry"] == "false"
    error = json.loads(body)["error"]
    assert error["code"] == "insufficient_quota" and "Daily token quota used up" in error["message"]
    assert len(fake.requests) == 1  # the refused call never reached the endpoint
    ledger.close()


async def test_endpoints_the_admin_does_not_allow_are_refused(fake, gateway):
    gateway.check_endpoint("https://api.openai.com/v1", ["https://api.openai.com/v1"])
    with pytest.raises(BadRequest, match=r"c\.LlmGateway\.allowed_endpoints"):
        gateway.check_endpoint(fake.url + "/v1", ["https://api.openai.com/v1"])
    with pytest.raises(BadRequest, match="not allowed"):  # a prefix is not a host prefix
        gateway.check_endpoint("https://api.openai.com.evil.example/v1", ["https://api.openai.com"])
    with pytest.raises(BadRequest, match="http"):
        gateway.check_endpoint("file:///etc/passwd", [])
    gateway.allowed_endpoints = [fake.url]
    gateway.check_endpoint(fake.url + "/v1", [])


async def test_paths_outside_the_api_are_refused(fake, gateway, acp_ledger):
    route = open_route(gateway, acp_ledger, fake.url + "/v1")
    status, _, _ = await http(route.socket_path, "POST", "/admin/../v2/x",
                              {"Authorization": f"Bearer {route.dummy_key}"}, {})
    assert status == 404 and fake.requests == []


async def test_relay_carries_a_request_from_loopback_to_the_socket(fake, gateway, acp_ledger):
    """The in-sandbox relay: binds 127.0.0.1, sets the env, execs the command (here a client)."""
    route = open_route(gateway, acp_ledger, fake.url + "/v1")
    argv = gateway.relay_argv(route, [sys.executable, "-c", CLIENT], {"BASE": route.agent_base_url})
    env = {"KEY": route.dummy_key, "ASK": "via relay", "PATH": os.environ["PATH"]}
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    text, pid = out.decode().rsplit(" ", 1)
    assert text == "Hello from the fake LLM. You said: via relay"
    assert int(pid) == proc.pid  # the relay exec'd the agent: same process, same stdio
    billed_equals_ledger(fake, acp_ledger)


def test_relay_fills_the_port_into_the_agents_arguments(tmp_path):
    """Codex takes its endpoint only as an argument: ``{port}`` is filled in there too."""
    out = tmp_path / "argv"
    code = "import sys, os; open(sys.argv[1], 'w').write(repr(sys.argv[2:]) + os.environ['BASE'])"
    argv = [sys.executable, "-I", str(RELAY), "--socket", str(tmp_path / "none.sock"),
            "--env", "BASE=http://127.0.0.1:{port}/v1", "--",
            sys.executable, "-c", code, str(out), "-c", 'base_url="http://127.0.0.1:{port}/v1"']
    subprocess.run(argv, check=True, timeout=30, env={"PATH": os.environ["PATH"]})
    args, _, base = out.read_text().partition("]")
    port = base.split(":")[2].split("/")[0]
    assert port.isdigit() and f'base_url="http://127.0.0.1:{port}/v1"' in args


@pytest.mark.sandbox
async def test_relay_inside_bubblewrap_without_network(fake, gateway, acp_ledger, tmp_path):
    ok, why = BubblewrapSandbox.available()
    acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", ok, f"bubblewrap cannot run here: {why}")
    from jupyter_acp.sandbox.base import ResourceLimits, SandboxSpec

    route = open_route(gateway, acp_ledger, fake.url + "/v1")
    # the fake itself is unreachable from inside (no network); only the socket leads out
    ro, rw = gateway.sandbox_paths(route)
    agent = ["/usr/bin/python3", "-I", "-c", CLIENT, f"{fake.url}/v1/models"]
    argv = gateway.relay_argv(route, agent, {"BASE": route.agent_base_url})
    (tmp_path / "ws").mkdir()
    unlimited = ResourceLimits(mem_limit=None, cpu_limit=None, pids_limit=None)
    env = {"KEY": route.dummy_key, "ASK": "from the sandbox", "PATH": "/usr/bin:/bin"}
    box = BubblewrapSandbox(SandboxSpec(argv=argv, workspace=tmp_path / "ws", env=env, limits=unlimited,
                                        labels={"session": "gw-test"}, ro_paths=ro, rw_paths=rw))
    await box.start()
    out = await asyncio.wait_for(box.stdout.read(), 30)
    status = await box.wait()
    await box.stop()
    await box.remove()
    assert status == 0, list(box.stderr_tail)
    text, _pid = out.decode().strip().rsplit(" ", 1)
    assert text == "Hello from the fake LLM. You said: from the sandbox"  # and no "LEAK" before it
    billed_equals_ledger(fake, acp_ledger)


def test_meter_reads_openai_details_and_anthropic_streams():
    meter = UsageMeter("openai")
    meter.feed(json.dumps({"model": "gpt", "usage": {
        "prompt_tokens": 100, "completion_tokens": 30, "total_tokens": 130,
        "prompt_tokens_details": {"cached_tokens": 60},
        "completion_tokens_details": {"reasoning_tokens": 20}}}).encode())
    usage = meter.result()
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (100, 30, 130)
    assert (usage.cached_read_tokens, usage.thought_tokens, usage.model) == (60, 20, "gpt")

    meter = UsageMeter("anthropic")
    stream = (b'event: message_start\ndata: {"type": "message_start", "message": {"model": "claude", '
              b'"usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 8}}}\n\n'
              b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 40}}\n\n')
    for i in range(0, len(stream), 7):  # split anywhere, as the network does
        meter.feed(stream[i:i + 7])
    usage = meter.result()
    assert (usage.input_tokens, usage.output_tokens, usage.cached_read_tokens) == (20, 40, 8)
    assert usage.total_tokens == 60 and usage.model == "claude"

    meter = UsageMeter("openai")
    meter.feed(b'{"error": {"message": "bad request"}}')
    assert meter.result() is None  # nothing billed, nothing recorded


@pytest.fixture
def llm_demo_agent(acp_managers):
    """The demo agent declared as an OpenAI-API agent: the gateway wiring without node."""
    from jupyter_acp.agents_builtin import python_ro_paths

    def make(**traits):
        manager = acp_managers(**traits)
        manager.agents.agents = {"llm-demo": {
            "command": [sys.executable, "-m", "jupyter_acp.agents_builtin.demo"],
            "ro_paths": python_ro_paths(), "llm_api": "openai",
            "credential_env": {"api_key": "OPENAI_API_KEY", "base_url": "OPENAI_BASE_URL",
                               "model": "OPENAI_MODEL"},
            "settings_files": {".agent/settings.json": {"telemetry": False}}}}
        return manager

    return make


async def test_the_real_key_never_reaches_the_sandbox_or_the_logs(llm_demo_agent, fake, caplog):
    caplog.set_level(logging.DEBUG)
    manager = llm_demo_agent(allow_unsandboxed=True)
    manager.gateway.allowed_endpoints = [fake.url]
    session = await manager.create_user_session(
        "alice", "llm-demo", credentials={"api_key": REAL_KEY, "base_url": fake.url + "/v1", "model": "m"})
    assert session.metered_by_gateway
    route = manager.gateway.routes[session.id]
    env = session.sandbox_spec.env
    assert env["OPENAI_API_KEY"] == route.dummy_key and env["OPENAI_MODEL"] == "m"
    assert "OPENAI_BASE_URL" not in env  # set by the relay once it has a port
    assert REAL_KEY not in json.dumps([env, session.sandbox_spec.argv, session.stats()])
    environ = Path(f"/proc/{session.sandbox.process.pid}/environ").read_bytes().decode()
    assert f"OPENAI_API_KEY={route.dummy_key}" in environ and REAL_KEY not in environ
    assert "OPENAI_BASE_URL=http://127.0.0.1:" in environ
    home = Path(env["HOME"])
    assert json.loads((home / ".agent/settings.json").read_text()) == {"telemetry": False}
    assert all(REAL_KEY not in p.read_text() for p in home.rglob("*") if p.is_file())
    assert REAL_KEY not in repr(route)
    assert RELAY.exists()
    await manager.delete_user_session("alice", session.id)
    assert not os.path.exists(route.socket_path) and session.id not in manager.gateway.routes
    assert REAL_KEY not in caplog.text


async def test_user_endpoint_must_be_allowed_and_admin_may_pin_fields(llm_demo_agent, fake):
    manager = llm_demo_agent(allow_unsandboxed=True)
    with pytest.raises(BadRequest, match="not allowed on this server"):
        await manager.create_user_session("alice", "llm-demo",
                                          credentials={"api_key": "k", "base_url": fake.url + "/v1"})
    assert manager.get_user_sessions("alice") == [] and manager.gateway.routes == {}
    # the admin's own endpoint is trusted; users may not change it when the admin says so
    manager.agents.credentials = {"llm-demo": {"api_key": REAL_KEY, "base_url": fake.url + "/v1"}}
    manager.agents.user_credential_fields = ["model"]
    with pytest.raises(BadRequest, match="does not let users set the credential 'base_url'"):
        await manager.create_user_session("alice", "llm-demo", credentials={"base_url": "http://x/v1"})
    session = await manager.create_user_session("alice", "llm-demo", credentials={"model": "mine"})
    assert manager.gateway.routes[session.id].upstream == fake.url + "/v1"
    assert session.sandbox_spec.env["OPENAI_MODEL"] == "mine"
