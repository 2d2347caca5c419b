"""Idle culling: the monitor that stops sessions nobody has used for ``idle_max_age``.

A mixin of ``UserSessionManager`` (like ``limit_traits.SessionLimits`` and
``stored_sessions.StoredSessions``); its traits are set as ``c.UserSessionManager.*``. A culled
session is stopped, not forgotten: it is suspended and can be resumed (``stored_sessions.py``).
The same periodic run purges stored sessions past their retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from traitlets import Float
from traitlets.config import LoggingConfigurable

from .session import SessionState

if TYPE_CHECKING:
    from .session import AgentSession


class IdleCulling(LoggingConfigurable):
    """The idle-session monitor of ``UserSessionManager``."""

    idle_max_age = Float(
        3600.0,
        help="""Seconds a session may stay idle (no prompt, no agent output) before the monitor
        stops it. A running prompt turn is never culled. 0 disables culling.""",
    ).tag(config=True)

    monitor_interval = Float(
        60.0,
        help="Seconds between two runs of the idle-session monitor. 0 disables the monitor.",
    ).tag(config=True)

    _monitor: asyncio.Task[None] | None = None

    if TYPE_CHECKING:  # the manager's, used here
        _sessions: dict[str, AgentSession]

        async def _delete(self, session: AgentSession, reason: str, *, forget: bool = True) -> None: ...
        async def purge_expired(self) -> list[str]: ...

    async def cleanup(self, max_age: float | None = None) -> list[str]:
        """Stop sessions idle for more than ``max_age`` seconds (default ``idle_max_age``).

        Only ``ready`` and ``error`` sessions are: never one in a prompt turn, nor one that is
        starting or restarting. Returns the ids of the sessions stopped.
        """
        max_age = self.idle_max_age if max_age is None else max_age
        if not max_age:
            return []
        culled = []
        for session in list(self._sessions.values()):
            # checked again for each one, just before it goes: the deletions before it awaited,
            # and meanwhile this one may have started a turn, been deleted or been used
            idle = time.time() - session.last_activity
            if (session.id not in self._sessions or idle <= max_age
                    or session.state not in (SessionState.READY, SessionState.ERROR)):
                continue
            self.log.info("Stopping idle session %s of %s (idle %.0f s)", session.id, session.user, idle)
            culled.append(session.id)
            await self._delete(session, f"idle for more than {max_age:g} s", forget=False)
        return culled

    def start_monitor(self) -> None:
        if self.monitor_interval and self._monitor is None:
            self._monitor = asyncio.create_task(self._monitor_loop(), name="acp-session-monitor")

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.monitor_interval)
            try:
                await self.cleanup()
                await self.purge_expired()
            except Exception:
                self.log.exception("The idle-session monitor failed; it will try again")

    async def stop_monitor(self) -> None:
        """Stop the monitor (the server is stopping); a run under way is cancelled."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
