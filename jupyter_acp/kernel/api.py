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

import json
import os
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

    def stop(self, session_id: str) -> None:
        self.request("DELETE", f"sessions/{_quote(session_id)}")

    def message(self, session_id: str, text: str) -> dict[str, Any]:
        return self.request("POST", f"sessions/{_quote(session_id)}/messages", {"message": text})

    def cancel(self, session_id: str) -> bool:
        return self.request("POST", f"sessions/{_quote(session_id)}/cancel")["cancelled"]

    def history(self, session_id: str, since: int = 0) -> dict[str, Any]:
        return self.request("GET", f"sessions/{_quote(session_id)}/history", params={"since": str(since)})

    def answer(self, session_id: str, request_id: str, option_id: str | None) -> None:
        self.request("POST", f"sessions/{_quote(session_id)}/permissions/{_quote(request_id)}",
                     {"option_id": option_id})

    def mode(self, session_id: str, mode_id: str | None = None) -> dict[str, Any]:
        if mode_id is None:
            return self.request("GET", f"sessions/{_quote(session_id)}/mode")
        return self.request("POST", f"sessions/{_quote(session_id)}/mode", {"mode_id": mode_id})

    def usage(self) -> dict[str, Any]:
        return self.request("GET", "usage")

    # -- WebSocket -----------------------------------------------------------------------------
    @contextmanager
    def socket(self, session_id: str, since: int | None = None) -> Iterator[Any]:
        """The session's WebSocket, past its history (``since``: default the latest event)."""
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        if since is None:
            since = self.session(session_id)["last_seq"]
        base = "ws" + self.server.url[len("http"):]
        url = f"{base}api/acp/sessions/{_quote(session_id)}/ws?since={since}&batch=1"
        headers = {"Authorization": f"token {self.server.token}"} if self.server.token else {}
        try:
            ws = connect(url, additional_headers=headers, open_timeout=30, max_size=None)
        except InvalidStatus as e:
            status = e.response.status_code
            raise AcpApiError(_message(e.response.body or b"", status), status) from None
        with ws:
            frames = Frames(ws)
            while frames.recv()["type"] != "history:end":
                pass
            yield frames

    def stream(self, session_id: str, text: str, on_event: Callable[[dict[str, Any]], None],
               on_interrupt: Callable[[], None] | None = None) -> dict[str, Any]:
        """Send ``text`` as a prompt and feed every event to ``on_event`` until the turn ends.

        Returns the ``chat:response`` data (text, stop_reason, usage). A refusal (busy, quota,
        too large) raises ``AcpApiError``; a KeyboardInterrupt (a kernel interrupt) cancels the
        turn at the agent and the stream goes on to the turn's (cancelled) end.
        """
        with self.socket(session_id) as ws:
            ws.send(json.dumps({"type": "chat:message", "message": text}))
            result: dict[str, Any] | None = None
            while True:
                try:
                    frame = ws.recv(timeout=None if result is None else 2)
                except KeyboardInterrupt:
                    ws.send(json.dumps({"type": "cancel"}))
                    if on_interrupt is not None:
                        on_interrupt()
                    continue
                except TimeoutError:
                    return result  # type: ignore[return-value]
                kind = frame["type"]
                if kind == "error" and "seq" not in frame:  # refused, for this socket only
                    raise AcpApiError(frame["data"]["message"], frame["data"].get("status", 400))
                on_event(frame)
                if kind == "chat:response":
                    result = frame["data"]
                    if result.get("stop_reason") != "error":
                        return result
                elif kind == "error" and result is not None:  # why the turn failed
                    result = {**result, "error": frame["data"]["message"]}
                    return result


class Frames:
    """One event at a time from a ``?batch=1`` socket, whose frames hold one event (an object)
    or a burst of them (an array, in order)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self._queue: deque[dict[str, Any]] = deque()

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        while not self._queue:
            data = json.loads(self.ws.recv(timeout=timeout))
            self._queue.extend(data if isinstance(data, list) else [data])
        return self._queue.popleft()

    def send(self, text: str) -> None:
        self.ws.send(text)


def _quote(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")


def _message(body: bytes, status: int) -> str:
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return f"The server answered HTTP {status}"
