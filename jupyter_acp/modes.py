"""The admin's say over an agent's modes (ACP ``session/set_mode``).

Agents have modes that decide how much they do without asking (Qwen Code's ``plan``,
``default``, ``auto-edit``, ``yolo``). The admin's ``permission_policy`` puts every agent in one
of them when it starts, and ``allowed_modes`` (or, by default, the policy's level) bounds the
ones users may switch to. An agent is hostile until shown otherwise: one that switches *itself*
into a mode the admin does not allow is switched back, and stopped if it keeps at it.

One ``ModePolicy`` per session; it speaks to the agent through the session (its connection,
its bounded requests, its events) and never outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from acp.exceptions import RequestError

from .errors import AgentError, BadRequest, ModeNotAllowed

if TYPE_CHECKING:
    from .session import AgentSession

log = logging.getLogger("jupyter_acp.session")


class ModePolicy:
    """The modes of one session's agent, as reported and as the admin allows them."""

    #: Self-switches into forbidden modes undone before the agent is stopped instead.
    MAX_REVERTS = 50

    def __init__(self, session: AgentSession) -> None:
        self.session = session
        #: the agent's modes as it reported them (None: an agent without modes)
        self.agent_modes: dict[str, Any] | None = None
        #: the same for clients: only the allowed ones in ``availableModes``, the others in
        #: ``forbiddenModes``
        self.modes: dict[str, Any] | None = None
        #: the mode the admin's policy puts the agent in (None: the agent has no known modes)
        self.policy_mode: str | None = None
        self.reverts = 0
        self._guard: asyncio.Task[None] | None = None

    def reported(self, modes: dict[str, Any] | None) -> None:
        """The modes an agent reported in ``session/new`` or ``session/load``."""
        self.agent_modes = modes
        self._publish()

    def available_ids(self) -> list[str]:
        return [m["id"] for m in (self.agent_modes or {}).get("availableModes", [])
                if isinstance(m, dict) and isinstance(m.get("id"), str)]

    def allowed(self, mode_id: str | None) -> bool:
        """Whether the admin lets this session be in ``mode_id`` (the policy's mode always)."""
        if mode_id is None:
            return False
        if mode_id == self.policy_mode:
            return True
        options = self.session.options
        if options.allowed_modes is not None:
            return mode_id in options.allowed_modes
        return self.session.spec.mode_permitted(mode_id, options.permission_policy)

    def _publish(self) -> None:
        raw = self.agent_modes
        if raw is None:
            self.modes = None
            return
        listed = [m for m in raw.get("availableModes", []) if isinstance(m, dict)]
        self.modes = {**raw, "availableModes": [m for m in listed if self.allowed(m.get("id"))],
                      "forbiddenModes": [m for m in listed if not self.allowed(m.get("id"))]}

    def _record(self, mode_id: str) -> None:
        if self.agent_modes is not None:
            self.agent_modes["currentModeId"] = mode_id
            self._publish()

    async def _switch(self, mode_id: str) -> None:
        s = self.session
        await s._bounded(s.conn.set_session_mode(session_id=s.acp_session_id, mode_id=mode_id),
                         "session/set_mode")

    async def apply(self, *, new: bool) -> None:
        """Put a starting agent in the policy's mode (or, resuming, in an allowed one).

        The launch already asked for that mode (``AgentSpec.for_policy``); this checks what the
        agent reports and fixes it with ``session/set_mode``. An agent that cannot be put in an
        allowed mode is not started: running it would break the admin's promise silently."""
        if self.agent_modes is None:  # an agent without modes: the policy applies per request
            return
        spec, options = self.session.spec, self.session.options
        policy = options.permission_policy
        available = self.available_ids()
        self.policy_mode = spec.policy_mode(policy, available)
        current: str | None = self.agent_modes.get("currentModeId")
        if self.policy_mode is None:
            if options.allowed_modes is None or current is None or current not in options.allowed_modes:
                raise AgentError(
                    f"{spec.display_name} offers no mode known to match the permission policy "
                    f"{policy!r} (its modes: {', '.join(map(str, available)) or 'none'}); an admin "
                    f"can declare them with mode_levels in c.AgentConfigManager.agents or list "
                    f"them in c.UserSessionManager.allowed_modes")
            self.policy_mode = current
        # new: the policy's mode; resumed: the mode it was in, if still allowed
        target = self.policy_mode if new or current is None or not self.allowed(current) else current
        self._publish()
        if current != target:
            log.info("Session %s: %s started in mode %r; switching it to %r (permission policy %r)",
                     self.session.id, spec.name, current, target, policy)
            try:
                await self._switch(target)
            except AgentError as e:
                raise AgentError(f"{spec.display_name} started in the mode {current!r} and "
                                 f"could not be put in {target!r}, which the permission policy "
                                 f"{policy!r} requires: {e}") from e
            self._record(target)

    async def set_by_user(self, mode_id: str) -> None:
        """The user's mode change, within what the admin allows."""
        s = self.session
        allowed = [m["id"] for m in (self.modes or {}).get("availableModes", [])]
        if mode_id not in self.available_ids():
            raise BadRequest(f"Unknown mode {mode_id!r}; available: {', '.join(allowed) or 'none'}")
        if not self.allowed(mode_id):
            raise ModeNotAllowed(
                f"Your admin does not allow the mode {mode_id!r} of {s.spec.display_name} "
                f"(permission policy {s.options.permission_policy!r}); allowed: "
                f"{', '.join(allowed) or 'none'}")
        try:
            await s.conn.set_session_mode(session_id=s.acp_session_id, mode_id=mode_id)
        except RequestError as e:
            raise s._request_error(e, "the mode change") from e
        self._record(mode_id)

    def agent_switched(self, mode_id: str) -> None:
        """The agent says it is now in ``mode_id``: if the admin does not allow that mode, put
        it back in the policy's mode (in a task: this runs inside the agent's notification)."""
        if self.agent_modes is None:
            return
        self._record(mode_id)
        if self.allowed(mode_id) or self.policy_mode is None:
            return
        if self._guard is None or self._guard.done():
            self._guard = asyncio.create_task(self._restore(), name=f"acp-mode-{self.session.id}")

    async def _restore(self) -> None:
        s = self.session
        target = self.policy_mode
        assert target is not None
        while s.conn is not None and not self.allowed(current := (self.agent_modes or {}).get(
                "currentModeId")):
            self.reverts += 1
            log.warning("Session %s (user %s): %s switched itself to the mode %r, which the "
                        "permission policy %r does not allow; switching it back to %r", s.id,
                        s.user, s.spec.name, current, s.options.permission_policy, target)
            try:
                if self.reverts > self.MAX_REVERTS:
                    raise AgentError(f"it switched itself to a forbidden mode {self.reverts} times")
                await self._switch(target)
            except Exception as e:
                reason = (f"{s.spec.display_name} switched itself to the mode {current!r}, which "
                          f"your admin does not allow, and could not be switched back ({e}); the "
                          f"agent was stopped")
                s._emit("error", {"message": reason, "mode": current, "restored": None})
                await s._halt(reason)
                return
            self._record(target)
            s._emit("session_update", {"sessionUpdate": "current_mode_update", "currentModeId": target})
            s._emit("error", {"message": f"{s.spec.display_name} switched itself to the mode "
                                         f"{current!r}, which your admin does not allow; it was "
                                         f"switched back to {target!r}.",
                              "mode": current, "restored": target})

    async def stop_guard(self, *, halting: bool) -> None:
        """End a running restore: cancelled, unless it is the one stopping the agent (awaited)."""
        guard = self._guard
        if guard is None or guard is asyncio.current_task():
            return
        if not halting:
            guard.cancel()
        with contextlib.suppress(BaseException):
            await guard
