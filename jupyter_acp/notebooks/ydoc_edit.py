"""Edit a notebook that is open in JupyterLab, live, through its collaborative document.

Measured with jupyter-collaboration 5.0.4 / jupyter-server-ydoc 3.0.4 / jupyter-ydoc 4.2.1 /
pycrdt 0.14.13 on jupyter_server 2.21 (see the issue 19 findings):

- The room of a notebook is ``json:notebook:<file id>``; the file id comes from
  ``jupyter_server_fileid``. ``room_of`` only *asks* (it never indexes a file, and with the
  inode-based ``LocalFileIdManager`` it looks the id up by the inode of the file the caller
  resolved without symlinks, because that manager's own ``get_id`` follows directory symlinks
  and re-points records as a side effect).
- ``YDocExtension.get_document(room_id=..., copy=False)`` returns the room's own ``YNotebook``;
  the default ``copy=True`` returns a detached fork (edits silently lost).
- Every edit is one transaction with the session's origin. The browser's undo managers track
  only their own origin, so the user's Ctrl+Z never undoes an agent's edit; the toolbox keeps
  an inverse per edit instead (``tools.NotebookToolbox.undo``).
- pycrdt's ``Array`` has no move: a move is delete + insert of a fresh ycell with the same id
  and content, in one transaction (as JupyterLab's own moveCell does).
- Cells are looked up by the ``id`` of the ycell itself: ``get_cell`` hides ids of notebooks
  older than 4.5, the ycells have them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jupyter_ydoc import YNotebook
from pycrdt import Map

from .file_edit import clean_cell

#: Transactions of agent edits carry ``ORIGIN_PREFIX + session id``.
ORIGIN_PREFIX = "jupyter-acp:"


def ydoc_extension(serverapp: Any) -> Any | None:
    """The running ``YDocExtension`` (jupyter-collaboration), or None when it is not enabled."""
    apps = serverapp.extension_manager.extension_apps.get("jupyter_server_ydoc")
    return next(iter(apps)) if apps else None


def _file_id(serverapp: Any, api_path: str, st: os.stat_result | None) -> str | None:
    fim = serverapp.web_app.settings.get("file_id_manager")
    if fim is None:
        return None
    from jupyter_server_fileid.manager import LocalFileIdManager  # comes with jupyter-collaboration

    if isinstance(fim, LocalFileIdManager):
        if st is None:
            return None
        row = fim.con.execute("SELECT id FROM Files WHERE ino = ?", (st.st_ino,)).fetchone()
        return str(row[0]) if row else None
    file_id = fim.get_id(api_path)  # the arbitrary manager: a lookup of the path as text
    return str(file_id) if file_id else None


def room_of(serverapp: Any, api_path: str, st: os.stat_result | None = None) -> str | None:
    """The id of the live room of notebook ``api_path`` when one exists, else None.

    ``st`` is the stat of the file the caller resolved without following symlinks."""
    ext = ydoc_extension(serverapp)
    if ext is None:
        return None
    file_id = _file_id(serverapp, api_path, st)
    rid = f"json:notebook:{file_id}" if file_id else None
    return rid if rid is not None and ext.ywebsocket_server.room_exists(rid) else None


def clients_of(serverapp: Any, rid: str | None) -> int:
    """How many browsers are connected to room ``rid`` right now."""
    ext = ydoc_extension(serverapp)
    if ext is None or rid is None or not ext.ywebsocket_server.room_exists(rid):
        return 0
    return len(ext.ywebsocket_server.rooms[rid].clients)


async def live_notebook(serverapp: Any, api_path: str, st: os.stat_result | None = None) -> YNotebook | None:
    """The room's own YNotebook of ``api_path`` when a room exists, else None (edit the file)."""
    rid = room_of(serverapp, api_path, st)
    ext = ydoc_extension(serverapp)
    if rid is None or ext is None:
        return None
    doc = await ext.get_document(room_id=rid, copy=False, create=False)
    return doc if isinstance(doc, YNotebook) else None


class LiveNotebook:
    """Cell operations on a room's YNotebook, addressed by cell id, as one agent (``origin``).

    The same methods as ``file_edit.FileCells``. Each public edit is its own transaction with
    ``origin``; wrap several in ``transaction()`` to make them one change for the browser."""

    live = True

    def __init__(self, nb: YNotebook, origin: str) -> None:
        self.nb, self.origin = nb, origin

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.nb.ydoc.transaction(origin=self.origin):
            yield

    def __len__(self) -> int:
        return int(self.nb.cell_number)

    def index_of(self, cell_id: str) -> int:
        for i, ycell in enumerate(self.nb.ycells):
            if ycell.get("id") == cell_id:
                return i
        raise KeyError(cell_id)

    def _with_id(self, i: int) -> dict[str, Any]:
        cell = self.nb.get_cell(i)
        cell["id"] = self.nb.ycells[i].get("id")
        return cell

    def cells(self) -> list[dict[str, Any]]:
        return [self._with_id(i) for i in range(self.nb.cell_number)]

    def cell(self, cell_id: str) -> dict[str, Any]:
        return clean_cell(self._with_id(self.index_of(cell_id)))

    def ycell(self, cell_id: str) -> Map:
        return self.nb.ycells[self.index_of(cell_id)]

    def insert(self, index: int, cell: dict[str, Any]) -> int:
        ycell = self.nb.create_ycell(clean_cell(cell))
        with self.transaction():
            index = max(0, min(index, self.nb.cell_number))
            self.nb.ycells.insert(index, ycell)
        return index

    def set_source(self, cell_id: str, source: str) -> None:
        with self.transaction():
            self.nb.set_cell(self.index_of(cell_id), source=source)  # a granular text diff

    def delete(self, cell_id: str) -> int:
        with self.transaction():
            i = self.index_of(cell_id)
            del self.nb.ycells[i]
        return i

    def move(self, cell_id: str, index: int) -> tuple[int, int]:
        with self.transaction():
            i = self.index_of(cell_id)
            value = self._with_id(i)
            del self.nb.ycells[i]
            index = max(0, min(index, self.nb.cell_number))
            self.nb.ycells.insert(index, self.nb.create_ycell(value))
        return i, index
