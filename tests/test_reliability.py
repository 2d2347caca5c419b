"""Reliability of a real server process: resuming a cut WebSocket, and surviving ``kill -9``.

The server runs as a subprocess (``bench/harness.py``: ``jupyter server`` with jupyter-acp and
``TokenPerUser``), as in production, so that it can be cut off and killed for real:

* a client whose socket breaks in the middle of a 5,000-chunk turn reconnects with
  ``?since=<last seq seen>`` and gets exactly the events it missed (no gap, no duplicate; the
  chunks add up to the turn's reply);
* the server killed with SIGKILL during turns: once restarted on the same usage database, every
  usage record committed before the kill is there, every session is listed (suspended) and
  resumes with its agent's context, and no agent process of the killed server is
  left running (local agents end on stdin EOF; bubblewrap sandboxes die with their parent).
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import os
import signal
import socket as stdsocket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import acp_require
from websockets.sync.client import ClientConnection, connect

from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox
from jupyter_acp.testing import auth

_spec = importlib.util.spec_from_file_location(
    "acp_bench_harness", Path(__file__).resolve().parents[1] / "bench" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

pytestmark = pytest.mark.timeout(120)
STREAM = 5000


def call(server: dict[str, Any], method: str, path: str, user: str, body: Any = None) -> tuple[int, Any]:
    port = int(server["url"].rsplit(":", 1)[1].strip("/"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, "/api/acp/" + path, body=json.dumps(body) if body is not None else None,
                     headers={**auth(user), "Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw) if raw else None


def socket(server: dict[str, Any], sid: str, user: str, since: int | None = None) -> ClientConnection:
    query = f"?since={since}" if since is not None else ""
    return connect(f"{server['ws']}api/acp/sessions/{sid}/ws{query}", additional_headers=auth(user),
                   max_size=None, max_queue=None, open_timeout=30, close_timeout=2)


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, Any]]:
    with harness.jupyter_server("local") as info:
        yield info


# -- a cut WebSocket resumes without loss -----------------------------------------------------------
@pytest.mark.parametrize("cut", ["abort", "close"])
def test_a_client_cut_mid_stream_resumes_with_exactly_the_missing_events(server: dict[str, Any],
                                                                         cut: str) -> None:
    status, session = call(server, "POST", "sessions", "alice", {"new": True})
    assert status == 201
    sid = session["id"]
    seen: list[dict[str, Any]] = []  # every event with a seq, from both connections, in order
    with socket(server, sid, "alice", since=0) as ws:
        while (frame := json.loads(ws.recv(timeout=20)))["type"] != "history:end":
            if "seq" in frame:
                seen.append(frame)
        ws.send(json.dumps({"type": "chat:message", "message": f"/stream {STREAM}"}))
        chunks = 0
        while chunks < 1000:  # a fifth of the turn, then the connection breaks
            frame = json.loads(ws.recv(timeout=20))
            assert frame["type"] != "chat:response"
            seen.append(frame)
            chunks += frame["type"] == "session/update" \
                and frame["data"]["sessionUpdate"] == "agent_message_chunk"
        if cut == "abort":  # close with SO_LINGER 0: a TCP reset, no close frame
            ws.socket.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.socket.close()
    last = seen[-1]["seq"]

    with socket(server, sid, "alice", since=last) as ws2:
        hello = json.loads(ws2.recv(timeout=20))
        assert hello["type"] == "hello" and hello["data"]["last_seq"] >= last
        while True:
            frame = json.loads(ws2.recv(timeout=30))
            if "seq" in frame:
                seen.append(frame)
            if frame["type"] == "chat:response":
                break
    seqs = [e["seq"] for e in seen]
    assert seqs == list(range(1, len(seqs) + 1))  # from the first event on: no gap, no duplicate
    turn = [e for e in seen if e["type"] == "session/update"
            and e["data"]["sessionUpdate"] == "agent_message_chunk"]
    reply = "".join(e["data"]["content"]["text"] for e in turn)
    assert reply == seen[-1]["data"]["text"] == "".join(f"c{i} " for i in range(STREAM))
    call(server, "DELETE", f"sessions/{sid}", "alice")


# -- kill -9 --------------------------------------------------------------------------------------
def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has exited; only its entry is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in harness.children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


@pytest.mark.parametrize("sandbox", ["local", "bubblewrap"])
def test_kill_9_loses_no_committed_usage_and_leaves_no_agent(tmp_path: Path, sandbox: str) -> None:
    if sandbox == "bubblewrap":
        ok, why = BubblewrapSandbox.available()
        acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", ok, f"bubblewrap is not usable here: {why}")
    users = ["ann", "ben", "cat"]
    with harness.jupyter_server(sandbox, workdir=tmp_path) as server:
        sids = {}
        for i, user in enumerate(users):
            status, session = call(server, "POST", "sessions", user, {"new": True})
            assert status == 201, session
            sids[user] = session["id"]
            for turn in range(i + 1):  # 1, 2 and 3 committed turns
                status, result = call(server, "POST", f"sessions/{session['id']}/messages", user,
                                      {"message": f"turn {turn} of {user}"})
                assert status == 200 and result["usage"]["total_tokens"] > 0
        before = {user: call(server, "GET", "usage", user)[1] for user in users}
        assert [before[u]["total"]["turns"] for u in users] == [1, 2, 3]
        agents = descendants(server["pid"])
        assert len(agents) >= len(users), [cmdline(p) for p in agents]
        # every agent in the middle of a turn when the server dies
        stack = contextlib.ExitStack()
        sockets = [stack.enter_context(socket(server, sid, user)) for user, sid in sids.items()]
        for ws in sockets:
            ws.send(json.dumps({"type": "chat:message", "message": "/sleep 60"}))
        for ws in sockets:
            while not ((frame := json.loads(ws.recv(timeout=20)))["type"] == "session/update"
                       and frame["data"]["sessionUpdate"] == "agent_message_chunk"):
                pass
        os.kill(server["pid"], signal.SIGKILL)
        server["proc"].wait(10)
        stack.close()

    killed, deadline = time.monotonic(), time.monotonic() + 15
    while any(alive(p) for p in agents) and time.monotonic() < deadline:
        time.sleep(0.1)
    print(f"the agents were gone {time.monotonic() - killed:.2f} s after the kill")
    survivors = {p: cmdline(p) for p in agents if alive(p)}
    for pid in survivors:  # do not leave them to the next test, but fail
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"agent processes outlived the killed server: {survivors}"

    with harness.jupyter_server(sandbox, workdir=tmp_path) as server:
        after = {user: call(server, "GET", "usage", user)[1] for user in users}
        # the sessions outlive the kill: listed, suspended, with their committed turns (the
        # turn cut by the kill may be counted too), and resumed with the agent's context
        for i, user in enumerate(users):
            [listed] = call(server, "GET", "sessions", user)[1]["sessions"]
            assert (listed["id"], listed["state"]) == (sids[user], "suspended")
            assert listed["turns"] in (i + 1, i + 2) and listed["title"] == f"turn 0 of {user}"
        status, resumed = call(server, "POST", f"sessions/{sids['ben']}/resume", "ben")
        assert status == 200 and resumed["restore"] == "resume", resumed
        status, result = call(server, "POST", f"sessions/{sids['ben']}/messages", "ben",
                              {"message": "/recall"})
        assert result["text"] == "Demo agent remembers: turn 0 of ben | turn 1 of ben"
    assert after == before


def test_debug_shows_the_extensions_own_log_lines() -> None:
    """``--debug`` (log level DEBUG) shows what our modules log, e.g. the line filter dropping an
    agent's junk output: their loggers were not under the server's, so such lines were lost."""
    junk = {"junk": {"command": [sys.executable, str(Path(__file__).parent / "agents" / "misbehaving.py"),
                                 "garbage"], "display_name": "Junk", "demo": True}}
    extra = [f"--AgentConfigManager.agents={junk!r}", "--UserSessionManager.allow_unsandboxed=True",
             "--ServerApp.log_level=DEBUG"]
    with harness.jupyter_server("local", extra=extra) as server:
        status, session = call(server, "POST", "sessions", "alice", {"agent": "junk"})
        assert status == 201, session
        status, turn = call(server, "POST", f"sessions/{session['id']}/messages", "alice", {"message": "hi"})
        assert status == 200, turn
        log_text = (server["tmp"] / "server.log").read_text()
    assert "non-JSON-RPC output dropped" in log_text  # jupyter_acp.linefilter, at DEBUG
