"""A remote agent over a WebSocket (``AgentSpec.url``), through the SDK's WebSocket transport.

The "remote host" here is a websockets server on 127.0.0.1 that runs one demo agent per
connection and relays JSON-RPC text frames to and from its stdio.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest
import websockets
from conftest import answer_next_permission, wait_for

from jupyter_acp.errors import AgentError, SessionNotReady
from jupyter_acp.session import SessionState


@pytest.fixture
async def remote_agent_url():
    seen_headers: list = []
    connections: list = []

    async def bridge(ws) -> None:
        connections.append(ws)
        seen_headers.append(ws.request.headers)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jupyter_acp.agents_builtin.demo",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)

        async def to_ws() -> None:
            while line := await proc.stdout.readline():
                await ws.send(line.decode().rstrip("\n"))
            await ws.close()

        pump = asyncio.create_task(to_ws())
        try:
            async for frame in ws:
                proc.stdin.write(frame.encode() + b"\n")
                await proc.stdin.drain()
        finally:
            pump.cancel()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async with websockets.serve(bridge, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/acp", seen_headers, connections


async def test_remote_agent_streams_and_writes_in_the_workspace(acp_managers, remote_agent_url,
                                                                acp_workspace_root):
    url, headers, connections = remote_agent_url
    manager = acp_managers()
    manager.agents.agents = {"remote": {"url": url, "credential_env": {"access_token": "UNUSED"}}}
    session = await manager.create_user_session("alice", "remote", credentials={"access_token": "tok"})
    assert session.sandbox.kind == "remote"
    assert headers[0]["Authorization"] == "Bearer tok"
    result = await manager.send_message("alice", session.id, "hi over the wire")
    assert result.text == "Demo agent (no LLM) heard 4 words: hi over the wire"
    approve = asyncio.create_task(answer_next_permission(session, "allow"))
    assert (await manager.send_message("alice", session.id, "/write r.txt remote")).text.startswith("Wrote")
    await approve
    assert (acp_workspace_root / "r.txt").read_text() == "remote\n"
    # no terminal for a remote agent: it would run on this host, unsandboxed
    result = await manager.send_message("alice", session.id, "/shell id")
    assert "terminal" in result.text.lower() or "cannot run" in result.text.lower()

    await connections[0].close()  # the remote side goes away
    await wait_for(lambda: session.state is SessionState.ERROR)
    assert "closed the connection" in session.error
    with pytest.raises(SessionNotReady, match="closed the connection"):
        await manager.send_message("alice", session.id, "still there?")
    await manager.restart_user_session("alice", session.id)
    assert (await manager.send_message("alice", session.id, "back")).stop_reason == "end_turn"


async def test_unreachable_remote_agent_is_a_clear_error(acp_managers):
    manager = acp_managers()
    manager.agents.agents = {"gone": {"url": "ws://127.0.0.1:9/acp"}}
    with pytest.raises(AgentError, match="Could not connect to the remote agent"):
        await manager.create_user_session("alice", "gone")
