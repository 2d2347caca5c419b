"""The demo agent's ``/nb TOOL JSON`` command: the demo as an MCP client (prototype, issue 19).

The agent keeps the ``mcpServers`` of ``session/new`` and, for each ``/nb`` call, starts the
stdio server named ``jupyter`` (exactly as Qwen Code and Gemini CLI do: a child of the agent,
so inside its sandbox), with the MCP SDK's ``stdio_client`` + ``ClientSession``, and calls the
tool. One process per call keeps the demo deterministic and stateless; a real agent keeps the
connection for the session. ``mcp`` is imported lazily: the demo starts without it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from acp import schema


def stdio_entry(servers: list[Any] | None, name: str = "jupyter") -> dict[str, Any] | None:
    """The ``McpServerStdio`` named ``name`` of ``session/new``, as a plain dict (kept in state)."""
    for server in servers or []:
        if isinstance(server, schema.McpServerStdio) and server.name == name:
            return {"command": server.command, "args": list(server.args),
                    "env": {e.name: e.value for e in server.env or []}}
    return None


async def call_tool(entry: dict[str, Any], tool: str, arguments: dict[str, Any],
                    timeout: float = 120) -> tuple[bool, str]:
    """(ok, text) of one tool call on the stdio MCP server ``entry``."""
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(command=entry["command"], args=entry["args"], env=entry["env"])
    async with stdio_client(params, errlog=sys.stderr) as (read, write), \
            ClientSession(read, write, read_timeout_seconds=timeout) as session:
        await session.initialize()
        result = await session.call_tool(tool, arguments)
    if result.structured_content is not None:
        text = json.dumps(result.structured_content)
    else:
        text = "\n".join(getattr(block, "text", "") for block in result.content)
    return not result.is_error, text
