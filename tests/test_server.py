"""The server extension against a real Jupyter server (pytest-jupyter), with the demo agent.

Two identities (``jupyter_acp.testing.TokenPerUser``: the token ``user:NAME`` is the user NAME)
show the per-user isolation; every answer is checked against ``jupyter_acp/openapi.yaml``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import wait_for
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClientConnection
from traitlets.config import Config

from jupyter_acp import api_models
from jupyter_acp.app import AcpExtension
from jupyter_acp.errors import AcpError
from jupyter_acp.handlers import GONE_REASON, STOPPED_REASON, handlers
from jupyter_acp.session_socket import SUSPENDED_REASON
from jupyter_acp.testing import TokenPerUser, auth

OPENAPI = yaml.safe_load((Path(__file__).parents[1] / "jupyter_acp" / "openapi.yaml").read_text())
SECRET = "sk-TEST-9f8e7d6c5b4a-do-not-leak"
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def jp_server_config(tmp_path: Path) -> Config:
    return Config({
        "ServerApp": {"jpserver_extensions": {"jupyter_acp": True, "jupyter_server_terminals": False},
                      "identity_provider_class": TokenPerUser,
                      "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": "local", "allow_unsandboxed": True,
                               "workspace_template": "{root_dir}/{username}",
                               "agent_home_dir": str(tmp_path / "homes"), "monitor_interval": 0,
                               "permission_timeout": 30},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
        "AcpExtension": {"admin_users": ["carol"], "max_message_bytes": 2000},
        "AgentConfigManager": {"agents": {"keyed-demo": {
            "display_name": "Demo agent with a key (no LLM)",
            "command": [sys.executable, "-m", "jupyter_acp.agents_builtin.demo"],
            "credential_env": {"api_key": "DEMO_API_KEY"}, "demo": True}}},
    })


@pytest.fixture
def jp_auth_header() -> dict[str, str]:
    return auth("alice")


@pytest.fixture
def api(jp_fetch: Any) -> Any:
    """``await api(method, path, body=None, user="alice")`` → (status, JSON), checked against OpenAPI."""

    async def call(method: str, path: str, body: Any = None, user: str | None = "alice",
                   raw: bytes | None = None, params: dict[str, str] | None = None) -> tuple[int, Any]:
        headers = auth(user) if user else {"Authorization": "token nobody"}
        kwargs: dict[str, Any] = {"method": method, "headers": headers, "raise_error": False}
        if method in ("POST", "PUT", "PATCH"):
            kwargs["body"] = raw if raw is not None else json.dumps(body if body is not None else {})
        resp = await jp_fetch("api", "acp", *path.split("/"), params=params, **kwargs)
        data = json.loads(resp.body) if resp.body else None
        check_openapi(method, path, resp.code, data)
        return resp.code, data

    return call


def _template(path: str) -> str:
    for template in OPENAPI["paths"]:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template.lstrip("/")) + "$"
        if re.match(pattern, path):
            return template
    raise AssertionError(f"{path} is not in openapi.yaml")


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = OPENAPI
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        node = target
    return node


def check_openapi(method: str, path: str, status: int, data: Any) -> None:
    """The answer's status is documented for the route, and its body matches the schema."""
    operation = OPENAPI["paths"][_template(path)][method.lower()]
    assert str(status) in operation["responses"], f"{method} {path} answered an undocumented {status}"
    response = _resolve(operation["responses"][str(status)])
    schema = response.get("content", {}).get("application/json", {}).get("schema")
    if schema is None:
        assert data is None, f"{method} {path} {status} should have no body"
        return
    jsonschema.validate(data, {**OPENAPI, **schema}, cls=jsonschema.Draft202012Validator)


async def ws_connect(jp_ws_fetch: Any, session_id: str, user: str = "alice", since: int | None = None
                     ) -> WebSocketClientConnection:
    params = {"since": str(since)} if since is not None else None
    return await jp_ws_fetch("api", "acp", "sessions", session_id, "ws", headers=auth(user), params=params)


async def next_frame(ws: WebSocketClientConnection, timeout: float = 20) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.read_message(), timeout)
    assert raw is not None, "the socket closed"
    return json.loads(raw)


async def frames_until(ws: WebSocketClientConnection, kind: str, on: Any = None) -> list[dict[str, Any]]:
    """Read frames until one of type ``kind`` (inclusive); ``on(frame)`` sees each one."""
    seen = []
    while True:
        frame = await next_frame(ws)
        seen.append(frame)
        if on is not None:
            await on(frame)
        if frame["type"] == kind:
            return seen


async def start(api: Any, user: str = "alice", **body: Any) -> dict[str, Any]:
    status, session = await api("POST", "sessions", {"new": True, **body}, user=user)
    assert status == 201, session
    assert session["state"] == "ready"
    return session


# -- the happy paths ----------------------------------------------------------------------------
async def test_openapi_documents_exactly_the_routes() -> None:
    routes = {re.sub(r"\(\?P<(\w+)>[^)]+\)", r"{\1}", path) for path, _ in handlers()}
    routes.discard("sessions/{session_id}/ws")  # a WebSocket: docs/api.md, not OpenAPI
    assert {p.lstrip("/") for p in OPENAPI["paths"]} == routes


