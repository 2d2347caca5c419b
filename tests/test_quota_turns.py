"""A turn that crosses the daily token quota ends cleanly, with one clear error.

The gateway checks the quota before each LLM request, so a turn that starts just under it gets
its first request through (which crosses it) and every later one refused with HTTP 429. Real
agents retry a 429 whatever it says (Qwen Code for more than 9 minutes, Gemini CLI for 215 s),
so the gateway tells the session (``GatewayRoute.on_refused`` → ``AgentSession.quota_refused``), which cancels
the turn through ACP (``session/cancel``) and shows the quota's message as the turn's one
``error`` event, before its ``turn_end`` (``chat:response``); an agent that ignores the cancel
has its turn ended on our side after ``QUOTA_CANCEL_GRACE`` s.

Overshoot bound: tokens of the requests that had already passed the quota check when the quota
was crossed (in flight), nothing after. Each test asserts it on the ledger and prints the time
from the first 429 to the end of the turn (``pytest -s``).

Agents: an ACP agent of this file that retries its LLM calls (fast), the hostile test agent
(ignores ``session/cancel``), and the real Qwen Code and Gemini CLI against the fake LLM
(``-m agent``: they fail rather than skip when ``JUPYTER_ACP_REQUIRE_AGENTS=1``).
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import acp_require, wait_for
from fake_llm import FakeLLM
from test_gateway import REAL_KEY, http
from traitlets.config import Config

from jupyter_acp.agents_builtin import python_ro_paths
from jupyter_acp.errors import QuotaExceeded
from jupyter_acp.gateway import LlmGateway
from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox
from jupyter_acp.session import AgentSession, SessionState, TurnResult
from jupyter_acp.testing import TokenPerUser, auth
from jupyter_acp.usage import TurnUsage, UsageLedger

HOSTILE = Path(__file__).parent / "agents" / "hostile.py"
QUOTA_RE = re.compile(r"^Daily token quota used up: (\d+) of (\d+) tokens today \(UTC\)")
OPENAI_ENV = {"api_key": "OPENAI_API_KEY", "base_url": "OPENAI_BASE_URL", "model": "OPENAI_MODEL"}

#: An ACP agent that calls its LLM like the real ones do: a failed call (429) is retried after a
#: pause until the turn is cancelled. The prompt is JSON: ``{"calls": N, "on_cancel": "stop"}``
#: (answer ``cancelled``, as ACP asks) or ``"fail"`` (answer with a JSON-RPC error instead).
RETRYING_AGENT = r'''
import asyncio, json, os, urllib.error, urllib.request, uuid
import acp
from acp import helpers, schema
from acp.exceptions import RequestError


def ask():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "count me"}]}).encode()
    request = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=body,
                                     headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


class RetryingAgent:
    def __init__(self):
        self.conn = None
        self.cancelled = asyncio.Event()

    def on_connect(self, conn):
        self.conn = conn

    async def initialize(self, protocol_version, **kwargs):
        return schema.InitializeResponse(protocol_version=protocol_version)

    async def new_session(self, cwd, mcp_servers=None, **kwargs):
        return schema.NewSessionResponse(session_id=uuid.uuid4().hex)

    async def authenticate(self, method_id, **kwargs):
        return None

    async def cancel(self, session_id, **kwargs):
        self.cancelled.set()

    async def prompt(self, session_id, prompt, **kwargs):
        order = json.loads(" ".join(getattr(b, "text", "") for b in prompt))
        self.cancelled.clear()
        done = 0
        while done < order["calls"]:
            status = await asyncio.to_thread(ask)
            if status == 200:
                done += 1
                await self.conn.session_update(session_id=session_id,
                                               update=helpers.update_agent_message_text(f"call {done} ok. "))
                continue
            try:  # a real agent's back-off; a cancel ends it
                await asyncio.wait_for(self.cancelled.wait(), 0.2)
            except asyncio.TimeoutError:
                continue
            if order.get("on_cancel") == "fail":
                raise RequestError.internal_error({"details": f"the LLM answered {status}"})
            return schema.PromptResponse(stop_reason="cancelled")
        return schema.PromptResponse(stop_reason="end_turn")


asyncio.run(acp.run_agent(RetryingAgent()))
'''

#: What the hostile agent runs (``sh`` op) to use the gateway: a burst of ``BURST`` requests at
#: once (all may pass the quota check before the first is counted: they are in flight when the
#: quota is crossed), then one every 0.1 s for ``LATER`` more; the statuses go to ``OUT``.
BURST_CLIENT = r'''
import json, os, sys, threading, time, urllib.error, urllib.request
burst, later, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def ask():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "spend"}]}).encode()
    request = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=body,
                                     headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"]})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
statuses = [0] * burst
threads = [threading.Thread(target=lambda i=i: statuses.__setitem__(i, ask())) for i in range(burst)]
for t in threads:
    t.start()
for t in threads:
    t.join()
after = []
for _ in range(later):
    time.sleep(0.1)
    after.append(ask())
with open(out + ".tmp", "w") as f:
    json.dump({"burst": statuses, "later": after}, f)
os.rename(out + ".tmp", out)
'''


def spend_all_but(ledger: UsageLedger, user: str, left: int) -> int:
    """Record earlier usage so that ``user`` has ``left`` tokens of the quota; returns it used."""
    used = ledger.max_tokens_per_user_per_day - left
    now = time.time()
    ledger.record(user=user, session_id="earlier", agent="earlier", turn=1,
                  usage=TurnUsage(input_tokens=used, total_tokens=used, source="gateway"), started_at=now)
    assert ledger.tokens_today(user) == used
    return used


class TurnWatch:
    """A session's events and the gateway's quota refusals of it, with when they happened."""

    def __init__(self, session: AgentSession) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.refusals: list[tuple[float, str]] = []
        session.subscribe(lambda event: self.events.append((time.monotonic(), event)))
        acted = session.quota_refused

        def spy(message: str) -> None:  # the route's on_refused looks it up at each refusal
            self.refusals.append((time.monotonic(), message))
            acted(message)

        session.quota_refused = spy  # type: ignore[method-assign]

    def of_type(self, kind: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in self.events if e["type"] == kind]

    def check_refused_turn(self, result: TurnResult, quota: int) -> float:
        """One quota error before the turn's end, the turn cancelled; returns first 429 → end (s)."""
        turn = result.turn
        errors = [(t, e) for t, e in self.of_type("error") if e["data"].get("turn") == turn]
        ends = [(t, e) for t, e in self.of_type("turn_end") if e["data"]["turn"] == turn]
        assert len(errors) == 1, [e["data"] for _, e in errors]
        assert len(ends) == 1
        (_, error), (ended, end) = errors[0], ends[0]
        message = error["data"]["message"]
        match = QUOTA_RE.match(message)
        assert match and int(match.group(1)) >= quota and int(match.group(2)) == quota, message
        assert error["data"]["quota"] is True
        assert error["seq"] < end["seq"]  # the error first: clients may stop reading at the end
        assert result.stop_reason == "cancelled" and result.error == message
        assert end["data"]["error"] == message and end["data"]["stop_reason"] == "cancelled"
        assert self.refusals and self.refusals[0][1] == message
        cancels = [t for t, _ in self.of_type("cancel_requested")]
        assert len(cancels) == 1 and cancels[0] - self.refusals[0][0] < 1.0  # session/cancel at once
        return ended - self.refusals[0][0]


