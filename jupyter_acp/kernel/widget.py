"""``ChatPanel``: an agent chat inside a notebook output (anywidget, i.e. ipywidgets).

The kernel side talks to the server API with the kernel's own credentials (``api.py``), not the
browser: that works the same in JupyterLab, Notebook 7 and VS Code (whose webviews have no
Jupyter cookie), and keeps a single client implementation. A turn streams on a background thread
(the kernel stays free for the widget's messages, e.g. a permission answer or Stop), and only
new text goes to the front end as custom messages (``delta``), never the whole transcript —
except once, as a ``snapshot``, when a view is (re)rendered.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from .api import AcpApi, AcpApiError, SessionGone, attachment_text

ESM = Path(__file__).with_name("chat_panel.js")


class ChatPanel(anywidget.AnyWidget):
    """``ChatPanel(agent="demo")`` or ``ChatPanel(session_id=...)``; display it in a cell."""

    _esm = ESM
    agent = traitlets.Unicode("").tag(sync=True)
    session_id = traitlets.Unicode("").tag(sync=True)
    status = traitlets.Unicode("starting").tag(sync=True)
    tokens = traitlets.Int(0).tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    pending: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    """Permission requests waiting for an answer: ``{request_id, title, options}``."""

    def __init__(self, agent: str | None = None, session_id: str | None = None, *,
                 api: AcpApi | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api = api or AcpApi()
        #: The conversation: ``{"role": "user" | "agent" | "tool", "text", ...}`` (kernel side only).
        self.transcript: list[dict[str, Any]] = []
        self._thread: threading.Thread | None = None
        self.on_msg(self._on_front_end)
        try:
            session = self.api.session(session_id) if session_id else self.api.start(agent)
            if session.get("state") == "suspended":  # (a panel is opened to go on with it)
                session = self.api.resume(session["id"])
        except AcpApiError as e:
            self.status, self.error = "error", str(e)
            return
        self.session_id, self.agent = session["id"], session["agent_display_name"]
        self.tokens = session["tokens"]["total_tokens"]
        self.status = "ready" if session["state"] == "ready" else session["state"]

    # -- from the front end --------------------------------------------------------------------
    def _on_front_end(self, _widget: Any, content: dict[str, Any], _buffers: Any) -> None:
        kind = content.get("type")
        if kind == "hello":
            self.send({"type": "snapshot", "messages": self.transcript})
        elif kind == "send":
            self.send_prompt(str(content.get("text", "")))
        elif kind == "cancel":
            self.cancel()
        elif kind == "permission":
            self.answer(str(content.get("request_id")), content.get("option_id"))

    # -- actions (also usable from Python) -----------------------------------------------------
    def send_prompt(self, text: str, wait: bool = False) -> None:
        """Start a turn with ``text``; ``wait`` blocks until it ends (scripts and tests)."""
        if not text.strip() or not self.session_id:
            return
        if self._thread is not None and self._thread.is_alive():
            self._fail("The agent is still answering; wait or press Stop")
            return
        self.transcript.append({"role": "user", "text": text})
        self.send({"type": "user", "text": text})
        self.status, self.error = "busy", ""
        self._thread = threading.Thread(target=self._turn, args=(text,), name="acp-chat-turn", daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()

    def answer(self, request_id: str, option_id: str | None) -> None:
        try:
            self.api.answer(self.session_id, request_id, option_id)
        except AcpApiError as e:
            self._fail(str(e))
        self.pending = [p for p in self.pending if p["request_id"] != request_id]

    def cancel(self) -> None:
        try:
            self.api.cancel(self.session_id)
        except AcpApiError as e:
            self._fail(str(e))

    # -- the turn, on a background thread ------------------------------------------------------
    def _turn(self, text: str) -> None:
        reply: dict[str, Any] = {"role": "agent", "text": ""}
        self.transcript.append(reply)
        try:
            # a session suspended since the panel opened (culled when idle) takes no prompt:
            # the person typing into it meant to go on, so it is resumed first
            if self.api.session(self.session_id).get("state") == "suspended":
                self.api.resume(self.session_id)
            result = self.api.stream(self.session_id, text, lambda frame: self._event(frame, reply))
        except AcpApiError as e:
            self._fail(str(e))
            self.status = "stopped" if isinstance(e, SessionGone) else "ready"  # (gone: final)
            return
        self.send({"type": "done", "stop_reason": result.get("stop_reason"), "usage": result.get("usage")})
        try:
            self.tokens = self.api.session(self.session_id)["tokens"]["total_tokens"]
        except AcpApiError:
            self.tokens += int((result.get("usage") or {}).get("total_tokens", 0))
        if result.get("error"):
            self._fail(result["error"])
        self.pending = []
        self.status = "error" if result.get("error") else "ready"

    def _event(self, frame: dict[str, Any], reply: dict[str, Any]) -> None:
        data = frame.get("data") or {}
        kind = frame["type"]
        if kind == "chat:message" and data.get("attachments"):
            # what went with the prompt (@file mentions): under the user's message
            lines = [attachment_text(a) for a in data["attachments"] if isinstance(a, dict)]
            user = next((m for m in reversed(self.transcript) if m["role"] == "user"), None)
            if user is not None:
                user["attachments"] = lines
            self.send({"type": "attachments", "lines": lines})
        elif kind == "session/update":
            update = data.get("sessionUpdate")
            content = data.get("content")
            if (update == "agent_message_chunk" and isinstance(content, dict)
                    and content.get("type") == "text"):
                reply["text"] += content["text"]
                self.send({"type": "delta", "text": content["text"]})
            elif update in ("tool_call", "tool_call_update"):
                self._tool(data)
        elif kind == "permission:request":
            title = (data.get("tool_call") or {}).get("title") or "a tool call"
            self.pending = [*self.pending, {"request_id": data["request_id"], "title": title,
                                            "options": data.get("options", [])}]
        elif kind == "permission:resolved":
            self.pending = [p for p in self.pending if p["request_id"] != data.get("request_id")]

    def _tool(self, data: dict[str, Any]) -> None:
        tool_id = data.get("toolCallId", "?")
        card = next((m for m in self.transcript if m.get("id") == tool_id), None)
        if card is None:
            card = {"role": "tool", "id": tool_id, "title": "tool", "status": "pending", "diffs": []}
            self.transcript.insert(len(self.transcript) - 1, card)  # before the reply it belongs to
        card["title"] = data.get("title") or card["title"]
        card["status"] = data.get("status") or card["status"]
        for item in data.get("content") or []:
            if isinstance(item, dict) and item.get("type") == "diff":
                card["diffs"].append({"path": item.get("path"), "oldText": item.get("oldText"),
                                      "newText": item.get("newText")})
        self.send({"type": "tool", **card})

    def _fail(self, message: str) -> None:
        self.error = message
        self.send({"type": "error", "message": message})
