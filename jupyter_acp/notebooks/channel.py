"""The server end of the notebook tools: one unix socket per agent start, MCP served on it by
the official SDK, in the Jupyter server process.

The sandbox side is ``mcp_relay.py`` (stdlib only): the agent starts it as the stdio MCP
server ``session/new`` names (``mcpServers``); it connects to this session's socket, sends the
route's token on the first line, then pipes MCP's newline-delimited JSON-RPC both ways. So the
MCP server proper (``mcp.server.mcpserver.MCPServer``) and the tools run here, next to the
collaborative rooms, the workspace and the kernels; the sandbox needs neither the ``mcp``
package nor any network, and a hostile agent reaches the tools only as an MCP client, through
the bounds below. This is the LLM gateway's pattern (``gateway/server.py``): the socket lives in
the session's private socket directory (0700, shared with its gateway route when it has one),
mounted into that session's sandbox only; the token is defence in depth (a socket of another
session is never mounted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Float, Integer, Unicode, default
from traitlets.config import LoggingConfigurable

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from .tools import NotebookToolbox

log = logging.getLogger("jupyter_acp.notebooks")

RELAY = Path(__file__).with_name("mcp_relay.py")
SOCKET_NAME = "nb.sock"
#: The name agents know the server by: Qwen Code calls its tools ``mcp__jupyter__<tool>``.
SERVER_NAME = "jupyter"
#: The tools, in the order agents are told about them (the names are the MCP tool names).
TOOL_NAMES = ("list_notebooks", "read_notebook", "insert_cell", "replace_cell", "move_cell",
              "delete_cell", "create_notebook", "run_cell", "run_code")


class NotebookTools(LoggingConfigurable):
    """The admin's settings of the notebook tools, and the sockets that serve them.

    Every session gets a ``jupyter`` MCP server in ``session/new`` whose tools read and edit the
    notebooks of its workspace cell by cell (live in the open notebook, through the
    collaborative document) and run cells in the notebook's own kernel after asking the user.
    """

    enabled = Bool(
        True, help="""Give every agent the notebook tools (a ``jupyter`` MCP server). When on, the
        agents' raw writes of ``.ipynb`` files through ACP ``fs/write_text_file`` are refused
        with a pointer to the tools.""",
    ).tag(config=True)

    allow_kernel_execution = Bool(
        True, help="""Let agents ask to run code in the user's notebook kernels (``run_cell``,
        ``run_code``). Such code runs outside the sandbox, as the user: every run asks the user
        first, whatever the permission policy. False: the tools refuse at once.""",
    ).tag(config=True)

    run_timeout = Float(
        120.0, help="Seconds one run in a kernel may take before it is interrupted.",
    ).tag(config=True)

    socket_dir = Unicode(
        help="""Directory holding the sessions' private socket directories (for sessions without
        an LLM gateway route; else the route's directory is used). Keep the path short (unix
        socket paths are limited to about 100 bytes). Default: the system temp dir.""",
    ).tag(config=True)

    @default("socket_dir")
    def _default_socket_dir(self) -> str:
        return tempfile.gettempdir()

    relay_python = Unicode(
        help="""The Python that runs the relay inside the sandbox (stdlib only; it must exist
        inside the sandbox too). Default: ``/usr/bin/python3`` when present, else the server's.""",
    ).tag(config=True)

    @default("relay_python")
    def _default_relay_python(self) -> str:
        from ..gateway.server import system_python  # (the same relay Python as the gateway's)

        return system_python()

    max_connections_per_session = Integer(
        4, help="MCP connections one session's agent may hold open at once; more are closed.",
    ).tag(config=True)

    max_message_bytes = Integer(
        1 << 20, help="Longest MCP message (one line) the server reads from an agent.",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: the Jupyter server (set by the extension): its collaborative rooms, contents root and
        #: kernels. None (a manager without a server, as in some tests): closed files only.
        self.serverapp: Any = None

    async def preload(self) -> None:
        """Import the tools' modules (the MCP SDK, nbformat, jsonschema, pycrdt) in a thread at
        server start, so that an agent's first tool call does not wait for them: about a second
        on an idle machine, tens of seconds on loaded cores (a first ``insert_cell`` took 47 s in a
        loaded test run). The first connection imports them itself if this has not finished."""
        if self.enabled:
            await asyncio.to_thread(_import_sdk, "jupyter_acp.notebooks.tools")

    # -- directories and routes ----------------------------------------------------------------
    def make_dir(self) -> str:
        """A private (0700) socket directory for a session that has no gateway route."""
        os.makedirs(self.socket_dir, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix="jacp-nb-", dir=self.socket_dir)

    def sandbox_ro_paths(self) -> list[str]:
        """What the sandbox must read to run the relay."""
        return [str(RELAY.parent)]

    async def open_route(self, session_id: str, directory: str,
                         get_toolbox: Callable[[], Awaitable[NotebookToolbox]]) -> NotebookRoute:
        """Listen on ``directory``/nb.sock for the MCP clients of the toolbox ``get_toolbox``
        gives (asked at the first connection: the agent's start never waits for the tools'
        imports); a fresh token."""
        route = NotebookRoute(session_id, os.path.join(directory, SOCKET_NAME), secrets.token_urlsafe(24),
                              get_toolbox)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(route.socket_path)  # (a previous start's, whose server is closed)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            if len(route.connections) >= self.max_connections_per_session:
                log.warning("notebook tools: session %s holds %d connections; one more was closed",
                            session_id, len(route.connections))
                writer.close()
                return
            route.connections.add(task)
            try:
                await self._serve(route, reader, writer)
            except (ConnectionError, ValueError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                log.info("notebook tools: a connection of session %s ended (%s)", session_id,
                         type(e).__name__)
            except asyncio.CancelledError:
                pass  # (close_route: the agent stops; asyncio's stream callback need not log it)
            finally:
                route.connections.discard(task)
                writer.close()

        route.server = await asyncio.start_unix_server(handle, route.socket_path,
                                                       limit=self.max_message_bytes)
        os.chmod(route.socket_path, 0o600)
        owner = os.stat(directory)
        if os.geteuid() == 0 and owner.st_uid != 0:
            # the Docker backend gave the directory to the container's user (chown_rw_paths);
            # the socket, made after the container started, goes to that user too
            os.chown(route.socket_path, owner.st_uid, owner.st_gid)
        log.info("notebook tools for session %s", session_id)
        return route

    def entry(self, route: NotebookRoute, socket_dir: str | None = None) -> dict[str, Any]:
        """The ``session/new`` ``mcpServers`` entry (ACP ``McpServerStdio``) of ``route``;
        ``socket_dir``: where the sandbox shows the socket's directory (None: its host path)."""
        sock = route.socket_path if socket_dir is None else os.path.join(socket_dir, SOCKET_NAME)
        return {"name": SERVER_NAME, "command": self.relay_python,
                "args": ["-I", str(RELAY), "--socket", sock],
                "env": [{"name": "JACP_NB_TOKEN", "value": route.token}]}

    async def _serve(self, route: NotebookRoute, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        first = await asyncio.wait_for(reader.readline(), 10)
        if not hmac.compare_digest(first.strip(), route.token.encode()):
            log.warning("notebook tools: a wrong token on session %s's socket", route.session_id)
            return
        # (the SDK's modules take seconds to import, more under load: in a thread, once, when a
        # first agent connects, never on the server's event loop)
        await asyncio.to_thread(_import_sdk)
        from mcp.server.stdio import stdio_server

        lines = _Lines(reader, writer)
        server = build_mcp_server(await route.get_toolbox())
        async with stdio_server(stdin=lines, stdout=lines) as (read, write):  # type: ignore[arg-type]
            lowlevel = server._lowlevel_server  # (MCPServer has no public "serve these streams")
            await lowlevel.run(read, write, lowlevel.create_initialization_options())

    async def close_route(self, route: NotebookRoute) -> None:
        """Stop listening and end the route's connections (the directory stays: its owner's)."""
        if route.server is not None:
            route.server.close()
            route.server = None
        for task in list(route.connections):
            task.cancel()
        for task in list(route.connections):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(FileNotFoundError):
            os.unlink(route.socket_path)


def _import_sdk(*more: str) -> None:
    for name in ("mcp.server.mcpserver", "mcp.server.stdio", *more):
        importlib.import_module(name)


def _json(result: dict[str, Any]) -> str:
    """One compact JSON object: the tool's only content (a structured copy beside it doubles
    what Qwen Code shows its LLM, and Gemini CLI wants an object, never bare JSON text)."""
    return json.dumps(result, ensure_ascii=False, separators=(",", ":"), default=str)


def build_mcp_server(tools: NotebookToolbox) -> MCPServer:
    """The MCP tools of one session, each forwarding to ``tools``."""
    from mcp.server.mcpserver import MCPServer

    mcp = MCPServer(SERVER_NAME, instructions=(
        "Work on the user's Jupyter notebooks cell by cell with these tools; they show live in the "
        "notebook the user has open. Never write .ipynb files directly: such writes are refused. "
        "Paths are relative to your working directory. Address cells by id (read_notebook)."))
    tool = mcp.tool

    @tool(description="List the notebooks in the workspace and whether each is open in JupyterLab.",
          structured_output=False)
    async def list_notebooks() -> str:
        return _json(await tools.list_notebooks())

    @tool(description="Read a notebook as cells: id, type, source and a summary of the outputs.",
          structured_output=False)
    async def read_notebook(path: str) -> str:
        return _json(await tools.read_notebook(path))

    @tool(description="Insert a cell (cell_type: code, markdown or raw) at index (0 = first; "
                      "past the end = last). Returns the new cell's id and an edit_id.",
          structured_output=False)
    async def insert_cell(path: str, index: int, cell_type: str, source: str) -> str:
        return _json(await tools.insert_cell(path, index, cell_type, source))

    @tool(description="Replace the source of the cell with this id.", structured_output=False)
    async def replace_cell(path: str, cell_id: str, source: str) -> str:
        return _json(await tools.replace_cell(path, cell_id, source))

    @tool(description="Move the cell with this id to index.", structured_output=False)
    async def move_cell(path: str, cell_id: str, index: int) -> str:
        return _json(await tools.move_cell(path, cell_id, index))

    @tool(description="Delete the cell with this id.", structured_output=False)
    async def delete_cell(path: str, cell_id: str) -> str:
        return _json(await tools.delete_cell(path, cell_id))

    @tool(description="Create a new, empty notebook (Python 3 kernel) at path.", structured_output=False)
    async def create_notebook(path: str) -> str:
        return _json(await tools.create_notebook(path))

    @tool(description="Run the code cell with this id in the notebook's kernel (the notebook must "
                      "be open with a running kernel). The user is asked first. Returns outputs.",
          structured_output=False)
    async def run_cell(path: str, cell_id: str) -> str:
        return _json(await tools.run_cell(path, cell_id))

    @tool(description="Run code in the notebook's kernel without adding a cell (the user is asked "
                      "first). Returns outputs.", structured_output=False)
    async def run_code(path: str, code: str) -> str:
        return _json(await tools.run_code(path, code))

    return mcp


class _Lines:
    """An asyncio stream pair as the text "files" ``mcp.server.stdio.stdio_server`` takes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> str:
        line = await self.reader.readline()  # ValueError past the limit: the connection ends
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", "replace")

    async def write(self, text: str) -> None:
        self.writer.write(text.encode())

    async def flush(self) -> None:
        await self.writer.drain()


@dataclass
class NotebookRoute:
    """One agent start's socket: its token and the toolbox it serves."""

    session_id: str
    socket_path: str
    token: str = field(repr=False)
    get_toolbox: Callable[[], Awaitable[NotebookToolbox]]
    server: asyncio.AbstractServer | None = None
    connections: set[asyncio.Task[Any]] = field(default_factory=set)
