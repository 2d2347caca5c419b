"""A plain local process: no isolation at all.

Only for the demo agent (which reads and writes nothing outside ACP) or when an admin sets
``c.UserSessionManager.allow_unsandboxed = True`` knowingly. The agent still starts in its own
process group and is stopped with TERM then KILL, and its environment is exactly the spec's
(the server's own environment, which may hold secrets, is not inherited).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from .base import ProcessSandbox


class LocalProcessSandbox(ProcessSandbox):
    kind: ClassVar[str] = "local"
    isolated: ClassVar[bool] = False

    def command(self, argv: Sequence[str], *, cwd: str, env: dict[str, str]) -> list[str]:
        return list(argv)

