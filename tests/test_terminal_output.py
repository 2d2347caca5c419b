"""``terminal:output``: what the agent's commands print reaches its user's clients, bounded.

A real Jupyter server (pytest-jupyter) and the demo agent's ``/shell CMD`` (a ``terminal/create``
whose tool call carries ``{"type": "terminal", "terminalId"}``), over REST and the WebSocket: the
event carries the command's output and exit status, is bounded and marked truncated, comes back
in a replay, and never reaches another user. The flood test plays a hostile agent through the
session's own ACP client; the history tests check the snapshot bookkeeping that keeps a flood
from pushing the conversation out. The server tests run under ``local`` with
``allow_unsandboxed_terminals`` (fast, always available); one test runs ``/shell`` under
bubblewrap (skipped where it cannot run).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import acp_require_backend
from test_server import (  # noqa: F401  (pytest fixtures)
    api,
    closed_at_once,
    frames_until,
    jp_auth_header,
    start,
    ws_connect,
)
from traitlets.config import Config

from jupyter_acp.history import MAX_KEYED, EventHistory
from jupyter_acp.terminals import EVENT_OUTPUT_BYTES, OUTPUT_INTERVAL
from jupyter_acp.testing import TokenPerUser

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def jp_server_config(tmp_path: Path) -> Config:
    return Config({
        "ServerApp": {"jpserver_extensions": {"jupyter_acp": True, "jupyter_server_terminals": False},
                      "identity_provider_class": TokenPerUser,
                      "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": "local", "allow_unsandboxed": True,
                               "allow_unsandboxed_terminals": True,
                               "workspace_template": "{root_dir}/{username}",
                               "agent_home_dir": str(tmp_path / "homes"), "monitor_interval": 0},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
    })


def outputs(frames: list[dict[str, Any]], terminal_id: str | None = None) -> list[dict[str, Any]]:
    """The ``terminal:output`` events (wire or, from ``subscribe``, internal type name)."""
    return [f for f in frames if f.get("type") in ("terminal:output", "terminal_output")
            and (terminal_id is None or f["data"]["terminal_id"] == terminal_id)]


def terminal_of(frames: list[dict[str, Any]]) -> str:
    """The terminal id the turn's ``/shell`` tool call shows (its ``content``)."""
    for f in frames:
        update = f.get("data") or {}
        if f.get("type") == "session/update" and update.get("sessionUpdate") == "tool_call":
            return next(c["terminalId"] for c in update["content"] if c["type"] == "terminal")
    raise AssertionError("no tool call with a terminal")


async def shell(ws: Any, line: str) -> list[dict[str, Any]]:
    """Run ``/shell line`` on the socket; the frames up to the turn's end."""
    ws.write_message(json.dumps({"type": "chat:message", "message": f"/shell {line}"}))
    return await frames_until(ws, "chat:response")


# -- over the WebSocket and REST ----------------------------------------------------------------
async def test_output_and_exit_status_reach_the_socket_and_the_history(api: Any, jp_ws_fetch: Any) -> None:  # noqa: F811
    sid = (await start(api))["id"]
    ws = await ws_connect(jp_ws_fetch, sid)
    await frames_until(ws, "history:end")
    frames = await shell(ws, "echo hello; echo oops >&2; exit 3")
    terminal_id = terminal_of(frames)
    events = outputs(frames, terminal_id)
    assert events and all(isinstance(e["seq"], int) for e in events)
    last = events[-1]
    assert last["data"] == {"terminal_id": terminal_id, "output": "hello\noops\n", "truncated": False,
                            "exit_status": {"exit_code": 3, "signal": None}}
    # it came before the turn's end, and after the tool call that names the terminal
    seqs = [f.get("seq") for f in frames]
    assert seqs.index(last["seq"]) < len(frames) - 1
    # the REST history keeps the latest one of the terminal (checked against openapi.yaml)
    status, history = await api("GET", f"sessions/{sid}/history")
    assert status == 200
    kept = outputs(history["events"], terminal_id)
    assert [e["data"] for e in kept] == [last["data"]] and kept[0]["seq"] == last["seq"]
    # a reconnect with ?since= (the socket's replay) gives it too
    since = next(f["seq"] for f in frames if f["type"] == "chat:message")
    again = await ws_connect(jp_ws_fetch, sid, since=since)
    replay = await frames_until(again, "history:end")
    assert [e["data"] for e in outputs(replay, terminal_id)] == [last["data"]]
    status, history = await api("GET", f"sessions/{sid}/history", params={"since": str(since)})
    assert [e["data"] for e in outputs(history["events"], terminal_id)] == [last["data"]]
    ws.close()
    again.close()


