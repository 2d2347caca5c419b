"""Load: 100 concurrent sessions prompting; nothing lost or duplicated; nothing leaked after."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

SESSIONS = 100
STREAM = 300


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def child_pids() -> list[int]:
    """Processes whose parent is this test process (agents we started and did not reap)."""
    me, out = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                out.append(int(entry.name))
    return out


async def test_hundred_sessions_lose_nothing_and_leak_nothing(acp_managers):
    fds_before, children_before = open_fds(), set(child_pids())
    manager = acp_managers(sandbox="local", init_timeout=180)
    sessions = await asyncio.gather(*(manager.create_user_session(f"user{i}", "demo")
                                      for i in range(SESSIONS)))
    received: dict[str, list[dict]] = {s.id: [] for s in sessions}
    for session in sessions:
        session.subscribe(received[session.id].append)

    async def work(session) -> None:
        first = await manager.send_message(session.user, session.id, f"/stream {STREAM}")
        assert first.text == "".join(f"c{i} " for i in range(STREAM))
        second = await manager.send_message(session.user, session.id, f"hello from {session.user}")
        assert second.text.endswith(f"hello from {session.user}")

    await asyncio.gather(*(work(s) for s in sessions))

    for session in sessions:
        events = received[session.id]
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no duplicate
        chunks = [e for e in events if e["data"].get("sessionUpdate") == "agent_message_chunk"]
        assert len(chunks) == STREAM + len(f"Demo agent (no LLM) heard 3 words: hello from {session.user}"
                                           .split())
        assert [e["type"] for e in events].count("turn_end") == 2
    assert sum(manager.ledger.user_totals(f"user{i}")["turns"] for i in range(SESSIONS)) == 2 * SESSIONS

    await manager.shutdown()
    assert manager.all_sessions() == []
    assert set(child_pids()) - children_before == set()
    assert open_fds() <= fds_before + 5  # the ledger's database file and the like
