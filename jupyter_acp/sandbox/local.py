"""A plain local process: no isolation at all.

Only for the demo agent (which reads and writes nothing outside ACP) or when an admin sets
``c.UserSessionManager.allow_unsandboxed = True`` knowingly. The agent still starts in its own
process group and is stopped with TERM then KILL, and its environment is exactly the spec's
(the server's own environment, which may hold secrets, is not inherited).

Here the host *is* the sandbox: an ACP terminal would run on the host with the server's rights,
so this backend offers no terminals (none advertised at ``initialize``, ``terminal/create``
refused) unless the admin also sets ``c.UserSessionManager.allow_unsandboxed_terminals = True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from ..errors import SandboxError
from .base import HostLaunch, ProcessSandbox, SandboxSpec, check_command


class LocalProcessSandbox(ProcessSandbox):
    kind: ClassVar[str] = "local"
    isolated: ClassVar[bool] = False
    provides_terminals: ClassVar[bool] = False

    @classmethod
    def create(cls, spec: SandboxSpec, *, parent: Any = None) -> ProcessSandbox:
        if getattr(parent, "allow_unsandboxed_terminals", False) is True:
            return LocalTerminalsSandbox(spec)
        return cls(spec)

    def launch(self, argv: Sequence[str], *, cwd: str, env: dict[str, str]) -> HostLaunch:
        check_command(argv, env)
        if "\x00" in cwd:
            raise SandboxError("The working directory holds a NUL byte")
        return HostLaunch(argv=list(argv), env=dict(env), cwd=cwd)


class LocalTerminalsSandbox(LocalProcessSandbox):
    """``local`` with ACP terminals on the host: only when the admin opted in."""

    provides_terminals: ClassVar[bool] = True