async def test_agents_lists_the_demo_agent_as_default(api: Any) -> None:
    status, data = await api("GET", "agents")
    assert status == 200
    by_name = {a["name"]: a for a in data["agents"]}
    assert data["default"] == "demo" and by_name["demo"]["available"] and by_name["demo"]["demo"]
    for agent in data["agents"]:
        assert agent["available"] or agent["reason"], agent  # unavailable ones say why
    assert any(b["kind"] == "local" and b["available"] for b in data["backends"])


async def test_every_rest_endpoint_happy_path(api: Any, jp_root_dir: Path) -> None:
    (jp_root_dir / "alice" / "project").mkdir(parents=True)
    session = await start(api, cwd="project")
    sid = session["id"]
    assert session["cwd"] == "project" and session["workspace"].endswith("alice/project")
    assert (await api("GET", "sessions"))[1]["sessions"][0]["id"] == sid
    assert (await api("GET", f"sessions/{sid}"))[1]["agent"] == "demo"
    # the same agent and cwd again without new: the live session is reused
    assert (await api("POST", "sessions", {"cwd": "project"}))[1]["id"] == sid

    status, reply = await api("POST", f"sessions/{sid}/messages", {"message": "hello there"})
    assert status == 200 and reply["stop_reason"] == "end_turn"
    assert reply["text"].endswith("hello there") and reply["usage"]["total_tokens"] > 0

    status, history = await api("GET", f"sessions/{sid}/history")
    types = [e["type"] for e in history["events"]]
    assert "chat:message" in types and types.count("chat:response") == 1
    assert [e["seq"] for e in history["events"]] == list(range(1, history["last_seq"] + 1))
    since = {"since": str(history["last_seq"] - 2)}
    status, later = await api("GET", f"sessions/{sid}/history", params=since)
    assert [e["seq"] for e in later["events"]] == [history["last_seq"] - 1, history["last_seq"]]

    assert (await api("GET", f"sessions/{sid}/mode"))[1]["current"] == "default"
    status, modes = await api("POST", f"sessions/{sid}/mode", {"mode_id": "yolo"})
    assert status == 200 and modes["current"] == "yolo"
    status, options = await api("POST", f"sessions/{sid}/config", {"config_id": "style", "value": "shout"})
    assert status == 200 and any(o.get("currentValue") == "shout" for o in options["config_options"])
    assert (await api("POST", f"sessions/{sid}/messages", {"message": "hi"}))[1]["text"].isupper()
    assert (await api("POST", f"sessions/{sid}/cancel"))[1] == {"cancelled": False}

    status, usage = await api("GET", "usage")
    assert status == 200 and usage["user"] == "alice"
    assert usage["total"]["turns"] == 2
    assert usage["today"]["total_tokens"] == usage["total"]["total_tokens"] > 0
    assert [s["session_id"] for s in usage["per_session"]] == [sid]

    status, restarted = await api("POST", f"sessions/{sid}/restart")
    assert status == 200 and restarted["state"] == "ready" and restarted["id"] == sid
    assert (await api("DELETE", f"sessions/{sid}"))[0] == 204
    assert (await api("GET", f"sessions/{sid}"))[0] == 404
    assert (await api("GET", "usage"))[1]["total"]["turns"] == 2  # the ledger outlives the session


async def test_websocket_streams_a_turn_with_a_permission_answered_over_rest(
        api: Any, jp_ws_fetch: Any, jp_root_dir: Path) -> None:
    sid = (await start(api))["id"]
    ws = await ws_connect(jp_ws_fetch, sid)
    hello = await next_frame(ws)
    assert hello["type"] == "hello" and hello["data"]["id"] == sid
    await frames_until(ws, "history:end")
    prompt = "/write notes/hello.txt hi from the demo"
    ws.write_message(json.dumps({"type": "chat:message", "message": prompt}))

    async def approve(frame: dict[str, Any]) -> None:
        if frame["type"] == "permission:request":
            options = frame["data"]["options"]
            allow = next(o["optionId"] for o in options if o["kind"] == "allow_once")
            status, _ = await api("POST", f"sessions/{sid}/permissions/{frame['data']['request_id']}",
                                  {"option_id": allow})
            assert status == 204

    frames = await frames_until(ws, "chat:response", on=approve)
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    types = [f["type"] for f in frames]
    order = [types.index(t) for t in ("permission:request", "permission:resolved", "chat:response")]
    assert order == sorted(order)
    updates = [f["data"] for f in frames if f["type"] == "session/update"]
    kinds = [u["sessionUpdate"] for u in updates]
    assert "tool_call" in kinds and "tool_call_update" in kinds
    chunks = "".join(u["content"]["text"] for u in updates if u["sessionUpdate"] == "agent_message_chunk")
    response = frames[-1]["data"]
    assert chunks == response["text"] and response["usage"]["total_tokens"] > 0
    assert (jp_root_dir / "alice" / "notes" / "hello.txt").read_text() == "hi from the demo\n"
    ws.close()


