"""Opening a session's ACP conversation at its agent: new, or restored (resume, load, fresh).

A session is restored when its agent is started again — a restart, or a resume after the
server stopped or the monitor culled it. The agent gets the conversation back the best way it
advertises: ``session/resume`` (nothing replayed: our history already shows the transcript),
else ``session/load`` (the agent replays the conversation; the session drops the replay, for the
same reason), else nothing: a new ACP session, with an ``error`` event (``context_lost``) saying
that the agent starts fresh and does not remember the earlier messages. ``session.restore``
says which happened (``resume``, ``load`` or ``fresh``; None for a new session).

Then the mode (``ModePolicy.apply``) and the model: a restored session gets back the model it
used, an agent on a model the admin does not allow is switched to an allowed one.

A part of ``AgentSession`` split out for size: it runs under the session's lifecycle lock and
uses the session's own helpers (``_bounded``, ``_set_modes``, ``_emit``, ``_replaying``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import AcpError, AgentError
from .model_choice import model_option

if TYPE_CHECKING:
    from .session import AgentSession

log = logging.getLogger("jupyter_acp.session")


def restore_methods(capabilities: dict[str, Any]) -> list[str]:
    """The ways an agent can restore a conversation, best first (``resume``: no replay)."""
    methods = []
    if "resume" in (capabilities.get("sessionCapabilities") or {}):
        methods.append("resume")
    if capabilities.get("loadSession"):
        methods.append("load")
    return methods


async def open_acp_session(session: AgentSession, *, restore: bool) -> None:
    """``session/new`` (or a restore, see the module's docstring), then mode and model."""
    conn, cwd = session.conn, session.sandbox.workspace_path if session.sandbox else ""
    preferred = (model_option(session.config_options) or {}).get("currentValue") if restore else None
    session.restore = None
    lost = None  # why the agent does not remember the conversation (None: nothing to lose)
    if restore and session.acp_session_id:
        methods = restore_methods(session.agent_capabilities)
        for how in methods:
            session._replaying = how == "load"
            try:
                if how == "resume":
                    call = conn.resume_session(cwd=cwd, session_id=session.acp_session_id,
                                               mcp_servers=session.mcp_servers)
                else:
                    call = conn.load_session(cwd=cwd, session_id=session.acp_session_id,
                                             mcp_servers=session.mcp_servers)
                resp = await session._bounded(call, f"session/{how}")
            except AgentError as e:
                if session._closed.is_set():
                    raise
                log.warning("session/%s failed for %s (%s)", how, session.id, e)
                lost = f"the agent could not restore the conversation ({e})"
                continue
            finally:
                session._replaying = False
            session._set_modes(getattr(resp, "modes", None), getattr(resp, "config_options", None))
            await session.mode_policy.apply(new=False)
            session.restore = how
            await _choose_model(session, preferred)
            return
        if not methods:
            lost = (f"{session.spec.display_name} cannot restore a conversation (no ACP "
                    "session/resume or session/load)")
    elif restore:
        lost = "the agent's session was never opened"
    if lost and session.turns:
        # the transcript above stays on screen, but the agent no longer knows it: say so
        session._emit("error", {"message": f"{lost[0].upper()}{lost[1:]}; it starts fresh and "
                                           "does not remember the earlier messages.",
                                "context_lost": True})
    resp = await session._bounded(conn.new_session(cwd=cwd, mcp_servers=session.mcp_servers), "session/new")
    session.acp_session_id = resp.session_id
    session._set_modes(resp.modes, getattr(resp, "config_options", None))
    await session.mode_policy.apply(new=True)
    session.restore = "fresh" if restore else None
    await _choose_model(session, preferred)


async def _choose_model(session: AgentSession, preferred: Any) -> None:
    """Back to the model used before the restore, or off a model the admin does not allow."""
    wanted = session.model_choice.wanted(session.agent_config_options, preferred)
    if wanted is None:
        return
    config_id, value = wanted
    try:
        await session.set_config_option(config_id, value, starting=True)
    except AcpError as e:
        log.warning("Session %s: could not switch the model to %r (%s)", session.id, value, e)
        if not session.model_choice.permits((model_option(session.agent_config_options) or {})
                                            .get("currentValue")):
            raise AgentError(f"The agent runs a model the admin does not allow and would not "
                             f"switch to {value!r}: {e}") from e