async def check_next_prompt_refused(manager: Any, session: AgentSession, quota: int) -> None:
    """The next prompt is refused before it reaches the agent: 429 ``QuotaExceeded``."""
    seq = session.last_seq
    with pytest.raises(QuotaExceeded, match=f"Daily token quota used up: \\d+ of {quota} tokens") as info:
        await manager.send_message("alice", session.id, "one more, please")
    assert info.value.status == 429
    assert session.last_seq == seq and session.state is SessionState.READY


# -- the gateway ----------------------------------------------------------------------------------

async def test_the_gateway_tells_the_route_of_each_quota_refusal(fake, tmp_path):
    ledger = UsageLedger(db_url=f"sqlite:///{tmp_path / 'q.sqlite'}", max_tokens_per_user_per_day=10)
    told: list[str] = []

    def on_refused(message: str) -> None:
        told.append(message)
        raise RuntimeError("a failing callback changes nothing for the agent")

    gateway = LlmGateway()
    try:
        route = gateway.open_route(
            session_id="s1", user="alice", api="openai", upstream=fake.url + "/v1", api_key=REAL_KEY,
            on_usage=lambda usage: ledger.record(user="alice", session_id="s1", agent="a", turn=1,
                                                 usage=usage, started_at=time.time()),
            check_quota=lambda: ledger.check_quota("alice"), on_refused=on_refused)
        headers = {"Authorization": f"Bearer {route.dummy_key}"}
        ask = {"messages": [{"role": "user", "content": "use up the quota please"}]}
        status, _, _ = await http(route.socket_path, "POST", "/v1/chat/completions", headers, ask)
        assert status == 200 and told == []
        for _ in range(3):
            status, hdrs, body = await http(route.socket_path, "POST", "/v1/chat/completions", headers, ask)
            assert status == 429 and hdrs["x-should-retry"] == "false"
        used = ledger.tokens_today("alice")
        message = f"Daily token quota used up: {used} of 10 tokens today (UTC); it renews at midnight UTC"
        assert json.loads(body)["error"]["message"] == message
        assert told == [message] * 3  # every refusal; the session acts on the first of a turn
        assert len(fake.requests) == 1
    finally:
        gateway.close()
        ledger.close()


