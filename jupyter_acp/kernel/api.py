"""From a kernel to its own Jupyter server's ``api/acp`` (REST + WebSocket; docs/api.md).

Which server: the one that started this kernel — ``jpserver-{JPY_PARENT_PID}.json`` in the
Jupyter runtime directory holds its url and token — or an explicit one
(``JUPYTER_ACP_SERVER_URL`` / ``JUPYTER_ACP_TOKEN``, or arguments). Under JupyterHub the token is
``JUPYTERHUB_API_TOKEN``. We never guess among all running servers: talking to someone else's
server with its token would be wrong, so no match is a clear ``NoServerFound``.

The calls are synchronous on purpose: a kernel's asyncio loop is already running the cell, so a
cell that streams a reply blocks on a synchronous WebSocket (``websockets.sync``) while it
updates its output.
"""

from __future__ import annotations

import difflib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class AcpApiError(Exception):
    """The server refused a request: ``status`` and the server's ``message`` for the user."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class NoServerFound(AcpApiError):
    """This kernel was not started by a Jupyter server we can find (e.g. plain ``ipython``)."""


class SessionGone(AcpApiError):
    """The session does not exist (any more) for us: deleted, culled when idle, gone with a
    server restart, or never ours. Final: nothing is retried, the caller says it once."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 404)


#: WebSocket close code of a session that does not exist for this user (docs/api.md).
CLOSE_GONE = 4404
#: Seconds to wait before each attempt to resume a turn's stream after its socket dropped
#: (a slow reader's 1013, a network blip); then the stream gives up.
RESUME_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class ServerInfo:
    url: str
    """The server's URL including its base_url, ending with ``/``."""
    token: str | None


def find_server(url: str | None = None, token: str | None = None) -> ServerInfo:
    """The Jupyter server of this kernel (see the module docstring for the rules)."""
    url = url or os.environ.get("JUPYTER_ACP_SERVER_URL")
    token = token or os.environ.get("JUPYTER_ACP_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN")
    if url:
        return ServerInfo(url.rstrip("/") + "/", token)
    pid = os.environ.get("JPY_PARENT_PID")
    if not pid:
        raise NoServerFound("No Jupyter server found: this kernel was not started by one "
                            "(no JPY_PARENT_PID); set JUPYTER_ACP_SERVER_URL and JUPYTER_ACP_TOKEN")
    from jupyter_core.paths import jupyter_runtime_dir

    path = Path(jupyter_runtime_dir()) / f"jpserver-{pid}.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        raise NoServerFound(f"No Jupyter server found: {path} is missing or unreadable; set "
                            "JUPYTER_ACP_SERVER_URL and JUPYTER_ACP_TOKEN to use a server") from None
    return ServerInfo(info["url"].rstrip("/") + "/", token or info.get("token") or None)


