"""The adversarial suite's harness: a hostile agent (``agents/hostile.py``) in a real sandbox.

``await attacker("call", method="create_terminal", params={...})`` sends one attack order as a
prompt through the session manager (the same path a user's message takes) and returns the
agent's JSON report of what happened. Each test names the backend it attacks; the fixture
skips (or fails in CI, by the ``JUPYTER_ACP_REQUIRE_*`` switches) where a backend cannot run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from conftest import acp_require

from jupyter_acp.agents import AgentConfigManager
from jupyter_acp.agents_builtin import python_ro_paths
from jupyter_acp.manager import UserSessionManager
from jupyter_acp.session import AgentSession

HOSTILE = Path(__file__).parent / "agents" / "hostile.py"
BACKENDS = ("bubblewrap", "docker", "local")


def hostile_agents(**extra: Any) -> AgentConfigManager:
    """An agent configuration holding the hostile agent (as an admin would define any agent)."""
    return AgentConfigManager(agents={"hostile": {
        "command": [sys.executable, str(HOSTILE)], "display_name": "Hostile test agent",
        "ro_paths": [*python_ro_paths(), str(HOSTILE.parent)], **extra}})


def require_backend(kind: str) -> None:
    if kind == "bubblewrap":
        from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox

        ok, why = BubblewrapSandbox.available()
        acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", ok, f"bubblewrap cannot run here: {why}")
    elif kind == "docker":
        from test_docker_sandbox import require_docker

        require_docker()


def backend_traits(kind: str) -> dict[str, Any]:
    """Manager traits that run agents in ``kind`` (``local`` needs the admin's explicit opt-in)."""
    return {"sandbox": kind, "allow_unsandboxed": kind == "local"}


class Attacker:
    """One hostile session: ``await attacker(op, **order)`` → the agent's report (a dict)."""

    def __init__(self, manager: UserSessionManager, session: AgentSession, user: str) -> None:
        self.manager, self.session, self.user = manager, session, user

    @property
    def workspace(self) -> Path:
        return self.session.sandbox_spec.workspace

    async def __call__(self, op: str, **order: Any) -> dict[str, Any]:
        result = await self.manager.send_message(self.user, self.session.id, json.dumps({"op": op, **order}))
        return json.loads(result.text)

    async def terminal(self, command: str, args: list[str] | None = None, **params: Any) -> dict[str, Any]:
        """Create a terminal, wait for it, and return its output (or the refusal)."""
        made = await self("call", method="create_terminal",
                          params={"command": command, "args": args or [], **params})
        if "error" in made:
            return made
        tid = made["ok"]["terminalId"]
        await self("call", method="wait_for_terminal_exit", params={"terminal_id": tid})
        out = await self("call", method="terminal_output", params={"terminal_id": tid})
        await self("call", method="release_terminal", params={"terminal_id": tid})
        return out


async def make_attacker(make_manager: Any, kind: str, *, user: str = "mallory", **traits: Any) -> Attacker:
    """Start the hostile agent for ``user`` in the ``kind`` sandbox of a fresh manager."""
    require_backend(kind)
    manager = make_manager(**{**backend_traits(kind), "agents": hostile_agents(), **traits})
    session = await manager.create_user_session(user, "hostile")
    if kind == "docker" and os.geteuid() == 0:
        os.chown(session.sandbox_spec.workspace, 1000, 1000)  # the container's uid must write there
    return Attacker(manager, session, user)
