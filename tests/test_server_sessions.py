"""Stored sessions through the REST API and the WebSocket of a real Jupyter server (issue 18).

A real server restart (a ``jupyter server`` subprocess stopped and started again on the same
database and homes): the session is listed as suspended, its socket replays the stored history
and closes with 4404 saying so, ``resume`` brings its agent back with its context. Then, on
pytest-jupyter's server: every route of a stored session is its user's alone (another user's id
is 404, like an unknown one), and the new routes refuse bad input with a clear 4xx.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import acp_require_backend
from fake_llm import FakeLLM
from kernel_server import TOKEN, server_for_kernels
from test_real_agents import REAL_KEY, require_agent
from test_server import (  # noqa: F401  (pytest fixtures)
    api,
    frames_until,
    jp_auth_header,
    jp_server_config,
    start,
    ws_connect,
)
from tornado.websocket import websocket_connect

from jupyter_acp.handlers import GONE_REASON

pytestmark = pytest.mark.timeout(180)


def rest(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
    req = urllib.request.Request(f"{url}api/acp/{path}", data=data, method=method,
                                 headers={"Authorization": f"token {TOKEN}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


async def test_a_session_outlives_a_real_server_restart(tmp_path: Path):
    with server_for_kernels(tmp_path) as srv:
        status, session = rest(srv["url"], "POST", "sessions", {"agent": "demo"})
        assert status == 201
        sid = session["id"]
        for text in ("my name is Ada", "the answer is 42"):
            assert rest(srv["url"], "POST", f"sessions/{sid}/messages", {"message": text})[0] == 200
    # the server is gone (stopped cleanly: its agents too); the same database and homes
    with server_for_kernels(tmp_path) as srv:
        status, listed = rest(srv["url"], "GET", "sessions")
        [model] = listed["sessions"]
        assert (model["id"], model["state"], model["title"], model["turns"], model["resumable"]) == \
            (sid, "suspended", "my name is Ada", 2, True)
        status, history = rest(srv["url"], "GET", f"sessions/{sid}/history")
        assert [e["data"]["text"] for e in history["events"] if e["type"] == "chat:message"] == \
            ["my name is Ada", "the answer is 42"]
        # the socket of a suspended session: hello, the stored history, then 4404 saying so
        ws_url = srv["url"].replace("http", "ws") + f"api/acp/sessions/{sid}/ws"
        ws = await websocket_connect(_ws_request(ws_url))
        frames = []
        while (raw := await ws.read_message()) is not None:
            frames.append(json.loads(raw))
        assert frames[0]["type"] == "hello" and frames[0]["data"]["state"] == "suspended"
        assert frames[-1]["type"] == "history:end" and frames[-1]["data"]["last_seq"] == history["last_seq"]
        assert ws.close_code == 4404 and ws.close_reason.startswith("The session is suspended")
        ws.close()

        status, resumed = rest(srv["url"], "POST", f"sessions/{sid}/resume")
        assert status == 200 and resumed["state"] == "ready" and resumed["restore"] == "resume"
        status, turn = rest(srv["url"], "POST", f"sessions/{sid}/messages", {"message": "/recall"})
        assert turn["text"] == "Demo agent remembers: my name is Ada | the answer is 42" and turn["turn"] == 3
        status, history2 = rest(srv["url"], "GET", f"sessions/{sid}/history")
        assert [e["seq"] for e in history2["events"]][: len(history["events"])] == \
            [e["seq"] for e in history["events"]]  # numbered on, not anew
        assert rest(srv["url"], "DELETE", f"sessions/{sid}")[0] == 204
        assert rest(srv["url"], "GET", "sessions")[1]["sessions"] == []


@pytest.mark.agent
@pytest.mark.sandbox
async def test_qwen_gets_its_context_back_after_a_real_server_restart(tmp_path: Path, fake: FakeLLM):
    """Qwen Code in bubblewrap, the server stopped and started again: the request of the turn
    after the resume carries the turns before it (the agent's own context, not only ours)."""
    acp_require_backend("bubblewrap")
    creds = {"qwen": {"api_key": REAL_KEY, "base_url": fake.url + "/v1", "model": "fake-model"}}
    config = tmp_path / "acp_config.py"
    config.write_text(f"c.AgentConfigManager.extra_paths = {[require_agent('qwen')]!r}\n"
                      f"c.AgentConfigManager.credentials = {creds!r}\n")
    args = (f"--config={config}",)
    with server_for_kernels(tmp_path, *args, sandbox="bubblewrap") as srv:
        status, session = rest(srv["url"], "POST", "sessions", {"agent": "qwen"})
        assert status == 201, session
        sid = session["id"]
        for text in ("remember the word aardvark", "and the word bumblebee"):
            status, turn = rest(srv["url"], "POST", f"sessions/{sid}/messages", {"message": text})
            assert status == 200 and "Hello from the fake LLM" in turn["text"], turn
    with server_for_kernels(tmp_path, *args, sandbox="bubblewrap") as srv:
        [model] = rest(srv["url"], "GET", "sessions")[1]["sessions"]
        assert (model["id"], model["state"]) == (sid, "suspended")
        status, resumed = rest(srv["url"], "POST", f"sessions/{sid}/resume")
        assert status == 200 and resumed["restore"] == "resume", resumed
        seen = len(fake.requests)
        status, turn = rest(srv["url"], "POST", f"sessions/{sid}/messages",
                            {"message": "what about the word chinchilla"})
        assert status == 200 and turn["turn"] == 3
        bodies = [json.dumps(r.body) for r in fake.requests[seen:]]
        assert any("chinchilla" in b and "aardvark" in b and "bumblebee" in b for b in bodies)


def _ws_request(url: str) -> Any:
    from tornado.httpclient import HTTPRequest

    return HTTPRequest(url, headers={"Authorization": f"token {TOKEN}"})


async def test_stored_sessions_are_their_users_alone(api, jp_ws_fetch, jp_root_dir):  # noqa: F811
    session = await start(api, agent="demo")
    sid = session["id"]
    (jp_root_dir / "alice").mkdir(exist_ok=True)
    (jp_root_dir / "alice" / "notes.txt").write_text("twelve bytes")
    assert (await api("POST", f"sessions/{sid}/messages", {"message": "hello"}))[0] == 200
    status, closed = await api("POST", f"sessions/{sid}/close")
    assert status == 200 and closed["state"] == "suspended"
    # bob: every route of alice's stored session is "not found", like an unknown id
    for method, path in (("GET", f"sessions/{sid}"), ("GET", f"sessions/{sid}/history"),
                         ("GET", f"sessions/{sid}/files"), ("POST", f"sessions/{sid}/resume"),
                         ("POST", f"sessions/{sid}/close"), ("DELETE", f"sessions/{sid}"),
                         ("GET", f"sessions/{sid}/model")):
        assert (await api(method, path, user="bob"))[0] == 404, (method, path)
    assert (await api("GET", "sessions", user="bob"))[1]["sessions"] == []
    ws = await ws_connect(jp_ws_fetch, sid, user="bob")
    assert await ws.read_message() is None and (ws.close_code, ws.close_reason) == (4404, GONE_REASON)
    ws.close()

    status, files = await api("GET", f"sessions/{sid}/files", params={"prefix": "no"})
    assert (status, files) == (200, {"files": ["notes.txt"]})
    assert (await api("GET", f"sessions/{sid}/files", params={"prefix": "../"}))[0] == 403
    assert (await api("GET", f"sessions/{sid}/files", params={"prefix": "/etc/"}))[0] == 400

    status, resumed = await api("POST", f"sessions/{sid}/resume")
    assert status == 200 and resumed["restore"] == "resume"
    assert [c["name"] for c in resumed["available_commands"]][:1] == ["recall"] or \
        (await api("GET", f"sessions/{sid}"))[1]["available_commands"]
    status, models = await api("GET", f"sessions/{sid}/model")
    assert models["current"] == "demo-small" and [m["value"] for m in models["available"]] == \
        ["demo-small", "demo-large"]
    status, err = await api("POST", f"sessions/{sid}/model", {"model": "gpt-9"})
    assert status == 400 and "demo-large" in err["message"]
    assert (await api("POST", f"sessions/{sid}/model", {"model": "demo-large"}))[1]["current"] == "demo-large"

    png = base64.b64encode(b"\x89PNG" + b"x" * 60).decode()
    image = {"mime_type": "image/png", "data": png}
    status, turn = await api("POST", f"sessions/{sid}/messages",
                             {"message": "see @notes.txt", "images": [image]})
    assert status == 200 and "Demo agent got image image/png (64 bytes)." in turn["text"]
    assert "Demo agent got file notes.txt (12 bytes)." in turn["text"]
    assert turn["text"].endswith("[demo-large] Demo agent (no LLM) heard 2 words: see @notes.txt")
    too_many = [{"mime_type": "image/png", "data": png}] * 5
    assert (await api("POST", f"sessions/{sid}/messages", {"message": "x", "images": too_many}))[0] == 400
    status, err = await api("POST", f"sessions/{sid}/messages", {"message": "see @../../etc/passwd"})
    assert status == 403 and "outside" in err["message"]

    ws = await ws_connect(jp_ws_fetch, sid)
    await frames_until(ws, "history:end")
    ws.write_message(json.dumps({"type": "chat:message", "message": "via @notes.txt"}))
    frames = await frames_until(ws, "chat:response")
    user = next(f for f in frames if f.get("type") == "chat:message")
    assert user["data"]["attachments"][0]["name"] == "notes.txt"
    ws.close()
    assert (await api("DELETE", f"sessions/{sid}"))[0] == 204
    assert (await api("GET", f"sessions/{sid}"))[0] == 404