async def test_output_is_bounded_and_marked_truncated(api: Any, jp_ws_fetch: Any) -> None:  # noqa: F811
    """``seq 1 100000`` prints 588,895 bytes; the demo asks for 65,536 (its ``outputByteLimit``)."""
    sid = (await start(api))["id"]
    ws = await ws_connect(jp_ws_fetch, sid)
    await frames_until(ws, "history:end")
    frames = await shell(ws, "seq 1 100000")
    terminal_id = terminal_of(frames)
    events = outputs(frames, terminal_id)
    for e in events:
        assert len(e["data"]["output"].encode()) <= min(65536, EVENT_OUTPUT_BYTES)
    last = events[-1]["data"]
    assert last["truncated"] is True and last["exit_status"] == {"exit_code": 0, "signal": None}
    assert last["output"].endswith("\n99999\n100000\n")
    assert len(last["output"].encode()) > 60000  # the end of the output, not a stub
    _, history = await api("GET", f"sessions/{sid}/history")
    assert [e["data"] for e in outputs(history["events"], terminal_id)] == [last]
    ws.close()


async def test_printing_in_a_loop_is_coalesced(api: Any, jp_ws_fetch: Any) -> None:  # noqa: F811
    """A command that prints a line every ~10 ms for seconds gives at most one event per
    ``OUTPUT_INTERVAL`` while it runs, plus the one at exit and the one at release; the bound is
    counted from the server's own event times, with a margin of 2x."""
    sid = (await start(api))["id"]
    ws = await ws_connect(jp_ws_fetch, sid)
    await frames_until(ws, "history:end")
    lines = 150
    frames = await shell(ws, f"for i in $(seq 1 {lines}); do echo line$i; sleep 0.01; done")
    terminal_id = terminal_of(frames)
    events = outputs(frames, terminal_id)
    assert events[-1]["data"]["output"].endswith(f"line{lines}\n")
    assert events[-1]["data"]["exit_status"] == {"exit_code": 0, "signal": None}
    span = events[-1]["time"] - events[0]["time"]
    bound = 2 * (span / OUTPUT_INTERVAL + 1) + 2  # running (1 per interval), then exit and release
    assert 1 <= len(events) <= bound, (len(events), span)
    assert len(events) < lines  # far fewer events than lines printed (150 lines take >= 1.5 s)
    # each one is the whole (bounded) output so far: every event's text extends the previous one
    texts = [e["data"]["output"] for e in events]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    # the replay keeps only the latest
    _, history = await api("GET", f"sessions/{sid}/history")
    assert [e["seq"] for e in outputs(history["events"], terminal_id)] == [events[-1]["seq"]]
    ws.close()


async def test_another_users_socket_never_sees_it(api: Any, jp_ws_fetch: Any) -> None:  # noqa: F811
    alice = (await start(api))["id"]
    bob = (await start(api, user="bob"))["id"]
    ws = await ws_connect(jp_ws_fetch, alice)
    bobs = await ws_connect(jp_ws_fetch, bob, user="bob")
    await frames_until(ws, "history:end")
    await frames_until(bobs, "history:end")
    secret = "alice-only-4f2c"
    frames = await shell(ws, f"echo {secret}")
    assert outputs(frames)[-1]["data"]["output"] == f"{secret}\n"
    # bob's socket: his own turn after alice's, and nothing of hers before it
    bobs.write_message(json.dumps({"type": "chat:message", "message": "hi"}))
    seen = await frames_until(bobs, "chat:response")
    assert not outputs(seen) and secret not in json.dumps(seen)
    _, history = await api("GET", f"sessions/{bob}/history", user="bob")
    assert not outputs(history["events"]) and secret not in json.dumps(history)
    # nor alice's session's history or socket
    assert (await api("GET", f"sessions/{alice}/history", user="bob"))[0] == 404
    assert (await closed_at_once(await ws_connect(jp_ws_fetch, alice, user="bob")))[0] == 4404
    ws.close()
    bobs.close()


# -- a hostile agent (its own ACP client, server side) ---------------------------------------------
async def create(client: Any, session: Any, script: str) -> str:
    """``terminal/create`` of ``sh -c script``, as the agent would ask; the terminal's id."""
    return (await client.create_terminal(session.acp_session_id, "/bin/sh", ["-c", script])).terminal_id


