"""``ChatPanel``: an agent chat inside a notebook output (ipywidgets).

The kernel side talks to the server API with the kernel's own credentials (``api.py``), not the
browser: that works the same in JupyterLab, Notebook 7 and VS Code (whose webviews have no
Jupyter cookie), and keeps a single client implementation. A turn streams on a background thread
(the kernel stays free for the widget's messages, e.g. a permission answer or Stop).

The panel is a ``VBox`` of two parts:

- the log: one ``ipywidgets.Output`` per transcript item (``transcript.py``), holding that item's
  Markdown (``markdown.py``) as a ``display_data`` output. The front end renders it with its own
  renderer — JupyterLab's and Notebook 7's rendermime (sanitized, LaTeX, highlighted code), VS
  Code's Markdown renderer — so the panel looks like the notebook around it, and nbclient saves
  it in the notebook's widget state. Only changed items are re-sent; the one that streams at
  most ``STREAM_INTERVAL`` apart. Outputs are set by assigning the trait (never ``with out:``,
  which captures by the executing cell's message, wrong from the turn's thread).
- ``ChatControls`` (anywidget, ``chat_panel.js``) under it: header, status, tokens, Stop, the
  permission requests and Undo buttons, the input. Plain text only.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anywidget
import ipywidgets  # type: ignore[import-untyped]
import traitlets

from .api import AcpApi, AcpApiError, SessionGone, notebook_edit_text
from .markdown import item_markdown, markdown_bundle
from .transcript import Item, Throttle, Transcript

ESM = Path(__file__).with_name("chat_panel.js")
#: Seconds between two redraws of the item that streams (the agent's reply).
STREAM_INTERVAL = 0.1
#: The most items of a session's earlier history a panel opened on it shows.
HISTORY_ITEMS = 200
#: The most Undo buttons shown (the latest edits).
UNDO_BUTTONS = 5


class ChatControls(anywidget.AnyWidget):
    """The panel's header, permission requests, Undo buttons and input (``chat_panel.js``)."""

    _esm = ESM
    agent = traitlets.Unicode("").tag(sync=True)
    session_id = traitlets.Unicode("").tag(sync=True)
    status = traitlets.Unicode("starting").tag(sync=True)
    tokens = traitlets.Int(0).tag(sync=True)
    error = traitlets.Unicode("").tag(sync=True)
    pending: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    """Permission requests waiting for an answer: ``{request_id, title, options, code}`` (``code``:
    what a notebook run would execute, shown before the buttons; None for other requests)."""
    edits: traitlets.List[dict[str, Any]] = traitlets.List().tag(sync=True)
    """The agent's latest notebook edits that can be undone: ``{edit_id, line}``."""


def _state(name: str) -> property:
    """A ``ChatPanel`` attribute that is the controls' synced trait of that name."""
    return property(lambda self: getattr(self.controls, name),
                    lambda self, value: setattr(self.controls, name, value))


