"""The four real agents through the server's REST + WebSocket API, in bubblewrap and in Docker,
against the fake LLM.

The same turn a JupyterLab user makes: start a session over REST, switch to the mode that asks,
prompt over the WebSocket, answer each permission request over REST (a file written — Gemini
CLI rewrites one of the user's, it cannot create one through ACP; for Claude and Codex also a
command run in the sandbox), and read ``GET usage``, whose totals must equal what the fake LLM
endpoint billed (the per-session gateway meters it), cached and reasoning tokens included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import acp_require_backend
from fake_llm import TOOL_DONE_REPLY, FakeLLM
from test_real_agents import REAL_KEY, billed_rows, require_agent
from test_server import frames_until, next_frame, ws_connect
from traitlets.config import Config

from jupyter_acp.testing import TokenPerUser, auth

pytestmark = [pytest.mark.agent, pytest.mark.timeout(120)]

#: Per agent: the credentials' endpoint suffix and model, and the mode that asks.
AGENTS = {"qwen": ("/v1", "fake-model", "default"), "gemini": ("", "gemini-2.5-flash", "default"),
          "claude": ("", "claude-sonnet-4-5", "default"), "codex": ("/v1", "gpt-5.3-codex", "read-only")}


@pytest.fixture(params=sorted(AGENTS))
def agent(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[pytest.param("bubblewrap", marks=pytest.mark.sandbox),
                        pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> str:
    acp_require_backend(request.param)
    return str(request.param)


@pytest.fixture
def jp_server_config(tmp_path: Path, fake: FakeLLM, agent: str, backend: str) -> Config:
    bin_dir = require_agent(agent)
    suffix, model, _ = AGENTS[agent]
    return Config({
        "ServerApp": {"jpserver_extensions": {"jupyter_acp": True, "jupyter_server_terminals": False},
                      "identity_provider_class": TokenPerUser, "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": backend, "workspace_template": "{root_dir}/{username}",
                               "agent_home_dir": str(tmp_path / "homes"), "monitor_interval": 0},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
        "AgentConfigManager": {"extra_paths": [bin_dir], "credentials": {agent: {
            "api_key": REAL_KEY, "base_url": fake.url + suffix, "model": model}}},
    })


@pytest.fixture
def jp_auth_header() -> dict[str, str]:
    return auth("alice")


async def test_turn_through_the_api(jp_fetch: Any, jp_ws_fetch: Any, jp_root_dir: Path, fake: FakeLLM,
                                    agent: str, backend: str) -> None:
    workspace = jp_root_dir / "alice"
    workspace.mkdir(exist_ok=True)
    if backend == "docker" and os.getuid() == 0:  # the agent's uid, as for a user's own workspace
        os.chown(workspace, 1000, 1000)
    if agent == "gemini":  # the user's file, which it rewrites
        (workspace / "hello.txt").write_text("old text\n")

    async def rest(method: str, path: str, body: Any = None) -> Any:
        kwargs = {"body": json.dumps(body or {})} if method == "POST" else {}
        resp = await jp_fetch("api", "acp", *path.split("/"), method=method, **kwargs)
        return json.loads(resp.body) if resp.body else None

    agents = {a["name"]: a for a in (await rest("GET", "agents"))["agents"]}
    assert agents[agent]["available"], agents[agent]["reason"]
    session = await rest("POST", "sessions", {"agent": agent})
    sid = session["id"]
    assert session["state"] == "ready" and session["sandbox"] == backend
    assert REAL_KEY not in json.dumps(session)
    mode = AGENTS[agent][2]
    assert (await rest("POST", f"sessions/{sid}/mode", {"mode_id": mode}))["current"] == mode

    ws = await ws_connect(jp_ws_fetch, sid)
    await frames_until(ws, "history:end")
    target = "/workspace/hello.txt"  # the workspace's path inside the sandbox
    message = f"please write {target} containing hi"
    if agent in ("claude", "codex"):  # they run commands themselves, inside the sandbox
        message += ", then run `env > /workspace/ran.txt`"
    ws.write_message(json.dumps({"type": "chat:message", "message": message}))

    async def approve(frame: dict[str, Any]) -> None:
        if frame["type"] == "permission:request":
            allow = next(o["optionId"] for o in frame["data"]["options"] if o["kind"] == "allow_once")
            answer = f"sessions/{sid}/permissions/{frame['data']['request_id']}"
            await rest("POST", answer, {"option_id": allow})

    frames = await frames_until(ws, "chat:response", on=approve)
    kinds = [f["data"].get("sessionUpdate") for f in frames if f["type"] == "session/update"]
    # Gemini asks before it announces the call, and then only updates it
    assert {"tool_call", "tool_call_update"} & set(kinds)
    assert "permission:resolved" in [f["type"] for f in frames]
    assert TOOL_DONE_REPLY in frames[-1]["data"]["text"]
    assert (jp_root_dir / "alice" / "hello.txt").read_text().strip() == "hi"
    if agent in ("claude", "codex"):
        env = (jp_root_dir / "alice" / "ran.txt").read_text()
        assert "HOME=/home/agent" in env and REAL_KEY not in env
        assert [f["type"] for f in frames].count("permission:resolved") == 2
    assert (await next_frame(ws))["data"]["state"] == "ready"
    ws.close()

    usage = await rest("GET", "usage")
    billed = fake.billed()
    assert (usage["total"]["input_tokens"], usage["total"]["output_tokens"], usage["total"]["total_tokens"]) \
        == (billed["input"], billed["output"], billed["total"])
    assert usage["total"]["turns"] == 1 and billed["requests"] >= 2
    assert (usage["total"]["cached_read_tokens"], usage["total"]["thought_tokens"]) == \
        (billed["cached_read"], billed["thought"])
    assert len(billed_rows(fake)) == billed["requests"]
    assert (await rest("GET", f"sessions/{sid}"))["tokens"]["total_tokens"] == billed["total"]
    history = await rest("GET", f"sessions/{sid}/history")
    assert REAL_KEY not in json.dumps(history)