# -- a retrying agent of our own (fast) --------------------------------------------------------------

@pytest.fixture
def retrying_agent(tmp_path: Path) -> dict[str, Any]:
    """The agents config of ``RETRYING_AGENT`` (an OpenAI-API agent: it goes through the gateway)."""
    script = tmp_path / "agent" / "retrying.py"
    script.parent.mkdir()
    script.write_text(RETRYING_AGENT)
    return {"retrying": {"command": [sys.executable, str(script)], "display_name": "Retrying test agent",
                         "ro_paths": [*python_ro_paths(), str(script.parent)], "llm_api": "openai",
                         "credential_env": OPENAI_ENV}}


async def start_retrying(acp_managers, acp_ledger, fake, retrying_agent, quota: int = 1000):
    acp_ledger.max_tokens_per_user_per_day = quota
    manager = acp_managers(sandbox="local", allow_unsandboxed=True)
    manager.agents.agents = retrying_agent
    manager.agents.credentials = {"retrying": {"api_key": REAL_KEY, "base_url": fake.url + "/v1"}}
    session = await manager.create_user_session("alice", "retrying")
    assert session.metered_by_gateway
    return manager, session


@pytest.mark.parametrize("on_cancel", ["stop", "fail"])
async def test_a_turn_crossing_the_quota_is_cancelled_with_one_error(acp_managers, acp_ledger, fake,
                                                                       retrying_agent, on_cancel):
    """The agent's first call crosses the quota; its next ones get 429 and it retries them until
    the session cancels the turn (``fail``: it then answers with a JSON-RPC error, which is not
    shown as a second error: the quota's is the turn's one)."""
    quota = 1000
    manager, session = await start_retrying(acp_managers, acp_ledger, fake, retrying_agent, quota)
    before = spend_all_but(acp_ledger, "alice", 1)
    watch = TurnWatch(session)
    result = await asyncio.wait_for(
        manager.send_message("alice", session.id, json.dumps({"calls": 5, "on_cancel": on_cancel})), 30)
    elapsed = watch.check_refused_turn(result, quota)
    print(f"\n[retrying agent, on cancel: {on_cancel}] first 429 -> turn end {elapsed:.3f} s")
    assert elapsed < 1.0
    assert result.text == "call 1 ok. "
    assert session.state is SessionState.READY
    billed = fake.billed()
    assert billed["requests"] == 1  # only the request in flight when the quota was crossed
    assert acp_ledger.tokens_today("alice") == before + billed["total"] <= quota + billed["total"]
    assert result.usage.total_tokens == billed["total"]
    await check_next_prompt_refused(manager, session, quota)


