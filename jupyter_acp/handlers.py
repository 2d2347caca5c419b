"""REST and WebSocket handlers of ``{base_url}api/acp/`` (the contract: docs/api.md, openapi.yaml).

Every handler works for the Jupyter identity of the request (``current_user.username``) and only
sees that user's sessions: another user's session id answers 404 exactly like an unknown one (the
socket: close code 4404, same reason), so ids leak nothing. ``AcpError``s become JSON errors
with their status and a message written for the user; anything else is a logged 500 without
details. Request bodies and client frames are the pydantic models of ``api_models``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import Callable
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from .api_models import MAX_CAPABILITIES as MAX_CAPABILITIES
from .api_models import MAX_CREDENTIAL_BYTES as MAX_CREDENTIAL_BYTES
from .api_models import MAX_ID_CHARS as MAX_ID_CHARS
from .api_models import MAX_SEQ as MAX_SEQ
from .api_models import (
    ConfigChange,
    M,
    ModeChange,
    ModelChange,
    NewSession,
    PermissionAnswer,
    PromptWithImages,
    Resume,
    check_choice,
    parse,
    parse_since,
)
from .errors import AcpError, BadRequest
from .handlers_base import AUTH_RESOURCE as AUTH_RESOURCE
from .handlers_base import MAX_ERROR_CHARS as MAX_ERROR_CHARS
from .handlers_base import AcpMixin, images_of, shorten
from .prompt_content import complete_paths
from .session import AgentSession
from .session_socket import GONE_REASON as GONE_REASON
from .session_socket import STOPPED_REASON as STOPPED_REASON
from .session_socket import SessionSocket
from .usage import utc_day

SESSION_ID = r"(?P<session_id>[^/]+)"
# (the bounds of a request's fields are api_models': the MAX_* imported above, for callers here)


def api_method(method: Callable[..., Any]) -> Callable[..., Any]:
    """What every REST method is (``AcpHandler`` applies it to each): refused unless logged in
    (403) and authorized for ``acp``, and its ``AcpError`` an HTTP error of the same status and
    message (logged by tornado as a 4xx/5xx, not as an uncaught exception)."""

    @functools.wraps(method)
    async def wrapper(self: AcpHandler, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except AcpError as e:
            # (no args: "%" stays as is; short: the message may quote the input, and is logged)
            raise web.HTTPError(e.status, shorten(e.message), reason=None) from None

    return web.authenticated(authorized(wrapper))


class AcpHandler(AcpMixin, APIHandler):
    """Base of the REST handlers: JSON in (``body``: a model of api_models), JSON out; each HTTP
    method a subclass defines is wrapped in ``api_method``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("get", "post", "put", "patch", "delete"):
            if name in vars(cls):
                setattr(cls, name, api_method(vars(cls)[name]))

    def body(self, model: type[M], required: bool = True) -> M:
        """The request's JSON object as ``model`` (a ``BadRequest`` saying what is wrong)."""
        return parse(model, self.json_body(required),
                     max_message_bytes=self.settings.get("acp_max_message_bytes"))

    def json_body(self, required: bool = True) -> dict[str, Any]:
        cap = self.settings.get("acp_max_request_bytes") or 0
        body = self.request.body or b""
        if cap and len(body) > cap:
            raise web.HTTPError(413, f"The request body is larger than {cap} bytes")
        if not body.strip():
            if required:
                raise web.HTTPError(400, "A JSON object is required in the request body")
            return {}
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):  # (RecursionError: nested deeper than the parser goes)
            raise web.HTTPError(400, "The request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "The request body must be a JSON object")
        return data

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """JSON errors like APIHandler's, with the message as written: tornado's ``log_message``
        doubles every "%" of an HTTPError without args (``get_message`` does not)."""
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and (message := exc.get_message()):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"message": shorten(message), "reason": exc.reason}))
            return
        super().write_error(status_code, **kwargs)

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(data, default=str))


# -- REST -----------------------------------------------------------------------------------------
class AgentsHandler(AcpHandler):
    async def get(self) -> None:
        agents = self.manager.agents
        default = None
        with contextlib.suppress(AcpError):
            default = agents.get_available(None).name
        out = []
        for spec, ok, why in agents.list_agents():
            if ok and not spec.url:
                try:
                    self.manager.backend_for(spec)
                except AcpError as e:
                    ok, why = False, e.message
            out.append({"name": spec.name, "display_name": spec.display_name,
                        "description": spec.description, "demo": spec.demo,
                        "capabilities": list(spec.capabilities), "available": ok,
                        "reason": "" if ok else why, "default": spec.name == default,
                        "source": spec.source})
        self.write_json({"agents": out, "default": default, "backends": self.manager.backends()})


