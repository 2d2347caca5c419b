"""Edit a notebook nobody has open: read, change and write its file through the session's
``WorkspaceFS``, never through the contents manager.

Why not the contents manager: it opens files by name and follows symlinks, and the agent owns
its workspace (mounted read-write in its sandbox): it can plant ``x.ipynb -> ../bob/secret.ipynb``
or swap a directory for a symlink between any check of ours and the open. ``WorkspaceFS`` walks
every request from a descriptor of the workspace root with ``O_NOFOLLOW`` (see its docstring), so
a read or a write can never leave the workspace, whatever the agent does meanwhile. The contents
manager's extras (checkpoints, ``pre_save_hook``) do not matter for agent edits.

Around the bytes, nbformat does the rest:

- ``parse`` refuses what is not a valid nbformat 4 notebook (the agent gets a clear refusal, the
  file is untouched) and upgrades notebooks older than 4.5 to 4.5, because tools address cells by
  id and only 4.5 has ids (``nbformat.v4.upgrade`` adds them);
- ``dump`` validates before anything is written: a broken notebook is never saved;
- ``edit`` re-reads the file just before the write and refuses when it changed since the read (a
  user's save, another agent). This narrows, but cannot close, the race with a writer that does
  not go through us; with the notebook open in JupyterLab the edit goes through its room instead.

A notebook file larger than ``MAX_NOTEBOOK_BYTES`` is refused, read or written.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import stat
import uuid
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import nbformat
from acp.exceptions import RequestError
from nbformat import NotebookNode

from ..workspace_fs import Refused, WorkspaceFS, _Walk

T = TypeVar("T")

MAX_NOTEBOOK_BYTES = 16 * 1024 * 1024
"""The largest notebook file the tools read or write."""

#: The keys nbformat 4.5 allows in a cell, per cell type (a cell taken from a live room, or saved
#: for an undo, is cut down to these before it goes into a file).
CELL_KEYS = {
    "code": ("id", "cell_type", "source", "metadata", "outputs", "execution_count"),
    "markdown": ("id", "cell_type", "source", "metadata", "attachments"),
    "raw": ("id", "cell_type", "source", "metadata", "attachments"),
}


class NotebookFileError(Exception):
    """The file cannot be used as a notebook; the text is for the agent (never a host path)."""


class NotebookFileConflict(NotebookFileError):
    """The file changed between our read and our write (nothing was written)."""


def new_cell_id() -> str:
    """A fresh cell id, in the form JupyterLab gives its own cells."""
    return str(uuid.uuid4())


def new_cell(cell_type: str, source: str, cell_id: str | None = None) -> dict[str, Any]:
    """A valid nbformat 4.5 cell as a plain dict (usable for a file and for a live room)."""
    maker = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell,
             "raw": nbformat.v4.new_raw_cell}[cell_type]
    return dict(maker(source, id=cell_id or new_cell_id()))


def clean_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """``cell`` with only the keys nbformat allows (``execution_state`` and the like dropped)
    and its source as one string."""
    keys = CELL_KEYS.get(str(cell.get("cell_type")), CELL_KEYS["raw"])
    out = {k: cell[k] for k in keys if k in cell}
    if isinstance(out.get("source"), list):
        out["source"] = "".join(out["source"])
    out.setdefault("metadata", {})
    if out.get("cell_type") == "code":
        out.setdefault("outputs", [])
        out.setdefault("execution_count", None)
    return out


def source_of(cell: dict[str, Any]) -> str:
    """A cell's source as one string (nbformat allows a list of lines)."""
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def parse(data: bytes) -> NotebookNode:
    """The notebook in ``data``, as valid nbformat 4.5, or ``NotebookFileError``."""
    try:
        text = data.decode("utf-8")
        raw = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        raise NotebookFileError("the file is not a notebook (not valid JSON)") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("nbformat"), int):
        raise NotebookFileError("the file is not a notebook (no nbformat version)")
    if raw["nbformat"] != 4:
        raise NotebookFileError(f"nbformat {raw['nbformat']} notebooks are not supported; open it "
                                "in JupyterLab and save it to upgrade it to nbformat 4")
    try:
        # nbformat repairs what it can here (missing ids, with warnings that are not ours to show)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nb = nbformat.reads(text, as_version=4, capture_validation_error={})
            minor = nb.get("nbformat_minor", 0)
            minor = minor if isinstance(minor, int) else 0
            if minor < 5:
                nb = nbformat.v4.upgrade(nb, from_version=4, from_minor=minor)
            nbformat.validate(nb)
        nbformat.validate(nb)  # now without repairs: raises on a notebook it cannot fix
    except Exception as e:  # nbformat raises several types; the agent needs only the reason
        raise NotebookFileError(f"the file is not a valid notebook ({type(e).__name__})") from None
    return nb