class ChatPanel(ipywidgets.VBox):
    """``ChatPanel(agent="demo")`` or ``ChatPanel(session_id=...)``; display it in a cell."""

    agent = _state("agent")
    session_id = _state("session_id")
    status = _state("status")
    tokens = _state("tokens")
    error = _state("error")
    pending = _state("pending")

    def __init__(self, agent: str | None = None, session_id: str | None = None, *,
                 api: AcpApi | None = None, **kwargs: Any) -> None:
        self.controls = ChatControls()
        self.log_box = ipywidgets.VBox(layout=ipywidgets.Layout(max_height="480px", overflow="auto"))
        self.log_box.add_class("acp-chat-log")
        # the conversation above, the header, requests and input below it (where the eye is
        # while typing), as in a chat
        super().__init__(children=[self.log_box, self.controls], **kwargs)
        self.add_class("acp-chat-panel")
        self.api = api or AcpApi()
        #: The conversation (``transcript.messages()`` gives it as a list of dicts).
        self.transcript = Transcript()
        self._outputs: dict[str, ipywidgets.Output] = {}
        self._throttle = Throttle(STREAM_INTERVAL)
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self._thread: threading.Thread | None = None
        self.controls.on_msg(self._on_front_end)
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
        self._show_history()

    # -- from the front end --------------------------------------------------------------------
    def _on_front_end(self, _widget: Any, content: dict[str, Any], _buffers: Any) -> None:
        kind = content.get("type")
        if kind == "send":
            self.send_prompt(str(content.get("text", "")))
        elif kind == "cancel":
            self.cancel()
        elif kind == "permission":
            self.answer(str(content.get("request_id")), content.get("option_id"))
        elif kind == "undo":
            self.undo(str(content.get("edit_id")))

    # -- actions (also usable from Python) -----------------------------------------------------
    def send_prompt(self, text: str, wait: bool = False) -> None:
        """Start a turn with ``text``; ``wait`` blocks until it ends (scripts and tests)."""
        if not text.strip() or not self.session_id:
            return
        if self._thread is not None and self._thread.is_alive():
            self._fail("The agent is still answering; wait or press Stop")
            return
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

    def undo(self, edit_id: str) -> None:
        """Take back one of the agent's notebook edits (as ``%acp undo``); the card says so."""
        try:
            answer = self.api.undo_edit(self.session_id, edit_id)
        except AcpApiError as e:
            self._fail(str(e))
            self._show_edits()  # (its button back)
            return
        record = answer.get("record") if isinstance(answer, dict) else None
        if isinstance(record, dict):
            with self._lock:
                self._draw(self.transcript.apply_edit(record))
                self._show_edits()

    # -- the turn, on a background thread ------------------------------------------------------
    def _turn(self, text: str) -> None:
        try:
            # a session suspended since the panel opened (culled when idle) takes no prompt:
            # the person typing into it meant to go on, so it is resumed first
            if self.api.session(self.session_id).get("state") == "suspended":
                self.api.resume(self.session_id)
            result = self.api.stream(self.session_id, text, self._event)
        except AcpApiError as e:
            self._flush()
            self._fail(str(e))
            self.status = "stopped" if isinstance(e, SessionGone) else "ready"  # (gone: final)
            return
        self._flush()
        try:
            self.tokens = self.api.session(self.session_id)["tokens"]["total_tokens"]
        except AcpApiError:
            self.tokens += int((result.get("usage") or {}).get("total_tokens", 0))
        if result.get("error"):
            self._fail(result["error"])
        self.pending = []
        self.status = "error" if result.get("error") else "ready"

    def _event(self, frame: dict[str, Any]) -> None:
        with self._lock:
            changed = self.transcript.apply(frame)
            self._draw(self._throttle.take(changed))
            if frame.get("type") in ("permission:request", "permission:resolved"):
                self._show_pending()
            if frame.get("type") == "notebook:edit":
                self._show_edits()
            if self._throttle.waiting and self._timer is None:
                # what was held back is drawn even if no other event comes meanwhile
                self._timer = threading.Timer(STREAM_INTERVAL, self._due)
                self._timer.daemon = True
                self._timer.start()

    def _due(self) -> None:
        with self._lock:
            self._timer = None
            self._draw(self._throttle.take([]))

    def _flush(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._draw(self._throttle.flush())

    # -- drawing -------------------------------------------------------------------------------
    def _show_history(self) -> None:
        """The session's conversation so far (a panel opened on a session that has one)."""
        try:
            events = self.api.history(self.session_id).get("events") or []
        except AcpApiError:
            return
        with self._lock:
            self.transcript.apply_all(events)
            self._draw(self.transcript.items[-HISTORY_ITEMS:], scroll=False)
            self._show_pending()
            self._show_edits()

    def _draw(self, items: list[Item], scroll: bool = True) -> None:
        """Set the outputs of these items (new: a new Output at the end; removed: gone)."""
        added: list[ipywidgets.Output] = []
        removed: set[str] = set()
        for item in items:
            out = self._outputs.get(item.key)
            if item.removed:
                if out is not None:
                    removed.add(out.model_id)
                    del self._outputs[item.key]
                continue
            bundle = markdown_bundle(item_markdown(item, self.transcript.terminals))
            if out is None:
                out = self._outputs[item.key] = ipywidgets.Output()
                added.append(out)
            out.outputs = (bundle,)
        if added or removed:
            gone = [c for c in self.log_box.children if c.model_id in removed]
            kept = tuple(c for c in self.log_box.children if c.model_id not in removed)
            self.log_box.children = kept + tuple(added)
            for out in gone:
                out.close()
        if items and scroll:
            self.controls.send({"type": "scroll"})

    def _show_pending(self) -> None:
        items = [self.transcript.by_key.get(f"perm:{r}") for r in self.transcript.pending]
        self.pending = [{k: i.data[k] for k in ("request_id", "title", "options", "code")}
                        for i in items if i is not None]

    def _show_edits(self) -> None:
        edits = self.transcript.undoable_edits()[-UNDO_BUTTONS:]
        self.controls.edits = [{"edit_id": e["edit_id"], "line": notebook_edit_text(e)[0]} for e in edits]

    def _fail(self, message: str) -> None:
        self.error = message