class SessionsHandler(AcpHandler):
    async def get(self) -> None:
        """The user's live sessions, then their suspended ones (most recently used first)."""
        live = [self.session_model(s) for s in self.manager.get_user_sessions(self.username)]
        suspended = [await self.stored_model(s) for s in await self.manager.suspended_sessions(self.username)]
        self.write_json({"sessions": live + suspended})

    async def post(self) -> None:
        body = self.body(NewSession, required=False)
        session = await self.manager.create_user_session(
            self.username, body.agent, cwd=body.cwd, credentials=body.credentials, new=body.new,
            capabilities=body.capabilities)
        self.write_json(self.session_model(session), status=201)


class SessionHandler(AcpHandler):
    async def get(self, session_id: str) -> None:
        self.write_json(await self.any_model(session_id))

    async def delete(self, session_id: str) -> None:
        await self.manager.delete_user_session(self.username, session_id)
        self.set_status(204)
        self.finish()


class ResumeHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        await self.any_session(session_id)  # (another user's: 404 whatever the body)
        body = self.body(Resume, required=False)
        session = await self.manager.resume_user_session(self.username, session_id, body.credentials)
        self.write_json(self.session_model(session))


class CloseHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        await self.manager.close_user_session(self.username, session_id)
        self.write_json(await self.any_model(session_id))


class FilesHandler(AcpHandler):
    async def get(self, session_id: str) -> None:
        found = await self.any_session(session_id)
        workspace = str(found.sandbox_spec.workspace if isinstance(found, AgentSession)
                        else self.manager.stored_workspace(self.username, found))
        prefix = self.get_argument("prefix", "", strip=False)
        self.write_json({"files": await asyncio.to_thread(complete_paths, workspace, prefix)})


class ModelHandler(AcpHandler):
    def models(self, session: AgentSession) -> dict[str, Any]:
        models = session.models
        if models is None:
            raise BadRequest(f"{session.spec.display_name} offers no model choice")
        return models

    async def get(self, session_id: str) -> None:
        self.write_json(self.models(self.user_session(session_id)))

    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        models = self.models(session)
        value = self.body(ModelChange).model
        known = [m["value"] for m in models["available"]]
        if value not in known:
            raise BadRequest(f"Unknown model {shorten(value, 80)!r}; choose one of: "
                             f"{', '.join(map(str, known))}")
        await session.set_config_option(models["config_id"], value)
        self.write_json(self.models(session))


class RestartHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        session = await self.manager.restart_user_session(self.username, session_id)
        self.write_json(self.session_model(session))


class MessagesHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        body = self.body(PromptWithImages)
        result = await session.prompt(body.message, images_of(body))
        self.write_json(result.to_dict())


class CancelHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        cancelled = await self.user_session(session_id).cancel()
        self.write_json({"cancelled": cancelled})


class HistoryHandler(AcpHandler):
    async def get(self, session_id: str) -> None:
        found = await self.any_session(session_id)
        since = parse_since(self.get_argument("since", None, strip=False))
        if isinstance(found, AgentSession):
            payloads, last = found.payloads(since), found.last_seq
        else:  # a suspended session: its stored history
            payloads = [p for _, p in await self.manager.store.events(found.id, since)]
            last = found.last_seq
        # the events' JSON is kept as sent: splice it in rather than parse and re-encode it
        self.set_header("Content-Type", "application/json")
        self.finish(f'{{"events": [{",".join(payloads)}], "last_seq": {last}}}')


class PermissionHandler(AcpHandler):
    async def post(self, session_id: str, request_id: str) -> None:
        session = self.user_session(session_id)
        session.answer_permission(request_id, self.body(PermissionAnswer, required=False).option_id)
        self.set_status(204)
        self.finish()


