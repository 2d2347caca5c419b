"""The session model of the API (docs/api.md): one shape for a live session and a stored one.

``GET /api/acp/sessions`` lists both: the live sessions of this server and the user's suspended
ones (``session_store.py``: stopped with the server, culled, or closed, and resumable). A
client tells them apart by ``state`` (``suspended``) and needs no other code path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model_choice import ModelChoice
from .prompt_content import prompt_capabilities

if TYPE_CHECKING:
    from .session import AgentSession
    from .session_store import StoredSession

TOKEN_KEYS = ("input_tokens", "output_tokens", "thought_tokens", "cached_read_tokens", "total_tokens")


def live_model(session: AgentSession) -> dict[str, Any]:
    """A live session's model (its stats: from memory, never waiting for the database)."""
    totals = session.ledger.live_totals(session)
    earlier = session.earlier_usage
    limits = session.sandbox_spec.limits
    sandbox = session.sandbox
    return {
        "id": session.id,
        "user": session.user,
        "agent": session.spec.name,
        "agent_display_name": session.spec.display_name,
        "demo": session.spec.demo,
        "state": session.state.value,
        "error": session.error,
        "created": session.created,
        "last_activity": session.last_activity,
        "turns": session.turns,
        "tokens": {k: totals[k] + int(earlier.get(k) or 0) for k in TOKEN_KEYS},
        "cost": totals["cost"] + float(earlier.get("cost") or 0.0),
        "currency": session.usage.currency,
        "context": {"used": session.usage.context_used, "size": session.usage.context_size},
        "workspace": str(session.sandbox_spec.workspace),
        "sandbox": sandbox.kind if sandbox else None,
        "limits": {"mem_limit": limits.mem_limit, "cpu_limit": limits.cpu_limit,
                   "pids_limit": limits.pids_limit, "disk_limit": limits.disk_limit,
                   "network": limits.network,
                   "enforced": sandbox.limits_enforced() if sandbox else {}},
        "modes": session.modes,
        "config_options": session.config_options,
        "models": session.models,
        "title": session.title,
        "resumable": session.persisted,
        "restore": session.restore,
        "available_commands": session.available_commands,
        "prompt_capabilities": prompt_capabilities(session.agent_capabilities.get("promptCapabilities")),
        "agent_info": session.agent_info,
        "acp_session_id": session.acp_session_id,
        "pending_permissions": [p.public() for p in session.pending.values()],
        "last_seq": session.history.seq,
    }


def stored_model(stored: StoredSession, totals: dict[str, Any], *, demo: bool = False,
                 allowed_models: list[str] | None = None) -> dict[str, Any]:
    """A suspended session's model: what was stored, and its usage from the ledger."""
    meta = stored.meta
    choice = ModelChoice(allowed_models)
    options = choice.narrow([o for o in meta.get("config_options") or [] if isinstance(o, dict)])
    return {
        "id": stored.id,
        "user": stored.user,
        "agent": stored.agent,
        "agent_display_name": meta.get("display_name") or stored.agent,
        "demo": demo,
        "state": "suspended",
        "error": None,
        "created": stored.created,
        "last_activity": stored.last_activity,
        "turns": stored.turns,
        "tokens": {k: int(totals.get(k) or 0) for k in TOKEN_KEYS},
        "cost": float(totals.get("cost") or 0.0),
        "currency": None,
        "context": {"used": None, "size": None},
        "workspace": stored.cwd,
        "sandbox": None,
        "limits": {},
        "modes": None,
        "config_options": options,
        "models": choice.model(options),
        "title": stored.title,
        "resumable": True,
        "restore": None,
        "available_commands": meta.get("available_commands") or [],
        "prompt_capabilities": prompt_capabilities(meta.get("prompt_capabilities")),
        "agent_info": meta.get("agent_info") or {},
        "acp_session_id": stored.acp_session_id,
        "pending_permissions": [],
        "last_seq": stored.last_seq,
    }
