"""The demo agent's commands for the chat's browser tests and benchmark (issue 20), end to end
through UserSessionManager over real stdio: ``/echo`` keeps the text verbatim, ``/edit`` and
``/write`` send a diff with the old text, ``/fill`` builds many items in one turn, ``/shell``'s
tool call carries its terminal."""

from __future__ import annotations

import pytest


@pytest.fixture
def manager(acp_managers):
    return acp_managers(sandbox="local", permission_policy="allow", allow_unsandboxed_terminals=True)


def updates(events: list[dict], kind: str) -> list[dict]:
    return [e["data"] for e in events if e["data"].get("sessionUpdate") == kind]


async def test_echo_streams_the_text_verbatim_in_8_character_chunks(manager):
    session = await manager.create_user_session("alice", "demo")
    events: list[dict] = []
    session.subscribe(events.append)
    text = "| a | b |\n|---|---|\n| 1 | 2 |\n\n$e^{i\\pi}+1=0$"
    result = await manager.send_message("alice", session.id, "/echo\n" + text)
    chunks = [u["content"]["text"] for u in updates(events, "agent_message_chunk")]
    assert "".join(chunks) == text == result.text
    assert all(len(c) == 8 for c in chunks[:-1])


async def test_edit_and_write_send_the_old_text(manager, acp_workspace_root):
    old = "".join(f"line {i}\n" for i in range(1, 21))
    (acp_workspace_root / "f.txt").write_text(old)
    session = await manager.create_user_session("alice", "demo")
    events: list[dict] = []
    session.subscribe(events.append)
    result = await manager.send_message("alice", session.id, "/edit f.txt 3=THREE 17=SEVENTEEN")
    assert result.text == "Edited f.txt (2 lines)."
    new = (acp_workspace_root / "f.txt").read_text()
    assert new == old.replace("line 3\n", "THREE\n").replace("line 17\n", "SEVENTEEN\n")
    diff = updates(events, "tool_call_update")[-1]["content"][0]
    assert diff["type"] == "diff" and diff["oldText"] == old and diff["newText"] == new

    events.clear()
    await manager.send_message("alice", session.id, "/write f.txt short")
    diff = updates(events, "tool_call_update")[-1]["content"][0]
    assert diff["oldText"] == new and diff["newText"] == "short\n"
    events.clear()
    await manager.send_message("alice", session.id, "/write g.txt new")
    assert updates(events, "tool_call_update")[-1]["content"][0].get("oldText") is None


async def test_fill_alternates_messages_and_edit_tool_calls(manager):
    session = await manager.create_user_session("alice", "demo")
    events: list[dict] = []
    session.subscribe(events.append)
    await manager.send_message("alice", session.id, "/fill 10")
    kinds = [e["data"]["sessionUpdate"] for e in events if e["data"].get("sessionUpdate") in
             ("agent_message_chunk", "tool_call")]
    assert kinds == ["agent_message_chunk", "tool_call"] * 5
    call = updates(events, "tool_call")[0]
    assert call["kind"] == "edit" and call["status"] == "completed"
    assert call["content"][0]["type"] == "diff" and call["content"][0]["oldText"]


async def test_shell_tool_call_carries_its_terminal(manager):
    session = await manager.create_user_session("alice", "demo")
    events: list[dict] = []
    session.subscribe(events.append)
    result = await manager.send_message("alice", session.id, "/shell echo hi")
    assert result.text.startswith("exit 0: hi")
    call = updates(events, "tool_call")[0]
    assert call["kind"] == "execute" and call["content"][0]["type"] == "terminal"
    assert call["content"][0]["terminalId"]
    assert updates(events, "tool_call_update")[-1]["status"] == "completed"