async def test_several_sockets_and_a_late_joiner_see_everything(api: Any, jp_ws_fetch: Any) -> None:
    sid = (await start(api))["id"]
    first = await ws_connect(jp_ws_fetch, sid)
    await frames_until(first, "history:end")
    first.write_message(json.dumps({"type": "chat:message", "message": "/stream 20"}))
    live = await frames_until(first, "chat:response")
    # a late joiner gets the history first, then live events like the first socket
    late = await ws_connect(jp_ws_fetch, sid)
    replay = await frames_until(late, "history:end")
    assert [f["seq"] for f in replay[1:-1]] == list(range(1, replay[-1]["data"]["last_seq"] + 1))
    last_seq = replay[-1]["data"]["last_seq"]
    assert last_seq == live[-1]["seq"] + 1  # the turn's end, then the state going back to ready
    # reconnecting with ?since= gets only what it missed
    resumed = await ws_connect(jp_ws_fetch, sid, since=last_seq - 2)
    missed = await frames_until(resumed, "history:end")
    assert [f["type"] for f in missed] == ["hello", "chat:response", "state", "history:end"]
    late.write_message(json.dumps({"type": "chat:message", "message": "again"}))
    for ws in (first, late, resumed):
        turn = await frames_until(ws, "chat:response")
        assert turn[0]["type"] == "state" and turn[-1]["data"]["text"].endswith("again")
        ws.close()


async def test_batch_sockets_get_bursts_as_arrays_and_the_same_events(api: Any, jp_ws_fetch: Any) -> None:
    """``?batch=1`` (the sidebar's and the kernel's sockets): a burst is one array frame; the
    events, their order and seqs are exactly what a plain socket of the same session gets."""
    sid = (await start(api))["id"]
    plain = await ws_connect(jp_ws_fetch, sid)
    batched = await jp_ws_fetch("api", "acp", "sessions", sid, "ws", headers=auth("alice"),
                                params={"batch": "1"})
    await frames_until(plain, "history:end")
    raw_frames: list[Any] = []

    async def events_until(ws: WebSocketClientConnection, kind: str, keep: list[Any] | None = None
                           ) -> list[Any]:
        """The events up to the first of type ``kind`` (inclusive; an array may hold more)."""
        events: list[dict[str, Any]] = []
        while kind not in [e["type"] for e in events]:
            data = json.loads(await asyncio.wait_for(ws.read_message(), 20))
            if keep is not None:
                keep.append(data)
            events.extend(data if isinstance(data, list) else [data])
        return events[:[e["type"] for e in events].index(kind) + 1]

    assert (await events_until(batched, "history:end"))[0]["type"] == "hello"
    plain.write_message(json.dumps({"type": "chat:message", "message": "/stream 300"}))
    live_plain = await frames_until(plain, "chat:response")
    live_batched = await events_until(batched, "chat:response", raw_frames)
    assert live_batched == live_plain
    seqs = [e["seq"] for e in live_plain]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # none lost, none twice
    chunks = [e for e in live_plain if e["type"] == "session/update"
              and e["data"]["sessionUpdate"] == "agent_message_chunk"]
    assert len(chunks) == 300
    arrays = [f for f in raw_frames if isinstance(f, list)]
    assert arrays and all(len(f) > 1 for f in arrays)  # a lone event stays a plain object
    assert len(raw_frames) < len(live_batched)
    # the replay on connect comes as arrays too, then history:end
    late = await jp_ws_fetch("api", "acp", "sessions", sid, "ws", headers=auth("alice"),
                             params={"batch": "1"})
    replayed = await events_until(late, "history:end", raw_frames)
    assert isinstance(raw_frames[-2], list) and len(raw_frames[-2]) == len(replayed) - 2
    assert [e["seq"] for e in replayed[1:-1]] == list(range(1, replayed[-1]["data"]["last_seq"] + 1))
    for ws in (plain, batched, late):
        ws.close()


async def test_without_a_history_events_still_stream_live(api: Any, jp_ws_fetch: Any, jp_serverapp: Any
                                                         ) -> None:
    jp_serverapp.web_app.settings["acp_manager"].max_history = 0
    sid = (await start(api))["id"]
    ws = await ws_connect(jp_ws_fetch, sid)
    assert [f["type"] for f in await frames_until(ws, "history:end")] == ["hello", "history:end"]
    ws.write_message(json.dumps({"type": "chat:message", "message": "/stream 5"}))
    turn = await frames_until(ws, "chat:response")
    assert turn[-1]["data"]["text"] == "c0 c1 c2 c3 c4 "
    status, history = await api("GET", f"sessions/{sid}/history")
    assert status == 200 and history["events"] == [] and history["last_seq"] >= turn[-1]["seq"]
    ws.close()