class NotebookUndoHandler(AcpHandler):
    """Undo one of the agent's notebook edits (JupyterLab's own undo leaves another client's
    edit alone, so this is how the user takes an agent's edit back)."""

    async def post(self, session_id: str, edit_id: str) -> None:
        session = self.user_session(session_id)
        if session.notebooks is None:
            raise BadRequest("This session has no notebook tools (c.NotebookTools.enabled)")
        record = await session.notebooks.undo(edit_id)
        self.write_json({"undone": edit_id, "record": record})


class ModeHandler(AcpHandler):
    def mode_model(self, session: AgentSession) -> dict[str, Any]:
        modes = session.modes or {}
        return {"current": modes.get("currentModeId"), "available": modes.get("availableModes", [])}

    async def get(self, session_id: str) -> None:
        self.write_json(self.mode_model(self.user_session(session_id)))

    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        await session.set_mode(self.body(ModeChange).mode_id)
        self.write_json(self.mode_model(session))


class ConfigHandler(AcpHandler):
    async def post(self, session_id: str) -> None:
        session = self.user_session(session_id)
        body = self.body(ConfigChange)
        check_choice(session.config_options, body.config_id, body.value)
        await session.set_config_option(body.config_id, body.value)
        self.write_json({"config_options": session.config_options})


class UsageHandler(AcpHandler):
    def is_admin(self) -> bool:
        if self.username in self.settings.get("acp_admin_users", set()):
            return True
        hub_user = getattr(self.current_user, "hub_user", None)  # JupyterHub's identity provider
        if not isinstance(hub_user, dict):
            return False
        scopes = set(hub_user.get("scopes") or ())
        return bool(hub_user.get("admin")) or bool(scopes & self.settings.get("acp_admin_scopes", set()))

    async def get(self) -> None:
        ledger = self.manager.ledger
        everyone = self.get_argument("all", "") not in ("", "0", "false")
        user = self.get_argument("user", None) or self.username
        if (everyone or user != self.username) and not self.is_admin():
            raise web.HTTPError(403, "Only an admin may read other users' usage")
        who = None if everyone else user
        if self.manager.hub is not None:  # hub mode: the service's ledger is the record
            self.write_json(await self.manager.hub.usage_summary(who))
            return
        today = utc_day()
        # each query in the ledger's threads: a slow database delays this answer, not the server
        # (one that cannot be read is a 503, LedgerUnavailable). ``used_today`` and ``total``
        # count the usage waiting in the ledger's spool too; the per-day and per-session rows
        # are the database's.
        per_day = await ledger.aper_day(who)
        cap = ledger.max_tokens_per_user_per_day
        used = await ledger.atokens_today(user) if who is not None else 0
        total = await ledger.auser_totals(who) if who is not None else _sum(per_day)
        per_session = await ledger.aper_session(who)
        self.write_json({
            "user": who,
            "today": {"day": today, "total_tokens": 0, **_sum([d for d in per_day if d["day"] == today])},
            "quota": {"max_tokens_per_day": cap, "used_today": used,
                      "remaining": max(cap - used, 0) if cap and who is not None else None},
            "total": total,
            "per_session": per_session,
            "per_day": per_day,
        })


def _sum(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in rows:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    return out


def handlers() -> list[tuple[str, type]]:
    """The routes, relative to ``{base_url}api/acp``."""
    return [
        ("agents", AgentsHandler),
        ("sessions", SessionsHandler),
        (f"sessions/{SESSION_ID}", SessionHandler),
        (f"sessions/{SESSION_ID}/restart", RestartHandler),
        (f"sessions/{SESSION_ID}/resume", ResumeHandler),
        (f"sessions/{SESSION_ID}/close", CloseHandler),
        (f"sessions/{SESSION_ID}/files", FilesHandler),
        (f"sessions/{SESSION_ID}/model", ModelHandler),
        (f"sessions/{SESSION_ID}/messages", MessagesHandler),
        (f"sessions/{SESSION_ID}/cancel", CancelHandler),
        (f"sessions/{SESSION_ID}/history", HistoryHandler),
        (f"sessions/{SESSION_ID}/permissions/(?P<request_id>[^/]+)", PermissionHandler),
        (f"sessions/{SESSION_ID}/notebook-edits/(?P<edit_id>[^/]+)/undo", NotebookUndoHandler),
        (f"sessions/{SESSION_ID}/mode", ModeHandler),
        (f"sessions/{SESSION_ID}/config", ConfigHandler),
        (f"sessions/{SESSION_ID}/ws", SessionSocket),
        ("usage", UsageHandler),
    ]
