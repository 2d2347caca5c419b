"""The notebook tools' channel (``notebooks/channel.py``) attacked from the sandbox side.

The agent reaches the MCP server through its session's unix socket, via the stdlib relay the
agent starts. Everything that arrives on that socket is hostile: a wrong or missing token, a
line past the bound, more connections than allowed, a tool that fails inside the server. An MCP
client of the official SDK, started exactly as an agent starts a ``session/new`` stdio entry,
checks what an honest agent sees (the tool names agents are configured with included).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from jupyter_acp.agents import QWEN_SETTINGS
from jupyter_acp.notebooks.channel import SERVER_NAME, TOOL_NAMES, NotebookRoute, NotebookTools
from jupyter_acp.notebooks.tools import NotebookToolbox
from jupyter_acp.workspace_fs import WorkspaceFS

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def route(tmp_path: Path) -> AsyncIterator[tuple[NotebookTools, NotebookRoute, list[dict[str, Any]]]]:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    edits: list[dict[str, Any]] = []

    async def never(title: str, code: str, path: str) -> bool:
        return False

    config = NotebookTools(socket_dir=str(tmp_path / "s"), max_connections_per_session=2,
                           max_message_bytes=64 * 1024)
    toolbox = NotebookToolbox(None, fs=WorkspaceFS(workspace, str(workspace)), api_prefix=None,
                              origin="jupyter-acp:s1", permit=never, allow_kernel=True, on_edit=edits.append)
    directory = config.make_dir()

    async def get_toolbox() -> NotebookToolbox:
        return toolbox

    opened = await config.open_route("s1", directory, get_toolbox)
    yield config, opened, edits
    await config.close_route(opened)
    assert not os.path.exists(opened.socket_path)


def params(config: NotebookTools, route: NotebookRoute, token: str | None = None) -> StdioServerParameters:
    entry = config.entry(route)
    env = {e["name"]: e["value"] for e in entry["env"]}
    if token is not None:
        env["JACP_NB_TOKEN"] = token
    return StdioServerParameters(command=entry["command"], args=entry["args"], env=env)


async def test_an_honest_agent_sees_the_tools_it_is_configured_with(route: Any) -> None:
    config, opened, edits = route
    mode = os.stat(opened.socket_path).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(opened.socket_path)).st_mode) == 0o700
    with open(os.devnull, "w") as errlog:
        async with stdio_client(params(config, opened), errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert sorted(tools) == sorted(TOOL_NAMES)
            # (Qwen Code offers an MCP tool to its LLM only if it is listed by this exact name)
            assert QWEN_SETTINGS["tools"]["visible"] == [f"mcp__{SERVER_NAME}__{n}" for n in TOOL_NAMES]
            required = set(tools["insert_cell"].input_schema["required"])
            assert required == {"path", "index", "cell_type", "source"}
            made = await session.call_tool("create_notebook", {"path": "a.ipynb"})
            assert not made.is_error and made.structured_content is None
            [block] = made.content  # one compact JSON object, nothing doubled
            assert json.loads(block.text)["path"] == "a.ipynb"  # type: ignore[union-attr]
            refused = await session.call_tool("read_notebook", {"path": "../x.ipynb"})
            assert refused.is_error
    assert [e["tool"] for e in edits] == ["create_notebook"]


async def raw_exchange(path: str, first: bytes, then: bytes = b"") -> bytes:
    """What the server answers to these bytes before it closes the connection (a reset: none)."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(first + then)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)  # (until the server closes it)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


INIT = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "x", "version": "1"}}}).encode()


async def test_a_wrong_or_missing_token_gets_nothing(route: Any) -> None:
    _, opened, _ = route
    assert await raw_exchange(opened.socket_path, b"guess\n", INIT + b"\n") == b""
    assert await raw_exchange(opened.socket_path, INIT + b"\n") == b""  # (no token line at all)
    # with the right token, the same bytes are answered
    reader, writer = await asyncio.open_unix_connection(opened.socket_path)
    writer.write(opened.token.encode() + b"\n" + INIT + b"\n")
    answer = json.loads(await asyncio.wait_for(reader.readline(), 10))
    writer.close()
    assert answer["id"] == 1 and answer["result"]["serverInfo"]["name"] == "jupyter"


async def test_an_oversize_line_ends_that_connection_only(route: Any) -> None:
    config, opened, _ = route
    huge = b'{"jsonrpc": "2.0", "id": 2, "method": "tools/list", "pad": "' + b"x" * (200 * 1024) + b'"}\n'
    hello = opened.token.encode() + b"\n" + INIT + b"\n"
    await asyncio.wait_for(raw_exchange(opened.socket_path, hello, huge), 20)
    with open(os.devnull, "w") as errlog:
        async with stdio_client(params(config, opened), errlog=errlog) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            assert len((await session.list_tools()).tools) == len(TOOL_NAMES)


async def test_connections_past_the_bound_are_closed(route: Any) -> None:
    _, opened, _ = route
    held = [await asyncio.open_unix_connection(opened.socket_path) for _ in range(2)]
    for _, writer in held:
        writer.write(opened.token.encode() + b"\n")
        await writer.drain()
    await asyncio.sleep(0)  # (the server accepts them)
    for _ in range(100):
        if len(opened.connections) == 2:
            break
        await asyncio.sleep(0.02)
    assert await raw_exchange(opened.socket_path, opened.token.encode() + b"\n", INIT + b"\n") == b""
    for _, writer in held:
        writer.close()
    for _ in range(200):
        if not opened.connections:
            break
        await asyncio.sleep(0.02)
    reader, writer = await asyncio.open_unix_connection(opened.socket_path)  # room again
    writer.write(opened.token.encode() + b"\n" + INIT + b"\n")
    assert json.loads(await asyncio.wait_for(reader.readline(), 10))["id"] == 1
    writer.close()


async def test_a_closed_route_refuses_and_its_token_is_dead(route: Any, tmp_path: Path) -> None:
    config, opened, _ = route
    await config.close_route(opened)
    with pytest.raises(OSError):
        await asyncio.open_unix_connection(opened.socket_path)
    again = await config.open_route("s1", os.path.dirname(opened.socket_path), opened.get_toolbox)
    try:
        assert again.token != opened.token
        assert await raw_exchange(again.socket_path, opened.token.encode() + b"\n", INIT + b"\n") == b""
    finally:
        await config.close_route(again)