async def test_websocket_bad_frames_get_an_error_and_the_socket_stays(api: Any, jp_ws_fetch: Any) -> None:
    sid = (await start(api))["id"]
    ws = await ws_connect(jp_ws_fetch, sid)
    await frames_until(ws, "history:end")
    bad = ["not json", "[1, 2]", json.dumps({"type": 3}), json.dumps({"type": "nope"}),
           json.dumps({"type": "chat:message"}), json.dumps({"type": "chat:message", "message": "x" * 2001}),
           json.dumps({"type": "permission:answer", "request_id": "missing"}),
           json.dumps({"type": "mode", "mode_id": "warp"})]
    for frame in bad:
        ws.write_message(frame)
        reply = await next_frame(ws)
        assert reply["type"] == "error" and "seq" not in reply and reply["data"]["message"], frame
        assert 400 <= reply["data"]["status"] < 500
    ws.write_message(json.dumps({"type": "ping"}))
    assert (await next_frame(ws))["type"] == "pong"
    ws.close()


async def test_a_second_turn_while_busy_is_refused(api: Any, jp_ws_fetch: Any) -> None:
    sid = (await start(api))["id"]
    ws = await ws_connect(jp_ws_fetch, sid)
    await frames_until(ws, "history:end")
    ws.write_message(json.dumps({"type": "chat:message", "message": "/sleep 30"}))
    frames = await frames_until(ws, "chat:message")
    assert frames[-1]["data"]["text"] == "/sleep 30"
    status, error = await api("POST", f"sessions/{sid}/messages", {"message": "me too"})
    assert status == 409 and "still answering" in error["message"]
    ws.write_message(json.dumps({"type": "chat:message", "message": "and me"}))
    refusal = await frames_until(ws, "error")
    assert refusal[-1]["data"]["status"] == 409
    assert (await api("POST", f"sessions/{sid}/cancel"))[1] == {"cancelled": True}
    end = await frames_until(ws, "chat:response")
    assert end[-1]["data"]["stop_reason"] == "cancelled"
    ws.close()


# -- authentication and isolation ---------------------------------------------------------------
ROUTES = [("GET", "sessions/{sid}"), ("DELETE", "sessions/{sid}"), ("POST", "sessions/{sid}/restart"),
          ("POST", "sessions/{sid}/messages"), ("POST", "sessions/{sid}/cancel"),
          ("GET", "sessions/{sid}/history"), ("POST", "sessions/{sid}/permissions/{rid}"),
          ("GET", "sessions/{sid}/mode"), ("POST", "sessions/{sid}/mode"), ("POST", "sessions/{sid}/config")]
BODIES = {"messages": {"message": "hi"}, "mode": {"mode_id": "yolo"}, "config": {"config_id": "style",
                                                                                    "value": "plain"}}


async def test_unauthenticated_requests_are_refused(api: Any, jp_ws_fetch: Any) -> None:
    for method, path in [("GET", "agents"), ("GET", "sessions"), ("POST", "sessions"), ("GET", "usage"),
                         *ROUTES]:
        status, _ = await api(method, path.format(sid="x", rid="y"), user=None)
        assert status in (401, 403), (method, path, status)
    with pytest.raises(HTTPClientError) as e:
        await jp_ws_fetch("api", "acp", "sessions", "x", "ws", headers={"Authorization": "token nobody"})
    assert e.value.code in (401, 403)


async def test_another_user_gets_404_on_every_route_and_the_socket(api: Any, jp_ws_fetch: Any) -> None:
    sid = (await start(api))["id"]
    ws = await ws_connect(jp_ws_fetch, sid)
    await frames_until(ws, "history:end")
    ws.write_message(json.dumps({"type": "chat:message", "message": "/write secret.txt alice-only"}))
    request = (await frames_until(ws, "permission:request"))[-1]["data"]
    for method, path in ROUTES:
        if method == "DELETE":
            continue  # checked last
        status, error = await api(method, path.format(sid=sid, rid=request["request_id"]),
                                  BODIES.get(path.rsplit("/", 1)[-1]), user="bob")
        assert status == 404, (method, path, status)
        assert sid in error["message"] and "alice" not in error["message"]
    # exactly what an id that never existed gets
    assert (await api("GET", "sessions/0123456789abcdef", user="bob"))[1]["message"] == \
        (await api("GET", f"sessions/{sid}", user="bob"))[1]["message"].replace(sid, "0123456789abcdef")
    assert await closed_at_once(await ws_connect(jp_ws_fetch, sid, user="bob")) == (4404, GONE_REASON)
    assert (await api("DELETE", f"sessions/{sid}", user="bob"))[0] == 404
    assert (await api("GET", "sessions", user="bob"))[1] == {"sessions": []}
    # alice's session went on untouched: her permission request is still pending
    status, alice = await api("GET", f"sessions/{sid}")
    assert alice["state"] == "busy" and alice["pending_permissions"][0]["request_id"] == request["request_id"]
    answer = f"sessions/{sid}/permissions/{request['request_id']}"
    assert (await api("POST", answer, {"option_id": None}))[0] == 204
    await frames_until(ws, "chat:response")
    ws.close()


async def next_raw(ws: WebSocketClientConnection) -> Any:
    return await asyncio.wait_for(ws.read_message(), 20)


def flat(raw: Any) -> list[dict[str, Any]]:
    """The events of a frame of a ``?batch=1`` socket (one object, or an array of them)."""
    data = json.loads(raw)
    return data if isinstance(data, list) else [data]