def dump(nb: NotebookNode) -> str:
    """``nb`` as the text of a notebook file; raises ``ValidationError`` (nothing is written)."""
    nbformat.validate(nb)
    text: str = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def notebook_fs(fs: WorkspaceFS) -> WorkspaceFS:
    """A twin of the session's ``fs`` for the tools: same workspace, agent root and refusal log,
    but without the session's refusal of ``.ipynb`` writes (which exists to send the agent to
    these tools) and with the notebook size bound instead of the agent's file bound."""
    limits = dataclasses.replace(fs.limits, max_file_bytes=MAX_NOTEBOOK_BYTES)
    return WorkspaceFS(fs.host_root, fs.agent_root, limits, refusals=fs.refusals, fsync=fs.fsync)


def _reason(e: RequestError) -> str:
    data = e.data if isinstance(e.data, dict) else {}
    return str(data.get("reason") or ("not found" if e.code == -32002 else e))


async def read_bytes(fs: WorkspaceFS, path: str) -> bytes:
    """The file's bytes (``NotebookFileError`` with the reason when refused or missing)."""
    try:
        return await fs.read_bytes(path, MAX_NOTEBOOK_BYTES)
    except RequestError as e:
        raise NotebookFileError(_reason(e)) from None


async def read(fs: WorkspaceFS, path: str) -> NotebookNode:
    """The notebook at ``path`` (workspace-relative), parsed and valid."""
    return parse(await read_bytes(fs, path))


async def write(fs: WorkspaceFS, path: str, text: str) -> None:
    try:
        await fs.write(path, text)
    except RequestError as e:
        raise NotebookFileError(_reason(e)) from None


async def exists(fs: WorkspaceFS, path: str) -> bool:
    """Whether something is at ``path`` (the same confined walk; not logged as a refusal when
    nothing is there, since that is the expected answer before a create)."""
    try:
        parts = fs.components(path)
    except Refused as r:
        raise NotebookFileError(r.why) from None

    def look() -> bool:
        walk = _Walk(fs)
        try:
            pfd, _, _ = walk.resolve(parts, create=False)
            os.close(pfd)
            return True
        except Refused as r:
            if r.code == -32002:
                return False
            if r.why == "is a directory":
                return True
            raise
        finally:
            walk.close()

    try:
        return await asyncio.to_thread(look)
    except Refused as r:
        raise NotebookFileError(r.why) from None
    except OSError as e:
        raise NotebookFileError(f"cannot access the file ({type(e).__name__})") from None


