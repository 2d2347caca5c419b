"""The error hierarchy of jupyter-acp.

Every failure a user can cause or meet is one of these, each carrying the HTTP status the REST
API answers with and a message written for the person who will read it (never a stack trace,
never a credential). Handlers turn them into JSON errors; the kernel magics print one line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agents import AgentSpec


class AcpError(Exception):
    """Base class: ``status`` is the HTTP status the API answers with."""

    status: int = 500

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class BadRequest(AcpError):
    """The request itself is malformed (missing field, wrong type, too large)."""

    status = 400


class SessionNotFound(AcpError):
    """No session of this user has that id.

    Another user's session is reported the same way on purpose: existence is not leaked.
    """

    status = 404

    def __init__(self, session_id: str) -> None:
        super().__init__(f"No agent session with id {session_id!r}")
        self.session_id = session_id


class AgentNotFound(AcpError):
    """No configured agent has that name, or none matches the requested capabilities."""

    status = 404


class AgentUnavailable(AcpError):
    """The agent is configured but cannot run here (executable missing, sandbox refused)."""

    status = 422


class SessionBusy(AcpError):
    """A prompt turn is already running in this session."""

    status = 409


class SessionNotReady(AcpError):
    """The session is starting, stopped or in error and cannot take this operation."""

    status = 409


class TooManySessions(AcpError):
    """The user already has ``max_sessions_per_user`` live sessions."""

    status = 429


class QuotaExceeded(AcpError):
    """The user's token quota for the day is used up."""

    status = 429


class SandboxError(AcpError):
    """The sandbox could not be created, started or kept alive."""

    status = 500


class AgentError(AcpError):
    """The agent process failed: crashed, timed out, or answered with a protocol error."""

    status = 502


class AuthenticationRequired(AgentError):
    """The agent asked for credentials it did not get (ACP error -32000)."""

    status = 401


class PermissionNotFound(AcpError):
    """No pending permission request has that id."""

    status = 404


class PathOutsideWorkspace(AcpError):
    """An agent asked to read or write a file outside its session workspace."""

    status = 403


class ModeNotAllowed(AcpError):
    """The agent mode asked for is one the admin's permission policy does not allow."""

    status = 403


class ModelNotAllowed(AcpError):
    """The model asked for is not in the admin's ``allowed_models`` for this agent."""

    status = 403


class HubUnavailable(AcpError):
    """Hub mode: the JupyterHub service of jupyter-acp cannot be reached, or answered with a
    server error. Agents that need it (an LLM through the service) do not start meanwhile."""

    status = 503


class HubRefused(AcpError):
    """Hub mode: the JupyterHub service refused this server's hub token (a missing scope, an
    expired token): an admin's configuration problem, not the user's request."""

    status = 403


class UserCredentialsRefused(AcpError):
    """Hub mode: a user's own ``api_key`` / ``base_url`` for an agent the hub service meters
    (``c.AcpExtension.hub_allow_user_credentials`` is off)."""

    status = 403


def agent_refusal(spec: AgentSpec, code: int, data: Any, text: str, what: str) -> AgentError:
    """What to tell the user when the agent answers ``what`` with a JSON-RPC error.

    ACP's -32000 is "authentication required": say which credential fields to pass and which
    setting an admin uses, never just the agent's terse message."""
    if code == -32000:
        env = spec.credential_env
        action = {"session/new": "start a session", "session/load": "resume the session",
                  "initialize": "start"}.get(what, what)
        extra = [k for k in ("base_url", "model") if k in env]
        also = f" (and {', '.join(map(repr, extra))} for another endpoint)" if extra else ""
        reads = ", ".join(env[k] for k in ("api_key", *extra) if k in env)
        return AuthenticationRequired(
            f"{spec.display_name} needs an API key to {action}: pass 'api_key'{also} in the "
            f"credentials when you start the session, or ask your admin to set "
            f"c.AgentConfigManager.credentials[{spec.name!r}]"
            + (f" (the agent reads {reads})" if reads else "")
        )
    detail = data.get("details") if isinstance(data, dict) else None
    return AgentError(f"The agent refused {what}: {text}" + (f" ({detail})" if detail else ""))
