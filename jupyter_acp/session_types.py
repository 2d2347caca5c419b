"""The values a session is made with and gives back: its state, its options, a turn's result.

Apart from ``session.py`` so that the manager, the handlers and the tests can name them without
the session's machinery, and so that ``session.py`` holds one concept: the live session.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from .limits import AgentInputLimits
from .usage import RecordOutcome, TurnUsage


class SessionState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPED = "stopped"
    ERROR = "error"


class UsageBook(Protocol):
    """Where a session's usage is recorded and its quota checked (``AgentSession.ledger``): the
    server's ``UsageLedger``, or — for a session the JupyterHub service meters (hub mode) —
    ``hubclient.HubUsageBook``, which writes nothing here and asks the service for the quota.
    The manager chooses one per session; the session never asks which it has."""

    async def acheck_quota(self, user: str) -> None: ...

    async def arecord(self, *, user: str, session_id: str, agent: str, turn: int, usage: TurnUsage,
                      started_at: float, ended_at: float | None = None, owner: Any = None
                      ) -> RecordOutcome: ...

    def take_problem(self, owner: Any) -> dict[str, Any] | None: ...

    def live_totals(self, owner: Any) -> dict[str, Any]: ...


@dataclass
class TurnResult:
    """What one prompt turn produced."""

    text: str
    stop_reason: str
    usage: TurnUsage
    turn: int
    duration: float
    error: str | None = None
    """Why the turn was cut short, if the session did it (a quota refusal, ``quota_refused``)."""

    def to_dict(self) -> dict[str, Any]:
        data = {"text": self.text, "stop_reason": self.stop_reason, "usage": self.usage.to_dict(),
                "turn": self.turn, "duration": round(self.duration, 6)}
        if self.error is not None:
            data["error"] = self.error
        return data


@dataclass
class SessionOptions:
    """Per-session settings decided by the manager (from the admin's config)."""

    permission_policy: str = "ask"
    """``ask`` the user, or ``allow`` / ``deny`` every request without asking."""
    permission_timeout: float = 300.0
    init_timeout: float = 60.0
    max_history: int = 10_000
    limits: AgentInputLimits = field(default_factory=AgentInputLimits)
    """What the agent may make the server hold or do (bytes, files, terminals)."""
    allowed_modes: list[str] | None = None
    """The admin's list of modes this agent may be in; None: those within the policy's level."""
    allowed_models: list[str] | None = None
    """The admin's list of models (config option of category ``model``); None: any."""
    client_info: dict[str, str] = field(default_factory=lambda: {"name": "jupyter-acp", "version": "0.1.0"})