async def closed_at_once(ws: WebSocketClientConnection) -> tuple[int | None, str | None]:
    """The socket is closed before any frame (no hello): its close code and reason."""
    assert await asyncio.wait_for(ws.read_message(), 10) is None, "a frame came before the close"
    ws.close()
    return ws.close_code, ws.close_reason


async def test_a_socket_to_a_session_that_is_not_mine_opens_and_closes_with_4404(
        api: Any, jp_ws_fetch: Any) -> None:
    """A browser sees an HTTP error before the upgrade only as 1006, like a network drop, and
    would reconnect forever: an unknown, another user's or a deleted session's socket opens and
    is closed with 4404 and one reason for all three (ids leak nothing)."""
    sid = (await start(api))["id"]
    unknown = await closed_at_once(await ws_connect(jp_ws_fetch, "0123456789abcdef"))
    foreign = await closed_at_once(await ws_connect(jp_ws_fetch, sid, user="bob"))
    assert unknown == foreign == (4404, GONE_REASON)
    assert sid not in GONE_REASON and "alice" not in GONE_REASON
    assert (await api("DELETE", f"sessions/{sid}"))[0] == 204
    assert await closed_at_once(await ws_connect(jp_ws_fetch, sid, since=0)) == (4404, GONE_REASON)
    # authentication and authorization are still refused before the upgrade
    with pytest.raises(HTTPClientError) as refused:
        await jp_ws_fetch("api", "acp", "sessions", sid, "ws", headers={"Authorization": "token nobody"})
    assert refused.value.code == 403


@pytest.mark.parametrize("how", ["deleted", "culled", "server stopping"])
async def test_open_sockets_of_a_session_that_ends_get_its_last_event_then_4404(
        api: Any, jp_ws_fetch: Any, jp_serverapp: Any, how: str) -> None:
    sid = (await start(api))["id"]
    manager = jp_serverapp.web_app.settings["acp_manager"]
    session = manager.get_user_session("alice", sid)
    plain = await ws_connect(jp_ws_fetch, sid)
    batched = await jp_ws_fetch("api", "acp", "sessions", sid, "ws", headers=auth("alice"),
                                params={"batch": "1"})
    await frames_until(plain, "history:end")
    while not any(f["type"] == "history:end" for f in flat(await next_raw(batched))):
        pass
    plain.write_message(json.dumps({"type": "chat:message", "message": "/sleep 30"}))
    await frames_until(plain, "chat:message")
    if how == "deleted":
        assert (await api("DELETE", f"sessions/{sid}"))[0] == 204
    elif how == "server stopping":
        await next(iter(jp_serverapp.extension_manager.extension_apps["jupyter_acp"])).stop_extension()
    else:  # the idle monitor's cull (a running turn is never culled: cancel it first)
        await api("POST", f"sessions/{sid}/cancel")
        await frames_until(plain, "chat:response")
        manager.get_user_session("alice", sid).last_activity -= 3600
        assert await manager.cleanup(max_age=60) == [sid]
    for ws in (plain, batched):
        events = []
        while (raw := await next_raw(ws)) is not None:
            events += flat(raw)
        assert events[-1]["type"] == "state" and events[-1]["data"]["state"] == "stopped", events[-3:]
        # deleted: ended; culled or stopped with the server: kept (a client resumes it)
        assert (ws.close_code, ws.close_reason) == (4404, STOPPED_REASON if how == "deleted"
                                                    else SUSPENDED_REASON)
        ws.close()
    assert session.fanout is None  # nothing left subscribed


async def test_usage_is_private_except_to_admins(api: Any) -> None:
    sid = (await start(api))["id"]
    await api("POST", f"sessions/{sid}/messages", {"message": "count me"})
    bob = (await api("GET", "usage", user="bob"))[1]
    assert bob["total"]["turns"] == 0 and bob["per_session"] == []
    assert (await api("GET", "usage", user="bob", params={"all": "1"}))[0] == 403
    assert (await api("GET", "usage", user="bob", params={"user": "alice"}))[0] == 403
    everyone = (await api("GET", "usage", user="carol", params={"all": "1"}))[1]
    assert everyone["user"] is None and [s["user"] for s in everyone["per_session"]] == ["alice"]
    assert (await api("GET", "usage", user="carol", params={"user": "alice"}))[1]["total"]["turns"] == 1


