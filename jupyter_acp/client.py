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

import logging
from typing import TYPE_CHECKING, Any, Protocol, cast

from acp import schema
from acp.exceptions import RequestError
from acp.interfaces import Client

from .limits import AgentInputLimits
from .refusals import RefusalLog, guard_agent_calls, install_sdk_filter
from .terminals import OutputSink, Terminals
from .workspace_fs import WorkspaceFS

if TYPE_CHECKING:
    from .sandbox.base import Sandbox

log = logging.getLogger("jupyter_acp.client")


class SessionHost(Protocol):
    """What the client needs from its session (implemented by ``AgentSession``)."""

    async def on_session_update(self, update: Any, meta: dict[str, Any] | None) -> None: ...

    async def on_permission_request(
        self, tool_call: schema.ToolCallUpdate, options: list[schema.PermissionOption]
    ) -> schema.RequestPermissionResponse: ...


@guard_agent_calls
class AcpClient:
    """``acp.Client`` for one agent session: fs confined, terminals sandboxed, rest delegated."""

    def __init__(self, host: SessionHost, sandbox: Sandbox, limits: AgentInputLimits | None = None,
                 *, refused_writes: dict[str, str] | None = None,
                 on_terminal_output: OutputSink | None = None) -> None:
        self.host = host
        self.sandbox = sandbox
        self.limits = limits or AgentInputLimits()
        #: one short log line per refused agent request, rate-limited (shared by fs and terminals)
        self.refusals = RefusalLog(sandbox.spec.labels.get("session", "?"))
        install_sdk_filter()
        self.fs = WorkspaceFS(sandbox.spec.workspace, sandbox.workspace_path, self.limits,
                              label=sandbox.spec.labels.get("session", ""), refusals=self.refusals,
                              refused_writes=refused_writes)
        #: ``on_terminal_output``: where the terminals' ``terminal:output`` events go
        self.terminals = Terminals(sandbox, self.limits, self.refusals, on_terminal_output)

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

    # -- terminals (checked and bounded in terminals.py) -----------------------------------------
    async def create_terminal(self, session_id: str, command: str, args: list[str] | None = None,
                              env: list[schema.EnvVariable] | None = None, cwd: str | None = None,
                              output_byte_limit: int | None = None,
                              **kwargs: Any) -> schema.CreateTerminalResponse:
        terminal_id = await self.terminals.create(command, args, env, cwd, output_byte_limit)
        return schema.CreateTerminalResponse(terminal_id=terminal_id)

    async def terminal_output(self, session_id: str, terminal_id: str,
                              **kwargs: Any) -> schema.TerminalOutputResponse:
        term = self.terminals.get(terminal_id)
        return schema.TerminalOutputResponse(
            output=term.output.decode(errors="replace"), truncated=term.truncated,
            exit_status=term.exit_status())

    async def wait_for_terminal_exit(self, session_id: str, terminal_id: str,
                                     **kwargs: Any) -> schema.WaitForTerminalExitResponse:
        status = await self.terminals.get(terminal_id).wait()
        return schema.WaitForTerminalExitResponse(exit_code=status.exit_code, signal=status.signal)

    async def kill_terminal(self, session_id: str, terminal_id: str,
                            **kwargs: Any) -> schema.KillTerminalResponse:
        self.terminals.get(terminal_id).kill()
        return schema.KillTerminalResponse()

    async def release_terminal(self, session_id: str, terminal_id: str,
                               **kwargs: Any) -> schema.ReleaseTerminalResponse:
        self.terminals.release(terminal_id)
        return schema.ReleaseTerminalResponse()

    async def close(self) -> None:
        """Kill every terminal the agent left running."""
        self.terminals.close()

    # -- extensions (Qwen's craft/*, qwen/notify/*, ...) ---------------------------------------
    async def ext_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise RequestError.method_not_found(method)

    async def ext_notification(self, method: str, params: dict[str, Any]) -> None:
        log.debug("Ignoring agent extension notification %s", method)

    def as_sdk_client(self) -> Client:
        """This client as the SDK's ``acp.Client`` protocol, for ``connect_to_agent``.

        That protocol also lists ``on_connect`` and the unstable elicitation methods, which the
        SDK's router looks up with ``getattr`` and, when absent, answers "method not found" (or
        skips). We leave them out on purpose: with the stable protocol, merely defining an
        elicitation handler makes the SDK warn on every such request, and pytest's warnings-as-
        errors turn the answer into an internal error (tests/test_hostile_protocol.py). Every
        other member's signature is checked against the protocol by ``_checked`` below."""
        return cast(Client, self)


if TYPE_CHECKING:
    class _CheckedClient(AcpClient):
        """``AcpClient`` plus exactly the members ``as_sdk_client`` says it may lack: mypy
        checks that this satisfies ``acp.Client``, i.e. that the rest of AcpClient does."""

        async def create_elicitation(self, message: str, mode: Any,
                                     **kwargs: Any) -> schema.CreateElicitationResponse: ...

        async def complete_elicitation(self, elicitation_id: str, **kwargs: Any) -> None: ...

        def on_connect(self, conn: Any) -> None: ...

    def _checked(client: _CheckedClient) -> Client:
        return client