# -- the hostile agent: ignores session/cancel and keeps calling ------------------------------------

async def test_an_agent_that_ignores_cancel_has_its_turn_ended_here(acp_managers, acp_ledger, fake,
                                                                     monkeypatch, tmp_path):
    """The hostile agent sends a burst of LLM requests at once, then more, and ignores the cancel.
    The turn ends ``QUOTA_CANCEL_GRACE`` s after the first 429 on our side; the agent's later
    requests are all refused (no second error), and its late answer ends no second turn."""
    grace = 1.0
    monkeypatch.setattr(AgentSession, "QUOTA_CANCEL_GRACE", grace)
    quota, burst, later = 1000, 4, 20
    acp_ledger.max_tokens_per_user_per_day = quota
    manager = acp_managers(sandbox="local", allow_unsandboxed=True)
    manager.agents.agents = {"hostile": {
        "command": [sys.executable, str(HOSTILE)], "display_name": "Hostile test agent",
        "ro_paths": [*python_ro_paths(), str(HOSTILE.parent)], "llm_api": "openai",
        "credential_env": OPENAI_ENV}}
    manager.agents.credentials = {"hostile": {"api_key": REAL_KEY, "base_url": fake.url + "/v1"}}
    session = await manager.create_user_session("alice", "hostile")
    assert session.metered_by_gateway
    before = spend_all_but(acp_ledger, "alice", 1)
    watch = TurnWatch(session)
    out = tmp_path / "statuses.json"
    cmd = shlex.join([sys.executable, "-c", BURST_CLIENT, str(burst), str(later), str(out)])
    result = await asyncio.wait_for(
        manager.send_message("alice", session.id, json.dumps({"op": "sh", "cmd": cmd})), 30)
    elapsed = watch.check_refused_turn(result, quota)
    print(f"\n[hostile agent ignoring cancel] first 429 -> turn end {elapsed:.3f} s (grace {grace:g} s)")
    assert grace - 0.1 < elapsed < grace + 1.0
    assert session.state is SessionState.READY

    # the agent goes on: every later request is refused; its late answer is dropped
    await wait_for(out.exists, timeout=30)
    statuses = json.loads(out.read_text())
    ok = statuses["burst"].count(200)
    assert ok >= 1 and set(statuses["burst"]) <= {200, 429}
    assert statuses["later"] == [429] * later
    assert len(watch.refusals) == burst - ok + later
    await asyncio.sleep(0.5)  # (the hostile agent's reply and PromptResponse arrive meanwhile)
    assert [e["data"]["turn"] for _, e in watch.of_type("turn_end")] == [result.turn]
    assert len(watch.of_type("error")) == 1 and session.state is SessionState.READY

    # overshoot: the requests that had passed the quota check when it was crossed, nothing after
    billed = fake.billed()
    assert billed["requests"] == ok <= burst
    assert acp_ledger.tokens_today("alice") == before + billed["total"]
    print(f"[hostile agent] {ok} of {burst} burst requests in flight when the quota was crossed: "
          f"{billed['total']} tokens over the {quota - before} left")
    await check_next_prompt_refused(manager, session, quota)


# -- the REST API and the WebSocket (what the sidebar and %%acp read) ------------------------------

