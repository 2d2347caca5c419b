"""A remote agent reached over a WebSocket (``AgentSpec.url``): nothing runs on this host.

It takes the place of a sandbox in a session so the rest stays the same: ``start`` opens the
connection (the SDK's WebSocket transport, text frames of JSON-RPC), ``wait`` returns when it
closes, ``stop`` closes it. The remote agent reads and writes the user's workspace only through
ACP ``fs/*`` requests (confined like any other); it gets no terminal here, since a command would
otherwise run on the Jupyter server beside the user's files, unsandboxed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, ClassVar

from ..errors import SandboxError
from .base import CommandProcess, Sandbox, SandboxSpec

#: The workspace as the remote agent sees it (paths of its fs requests start here).
WORKSPACE = "/workspace"


class _ObservedTransport:
    """The SDK transport, with an event set when the remote side closes."""

    def __init__(self, inner: Any, closed: asyncio.Event) -> None:
        self._inner = inner
        self._closed = closed

    async def send(self, message: dict[str, Any]) -> None:
        await self._inner.send(message)

    async def receive(self) -> dict[str, Any] | None:
        message = await self._inner.receive()
        if message is None:
            self._closed.set()
        return message

    async def close(self) -> None:
        self._closed.set()
        await self._inner.close()


class RemoteAgent(Sandbox):
    kind: ClassVar[str] = "remote"
    provides_terminals: ClassVar[bool] = False

    def __init__(self, spec: SandboxSpec, url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(spec)
        self.url = url
        self.headers = headers or {}
        self.transport: _ObservedTransport | None = None
        self._closed = asyncio.Event()

    @property
    def workspace_path(self) -> str:
        return WORKSPACE

    def limits_enforced(self) -> dict[str, bool]:
        return dict.fromkeys(("mem_limit", "cpu_limit", "pids_limit", "disk_limit", "network"), False)

    async def start(self) -> None:
        from acp.ws.client import create_websocket_stream

        try:
            inner = await create_websocket_stream(self.url, headers=self.headers)
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            raise SandboxError(f"Could not connect to the remote agent at {self.url}: {e}") from e
        except Exception as e:  # websockets' handshake errors (InvalidStatus, InvalidURI, ...)
            raise SandboxError(f"The remote agent at {self.url} refused the connection: {e}") from e
        self.transport = _ObservedTransport(inner, self._closed)

    async def poll(self) -> int | None:
        return 0 if self._closed.is_set() else None

    async def wait(self) -> int:
        await self._closed.wait()
        return 0

    async def stop(self, timeout: float = 3.0) -> None:
        if self.transport is not None:
            await self.transport.close()
        self._closed.set()

    def exit_reason(self, status: int | None) -> str:
        return f"the remote agent at {self.url} closed the connection"

    async def spawn_command(self, argv: Sequence[str], *, cwd: str | None,
                            env: dict[str, str] | None) -> CommandProcess:
        raise OSError("terminals are not available to a remote agent")
