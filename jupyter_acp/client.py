"""The client side of ACP: what the agent may ask of us.

``AcpClient`` implements the SDK's ``acp.Client`` protocol for one agent session. It serves:

* ``session/update`` — handed to the owning session, which records and fans it out;
* ``session/request_permission`` — handed to the session, which asks the user (or applies the
  admin's policy) and times out to a rejection;
* ``fs/read_text_file`` / ``fs/write_text_file`` — confined to the session workspace: a path
  with ``..``, an absolute path outside the workspace, or a symlink leading out is refused;
* ``terminal/*`` — commands run *inside the sandbox*, never on the host beside it.

Anything else (e.g. Qwen Code's non-standard requests) is answered with JSON-RPC -32601 by the
SDK's router, which is what those agents expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from acp import schema
from acp.exceptions import RequestError

if TYPE_CHECKING:
    from .sandbox.base import CommandProcess, Sandbox

log = logging.getLogger("jupyter_acp.client")

#: Largest file the agent may read or write through fs/* (bytes).
MAX_FILE_BYTES = 20 * 1024 * 1024


class WorkspaceFS:
    """Maps the agent's view of its workspace onto the host and refuses every escape."""

    def __init__(self, host_root: Path, agent_root: str) -> None:
        self.host_root = Path(os.path.realpath(host_root))
        self.agent_root = PurePosixPath(agent_root)

    def resolve(self, path: str) -> Path:
        """The host path for an agent path, or ``RequestError`` if it leaves the workspace."""
        if not isinstance(path, str) or not path or "\x00" in path:
            raise self._refuse(path, "not a valid path")
        p = PurePosixPath(path)
        if not p.is_absolute():
            p = self.agent_root / p
        if ".." in p.parts:
            raise self._refuse(path, "'..' is not allowed")
        try:
            rel = p.relative_to(self.agent_root)
        except ValueError:
            raise self._refuse(path, f"outside the workspace {self.agent_root}") from None
        host = Path(os.path.realpath(self.host_root / rel))
        if host != self.host_root and self.host_root not in host.parents:
            raise self._refuse(path, "a symlink leads outside the workspace")
        return host

    def _refuse(self, path: Any, why: str) -> RequestError:
        log.warning("Refused agent file access to %r: %s", path, why)
        return RequestError(-32602, f"Access denied: {why}", {"path": str(path)})

    async def read(self, path: str, line: int | None, limit: int | None) -> str:
        host = self.resolve(path)
        return await asyncio.to_thread(self._read, host, path, line, limit)

    def _read(self, host: Path, path: str, line: int | None, limit: int | None) -> str:
        try:
            if host.stat().st_size > MAX_FILE_BYTES:
                raise RequestError(-32602, f"File larger than {MAX_FILE_BYTES} bytes", {"path": path})
            text = host.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            raise RequestError.resource_not_found(path) from None
        except (IsADirectoryError, PermissionError) as e:
            raise RequestError(-32602, f"Cannot read: {e.strerror}", {"path": path}) from None
        if line is None and limit is None:
            return text
        lines = text.splitlines(keepends=True)
        start = max((line or 1) - 1, 0)
        end = None if limit is None else start + max(limit, 0)
        return "".join(lines[start:end])

    async def write(self, path: str, content: str) -> None:
        if len(content) > MAX_FILE_BYTES:
            raise RequestError(-32602, f"Content larger than {MAX_FILE_BYTES} bytes", {"path": path})
        host = self.resolve(path)
        await asyncio.to_thread(self._write, host, path, content)

    def _write(self, host: Path, path: str, content: str) -> None:
        try:
            host.parent.mkdir(parents=True, exist_ok=True)
            # re-check after mkdir: a directory swapped for a symlink must not be followed
            self.resolve(path)
            host.write_text(content, encoding="utf-8")
        except (IsADirectoryError, PermissionError, NotADirectoryError) as e:
            raise RequestError(-32602, f"Cannot write: {e.strerror}", {"path": path}) from None


class Terminal:
    """One command started by the agent through ``terminal/create``, output capped."""

    def __init__(self, proc: CommandProcess, byte_limit: int | None) -> None:
        self.proc = proc
        self.limit = byte_limit if byte_limit and byte_limit > 0 else 1024 * 1024
        self.output = bytearray()
        self.truncated = False
        self.reader = asyncio.create_task(self._read(), name="acp-terminal-output")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.output += chunk
            if len(self.output) > self.limit:
                # the protocol keeps the end of the output, cut at a character boundary
                cut = len(self.output) - self.limit
                while cut < len(self.output) and (self.output[cut] & 0xC0) == 0x80:
                    cut += 1
                del self.output[:cut]
                self.truncated = True

    def exit_status(self) -> schema.TerminalExitStatus | None:
        code = self.proc.returncode
        if code is None:
            return None
        if code < 0:
            import signal

            return schema.TerminalExitStatus(signal=signal.Signals(-code).name)
        return schema.TerminalExitStatus(exit_code=code)

    async def wait(self) -> schema.TerminalExitStatus:
        await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        status = self.exit_status()
        assert status is not None
        return status

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()