async def test_a_terminal_flood_never_pushes_the_conversation_out(acp_managers: Any) -> None:
    """The max terminals each printing 8 MB, then 60 terminals started and released in a row:
    the first turn stays in the history, the terminal snapshots stay within their budget, and
    each terminal's kept event is its latest."""
    manager = acp_managers(sandbox="local", allow_unsandboxed_terminals=True, max_history_bytes=1024 * 1024)
    session = await manager.create_user_session("alice", "demo")
    await manager.send_message("alice", session.id, "the first words")
    client = session.client
    first = session.events()[0]["seq"]
    seen: list[dict[str, Any]] = []
    session.subscribe(seen.append)
    flood = [await create(client, session, "head -c 8000000 /dev/zero | tr '\\000' x")
             for _ in range(session.options.limits.max_terminals)]
    for terminal_id in flood:
        await client.wait_for_terminal_exit(session.acp_session_id, terminal_id)
        await client.release_terminal(session.acp_session_id, terminal_id)
    for i in range(60):
        made = await create(client, session, f"head -c 100000 /dev/zero | tr '\\000' {i % 10}")
        await client.wait_for_terminal_exit(session.acp_session_id, made)
        await client.release_terminal(session.acp_session_id, made)
    events = session.events()
    assert events[0]["type"] != "history:truncated" and events[0]["seq"] == first
    assert any(e["type"] == "chat:message" and e["data"]["text"] == "the first words" for e in events)
    snapshots = outputs(events)
    assert 0 < len(snapshots) <= MAX_KEYED
    assert sum(len(json.dumps(e)) for e in snapshots) <= 1024 * 1024 // 4 + 2 * EVENT_OUTPUT_BYTES
    ids = [e["data"]["terminal_id"] for e in snapshots]
    assert len(ids) == len(set(ids))  # one per terminal, the latest
    latest = {e["data"]["terminal_id"]: e for e in outputs(seen)}
    assert all(latest[e["data"]["terminal_id"]]["seq"] == e["seq"] for e in snapshots)
    # live, a flooding terminal's events were each bounded and marked truncated
    flooded = outputs(seen, flood[0])
    assert flooded[-1]["data"]["truncated"] and flooded[-1]["data"]["exit_status"]["exit_code"] == 0
    assert all(len(e["data"]["output"]) <= EVENT_OUTPUT_BYTES for e in flooded)
    # the session still works
    assert (await manager.send_message("alice", session.id, "still here")).text


async def test_a_killed_command_reports_its_signal_at_release(acp_managers: Any) -> None:
    manager = acp_managers(sandbox="local", allow_unsandboxed_terminals=True)
    session = await manager.create_user_session("alice", "demo")
    seen: list[dict[str, Any]] = []
    session.subscribe(seen.append)
    terminal_id = await create(session.client, session, "echo started; exec sleep 60")
    await wait_until(lambda: any(e["data"]["output"] == "started\n" for e in outputs(seen, terminal_id)))
    await session.client.release_terminal(session.acp_session_id, terminal_id)
    await wait_until(lambda: outputs(seen, terminal_id)[-1]["data"]["exit_status"])
    last = outputs(seen, terminal_id)[-1]["data"]
    assert last["exit_status"] == {"exit_code": None, "signal": "SIGKILL"} and last["output"] == "started\n"


async def wait_until(predicate: Any) -> None:
    from conftest import wait_for

    await wait_for(lambda: _safe(predicate), timeout=30)


def _safe(predicate: Any) -> Any:
    try:
        return predicate()
    except (IndexError, KeyError):
        return None


async def test_snapshots_are_not_stored_and_a_resumed_session_numbers_on(acp_managers: Any) -> None:
    """(``session_store.NOT_STORED``) a resumed session has no terminals, and the store could not
    drop the snapshots a later one replaces: they stay out of it, the conversation is resumed."""
    first = acp_managers(sandbox="local", allow_unsandboxed_terminals=True)
    session = await first.create_user_session("alice", "demo")
    await first.send_message("alice", session.id, "/shell echo stored")
    made = await create(session.client, session, "echo late")
    await session.client.wait_for_terminal_exit(session.acp_session_id, made)
    await session.client.release_terminal(session.acp_session_id, made)
    assert outputs(session.events())
    await first.shutdown()
    last = session.last_seq
    second = acp_managers(sandbox="local", allow_unsandboxed_terminals=True)
    resumed = await second.resume_user_session("alice", session.id)
    events = resumed.events()
    assert not outputs(events) and events[0]["seq"] == 1 and events[0]["type"] != "history:truncated"
    assert any(e["type"] == "chat:message" and e["data"]["text"] == "/shell echo stored" for e in events)
    assert resumed.last_seq > last  # numbered on after the unstored snapshots too


