"""Qwen Code through the server's REST + WebSocket API, in bubblewrap, against the fake LLM.

The same turn a JupyterLab user makes: start a session over REST, switch to ``default`` mode,
prompt over the WebSocket, answer the permission request over REST, and read ``GET usage``,
whose totals must equal what the fake LLM endpoint billed (the per-session gateway meters it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import acp_require
from fake_llm import TOOL_DONE_REPLY, FakeLLM
from test_real_agents import REAL_KEY, require_agent
from test_server import frames_until, next_frame, ws_connect
from traitlets.config import Config

from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox
from jupyter_acp.testing import TokenPerUser, auth

pytestmark = [pytest.mark.agent, pytest.mark.sandbox, pytest.mark.timeout(120)]


@pytest.fixture
def fake() -> Any:
    with FakeLLM() as server:
        yield server


@pytest.fixture
def jp_server_config(tmp_path: Path, fake: FakeLLM) -> Config:
    bin_dir = require_agent("qwen")
    ok, why = BubblewrapSandbox.available()
    acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", ok, f"bubblewrap cannot run here: {why}")
    return Config({
        "ServerApp": {"jpserver_extensions": {"jupyter_acp": True, "jupyter_server_terminals": False},
                      "identity_provider_class": TokenPerUser, "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": "bubblewrap", "workspace_template": "{root_dir}/{username}",
                               "agent_home_dir": str(tmp_path / "homes"), "monitor_interval": 0},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
        "AgentConfigManager": {"extra_paths": [bin_dir], "credentials": {"qwen": {
            "api_key": REAL_KEY, "base_url": fake.url + "/v1", "model": "fake-model"}}},
    })


@pytest.fixture
def jp_auth_header() -> dict[str, str]:
    return auth("alice")


async def test_qwen_code_turn_through_the_api(jp_fetch: Any, jp_ws_fetch: Any, jp_root_dir: Path,
                                               fake: FakeLLM) -> None:
    async def rest(method: str, path: str, body: Any = None) -> Any:
        kwargs = {"body": json.dumps(body or {})} if method == "POST" else {}
        resp = await jp_fetch("api", "acp", *path.split("/"), method=method, **kwargs)
        return json.loads(resp.body) if resp.body else None

    agents = {a["name"]: a for a in (await rest("GET", "agents"))["agents"]}
    assert agents["qwen"]["available"], agents["qwen"]["reason"]
    session = await rest("POST", "sessions", {"agent": "qwen"})
    sid = session["id"]
    assert session["state"] == "ready" and session["sandbox"] == "bubblewrap"
    assert REAL_KEY not in json.dumps(session)
    assert (await rest("POST", f"sessions/{sid}/mode", {"mode_id": "default"}))["current"] == "default"

    ws = await ws_connect(jp_ws_fetch, sid)
    await frames_until(ws, "history:end")
    target = "/workspace/hello.txt"  # the workspace's path inside the sandbox
    ws.write_message(json.dumps({"type": "chat:message", "message": f"please write {target} containing hi"}))

    async def approve(frame: dict[str, Any]) -> None:
        if frame["type"] == "permission:request":
            allow = next(o["optionId"] for o in frame["data"]["options"] if o["kind"] == "allow_once")
            answer = f"sessions/{sid}/permissions/{frame['data']['request_id']}"
            await rest("POST", answer, {"option_id": allow})

    frames = await frames_until(ws, "chat:response", on=approve)
    kinds = [f["data"].get("sessionUpdate") for f in frames if f["type"] == "session/update"]
    assert "tool_call" in kinds and "permission:resolved" in [f["type"] for f in frames]
    assert TOOL_DONE_REPLY in frames[-1]["data"]["text"]
    assert (jp_root_dir / "alice" / "hello.txt").read_text() == "hi"
    assert (await next_frame(ws))["data"]["state"] == "ready"
    ws.close()

    usage = await rest("GET", "usage")
    billed = fake.billed()
    assert (usage["total"]["input_tokens"], usage["total"]["output_tokens"], usage["total"]["total_tokens"]) \
        == (billed["input"], billed["output"], billed["total"])
    assert usage["total"]["turns"] == 1 and billed["requests"] >= 2
    assert (await rest("GET", f"sessions/{sid}"))["tokens"]["total_tokens"] == billed["total"]
    history = await rest("GET", f"sessions/{sid}/history")
    assert REAL_KEY not in json.dumps(history)