class SessionHost:
    """What the client needs from its session (implemented by ``AgentSession``)."""

    async def on_session_update(self, update: Any, meta: dict[str, Any] | None) -> None: ...

    async def on_permission_request(
        self, tool_call: schema.ToolCallUpdate, options: list[schema.PermissionOption]
    ) -> schema.RequestPermissionResponse: ...


class AcpClient:
    """``acp.Client`` for one agent session: fs confined, terminals sandboxed, rest delegated."""

    def __init__(self, host: SessionHost, sandbox: Sandbox) -> None:
        self.host = host
        self.sandbox = sandbox
        self.fs = WorkspaceFS(sandbox.spec.workspace, sandbox.workspace_path)
        self.terminals: dict[str, Terminal] = {}

    # -- notifications and permission --------------------------------------------------------
    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        await self.host.on_session_update(update, kwargs or None)

    async def request_permission(self, session_id: str, tool_call: schema.ToolCallUpdate,
                                 options: list[schema.PermissionOption], **kwargs: Any
                                 ) -> schema.RequestPermissionResponse:
        return await self.host.on_permission_request(tool_call, options)

    # -- fs ----------------------------------------------------------------------------------
    async def read_text_file(self, session_id: str, path: str, line: int | None = None,
                             limit: int | None = None, **kwargs: Any) -> schema.ReadTextFileResponse:
        return schema.ReadTextFileResponse(content=await self.fs.read(path, line, limit))

    async def write_text_file(self, session_id: str, path: str, content: str,
                              **kwargs: Any) -> schema.WriteTextFileResponse:
        await self.fs.write(path, content)
        return schema.WriteTextFileResponse()

    # -- terminals ---------------------------------------------------------------------------
    async def create_terminal(self, session_id: str, command: str, args: list[str] | None = None,
                              env: list[schema.EnvVariable] | None = None, cwd: str | None = None,
                              output_byte_limit: int | None = None,
                              **kwargs: Any) -> schema.CreateTerminalResponse:
        env_map = {v.name: v.value for v in env or []}
        try:
            proc = await self.sandbox.spawn_command([command, *(args or [])], cwd=cwd, env=env_map)
        except OSError as e:
            raise RequestError(-32602, f"Cannot run {command!r}: {e.strerror or e}") from None
        terminal_id = f"term-{uuid.uuid4().hex[:12]}"
        self.terminals[terminal_id] = Terminal(proc, output_byte_limit)
        return schema.CreateTerminalResponse(terminal_id=terminal_id)

    def _terminal(self, terminal_id: str) -> Terminal:
        try:
            return self.terminals[terminal_id]
        except KeyError:
            raise RequestError.invalid_params({"terminal_id": f"unknown terminal {terminal_id!r}"}) from None

    async def terminal_output(self, session_id: str, terminal_id: str,
                              **kwargs: Any) -> schema.TerminalOutputResponse:
        term = self._terminal(terminal_id)
        return schema.TerminalOutputResponse(
            output=term.output.decode(errors="replace"), truncated=term.truncated,
            exit_status=term.exit_status())

    async def wait_for_terminal_exit(self, session_id: str, terminal_id: str,
                                     **kwargs: Any) -> schema.WaitForTerminalExitResponse:
        status = await self._terminal(terminal_id).wait()
        return schema.WaitForTerminalExitResponse(exit_code=status.exit_code, signal=status.signal)

    async def kill_terminal(self, session_id: str, terminal_id: str,
                            **kwargs: Any) -> schema.KillTerminalResponse:
        self._terminal(terminal_id).kill()
        return schema.KillTerminalResponse()

    async def release_terminal(self, session_id: str, terminal_id: str,
                               **kwargs: Any) -> schema.ReleaseTerminalResponse:
        term = self.terminals.pop(terminal_id, None)
        if term is not None:
            term.kill()
            term.reader.cancel()
        return schema.ReleaseTerminalResponse()

    async def close(self) -> None:
        """Kill every terminal the agent left running."""
        for terminal_id in list(self.terminals):
            await self.release_terminal("", terminal_id)

    # -- extensions (Qwen's craft/*, qwen/notify/*, ...) ---------------------------------------
    async def ext_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise RequestError.method_not_found(method)

    async def ext_notification(self, method: str, params: dict[str, Any]) -> None:
        log.debug("Ignoring agent extension notification %s", method)