class AcpApi:
    """The jupyter-acp REST API of one server, plus streaming a turn over the WebSocket."""

    def __init__(self, server: ServerInfo | None = None, *, timeout: float = 600.0) -> None:
        self.server = server or find_server()
        self.timeout = timeout

    # -- REST ----------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.server.token:
            headers["Authorization"] = f"token {self.server.token}"
        return headers

    def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        url = self.server.url + "api/acp/" + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        req = urllib.request.Request(url, data=data, method=method, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise AcpApiError(_message(e.read(), e.code), e.code) from None
        except urllib.error.URLError as e:
            raise AcpApiError(f"Cannot reach the Jupyter server at {self.server.url}: {e.reason}") from None
        return json.loads(raw) if raw else None

    def agents(self) -> dict[str, Any]:
        return self.request("GET", "agents")

    def sessions(self) -> list[dict[str, Any]]:
        return self.request("GET", "sessions")["sessions"]

    def start(self, agent: str | None = None, *, new: bool = False, cwd: str | None = None,
              credentials: dict[str, str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"new": new}
        for key, value in (("agent", agent), ("cwd", cwd), ("credentials", credentials)):
            if value:
                body[key] = value
        return self.request("POST", "sessions", body)

    def session(self, session_id: str) -> dict[str, Any]:
        return self.request("GET", f"sessions/{_quote(session_id)}")

    def resume(self, session_id: str) -> dict[str, Any]:
        """Bring a suspended session back (a fresh sandbox; the agent continues through ACP
        ``session/resume`` or ``session/load``, see the model's ``restore``); a live one is
        returned as is, so calling it is always safe before using a session."""
        return self.request("POST", f"sessions/{_quote(session_id)}/resume")

    def close(self, session_id: str) -> dict[str, Any]:
        """End the session's agent but keep the session (``suspended``): it stays listed and
        ``resume`` continues it. Returns the session model."""
        return self.request("POST", f"sessions/{_quote(session_id)}/close")

    def delete(self, session_id: str) -> None:
        """Forget the session: its agent is stopped, its stored history and agent home removed."""
        self.request("DELETE", f"sessions/{_quote(session_id)}")

    def stop(self, session_id: str) -> None:
        """``delete`` under its old name (``DELETE`` used to only stop a session; it now forgets
        it): kept so that existing scripts go on working. To keep a session, ``close`` it."""
        self.delete(session_id)

    def message(self, session_id: str, text: str, images: list[dict[str, str]] | None = None
                ) -> dict[str, Any]:
        """One prompt over REST (the reply when the turn ends). ``@path`` mentions in ``text``
        are resolved by the server; ``images``: ``[{"mime_type", "data": base64}]``."""
        body: dict[str, Any] = {"message": text}
        if images:
            body["images"] = images
        return self.request("POST", f"sessions/{_quote(session_id)}/messages", body)

    def cancel(self, session_id: str) -> bool:
        return self.request("POST", f"sessions/{_quote(session_id)}/cancel")["cancelled"]

    def history(self, session_id: str, since: int = 0) -> dict[str, Any]:
        return self.request("GET", f"sessions/{_quote(session_id)}/history", params={"since": str(since)})

    def answer(self, session_id: str, request_id: str, option_id: str | None) -> None:
        self.request("POST", f"sessions/{_quote(session_id)}/permissions/{_quote(request_id)}",
                     {"option_id": option_id})

    def undo_edit(self, session_id: str, edit_id: str) -> dict[str, Any]:
        """Revert one edit of the agent's notebook tools (409: the cell changed since)."""
        path = f"sessions/{_quote(session_id)}/notebook-edits/{_quote(edit_id)}/undo"
        return self.request("POST", path, {})

    def mode(self, session_id: str, mode_id: str | None = None) -> dict[str, Any]:
        if mode_id is None:
            return self.request("GET", f"sessions/{_quote(session_id)}/mode")
        return self.request("POST", f"sessions/{_quote(session_id)}/mode", {"mode_id": mode_id})

    def model(self, session_id: str, value: str | None = None) -> dict[str, Any]:
        """The agent's model choice ``{config_id, current, available: [{value, name,
        description}]}`` (as narrowed by the admin); with ``value``, switch to it first."""
        if value is None:
            return self.request("GET", f"sessions/{_quote(session_id)}/model")
        return self.request("POST", f"sessions/{_quote(session_id)}/model", {"model": value})

    def commands(self, session_id: str) -> list[dict[str, Any]]:
        """The agent's slash commands ``[{name, description, input: {hint} | None}]`` (names
        without the slash): the latest ACP ``available_commands_update``, as the server keeps it
        in the session model (there is no endpoint of their own)."""
        return self.session(session_id).get("available_commands") or []

    def files(self, session_id: str, prefix: str = "") -> list[str]:
        """Workspace paths (relative to the session's cwd) starting with ``prefix``, for
        completing an ``@path`` mention; directories end with ``/`` (at most 50)."""
        return self.request("GET", f"sessions/{_quote(session_id)}/files", params={"prefix": prefix})["files"]

    def usage(self) -> dict[str, Any]:
        return self.request("GET", "usage")

    # -- WebSocket -----------------------------------------------------------------------------
    def _connect(self, session_id: str, since: int) -> Any:
        """One WebSocket to the session, past the events up to ``since``."""
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        base = "ws" + self.server.url[len("http"):]
        url = f"{base}api/acp/sessions/{_quote(session_id)}/ws?since={since}&batch=1"
        headers = {"Authorization": f"token {self.server.token}"} if self.server.token else {}
        try:
            ws = connect(url, additional_headers=headers, open_timeout=30, max_size=None)
        except InvalidStatus as e:
            status = e.response.status_code
            raise AcpApiError(_message(e.response.body or b"", status), status) from None
        # entered like ``with connect(...)`` (websockets 17 warns otherwise); ``Frames.close``
        # closes it, which is all its exit does
        return ws.__enter__()

    @contextmanager
    def socket(self, session_id: str, since: int | None = None) -> Iterator[Frames]:
        """The session's WebSocket, past its history (``since``: default the latest event).

        A session that does not exist (any more) raises ``SessionGone``, here or from
        ``Frames.recv`` when it ends while the socket is open."""
        if since is None:
            try:
                since = self.session(session_id)["last_seq"]
            except AcpApiError as e:
                if e.status == 404:
                    raise SessionGone(e.message) from None
                raise
        frames = Frames(lambda after: self._connect(session_id, after), since)
        try:
            frames.open()
            yield frames
        finally:
            frames.close()

    def stream(self, session_id: str, text: str, on_event: Callable[[dict[str, Any]], None],
               on_interrupt: Callable[[], None] | None = None,
               images: list[dict[str, str]] | None = None) -> dict[str, Any]:
        """Send ``text`` (and ``images``, as for ``message``) as a prompt and feed every event to
        ``on_event`` until the turn ends. The server resolves ``text``'s ``@path`` mentions; the
        turn's ``chat:message`` event lists what went with it in ``data.attachments``.

        Returns the ``chat:response`` data (text, stop_reason, usage), with ``"error"``: the
        message of the turn's ``error`` event when it failed (the server sends it before the
        ``chat:response``, so the turn's end is the end: nothing is waited for after it).
        A refusal (busy, quota, too large) raises ``AcpApiError``; a session deleted or culled
        meanwhile raises ``SessionGone`` (once: nothing is retried). A dropped socket is
        resumed with ``?since=`` (``RESUME_DELAYS``) once the turn has started. A
        KeyboardInterrupt (a kernel interrupt) cancels the turn at the agent and the stream goes
        on to the turn's (cancelled) end.
        """
        with self.socket(session_id) as ws:
            prompt: dict[str, Any] = {"type": "chat:message", "message": text}
            if images:
                prompt["images"] = images
            ws.send(json.dumps(prompt))
            started = False  # our chat:message event was seen: the turn runs on the server
            turn: int | None = None
            errors: list[str] = []
            while True:
                try:
                    frame = ws.recv(resume=started)
                except KeyboardInterrupt:
                    try:
                        ws.send(json.dumps({"type": "cancel"}))
                    except Exception:  # (interrupted while the socket was being resumed)
                        self.cancel(session_id)
                    if not started:
                        # no sign of our turn at the server (a refusal that never came back, a
                        # slow start): the cancel above stops it should it start; waiting on
                        # would leave the cell stuck with nothing to cancel
                        raise AcpApiError("Interrupted before the agent started the turn") from None
                    if on_interrupt is not None:
                        on_interrupt()
                    continue
                kind = frame["type"]
                if kind == "error" and "seq" not in frame:  # refused, for this socket only
                    raise AcpApiError(frame["data"]["message"], frame["data"].get("status", 400))
                data = frame.get("data") or {}
                if not started and kind in ("chat:response", "error"):
                    on_event(frame)  # the end (or an error) of an earlier turn: not ours
                    continue
                on_event(frame)
                if kind == "chat:message" and not started:
                    started, turn = True, data.get("turn")
                elif kind == "error" and data.get("turn") == turn:
                    errors.append(str(data.get("message", "")))
                elif kind == "chat:response" and data.get("turn", turn) == turn:
                    if not errors and data.get("stop_reason") == "error":
                        # a server that sends the error after the turn's end: it came in the same
                        # burst, so look only at what is already here (no waiting)
                        for late in ws.received():
                            if late["type"] == "error" and (late.get("data") or {}).get("turn") == turn:
                                on_event(late)
                                errors.append(str(late["data"].get("message", "")))
                    return {**data, "error": "; ".join(errors)} if errors else data


class Frames:
    """One event at a time from a ``?batch=1`` socket, whose frames hold one event (an object)
    or a burst of them (an array, in order).

    It remembers the last ``seq`` it gave out: after a drop, ``recv(resume=True)`` reconnects
    with ``?since=`` that seq and goes on with exactly the missed events. A close with
    ``CLOSE_GONE`` (the session ended, or is not ours) raises ``SessionGone`` and is final."""

    def __init__(self, connect: Callable[[int], Any], since: int) -> None:
        self._connect = connect
        self.last_seq = since
        self.ws: Any = None
        self._queue: deque[dict[str, Any]] = deque()

    def open(self) -> None:
        """Connect and read the replay up to ``history:end``; its events are queued."""
        from websockets.exceptions import ConnectionClosed

        self.close()
        self.ws = self._connect(self.last_seq)
        try:
            while True:
                data = json.loads(self.ws.recv())
                for frame in data if isinstance(data, list) else [data]:
                    if frame.get("type") == "history:end":
                        return
                    if "seq" in frame:
                        self._queue.append(frame)
        except ConnectionClosed as e:
            raise _closed(e) from None

    def recv(self, timeout: float | None = None, *, resume: bool = False) -> dict[str, Any]:
        """The next event (or control frame). ``resume``: reconnect after a drop instead of
        raising ``AcpApiError`` (never after a ``CLOSE_GONE``, which raises ``SessionGone``)."""
        from websockets.exceptions import ConnectionClosed

        while True:
            while self._queue:
                frame = self._queue.popleft()
                seq = frame.get("seq")
                if isinstance(seq, int):
                    if seq <= self.last_seq:
                        continue  # (seen before a reconnect)
                    self.last_seq = seq
                return frame
            try:
                data = json.loads(self.ws.recv(timeout=timeout))
            except ConnectionClosed as e:
                error = _closed(e)
                if isinstance(error, SessionGone) or not resume:
                    raise error from None
                self._resume(error)
                continue
            self._queue.extend(data if isinstance(data, list) else [data])

    def received(self) -> list[dict[str, Any]]:
        """The events already received and not yet given out (no waiting), taken."""
        frames = list(self._queue)
        self._queue.clear()
        return frames

    def _resume(self, error: AcpApiError) -> None:
        """Reconnect with ``?since=`` after a drop; ``error`` if every attempt fails."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        for delay in RESUME_DELAYS:
            time.sleep(delay)
            try:
                self.open()
                return
            except SessionGone:
                raise
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, AcpApiError) as e:
                error = e if isinstance(e, AcpApiError) else AcpApiError(
                    f"Lost the connection to the Jupyter server: {e}")
        raise error

    def send(self, text: str) -> None:
        self.ws.send(text)

    def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            ws.close()


def _closed(e: Any) -> AcpApiError:
    """The error for a socket the server closed (``ConnectionClosed``)."""
    rcvd = e.rcvd
    if rcvd is not None and rcvd.code == CLOSE_GONE:
        return SessionGone(rcvd.reason or "The session has ended")
    why = f"{rcvd.code} {rcvd.reason}".strip() if rcvd is not None else "no close frame"
    return AcpApiError(f"Lost the connection to the Jupyter server ({why}); the turn may still "
                       "run there (see %acp stats)")


def attachment_text(item: dict[str, Any]) -> str:
    """One line for something that went with a prompt (an item of a ``chat:message`` event's
    ``data.attachments``), e.g. ``📎 notes.txt (123 bytes)``: how ``%%acp`` and ``ChatPanel``
    show that an ``@file`` mention or an image really reached the agent."""
    name = str(item.get("name") or item.get("uri") or "?")
    size = item.get("size")
    details = [f"{size} bytes"] if isinstance(size, int) else []
    if item.get("type") == "image" and item.get("mime_type"):
        details.insert(0, str(item["mime_type"]))
    elif item.get("type") == "resource_link":
        details.append("as a link")  # (the agent was given its path and reads it itself)
    return f"📎 {name}" + (f" ({', '.join(details)})" if details else "")


def _quote(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")


def _message(body: bytes | bytearray, status: int) -> str:
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return f"The server answered HTTP {status}"


# -- the agent's notebook tools, as text (``%%acp`` and ``ChatPanel``) ------------------------

NOTEBOOK_TOOL_PREFIX = "mcp__jupyter__"
_EDIT_MARKS = {"run_cell": "▶", "run_code": "▶", "undo": "↶"}


def notebook_tool_title(tool: str, args: dict[str, Any] | None) -> str:
    """A readable title for a call of a notebook tool (``insert_cell`` → "Insert a code cell
    into nb.ipynb"): Qwen titles its permission request with the raw JSON of the arguments."""
    args = args or {}
    path = str(args.get("path") or "")
    of = f" of {path}" if path else " of a notebook"
    cell_type = str(args.get("cell_type") or "")
    titles = {
        "insert_cell": f"Insert a {cell_type + ' ' if cell_type else ''}cell into {path or 'a notebook'}",
        "replace_cell": f"Edit a cell{of}", "move_cell": f"Move a cell{of}",
        "delete_cell": f"Delete a cell{of}", "create_notebook": f"Create {path or 'a notebook'}",
        "run_cell": f"Run a cell{of}", "run_code": f"Run code in the kernel{of}",
        "read_notebook": f"Read {path or 'a notebook'}", "list_notebooks": "List the notebooks",
    }
    return titles.get(tool, f"Notebook tool: {tool}")


def permission_view(tool_call: dict[str, Any]) -> tuple[str, str | None]:
    """What a permission prompt shows: its title, and the code to read before answering — a
    notebook run's code (server-made, ``_meta.jupyterAcp.notebookRun``) or the source a notebook
    tool would write — or None."""
    meta = tool_call.get("_meta") or {}
    raw = tool_call.get("rawInput")
    args = raw if isinstance(raw, dict) else {}
    name = str(meta.get("toolName") or "")
    title = str(tool_call.get("title") or "a tool call")
    if (meta.get("jupyterAcp") or {}).get("notebookRun") is True:
        return title, str(args.get("code") or "")
    if name.startswith(NOTEBOOK_TOOL_PREFIX):
        code = args.get("code", args.get("source"))
        title = notebook_tool_title(name[len(NOTEBOOK_TOOL_PREFIX):], args)
        return title, code if isinstance(code, str) else None
    return title, None


def outputs_text(outputs: Any) -> str:
    """A run's outputs (as the server summarized them, or nbformat's) as text: streams and plain
    text as they are, errors as ``ename: evalue``, rich ones as ``[image/png]``."""
    lines: list[str] = []
    for o in outputs if isinstance(outputs, list) else []:
        if not isinstance(o, dict):
            continue
        kind = str(o.get("type") or o.get("output_type") or "")
        if kind == "error":
            lines.append(f"{o.get('ename') or ''}: {o.get('evalue') or ''}")
            continue
        text = o.get("text", (o.get("data") or {}).get("text/plain"))
        text = "".join(text) if isinstance(text, list) else str(text or "")
        mime = ", ".join(o.get("mime") or []) if isinstance(o.get("mime"), list) else ""
        lines.append(text.rstrip("\n") if text else f"[{mime or kind}]")
    return "\n".join(lines)


def notebook_edit_text(record: dict[str, Any]) -> tuple[str, str | None]:
    """A ``notebook:edit`` record as one line and an optional block: "✎ inserted code cell
    3f2a1b2c into nb.ipynb at 0" + its source, "▶ ran cell … [3] ok" + the code and outputs,
    "↶ undid edit e1a2b3c4 of nb.ipynb". The block of an edit is a diff of the cell's source."""
    tool = str(record.get("tool") or "")
    path = str(record.get("path") or "?")
    cell_id = str(record.get("cell_id") or "")[:8]
    cell = " ".join(p for p in (record.get("cell_type"), "cell", cell_id) if p)
    index = record.get("index")
    at = f" at {index}" if isinstance(index, int) else ""
    before, after = record.get("before"), record.get("after")
    mark = _EDIT_MARKS.get(tool, "✎")
    edit_id = str(record.get("edit_id") or "")[:8]
    heads = {
        "insert_cell": f"inserted {cell} into {path}{at}",
        "replace_cell": f"edited {cell} of {path}",
        "move_cell": f"moved {cell} of {path}" + (f" to {index}" if isinstance(index, int) else ""),
        "delete_cell": f"deleted {cell} of {path}",
        "create_notebook": f"created {path}",
        "undo": f"undid edit {str(record.get('undoes') or '')[:8]} of {path}",
    }
    body: str | None = None
    if tool in ("run_cell", "run_code"):
        count = record.get("execution_count")
        counted = f" [{count}]" if isinstance(count, int) else ""
        head = f"ran {cell if cell_id else 'code'} of {path}{counted} {record.get('status') or 'done'}"
        code = after if isinstance(after, str) else before if isinstance(before, str) else ""
        out = outputs_text(record.get("outputs"))
        body = code + (f"\n→ {out}" if out else "")
    else:
        head = heads.get(tool, f"{tool} {path}")
        if tool in ("insert_cell", "create_notebook"):
            body = after if isinstance(after, str) and after else None
        elif tool in ("replace_cell", "delete_cell", "undo") and (before or after):
            body = _source_diff(before if isinstance(before, str) else "",
                                after if isinstance(after, str) else "")
    if record.get("undoable") and tool != "undo" and edit_id:
        head += f" (edit {edit_id})"
    return f"{mark} {head}", body


def _source_diff(before: str, after: str) -> str:
    """The changed lines of a cell's source, ``-`` then ``+`` (with a line of context)."""
    lines = difflib.unified_diff(before.splitlines(), after.splitlines(), n=1, lineterm="")
    return "\n".join(line for line in lines if not line.startswith(("---", "+++", "@@")))