# -- under bubblewrap --------------------------------------------------------------------------------
async def test_shell_under_bubblewrap(acp_managers: Any) -> None:
    acp_require_backend("bubblewrap")
    manager = acp_managers(sandbox="bubblewrap")
    session = await manager.create_user_session("alice", "demo")
    seen: list[dict[str, Any]] = []
    session.subscribe(seen.append)
    result = await manager.send_message("alice", session.id, "/shell echo inside; exit 2")
    assert result.text.startswith("exit 2: inside")
    last = outputs(seen)[-1]
    assert last["data"]["output"] == "inside\n"
    assert last["data"]["exit_status"] == {"exit_code": 2, "signal": None}


# -- the history's snapshot bookkeeping ----------------------------------------------------------------
def history(**kw: Any) -> EventHistory:
    return EventHistory(max_events=kw.get("max_events", 1000), max_bytes=kw.get("max_bytes", 100_000),
                        max_event_bytes=kw.get("max_event_bytes", 50_000))


def test_snapshots_replace_their_key_and_leave_gaps() -> None:
    h = history()
    h.emit("user_message", {"text": "hi"})
    for i in range(5):
        h.emit("terminal_output", {"terminal_id": "a", "output": "x" * i}, key="terminal:a")
        h.emit("session_update", {"n": i})
    kept = h.events()
    assert [e["seq"] for e in kept] == [1, 3, 5, 7, 9, 10, 11]
    assert [e["data"]["output"] for e in kept if e["type"] == "terminal:output"] == ["xxxx"]
    assert h.events(since=9) == kept[-2:] and h.events(since=10) == kept[-1:]
    assert json.loads(h.payload(10))["seq"] == 10 and json.loads(h.payload(1))["seq"] == 1
    with pytest.raises(IndexError):
        h.payload(2)  # superseded
    # restore (a resumed session) keeps the gaps and numbers on after the last seq given
    again = history()
    again.restore([(s, h.payload(s)) for s in (1, 3, 5)], last_seq=11)
    assert again.seq == 11 and [e["seq"] for e in again.events()] == [1, 3, 5]
    assert again.emit("state", {})["seq"] == 12


def test_snapshots_are_bounded_in_number_and_bytes_and_never_evict_the_conversation() -> None:
    h = history(max_bytes=200_000, max_event_bytes=60_000)
    h.emit("user_message", {"text": "keep me"})
    for i in range(500):  # a terminal per event: no key repeats
        h.emit("terminal_output", {"terminal_id": str(i), "output": "y" * 20_000}, key=f"terminal:{i}")
    kept = h.events()
    assert kept[0]["type"] == "chat:message" and kept[0]["data"]["text"] == "keep me"
    snapshots = [e for e in kept if e["type"] == "terminal:output"]
    assert len(snapshots) <= MAX_KEYED and sum(len(json.dumps(e)) for e in snapshots) <= 200_000 // 4
    assert snapshots[-1]["data"]["terminal_id"] == "499"  # the newest stay
    small = history(max_bytes=200_000)
    for i in range(100):
        small.emit("terminal_output", {"terminal_id": str(i), "output": ""}, key=f"terminal:{i}")
    assert len(small.events()) == MAX_KEYED


def test_a_real_eviction_still_says_history_truncated() -> None:
    h = history(max_events=3)
    h.emit("terminal_output", {"terminal_id": "a"}, key="terminal:a")
    for i in range(5):
        h.emit("session_update", {"n": i})
    kept = h.events()
    assert kept[0]["type"] == "history:truncated" and kept[0]["data"] == {"dropped": 3, "first_seq": 4}
    assert [e["seq"] for e in kept[1:]] == [4, 5, 6]
    assert h.events(since=3)[0]["seq"] == 4
    # the bookkeeping forgets a snapshot that the bounds dropped
    assert not h._keyed and not h._key_of and h._keyed_bytes == 0