class FileCells:
    """Cell operations on a parsed notebook, addressed by cell id (the same methods as
    ``ydoc_edit.LiveNotebook``, so tools and undo are written once for both)."""

    live = False

    def __init__(self, nb: NotebookNode) -> None:
        self.nb = nb

    def __len__(self) -> int:
        return len(self.nb.cells)

    def index_of(self, cell_id: str) -> int:
        for i, cell in enumerate(self.nb.cells):
            if cell.get("id") == cell_id:
                return i
        raise KeyError(cell_id)

    def cells(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.nb.cells]

    def cell(self, cell_id: str) -> dict[str, Any]:
        return clean_cell(dict(self.nb.cells[self.index_of(cell_id)]))

    def insert(self, index: int, cell: dict[str, Any]) -> int:
        index = max(0, min(index, len(self.nb.cells)))
        self.nb.cells.insert(index, nbformat.from_dict(clean_cell(cell)))
        return index

    def set_source(self, cell_id: str, source: str) -> None:
        self.nb.cells[self.index_of(cell_id)].source = source

    def delete(self, cell_id: str) -> int:
        i = self.index_of(cell_id)
        del self.nb.cells[i]
        return i

    def move(self, cell_id: str, index: int) -> tuple[int, int]:
        i = self.index_of(cell_id)
        cell = self.nb.cells.pop(i)
        index = max(0, min(index, len(self.nb.cells)))
        self.nb.cells.insert(index, cell)
        return i, index

    def set_outputs(self, cell_id: str, outputs: list[dict[str, Any]], execution_count: int | None) -> None:
        cell = self.nb.cells[self.index_of(cell_id)]
        if cell.cell_type == "code":
            cell.outputs = [nbformat.from_dict(o) for o in outputs]
            cell.execution_count = execution_count


async def edit(fs: WorkspaceFS, path: str, change: Callable[[FileCells], T]) -> T:
    """Apply ``change`` to the notebook at ``path`` and write it; returns what ``change`` returned.

    ``change`` may raise (``KeyError`` for an unknown cell id, or the caller's own refusal):
    then nothing is written."""
    data = await read_bytes(fs, path)
    nb = parse(data)
    result = change(FileCells(nb))
    try:
        text = dump(nb)
    except nbformat.ValidationError:
        raise NotebookFileError("the edit would make the notebook invalid; nothing was written") from None
    if len(text.encode("utf-8")) > MAX_NOTEBOOK_BYTES:
        raise NotebookFileError(f"the notebook would be larger than {MAX_NOTEBOOK_BYTES} bytes")
    if await read_bytes(fs, path) != data:
        raise NotebookFileConflict("the notebook changed on disk meanwhile; read it again")
    await write(fs, path, text)
    return result


def empty_notebook(kernel_name: str = "python3") -> str:
    """The text of a new, valid, empty notebook (with a kernelspec, so JupyterLab does not ask)."""
    nb = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": kernel_name, "display_name": "Python 3" if kernel_name == "python3"
                       else kernel_name, "language": "python"},
        "language_info": {"name": "python"}})
    return dump(nb)


async def create(fs: WorkspaceFS, path: str) -> str:
    """Write a new empty notebook at ``path`` (refused when something is there); returns its text."""
    if await exists(fs, path):
        raise NotebookFileError("the file exists")
    text = empty_notebook()
    await write(fs, path, text)
    return text


async def remove_if_unchanged(fs: WorkspaceFS, path: str, expected: bytes) -> None:
    """Delete the file at ``path`` if it still holds exactly ``expected`` (the undo of a
    ``create``): the same race-free walk as every other access, the file compared through the
    descriptor the walk holds, and removed from the directory the walk resolved."""
    parts = fs.components(path)

    def remove() -> None:
        walk = _Walk(fs)
        try:
            pfd, name, st = walk.resolve(parts, create=False)
            try:
                assert st is not None
                if not stat.S_ISREG(st.st_mode) or st.st_size != len(expected):
                    raise NotebookFileConflict("the notebook was changed since it was created")
                fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    data = os.read(fd, len(expected) + 1)
                finally:
                    os.close(fd)
                if data != expected:
                    raise NotebookFileConflict("the notebook was changed since it was created")
                now = os.stat(name, dir_fd=walk.dir_fd, follow_symlinks=False)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    raise NotebookFileConflict("the notebook was replaced since it was created")
                os.unlink(name, dir_fd=walk.dir_fd)
            finally:
                with contextlib.suppress(OSError):
                    os.close(pfd)
        finally:
            walk.close()

    try:
        await asyncio.to_thread(remove)
    except Refused as r:
        if r.code == -32002:
            raise NotebookFileConflict("the notebook no longer exists") from None
        raise NotebookFileError(r.why) from None
    except FileNotFoundError:
        raise NotebookFileConflict("the notebook no longer exists") from None
    except OSError as e:
        raise NotebookFileError(f"cannot remove the notebook ({type(e).__name__})") from None
