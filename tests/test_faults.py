"""Faults from the agent side: junk on stdout, a line over the limit, a flood, a crash mid-turn."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from jupyter_acp.session import SessionState

MISBEHAVING = str(Path(__file__).parent / "agents" / "misbehaving.py")


@pytest.fixture
def manager(acp_managers):
    manager = acp_managers(sandbox="local")
    manager.agents.agents = {
        mode: {"command": [sys.executable, MISBEHAVING, mode], "demo": True}
        for mode in ("garbage", "huge", "flood")
    }
    return manager


async def test_junk_lines_do_not_break_the_session(manager, acp_workspace_root):
    session = await manager.create_user_session("alice", "garbage")
    result = await manager.send_message("alice", session.id, "hello through the junk")
    assert result.text == "Demo agent (no LLM) heard 4 words: hello through the junk"
    approve = asyncio.create_task(_approve(session))
    result = await manager.send_message("alice", session.id, "/write f.txt ok")
    await approve
    assert result.text.startswith("Wrote") and (acp_workspace_root / "f.txt").exists()
    assert session.state is SessionState.READY


async def _approve(session):
    from conftest import answer_next_permission

    await answer_next_permission(session, "allow")


async def test_a_line_over_the_limit_is_dropped_and_reported(manager):
    session = await manager.create_user_session("alice", "huge")
    result = await asyncio.wait_for(manager.send_message("alice", session.id, "go"), 60)
    assert result.text == "Demo agent (no LLM) heard 1 words: go"  # the session went on
    errors = [e["data"]["message"] for e in session.events() if e["type"] == "error"]
    assert errors == ["The agent sent a message larger than 16 MiB; it was dropped (protocol error)"]
    assert session.state is SessionState.READY


async def test_a_flood_is_delivered_in_order_without_loss(manager):
    session = await manager.create_user_session("alice", "flood")
    seen: list[int] = []

    def collect(event):
        if event["type"] == "session_update" and event["data"].get("sessionUpdate") == "agent_message_chunk":
            seen.append(event["seq"])

    session.subscribe(collect)
    result = await asyncio.wait_for(manager.send_message("alice", session.id, "flood me"), 120)
    assert result.stop_reason == "end_turn"
    reply = "Demo agent (no LLM) heard 2 words: flood me"
    assert result.text == "".join(f"{i} " for i in range(50_000)) + reply  # nothing lost, in order
    assert len(seen) == 50_000 + len(reply.split())
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
