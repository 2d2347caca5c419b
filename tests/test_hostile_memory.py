"""A hostile agent cannot take the server's memory: a real server under 51 flooding agents.

The server runs as a subprocess (``bench/harness.py``: ``jupyter server`` with jupyter-acp and
``TokenPerUser``), with the hostile agent (``agents/hostile.py``) as an admin-defined agent in the
``local`` sandbox (``allow_unsandboxed``: the agents' own memory is theirs, not the server's).
One agent sends 64 message chunks of 4 MiB in one turn (the attack that took an unbounded server
from 138 MiB to 1.9 GiB, 922 MiB of it kept); then 50 users' agents flood at once. The server's
resident memory is sampled throughout (``VmRSS``; ``VmHWM`` is its peak): it stays under 1 GiB,
because every event is cut to ``max_event_bytes`` (1 MiB) before it is kept or sent, every
history to ``max_history_bytes`` (8 MiB), every turn's reply text to ``max_turn_text_bytes``, and
the agent's stdout is read no faster than the server digests it (``linefilter.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_reliability import call

_spec = importlib.util.spec_from_file_location(
    "acp_bench_harness", Path(__file__).resolve().parents[1] / "bench" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

HOSTILE = Path(__file__).parent / "agents" / "hostile.py"
MiB = 1024 * 1024
PEAK_LIMIT = 1024 * MiB
#: past this the server is killed at once (the unbounded server grows by gigabytes)
ABORT_AT = int(os.environ.get("ACP_TEST_ABORT_MIB", "2048")) * MiB
USERS = 50
CHUNKS = 8
CHUNK = 4 * MiB

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(240)]


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """Samples a process's RSS every 20 ms; kills it if it passes ``ABORT_AT``."""

    def __init__(self, proc: Any) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.stop = threading.Event()
        self.peak = 0
        self.aborted = False

    def run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                rss = status_kb(self.proc.pid, "VmRSS") * 1024
            except OSError:
                return
            self.peak = max(self.peak, rss)
            if rss > ABORT_AT:
                self.aborted = True
                self.proc.kill()
                return


def flood(server: dict[str, Any], user: str, count: int, size: int) -> dict[str, Any]:
    status, session = call(server, "POST", "sessions", user, {"agent": "hostile", "new": True})
    assert status == 201, session
    order = json.dumps({"op": "flood", "count": count, "size": size})
    status, turn = call(server, "POST", f"sessions/{session['id']}/messages", user, {"message": order})
    assert status == 200, turn
    return {"id": session["id"], "text_bytes": len(turn["text"]), "stop_reason": turn["stop_reason"]}


def test_flooding_agents_leave_the_server_under_a_gigabyte() -> None:
    agents = {"hostile": {"command": [sys.executable, str(HOSTILE)], "display_name": "Hostile test agent"}}
    extra = [f"--AgentConfigManager.agents={agents!r}", "--UserSessionManager.allow_unsandboxed=True"]
    with harness.jupyter_server("local", extra=extra) as server:
        pid = server["pid"]
        before = status_kb(pid, "VmRSS") * 1024
        sampler = Sampler(server["proc"])
        sampler.start()
        started = time.monotonic()
        try:
            # the attack as reported: one turn of 64 chunks of 4 MiB
            one = flood(server, "mallory", 64, CHUNK)
            after_one = status_kb(pid, "VmRSS") * 1024
            # then 50 users' agents at once
            with concurrent.futures.ThreadPoolExecutor(USERS) as pool:
                results = list(pool.map(lambda k: flood(server, f"m{k}", CHUNKS, CHUNK), range(USERS)))
            after = status_kb(pid, "VmRSS") * 1024
            peak = status_kb(pid, "VmHWM") * 1024
            # a replay of one history: bounded, and it says that older events were dropped
            status, history = call(server, "GET", f"sessions/{one['id']}/history", "mallory")
        except OSError:
            if not sampler.aborted:
                raise
        finally:
            sampler.stop.set()
            sampler.join()
        elapsed = time.monotonic() - started
        assert not sampler.aborted, (f"the server passed {ABORT_AT / MiB:.0f} MiB after {elapsed:.0f} s "
                                     f"(from {before / MiB:.0f} MiB) and was killed")
        print(f"\nserver RSS: before {before / MiB:.0f} MiB, after one 64 x 4 MiB flood "
              f"{after_one / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB (sampled {sampler.peak / MiB:.0f}), "
              f"after {USERS} x {CHUNKS} x 4 MiB {after / MiB:.0f} MiB; {elapsed:.1f} s")
    assert peak < PEAK_LIMIT, f"peak RSS {peak / MiB:.0f} MiB"
    assert after < PEAK_LIMIT
    assert one["stop_reason"] == "end_turn" and all(r["stop_reason"] == "end_turn" for r in results)
    assert one["text_bytes"] <= MiB + 100  # max_turn_text_bytes (and a note of the cut)
    assert status == 200
    events = history["events"]
    assert events[0]["type"] == "history:truncated" and events[0]["data"]["first_seq"] == events[1]["seq"]
    assert len(json.dumps(events)) <= 4 * MiB + 64 * 1024  # max_history_bytes
    chunks = [e for e in events if e["type"] == "session/update"]
    assert chunks and all(len(json.dumps(e)) <= MiB for e in chunks)
    assert "bytes dropped by the server]" in chunks[0]["data"]["content"]["text"]