# -- bad input ----------------------------------------------------------------------------------
async def test_bad_input_gets_clear_4xx_errors_and_the_server_keeps_serving(api: Any) -> None:
    sid = (await start(api))["id"]
    cases = [
        ("POST", "sessions", None, b"{not json", 400, "not valid JSON"),
        ("POST", "sessions", None, b"[1]", 400, "JSON object"),
        ("POST", "sessions", {"agent": "no-such-agent"}, None, 404, "no-such-agent"),
        ("POST", "sessions", {"agent": 7}, None, 400, "'agent' must be a string"),
        ("POST", "sessions", {"color": "red"}, None, 400, "Unknown fields: color"),
        ("POST", "sessions", {"cwd": "../../etc"}, None, 403, "outside your workspace"),
        ("POST", "sessions", {"cwd": "../100%"}, None, 403, "cwd '../100%' is outside"),
        ("POST", "sessions", {"credentials": {"api_key": 5}}, None, 400, "string values"),
        ("POST", f"sessions/{sid}/messages", {}, None, 400, "'message' is required"),
        ("POST", f"sessions/{sid}/messages", {"message": "   "}, None, 400, "empty"),
        ("POST", f"sessions/{sid}/messages", {"message": "é" * 1001}, None, 413, "larger than 2000 bytes"),
        ("POST", f"sessions/{sid}/messages", None, b"", 400, "JSON object is required"),
        ("POST", "sessions/nope/messages", {"message": "hi"}, None, 404, "nope"),
        ("GET", f"sessions/{sid}/history", None, None, 400, "'since'"),
        ("GET", f"sessions/{sid}/history?since=" + "9" * 26, None, None, 400, "larger than any event"),
        ("POST", "sessions", {"cwd": "x" * 100_000}, None, 400, "cwd is too long"),
        ("POST", "sessions", {"cwd": "a/" + "y" * 300}, None, 400, "cwd is too long"),
        ("POST", f"sessions/{sid}/mode", {"mode_id": "warp"}, None, 400, "Unknown mode"),
        ("POST", f"sessions/{sid}/config", {"config_id": "style"}, None, 400, "'value' is required"),
        ("POST", f"sessions/{sid}/permissions/abc", {}, None, 404, "No pending permission"),
    ]
    for method, path, body, raw, code, words in cases:
        path, _, since = path.partition("?since=")
        params = {"since": since or "soon"} if path.endswith("history") else None
        status, error = await api(method, path, body, raw=raw, params=params)
        assert status == code and words in error["message"], (path, body, raw, status, error)
    # an agent that died: the session is in error and prompting it is refused with the reason
    status, _ = await api("POST", f"sessions/{sid}/messages", {"message": "/crash"})
    assert status == 502
    status, error = await api("POST", f"sessions/{sid}/messages", {"message": "hello?"})
    assert status == 409 and "error" in error["message"]
    assert (await api("GET", "agents"))[0] == 200


async def test_too_many_sessions_is_429(api: Any, jp_serverapp: Any) -> None:
    jp_serverapp.web_app.settings["acp_manager"].max_sessions_per_user = 1
    await start(api)
    status, error = await api("POST", "sessions", {"new": True})
    assert status == 429 and "limit is 1" in error["message"]


# -- credentials, audit, activity, shutdown -----------------------------------------------------
async def test_credentials_reach_only_the_agent_process(api: Any, jp_serverapp: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    session = await start(api, agent="keyed-demo", credentials={"api_key": SECRET})
    sid = session["id"]
    manager = jp_serverapp.web_app.settings["acp_manager"]
    pid = manager.get_user_session("alice", sid).sandbox.process.pid
    assert f"DEMO_API_KEY={SECRET}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    seen = [session, (await api("GET", f"sessions/{sid}"))[1], (await api("GET", "sessions"))[1],
            (await api("POST", f"sessions/{sid}/messages", {"message": "hello"}))[1],
            (await api("GET", f"sessions/{sid}/history"))[1], (await api("GET", "usage"))[1],
            (await api("POST", f"sessions/{sid}/restart"))[1], (await api("GET", "agents"))[1]]
    assert SECRET not in json.dumps(seen)
    assert SECRET not in caplog.text and SECRET[:12] not in caplog.text