@pytest.fixture
def jp_server_config(tmp_path: Path, fake: FakeLLM, retrying_agent: dict[str, Any]) -> Config:
    return Config({
        "ServerApp": {"jpserver_extensions": {"jupyter_acp": True, "jupyter_server_terminals": False},
                      "identity_provider_class": TokenPerUser, "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": "local", "allow_unsandboxed": True,
                               "agent_home_dir": str(tmp_path / "homes"), "monitor_interval": 0},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'usage.sqlite'}",
                        "max_tokens_per_user_per_day": 1000},
        "AgentConfigManager": {"agents": retrying_agent, "credentials": {
            "retrying": {"api_key": REAL_KEY, "base_url": fake.url + "/v1"}}},
    })


async def rest(jp_fetch: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    from test_server import check_openapi

    kwargs: dict[str, Any] = {"method": method, "headers": auth("alice"), "raise_error": False}
    if method == "POST":
        kwargs["body"] = json.dumps(body or {})
    resp = await jp_fetch("api", "acp", *path.split("/"), **kwargs)
    data = json.loads(resp.body) if resp.body else None
    check_openapi(method, path, resp.code, data)
    return resp.code, data


async def start_over_rest(jp_fetch: Any, tmp_path: Path) -> str:
    status, session = await rest(jp_fetch, "POST", "sessions", {"agent": "retrying"})
    assert status == 201
    ledger = UsageLedger(db_url=f"sqlite:///{tmp_path / 'usage.sqlite'}", max_tokens_per_user_per_day=1000)
    spend_all_but(ledger, "alice", 1)  # (the server's ledger reads the same database)
    ledger.close()
    return session["id"]


async def test_rest_answers_the_refused_turn_with_its_error(jp_fetch, tmp_path):
    sid = await start_over_rest(jp_fetch, tmp_path)
    status, result = await rest(jp_fetch, "POST", f"sessions/{sid}/messages",
                                {"message": json.dumps({"calls": 5})})
    assert status == 200 and result["stop_reason"] == "cancelled"
    assert QUOTA_RE.match(result["error"]) and result["text"] == "call 1 ok. "
    _, history = await rest(jp_fetch, "GET", f"sessions/{sid}/history")
    kinds = [e["type"] for e in history["events"] if e["type"] in ("error", "chat:response")]
    assert kinds == ["error", "chat:response"]
    status, refused = await rest(jp_fetch, "POST", f"sessions/{sid}/messages", {"message": "again"})
    assert status == 429 and QUOTA_RE.match(refused["message"])
    _, stats = await rest(jp_fetch, "GET", f"sessions/{sid}")
    assert stats["state"] == "ready"


async def test_the_socket_shows_the_error_before_the_turn_ends(jp_fetch, jp_ws_fetch, tmp_path):
    """The sidebar's and ``%%acp``'s view: on the session's WebSocket, the quota ``error`` comes
    before ``chat:response``, which carries it too (``AcpApi.stream`` returns that)."""
    sid = await start_over_rest(jp_fetch, tmp_path)
    ws = await jp_ws_fetch("api", "acp", "sessions", sid, "ws", headers=auth("alice"))
    try:
        ws.write_message(json.dumps({"type": "chat:message", "message": json.dumps({"calls": 5})}))
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] != "chat:response":
            frame = json.loads(await asyncio.wait_for(ws.read_message(), 30))
            frames += frame if isinstance(frame, list) else [frame]
        errors = [f for f in frames if f["type"] == "error"]
        assert len(errors) == 1 and QUOTA_RE.match(errors[0]["data"]["message"])
        assert frames[-1]["data"]["error"] == errors[0]["data"]["message"]
        ws.write_message(json.dumps({"type": "chat:message", "message": "again"}))
        while frames[-1]["type"] != "error":  # (after the turn's end: its state: ready)
            frame = json.loads(await asyncio.wait_for(ws.read_message(), 30))
            frames += frame if isinstance(frame, list) else [frame]
        refused = frames[-1]
        assert "seq" not in refused  # the refusal, for this socket only: no turn was started
        assert refused["data"]["status"] == 429 and QUOTA_RE.match(refused["data"]["message"])
        assert [f["type"] for f in frames].count("chat:message") == 1
    finally:
        ws.close()


