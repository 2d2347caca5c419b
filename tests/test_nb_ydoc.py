"""Live edits of an open notebook through its collaborative room (``ydoc_edit``).

A "browser" here is a pycrdt Provider over the server's real collaboration websocket, exactly
what JupyterLab's docprovider speaks; the agent's edits are made server-side and must reach that
client, while the client's own concurrent edits stay. The helpers (``jp_server_config``,
``TornadoChannel``, ``until``, ``browser``, ``read_saved``) are shared by the other notebook tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_ydoc import YNotebook
from nbformat import NotebookNode
from pycrdt import Provider
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect
from traitlets.config import Config

from jupyter_acp.notebooks import ydoc_edit

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def jp_server_config(tmp_path: Path) -> Config:
    return server_config(tmp_path)


def server_config(tmp_path: Path) -> Config:
    """jupyter_server_ydoc and the file ids on, their databases in ``tmp_path``, quick autosave."""
    return Config({
        "ServerApp": {"jpserver_extensions": {"jupyter_server_ydoc": True, "jupyter_server_fileid": True,
                                              "jupyter_server_terminals": False}},
        "SQLiteYStore": {"db_path": str(tmp_path / "ystore.db")},
        "BaseFileIdManager": {"db_path": str(tmp_path / "fileid.db"), "db_journal_mode": "OFF"},
        "YDocExtension": {"document_save_delay": 0.2, "document_cleanup_delay": 60},
    })


class TornadoChannel:
    """pycrdt's ``Channel`` over a tornado websocket client (binary y-protocol messages)."""

    def __init__(self, ws: WebSocketClientConnection, path: str) -> None:
        self.ws, self._path = ws, path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> TornadoChannel:
        return self

    async def __anext__(self) -> bytes:
        msg = await self.ws.read_message()
        if msg is None:
            raise StopAsyncIteration
        return msg if isinstance(msg, bytes) else msg.encode()

    async def send(self, message: bytes) -> None:
        await self.ws.write_message(message, binary=True)

    async def recv(self) -> bytes:
        return await self.__anext__()


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds (a deadline only against hanging, not a timing check)."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


def read_saved(path: Path) -> NotebookNode | None:
    """The notebook file as saved, or None while the room is writing it (a reader may see a
    half-written file during an autosave)."""
    try:
        return nbformat.read(path, as_version=4)
    except Exception:
        return None


@contextlib.asynccontextmanager
async def browser(serverapp: Any, fetch: Any, port: int, base_url: str, auth: dict[str, str],
                  api_path: str) -> AsyncIterator[YNotebook]:
    """Open ``api_path`` as JupyterLab does and yield the synced client document; on exit the
    client leaves and the room sees no clients."""
    resp = await fetch("api", "collaboration", "session", *api_path.split("/"), method="PUT",
                       body=json.dumps({"format": "json", "type": "notebook"}))
    session = json.loads(resp.body)
    room = f"json:notebook:{session['fileId']}"
    # (not jp_ws_fetch: it escapes the room's ":", which names another, empty room)
    url = f"ws://127.0.0.1:{port}{base_url}api/collaboration/room/{room}?sessionId={session['sessionId']}"
    ws = await websocket_connect(HTTPRequest(url, headers=auth))
    client = YNotebook()
    try:
        async with Provider(client.ydoc, TornadoChannel(ws, room)):
            await until(lambda: client.cell_number > 0)
            yield client
    finally:
        ws.close()
    await until(lambda: ydoc_edit.clients_of(serverapp, room) == 0)


async def test_live_edits_reach_the_open_client(jp_serverapp: Any, jp_root_dir: Path, jp_fetch: Any,
                                                jp_http_port: int, jp_base_url: str,
                                                jp_auth_header: dict[str, str]) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("a = 1"),
                                         nbformat.v4.new_markdown_cell("# title")])
    (jp_root_dir / "nb.ipynb").write_text(nbformat.writes(nb))
    assert ydoc_edit.room_of(jp_serverapp, "nb.ipynb") is None
    assert await ydoc_edit.live_notebook(jp_serverapp, "nb.ipynb") is None

    async with browser(jp_serverapp, jp_fetch, jp_http_port, jp_base_url, jp_auth_header,
                       "nb.ipynb") as client:
        await until(lambda: client.cell_number == 2)
        rid = ydoc_edit.room_of(jp_serverapp, "nb.ipynb")
        assert rid is not None and ydoc_edit.clients_of(jp_serverapp, rid) == 1
        doc = await ydoc_edit.live_notebook(jp_serverapp, "nb.ipynb")
        assert doc is not None
        live = ydoc_edit.LiveNotebook(doc, ydoc_edit.ORIGIN_PREFIX + "s1")
        first = live.cells()[0]["id"]

        new = {"cell_type": "code", "id": "agent-1", "source": "print('from the agent')", "metadata": {},
               "outputs": [], "execution_count": None}
        assert live.insert(1, new) == 1
        await until(lambda: client.cell_number == 3)
        assert client.get_cell(1)["source"] == "print('from the agent')"
        assert client.ycells[1]["id"] == "agent-1"
        assert live.insert(99, {**new, "id": "agent-2", "cell_type": "raw", "source": "end"}) == 3  # clamped

        live.set_source(first, "a = 2")
        await until(lambda: client.get_cell(0)["source"] == "a = 2")
        assert live.move("agent-1", 0) == (1, 0)
        await until(lambda: client.ycells[0]["id"] == "agent-1")

        # the user edits the markdown cell meanwhile (the client's own origin); it stays
        client.set_cell(2, source="# title (user)")
        await until(lambda: doc.get_cell(2)["source"] == "# title (user)")
        assert live.delete("agent-2") == 3
        await until(lambda: client.cell_number == 3)
        assert live.cell("agent-1")["source"] == "print('from the agent')"
        with pytest.raises(KeyError):
            live.index_of("nope")

        # the room autosaves a valid notebook
        def saved() -> bool:
            disk = read_saved(jp_root_dir / "nb.ipynb")
            return disk is not None and [c.source for c in disk.cells] == [
                "print('from the agent')", "a = 2", "# title (user)"]
        await until(saved)
        disk = read_saved(jp_root_dir / "nb.ipynb")
        assert disk is not None
        nbformat.validate(disk)
        assert [c.id for c in disk.cells][:2] == ["agent-1", first]