async def test_audit_events_and_activity(api: Any, jp_serverapp: Any) -> None:
    events: list[tuple[str, dict[str, Any]]] = []

    async def listener(logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        events.append((schema_id.rsplit("/", 2)[-2], dict(data)))

    jp_serverapp.event_logger.add_listener(schema_id="https://events.jupyter.org/jupyter_acp/session/v1",
                                           listener=listener)
    jp_serverapp.event_logger.add_listener(
        schema_id="https://events.jupyter.org/jupyter_acp/permission/v1", listener=listener)
    sid = (await start(api))["id"]
    await api("POST", f"sessions/{sid}/messages", {"message": "hi"})
    assert jp_serverapp.web_app.settings["acp_last_activity"] is not None
    assert "acp" in jp_serverapp.web_app.settings["last_activity_times"]
    await api("DELETE", f"sessions/{sid}")
    await wait_for(lambda: len(events) >= 2)
    assert [(kind, d.get("action")) for kind, d in events] == [("session", "started"), ("session", "stopped")]
    assert events[0][1]["user"] == "alice" and events[0][1]["sandbox"] == "local"


async def test_the_started_server_is_frozen_out_of_the_collector_unless_configured_not(
        jp_serverapp: Any) -> None:
    import gc

    extension = next(iter(jp_serverapp.extension_manager.extension_apps["jupyter_acp"]))
    assert extension.gc_freeze is True  # the default
    gc.unfreeze()
    extension.gc_freeze = False
    await extension._start_jupyter_server_extension(jp_serverapp)
    assert gc.get_freeze_count() == 0
    extension.gc_freeze = True
    await extension._start_jupyter_server_extension(jp_serverapp)
    assert gc.get_freeze_count() > 10_000  # the server's modules, at least


async def test_stopping_the_extension_stops_every_agent(api: Any, jp_serverapp: Any) -> None:
    sessions = [await start(api), await start(api, user="bob")]
    manager = jp_serverapp.web_app.settings["acp_manager"]
    procs = [manager.get_user_session(s["user"], s["id"]).sandbox.process for s in sessions]
    extension = jp_serverapp.extension_manager.extension_apps["jupyter_acp"]
    await next(iter(extension)).stop_extension()
    assert manager.all_sessions() == []
    assert all(p.returncode is not None for p in procs)


async def test_a_client_too_slow_to_read_is_dropped_and_resumes_without_loss(
        api: Any, jp_serverapp: Any, jp_http_port: int, jp_base_url: str) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    jp_serverapp.web_app.settings["acp_max_socket_buffer_bytes"] = 64 * 1024
    sid = (await start(api))["id"]
    session = jp_serverapp.web_app.settings["acp_manager"].get_user_session("alice", sid)
    url = f"ws://127.0.0.1:{jp_http_port}{jp_base_url}api/acp/sessions/{sid}/ws"
    # max_queue=1: once one frame waits unread, the client stops reading its (small) TCP socket
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", jp_http_port))
    stalled = await connect(url, additional_headers=auth("alice"), max_queue=1, sock=sock)
    await api("POST", f"sessions/{sid}/messages", {"message": "/stream 20000"})
    # the stalled socket was dropped, the turn went on (what subscribes still: the session store)
    assert session.fanout is None and len(session.history._subscribers) == 1
    with pytest.raises(ConnectionClosedError) as closed:
        while True:
            await stalled.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    jp_serverapp.web_app.settings["acp_max_socket_buffer_bytes"] = 0  # the replay comes in one burst
    async with connect(url + "?since=0", additional_headers=auth("alice"), max_size=None) as ws:
        seqs = []
        while True:
            frame = json.loads(await ws.recv())
            if frame["type"] == "history:end":
                break
            if "seq" in frame:
                seqs.append(frame["seq"])
    # the history keeps the latest max_history events, all of them in order
    assert seqs == list(range(session.last_seq - len(seqs) + 1, session.last_seq + 1))
    assert len(seqs) == min(session.last_seq, session.options.max_history)
    # and the REST history counts from the same seqs once older events have left it
    status, later = await api("GET", f"sessions/{sid}/history", params={"since": str(session.last_seq - 3)})
    assert status == 200 and [e["seq"] for e in later["events"]] == [session.last_seq - k for k in (2, 1, 0)]


# -- request models and keep-alive (issue 15) -----------------------------------------------------
#: The request bodies' models (api_models), per operation of openapi.yaml and client frame.
BODY_MODELS = {("post", "/sessions"): "NewSession",
               ("post", "/sessions/{session_id}/messages"): "PromptWithImages",
               ("post", "/sessions/{session_id}/permissions/{request_id}"): "PermissionAnswer",
               ("post", "/sessions/{session_id}/mode"): "ModeChange",
               ("post", "/sessions/{session_id}/config"): "ConfigChange",
               ("post", "/sessions/{session_id}/resume"): "Resume",
               ("post", "/sessions/{session_id}/model"): "ModelChange"}
FRAME_MODELS = {"chat:message": "PromptWithImages", "permission:answer": "PermissionFrame",
                "mode": "ModeChange", "cancel": None, "ping": None}
BOUND_KEYS = ("type", "minLength", "maxLength", "maxItems", "maxProperties", "x-maxBytes",
              "x-maxComponentBytes", "pattern")
#: Bounds the models leave to others: a cwd's (the manager's, in bytes: PATH_MAX, NAME_MAX; its
#: errors say which), a prompt's size (the server's max_message_bytes, a 413; the spec states the
#: default, checked by test_fuzz_bounds.py against AcpExtension).
ENFORCED_ELSEWHERE = {("NewSession", "cwd"): {"maxLength", "x-maxBytes", "x-maxComponentBytes"},
                      ("Prompt", "message"): {"maxLength", "x-maxBytes"},
                      ("PromptWithImages", "message"): {"maxLength", "x-maxBytes"}}


def _bounds(schema: dict[str, Any], at: str = "") -> set[tuple[str, str, str]]:
    """(where, keyword, value) of each bound of a JSON schema, through anyOf (null left out),
    items and additionalProperties."""
    s = _resolve(schema)
    out = {(at, key, json.dumps(s[key])) for key in BOUND_KEYS if key in s}
    for part in s.get("anyOf", []):
        if _resolve(part).get("type") != "null":
            out |= _bounds(part, at)
    for key in ("items", "additionalProperties"):
        if isinstance(s.get(key), dict):
            out |= _bounds(s[key], f"{at}.{key}")
    return out


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """A model's JSON schema with its ``$defs`` references (``#/$defs/X``) replaced by X."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(defs[ref.rsplit("/", 1)[1]], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _check_model(name: str, spec: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    raw = getattr(api_models, name).model_json_schema()
    model = _inline(raw, raw.get("$defs", {}))
    props = {k: v for k, v in spec.get("properties", {}).items() if k not in ignore}
    problems = []
    if set(props) != set(model["properties"]):
        problems.append(f"{name}: fields {sorted(model['properties'])}, the spec's {sorted(props)}")
    if set(spec.get("required", [])) - ignore != set(model.get("required", [])):
        problems.append(f"{name}: required {model.get('required', [])}, "
                        f"the spec's {spec.get('required', [])}")
    if (spec.get("additionalProperties") is False) != (model.get("additionalProperties") is False):
        problems.append(f"{name}: unknown fields refused: {model.get('additionalProperties') is False}")
    for field in set(props) & set(model["properties"]):
        skip = ENFORCED_ELSEWHERE.get((name, field), set())
        mine = {b for b in _bounds(model["properties"][field]) if b[1] not in skip}
        theirs = {b for b in _bounds(props[field]) if b[1] not in skip}
        if mine != theirs:
            problems.append(f"{name}.{field}: the model's bounds {sorted(mine - theirs)}, "
                            f"the spec's {sorted(theirs - mine)}")
    return problems


async def test_request_models_agree_with_the_openapi_request_schemas() -> None:
    """Each request body and client frame has a model (jupyter_acp/api_models.py) with the
    spec's fields, required fields and bounds; a prompt's size is the server's setting."""
    problems = []
    bodies = {(m, t): op for t, item in OPENAPI["paths"].items() for m, op in item.items()
              if isinstance(op, dict) and "requestBody" in op}
    assert set(bodies) == set(BODY_MODELS)
    for key, operation in bodies.items():
        spec = _resolve(operation["requestBody"]["content"]["application/json"]["schema"])
        problems += _check_model(BODY_MODELS[key], spec)
    variants = OPENAPI["components"]["schemas"]["ClientFrame"]["oneOf"]
    frames = {v["properties"]["type"]["const"]: v for v in variants}
    assert set(frames) == set(FRAME_MODELS)
    for kind, variant in frames.items():
        name = FRAME_MODELS[kind]
        if name is None:
            assert set(variant["properties"]) == {"type"}, kind
        else:
            problems += _check_model(name, variant, ignore=frozenset({"type"}))
    assert not problems, "\n".join(problems)
    cap = _resolve({"$ref": "#/components/schemas/Prompt"})["x-maxBytes"]
    assert cap == AcpExtension.max_message_bytes.default_value
    prompt = api_models.Prompt
    assert api_models.parse(prompt, {"message": "é" * (cap // 2)}, max_message_bytes=cap).message
    with pytest.raises(AcpError) as refused:
        api_models.parse(prompt, {"message": "é" * (cap // 2) + "x"}, max_message_bytes=cap)
    assert refused.value.status == 413


async def test_idle_sockets_get_keep_alive_pings(api: Any, jp_ws_fetch: Any, jp_serverapp: Any) -> None:
    """The session socket is jupyter_server's WebSocketMixin: it pings every ws_ping_interval
    ms; a client that answers (tornado's does) stays connected however long it is idle."""
    jp_serverapp.web_app.settings.update(ws_ping_interval=100, ws_ping_timeout=300)
    sid = (await start(api))["id"]
    ws = await ws_connect(jp_ws_fetch, sid)
    pings: list[bytes] = []
    ws.on_ping = pings.append  # type: ignore[method-assign]
    await frames_until(ws, "history:end")
    await asyncio.sleep(1.2)  # idle for four ping timeouts
    assert len(pings) >= 5, pings
    ws.write_message(json.dumps({"type": "ping"}))
    assert (await next_frame(ws))["type"] == "pong"
    ws.close()


async def test_a_client_that_stops_answering_pings_is_closed(
        api: Any, jp_serverapp: Any, jp_http_port: int, jp_base_url: str) -> None:
    """A client that is gone without a word (a laptop closed, a VPN dropped) answers no ping:
    after ws_ping_timeout ms the server closes the socket, with a close frame."""
    jp_serverapp.web_app.settings.update(ws_ping_interval=100, ws_ping_timeout=300)
    sid = (await start(api))["id"]
    reader, writer = await asyncio.open_connection("127.0.0.1", jp_http_port)
    headers = {"Host": f"127.0.0.1:{jp_http_port}", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
               "Sec-WebSocket-Version": "13", **auth("alice")}
    request = f"GET {jp_base_url}api/acp/sessions/{sid}/ws HTTP/1.1\r\n" + \
        "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(request.encode())
    assert b" 101 " in (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0]
    began, opcodes = time.monotonic(), []
    try:
        while not opcodes or opcodes[-1] != 0x8:  # the server's frames, never answered
            head = await asyncio.wait_for(reader.readexactly(2), 10)
            size = head[1] & 0x7F
            if size >= 126:
                size = int.from_bytes(await reader.readexactly(2 if size == 126 else 8), "big")
            await reader.readexactly(size)
            opcodes.append(head[0] & 0x0F)
    finally:
        writer.close()
    assert 0x9 in opcodes, opcodes  # pinged
    assert time.monotonic() - began >= 0.25, opcodes  # (not before the timeout)