# -- the bounds, one by one, against a session --------------------------------------------------
def _cut_note(text: str) -> int:
    """The byte count of the server's note at the end of ``text`` (fails if there is none)."""
    note = text.rpartition("... [")[2]
    assert note.endswith(" bytes dropped by the server]"), text[-80:]
    return int(note.split(" ")[0].replace(",", ""))


def test_small_events_pass_untouched_and_large_ones_are_cut_with_a_note() -> None:
    from jupyter_acp.session import wire_json
    from jupyter_acp.shrink import fit_event

    small = {"seq": 1, "type": "session_update", "time": 1.0,
             "data": {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": "hi"}}}
    payload = wire_json(small)
    assert fit_event(small, payload, 1024) == (small, payload)  # the same objects, not a copy

    text = "x" * (3 * MiB)
    big = {**small, "data": {"sessionUpdate": "agent_message_chunk",
                             "content": {"type": "text", "text": text}}}
    event, payload = fit_event(big, wire_json(big), 64 * 1024)
    assert len(payload) <= 64 * 1024 and json.loads(payload) == json.loads(wire_json(event))
    kept = event["data"]["content"]["text"]
    assert kept.startswith("x" * 60_000) and _cut_note(kept) == len(text) - kept.index("...")
    assert "truncated" not in event and event["seq"] == 1  # (only a placeholder has it)

    # text that JSON escapes (6 bytes a character) and several long strings in one tool call
    tool = {**small, "data": {"sessionUpdate": "tool_call", "toolCallId": "t1", "title": "é" * MiB,
                              "rawInput": {"command": "y" * MiB}, "content": [
                                  {"type": "diff", "path": "a", "oldText": "o" * MiB, "newText": "n" * MiB}]}}
    event, payload = fit_event(tool, wire_json(tool), 100_000)
    assert len(payload) <= 100_000
    data = event["data"]
    assert data["toolCallId"] == "t1" and data["content"][0]["path"] == "a"
    for cut in (data["title"], data["rawInput"]["command"], data["content"][0]["newText"]):
        assert _cut_note(cut) > 0

    # a million short strings cannot be cut: a placeholder keeps the short fields
    many = {**small, "data": {"sessionUpdate": "tool_call", "toolCallId": "t2", "status": "pending",
                              "rawInput": {f"k{i}": "v" for i in range(200_000)}}}
    event, payload = fit_event(many, wire_json(many), 64 * 1024)
    assert len(payload) < 1024 and event["data"] == {"sessionUpdate": "tool_call", "toolCallId": "t2",
                                                      "status": "pending"}
    assert event["truncated"] == len(wire_json(many))
    chunk = {**small, "data": {"sessionUpdate": "agent_thought_chunk",
                               "content": {"type": "text", "text": "z"},
                               "_meta": {f"k{i}": i for i in range(200_000)}}}
    event, _ = fit_event(chunk, wire_json(chunk), 64 * 1024)
    assert _cut_note(event["data"]["content"]["text"]) > 64 * 1024  # what a chat shows


def test_a_turns_reply_text_keeps_its_start_and_end() -> None:
    from jupyter_acp.shrink import TextBudget

    budget = TextBudget(1000)
    for i in range(1000):
        budget.append(f"{i:04d} ")
    text = budget.text()
    assert text.startswith("0000 0001 ") and text.endswith("0998 0999 ")
    assert len(text.encode()) <= 1000 + 60 and _cut_note(text.split("\n")[1]) == 5000 - 1000
    small = TextBudget(1000)
    small.append("é" * 10)
    assert small.text() == "é" * 10 and small


async def test_a_flood_is_cut_per_event_and_per_history_and_a_replay_says_so(acp_managers) -> None:
    from attack import make_attacker

    attacker = await make_attacker(acp_managers, "local", max_event_bytes="64K", max_history_bytes="512K")
    session = attacker.session
    seen: list[dict[str, Any]] = []
    session.subscribe(seen.append)
    for kind in ("message", "thought", "tool"):
        text = (await attacker.manager.send_message(attacker.user, session.id, json.dumps(
            {"op": "flood", "count": 12, "size": 200_000, "kind": kind}))).text
        assert len(text.encode()) <= session.options.limits.max_turn_text_bytes + 100
    limit = 64 * 1024
    assert session.options.limits.max_event_bytes == limit
    # every event kept and sent fits; the cut ones say so
    assert all(len(session.payload(e["seq"])) <= limit for e in seen[-3:])
    assert all(len(p) <= limit for p in session.payloads())
    floods = [e for e in seen if e["type"] == "session_update" and e["data"]["sessionUpdate"] in
              ("agent_message_chunk", "agent_thought_chunk", "tool_call")]
    assert len(floods) == 36 + 3  # (and the three replies)
    cut = floods[:12] + floods[13:25] + floods[26:38]
    for event in cut:
        data = event["data"]
        text = data["title"] if data["sessionUpdate"] == "tool_call" else data["content"]["text"]
        assert text.startswith("x" * 1000) and 0 < _cut_note(text) < 200_000
    # the history is bounded in bytes; a replay from the start says what it lost
    assert session.history._log_bytes == sum(map(len, session.history._log)) <= 512 * 1024
    replay = [json.loads(p) for p in session.payloads(0)]
    first = replay[1]["seq"]
    assert first > 1
    assert replay[0] == {"type": "history:truncated", "data": {"dropped": first - 1, "first_seq": first}}
    assert [e["seq"] for e in replay[1:]] == list(range(first, session.last_seq + 1))
    # a client that saw part of it gets the rest, then the count from where it stopped
    assert [json.loads(p)["seq"] for p in session.payloads(session.last_seq - 3)] == \
        [session.last_seq - 2, session.last_seq - 1, session.last_seq]
    assert json.loads(session.payloads(first - 5)[0])["data"] == {"dropped": 4, "first_seq": first}
    assert session.payloads(session.last_seq) == []
    # and the session goes on
    assert (await attacker("sh", cmd="echo still here"))["output"] == "still here\n"


async def test_the_history_count_still_bounds_and_the_marker_counts_from_since(acp_managers) -> None:
    from attack import make_attacker

    attacker = await make_attacker(acp_managers, "local", max_history=5)
    session = attacker.session
    await attacker.manager.send_message(attacker.user, session.id, '{"op": "flood", "count": 20, "size": 10}')
    payloads = session.payloads(0)
    assert len(payloads) == 6 and json.loads(payloads[0])["data"] == {
        "dropped": session.last_seq - 5, "first_seq": session.last_seq - 4}


async def test_permission_requests_past_the_bound_are_cancelled_at_once(acp_managers, caplog) -> None:
    from attack import make_attacker

    attacker = await make_attacker(acp_managers, "local")
    session = attacker.session
    most = session.options.limits.max_pending_permissions
    attack = asyncio.ensure_future(attacker("permissions", count=most + 12))
    from conftest import wait_for

    await wait_for(lambda: len(session.pending) == most)
    await asyncio.sleep(0.3)  # the rest were answered at once, nothing more waits
    assert len(session.pending) == most and not attack.done()
    for request_id in list(session.pending):
        session.answer_permission(request_id, "allow")
    answers = (await asyncio.wait_for(attack, 30))["answers"]
    outcomes = sorted(a["outcome"] for a in answers)
    assert outcomes == ["cancelled"] * 12 + ["selected"] * most
    assert len([r for r in caplog.records if "permission request refused" in r.getMessage()]) == 1
    requests = [e for e in session.events() if e["type"] == "permission:request"]
    assert len(requests) == most  # the refused ones reached no client


# -- the line filter: bounded in what it holds, whatever the agent writes ------------------------
async def test_the_line_filter_holds_a_bounded_queue_and_assembles_long_lines() -> None:
    from jupyter_acp.linefilter import MAX_QUEUED_LINES, filtered_reader

    source = asyncio.StreamReader(limit=1024)  # (the agent's stdout buffer)
    drops: list[str] = []
    reader, task = filtered_reader(source, limit=64 * 1024, on_drop=lambda what, size: drops.append(what),
                                   update_limit=8 * 1024)
    long_ok = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": "a" * 40_000}}).encode() + b"\n"
    too_long = b'{"jsonrpc": "2.0", "id": 2, "result": "' + b"b" * 100_000 + b'"}\n'
    update = json.dumps({"jsonrpc": "2.0", "method": "session/update", "params": {
        "sessionId": "s", "update": {"sessionUpdate": "agent_message_chunk",
                                     "content": {"type": "text", "text": "c" * 50_000}}}}).encode() + b"\n"
    small = [json.dumps({"jsonrpc": "2.0", "method": "n", "params": {"i": i}}).encode() + b"\n"
             for i in range(500)]
    for data in (long_ok, too_long, update, *small):
        source.feed_data(data)
    source.feed_eof()
    await asyncio.sleep(0.1)
    assert not task.done() and len(reader._lines) <= MAX_QUEUED_LINES  # it waits for the reader
    assert await reader.readuntil(b"\n") == long_ok  # assembled from pieces, intact
    assert drops == ["a message larger than 65,536 bytes"]
    cut = json.loads(await reader.readuntil(b"\n"))
    text = cut["params"]["update"]["content"]["text"]
    assert cut["params"]["sessionId"] == "s" and text.startswith("ccc") and _cut_note(text) > 40_000
    lines = [await reader.readuntil(b"\n") for _ in small]
    assert lines == small
    with pytest.raises(asyncio.IncompleteReadError):
        await reader.readuntil(b"\n")
    await task
