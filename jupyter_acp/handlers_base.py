"""What the REST handlers (handlers.py) and the session socket (session_socket.py) share: the
user a request acts for, session lookup (live or suspended), the session model, and how long
an error message may be."""

from __future__ import annotations

import os
from typing import Any

from jupyter_server.extension.handler import ExtensionHandlerMixin

from .api_models import PromptWithImages
from .errors import SessionNotFound
from .manager import UserSessionManager
from .prompt_content import Image
from .session import AgentSession
from .session_store import StoredSession

AUTH_RESOURCE = "acp"

#: The longest error message an answer carries: a longer one (quoting a 4 KiB cwd, an id of the
#: URL) is cut in the middle, keeping its start and its explanation at the end.
MAX_ERROR_CHARS = 1000


def shorten(message: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``message`` within ``limit`` characters, cut in the middle."""
    if len(message) <= limit:
        return message
    marker = " [...] "
    head = (limit - len(marker)) * 2 // 3
    return message[:head] + marker + message[len(message) - (limit - len(marker) - head):]


def images_of(body: PromptWithImages) -> list[Image]:
    """A prompt's images as ``prompt_content`` takes them."""
    return [{"mime_type": i.mime_type, "data": i.data} for i in body.images or []]


class AcpMixin(ExtensionHandlerMixin):
    """What REST and WebSocket handlers share: the manager, the user, session lookup."""

    auth_resource = AUTH_RESOURCE
    settings: dict[str, Any]
    current_user: Any

    @property
    def manager(self) -> UserSessionManager:
        return self.settings["acp_manager"]

    @property
    def username(self) -> str:
        """Who the request acts for: the server's owner, or the Jupyter identity (see
        ``AcpExtension.identity``)."""
        return self.settings.get("acp_owner") or self.current_user.username

    def user_session(self, session_id: str) -> AgentSession:
        return self.manager.get_user_session(self.username, session_id)

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """Path and query arguments as text, bytes that are not UTF-8 replaced (U+FFFD) instead
        of refused: tornado's refusal is an HTTPError raised wherever the argument is read, which
        for a socket's ``?since=`` is after the upgrade (the socket was dropped without a close
        frame). A replaced id is an unknown session (404), a replaced ``since`` not a number (400)."""
        return value.decode("utf-8", errors="replace")

    def session_model(self, session: AgentSession) -> dict[str, Any]:
        return self._with_cwd(session.stats())

    async def stored_model(self, stored: StoredSession) -> dict[str, Any]:
        """A suspended session's model (session_model.py): same shape, ``state: suspended``."""
        return self._with_cwd(await self.manager.stored_model(stored))

    def _with_cwd(self, model: dict[str, Any]) -> dict[str, Any]:
        root = os.path.realpath(self.manager.workspace_root(model["user"]))
        rel = os.path.relpath(os.path.realpath(model["workspace"]), root)
        model["cwd"] = "" if rel == "." else rel
        return model

    async def any_session(self, session_id: str) -> AgentSession | StoredSession:
        """The user's live session, else their suspended one (``SessionNotFound``: neither)."""
        try:
            return self.user_session(session_id)
        except SessionNotFound:
            pass
        try:
            return await self.manager.get_suspended(self.username, session_id)
        except SessionNotFound:  # resumed while we looked it up: live now
            return self.user_session(session_id)

    async def any_model(self, session_id: str) -> dict[str, Any]:
        found = await self.any_session(session_id)
        if isinstance(found, AgentSession):
            return self.session_model(found)
        return await self.stored_model(found)
