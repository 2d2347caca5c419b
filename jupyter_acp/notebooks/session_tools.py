"""One session's notebook tools: what ``AgentSession`` holds of them.

The manager makes it with the session (its socket directory is mounted into the sandbox, so it
must exist before the sandbox does). Each agent start opens a fresh route in that directory (a
new token: a restored session's agent never reuses an old one) and hands the agent the
``jupyter`` MCP server in ``session/new`` / ``session/load`` / ``session/resume``. The toolbox
(``tools.NotebookToolbox``) lives as long as the session, so the user can undo an agent's edit
after a restart of its agent. A run in a kernel asks the user through the session's permission
desk, even under the ``allow`` policy: it runs outside the sandbox.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import shutil
import uuid
from typing import TYPE_CHECKING, Any

from acp import schema

from .channel import SERVER_NAME, NotebookRoute, NotebookTools

if TYPE_CHECKING:
    from ..session import AgentSession
    from ..workspace_fs import WorkspaceFS
    from .tools import NotebookToolbox

log = logging.getLogger("jupyter_acp.notebooks")

#: The options of the permission request of a run in the user's kernel.
RUN_OPTIONS = [schema.PermissionOption(option_id="run", name="Run in my kernel", kind="allow_once"),
               schema.PermissionOption(option_id="no", name="Don't run", kind="reject_once")]

#: The agent's raw writes of notebooks (ACP ``fs/write_text_file``) are refused, with a pointer
#: to the tools: a whole-file write has no cell identity, so applied to an open notebook it
#: would replace every cell (the user's concurrent edits, outputs and undo lost), and a valid
#: but wrong file would pass any check. Checked on the name the walk resolved (workspace_fs).
NOTEBOOK_WRITES_REFUSED = {".ipynb": (
    f"notebooks are edited with the {SERVER_NAME} MCP tools (insert_cell, replace_cell, "
    "move_cell, delete_cell, create_notebook), which show the change live in the notebook; "
    "a raw .ipynb write is refused")}


def is_notebook_tool_call(tool_call: schema.ToolCallUpdate) -> bool:
    """Whether an agent's permission request is for one of our own notebook tools (Qwen Code
    asks before every MCP call: ``_meta.toolName`` ``mcp__jupyter__<tool>``). Such requests
    are answered by the server: the tools enforce what needs the user themselves (a run asks
    the user; an edit is confined, shown live and undoable), so the user sees one card, ours.
    An agent that lies here gains nothing: it can call the tools without asking at all."""
    meta = tool_call.field_meta or {}
    name = meta.get("toolName") if isinstance(meta, dict) else None
    return isinstance(name, str) and name.startswith(f"mcp__{SERVER_NAME}__")


class SessionNotebooks:
    """The notebook tools of one session (see the module docstring)."""

    def __init__(self, config: NotebookTools, *, directory: str, own_dir: bool, writable_path: bool,
                 sandbox_dir: str | None) -> None:
        self.config = config
        #: the session's socket directory on the host, and where its sandbox shows it (None: at
        #: its host path)
        self.directory, self.sandbox_dir = directory, sandbox_dir
        self._own_dir = own_dir  # (else the gateway route's directory: the gateway removes it)
        self._writable_path = writable_path
        #: made at the agent's first connection (``_get_toolbox``), kept for the session's life
        self.toolbox: NotebookToolbox | None = None
        self.route: NotebookRoute | None = None
        self._session: AgentSession | None = None
        self._fs: WorkspaceFS | None = None
        self._making = asyncio.Lock()

    def sandbox_paths(self) -> tuple[list[str], list[str]]:
        """(read-only, read-write) host paths the sandbox needs: the relay, and the socket
        directory when it is our own and the backend shows it at its host path (a gateway
        route's is already among the launch's paths)."""
        return self.config.sandbox_ro_paths(), [self.directory] if self._writable_path else []

    async def open(self, session: AgentSession, fs: WorkspaceFS) -> list[schema.McpServerStdio]:
        """A route for this agent start; the ``mcpServers`` of ``session/new``."""
        await self.close()
        self._session, self._fs = session, fs
        if self.toolbox is not None:
            self.toolbox.fs = fs
        self.route = await self.config.open_route(session.id, self.directory, self._get_toolbox)
        entry = self.config.entry(self.route, self.sandbox_dir)
        return [schema.McpServerStdio.model_validate(entry)]

    async def _get_toolbox(self) -> NotebookToolbox:
        """The session's toolbox, made when the agent first connects: nbformat, jsonschema and
        pycrdt take seconds to import (tens under load), so in a thread, and never while the
        session starts (a first session waited 44 s for them in a loaded CI run)."""
        async with self._making:
            if self.toolbox is None:
                session, fs = self._session, self._fs
                assert session is not None and fs is not None  # (set by open, which comes first)
                tools = await asyncio.to_thread(importlib.import_module, "jupyter_acp.notebooks.tools")
                self.toolbox = tools.NotebookToolbox(
                    self.config.serverapp, fs=fs, api_prefix=self._api_prefix(fs.host_root),
                    origin=f"jupyter-acp:{session.id}", permit=self._permit,
                    allow_kernel=self.config.allow_kernel_execution, on_edit=self._on_edit,
                    may_edit=self._may_edit, run_timeout=self.config.run_timeout)
            return self.toolbox

    def _api_prefix(self, workspace: str) -> str | None:
        """The workspace as a contents-API path of the Jupyter server (None: outside its root,
        so no notebook there can be open in a room or have a kernel of this server)."""
        serverapp = self.config.serverapp
        if serverapp is None:
            return None
        root = os.path.realpath(serverapp.root_dir)
        rel = os.path.relpath(os.path.realpath(workspace), root)
        if rel == os.curdir:
            return ""
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            return None
        return rel.replace(os.sep, "/")

    async def _permit(self, title: str, code: str, path: str) -> bool:
        """Ask the user whether the agent may run ``code`` in the kernel of ``path``."""
        session = self._session
        if session is None:
            return False
        call = schema.ToolCallUpdate(
            tool_call_id=f"nb-run-{uuid.uuid4().hex[:12]}", title=title, kind="execute", status="pending",
            raw_input={"code": code, "path": path},
            content=[schema.ContentToolCallContent(type="content", content=schema.TextContentBlock(
                type="text", text=f"```python\n{code}\n```"))],
            field_meta={"jupyterAcp": {"notebookRun": True}})
        response = await session.permissions.ask(call, RUN_OPTIONS, always_ask=True)
        return getattr(response.outcome, "option_id", None) == "run"

    def _may_edit(self) -> str | None:
        session = self._session
        if session is not None and session.options.permission_policy == "deny":
            return "the admin's permission policy (deny) refuses every change by an agent"
        return None

    def _on_edit(self, record: dict[str, Any]) -> None:
        session = self._session
        if session is None:
            return
        session._emit("notebook_edit", record)
        session._audit("notebook_edit", tool=record.get("tool"), path=record.get("path"),
                       cell_id=record.get("cell_id"), edit_id=record.get("edit_id"))

    async def undo(self, edit_id: str) -> dict[str, Any]:
        """Undo one of the agent's edits (``EditNotFound`` / ``EditConflict`` from the toolbox).
        ``EditGone`` for an edit the session's history shows but the toolbox no longer keeps
        (made before a suspension or a server restart, or past its bound): a 404 would say the
        edit never was."""
        from .tools import MAX_UNDO, EditGone, EditNotFound

        try:
            if self.toolbox is None:
                raise EditNotFound(f"No notebook edit {edit_id!r} in this session")
            return await self.toolbox.undo(edit_id)
        except EditNotFound:
            session = self._session
            if session is not None and any(
                    e["type"] == "notebook:edit" and isinstance(e["data"], dict)
                    and e["data"].get("edit_id") == edit_id for e in session.events()):
                raise EditGone(
                    "This edit can no longer be undone here: what undoes an edit is kept only while "
                    f"the session runs (not across a suspension or a server restart), for its latest "
                    f"{MAX_UNDO} edits") from None
            raise

    async def cancel(self) -> None:
        """The turn was cancelled: interrupt the agent's runs in kernels."""
        if self.toolbox is not None:
            await self.toolbox.cancel()

    async def close(self) -> None:
        """The agent stops: its route and its runs in kernels go (the toolbox and its edits
        stay with the session, to be undone)."""
        route, self.route = self.route, None
        if route is not None:
            await self.config.close_route(route)
        if self.toolbox is not None:
            await self.toolbox.cancel()

    def discard(self) -> None:
        """The session ends (its agent is stopped, so its route is closed): the toolbox and,
        if ours, the socket directory go."""
        if self.toolbox is not None:
            self.toolbox.close()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)