# -- the real agents ---------------------------------------------------------------------------------

@pytest.mark.agent
@pytest.mark.parametrize(("agent", "backend"), [
    *[pytest.param(a, b, marks=[pytest.mark.sandbox] if b == "bubblewrap" else [])
      for a in ("qwen", "gemini") for b in ("bubblewrap", "local")],
    *[pytest.param(a, "bubblewrap", marks=pytest.mark.sandbox) for a in ("claude", "codex")]])
async def test_real_agent_turn_crossing_the_quota_ends_cleanly(acp_managers, acp_ledger, fake, agent,
                                                               backend):
    """The fake LLM's first reply is a tool call that writes the file, billed at 8,000 to 20,000
    tokens (the agents' system prompts), which crosses the quota; after the tool runs, the agent's
    next LLM call gets 429 (Claude Code's title call, beside it, may cross it first). Without
    the session's cancel, Qwen Code retried for more than 9 minutes and Gemini CLI for 215 s;
    here the turn ends within a second (Claude Code and Codex too)."""
    from test_real_agents import require_agent

    bin_dir = require_agent(agent)
    if backend == "bubblewrap":
        ok, why = BubblewrapSandbox.available()
        acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", ok, f"bubblewrap cannot run here: {why}")
    quota = 5000
    acp_ledger.max_tokens_per_user_per_day = quota
    manager = acp_managers(sandbox=backend, allow_unsandboxed=True, permission_policy="allow")
    manager.agents.extra_paths = [bin_dir]
    base, model = {"qwen": (fake.url + "/v1", "fake-model"), "gemini": (fake.url, "gemini-2.5-flash"),
                   "claude": (fake.url, "claude-sonnet-4-5"),
                   "codex": (fake.url + "/v1", "gpt-5.3-codex")}[agent]
    manager.agents.credentials = {agent: {"api_key": REAL_KEY, "base_url": base, "model": model}}
    session = await manager.create_user_session("alice", agent)
    assert session.metered_by_gateway and session.sandbox.kind == backend
    # Gemini CLI 0.61 edits only existing files through ACP fs (see test_real_agents.py)
    (session.sandbox_spec.workspace / "hello.txt").write_text("old text\n")
    before = spend_all_but(acp_ledger, "alice", 1)
    watch = TurnWatch(session)
    target = f"{session.sandbox.workspace_path}/hello.txt"
    result = await asyncio.wait_for(
        manager.send_message("alice", session.id, f"please write {target} containing hi from {agent}"), 60)
    elapsed = watch.check_refused_turn(result, quota)
    billed = fake.billed()
    print(f"\n[{agent} in {backend}] first 429 -> turn end {elapsed:.3f} s; {len(watch.refusals)} "
          f"refusal(s); {billed['requests']} LLM request(s) billed, {billed['total']} tokens")
    assert elapsed < 2.0  # the agent itself ended the turn on session/cancel (grace: 3 s)
    assert session.state is SessionState.READY
    # only the requests in flight when the quota was crossed: the tool call; for Claude Code,
    # whose title call runs beside each turn's first request, whichever of the two were
    kinds = [r.kind for r in fake.requests if r.usage]
    if agent == "claude":
        assert 1 <= len(kinds) <= 2 and set(kinds) <= {"text", "tool_call"}
    else:
        assert kinds == ["tool_call"]
    assert billed["requests"] == len(kinds)
    assert acp_ledger.tokens_today("alice") == before + billed["total"] <= quota + billed["total"]
    await check_next_prompt_refused(manager, session, quota)
    await asyncio.sleep(1.0)  # nothing more comes of the refused turn
    assert len(watch.of_type("error")) == 1 and len(watch.of_type("turn_end")) == 1
    assert session.state is SessionState.READY
    await manager.delete_user_session("alice", session.id)
