"""The notebook tools of one session, run in the Jupyter server process (issue 19).

``NotebookToolbox`` is what the session's MCP server (``channel.py``) calls. Every argument is
the agent's input, and the agent is hostile: it controls its workspace (read-write in its
sandbox) and can plant symlinks or swap a directory for one at any moment.

Where an edit goes
    A notebook with a live collaborative room (open in JupyterLab, or closed less than
    ``document_cleanup_delay`` ago) is edited through the room (``ydoc_edit``): the user sees
    the change at once, and a disk write would be an out-of-band change that can lose the
    user's unsaved edits. Any other notebook is edited as a file (``file_edit``), through the
    session's ``WorkspaceFS`` and nbformat, never the contents manager (it follows symlinks).

Paths
    Relative to the workspace (or the agent's absolute view, e.g. ``/workspace/x.ipynb``),
    checked by ``WorkspaceFS.components`` (no ``..``, nothing outside), ending in ``.ipynb``,
    with **no symlink in any component** (one ``O_NOFOLLOW`` walk from the root) and naming a
    regular file with one link (a hard link is another name of a file that may live elsewhere,
    and an inode-based file id manager would find that file's room). The walk
    only decides; every read and write of the file is again confined by ``WorkspaceFS``'s own
    race-free walk, so a swap after the check cannot lead out of the workspace either. For a
    live room the path only *finds* the room, and a kernel is only found through the contents
    path of a notebook inside the workspace: another user's notebook or kernel has no name the
    agent can give.

Undo
    The user's Ctrl+Z in JupyterLab never undoes an agent's edit (the browser tracks only its own
    origin). Each edit therefore keeps its own inverse, applied by ``undo(edit_id)`` (a button on
    the edit's card): it touches only that edit's cell and refuses (``EditConflict``, 409) when
    the cell changed since, so a user's later work is never overwritten. The same inverse works
    whether the notebook is open or closed now.

Costs
    Sources over ``MAX_SOURCE_CHARS`` are refused (not cut: a cut cell would run or save
    something the agent did not write); ``read_notebook`` answers at most ``MAX_READ_CHARS``;
    at most ``MAX_NOTEBOOKS`` notebooks are listed; notebook files over 16 MiB are refused; at
    most ``MAX_UNDO`` edits are kept for undo (the oldest dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mcp.server.mcpserver.exceptions import ToolError as McpToolError

from ..errors import AcpError
from ..workspace_fs import Refused, WorkspaceFS, shown_path
from . import file_edit, kernel_run, ydoc_edit
from .file_edit import FileCells, NotebookFileError, source_of
from .ydoc_edit import LiveNotebook

log = logging.getLogger("jupyter_acp.notebooks")

T = TypeVar("T")

MAX_SOURCE_CHARS = 20_000
"""A cell source (or ``run_code`` code) the agent may send; longer is refused."""
MAX_RECORD_CHARS = 20_000
"""Source kept per side (before/after) in an ``on_edit`` record; longer is cut."""
MAX_OUTPUT_CHARS = 2_000
"""Text kept per output in what the agent gets back."""
MAX_OUTPUTS_SHOWN = 20
"""Outputs per cell in what the agent gets back."""
MAX_READ_CHARS = 256 * 1024
"""The cells ``read_notebook`` answers with, as JSON; the rest is left out and counted."""
MAX_NOTEBOOKS = 500
"""Notebooks ``list_notebooks`` names."""
MAX_SCAN_ENTRIES = 50_000
"""Directory entries ``list_notebooks`` looks at before it stops (a huge tree costs no more)."""
MAX_UNDO = 200
"""Edits kept for ``undo``; the oldest are dropped."""
CELL_TYPES = ("code", "markdown", "raw")

#: ``permit(title, code, path) -> bool``: asks the user (the session's PermissionDesk, always
#: asking, even under an "allow" policy; False under "deny").
Permit = Callable[[str, str, str], Awaitable[bool]]

_O_PATH = getattr(os, "O_PATH", 0)


class ToolError(McpToolError):
    """A refusal or failure the agent sees as the tool's error text (any other exception in a
    tool reaches the agent as a bare "Error executing tool X": its text stays on the server)."""


class EditNotFound(AcpError):
    """``undo`` of an edit this session does not know (or no longer keeps)."""

    status = 404


class EditGone(AcpError):
    """``undo`` of an edit the session made, whose undo data is no longer kept: it lives in the
    toolbox's memory, which a suspension or a server restart does not keep, and only for the
    latest ``MAX_UNDO`` edits."""

    status = 410


class EditConflict(AcpError):
    """``undo`` cannot apply: the cell changed since, it is gone, or the edit was undone already."""

    status = 409


class _Conflict(Exception):
    """Raised inside a change, before it mutates anything: the change does not apply."""


@dataclass
class _Target:
    """A notebook path the agent gave, checked: ``rel`` for ``WorkspaceFS``, ``api`` for the
    room and the kernel (None: the workspace is outside the server's root), and the file's
    ``lstat`` (None: it does not exist)."""

    rel: str
    api: str | None
    st: os.stat_result | None


@dataclass
class _Edit:
    """One edit kept for undo: its record and what the inverse needs."""

    record: dict[str, Any]
    cell: dict[str, Any] | None = None  # delete: the cell to re-insert
    from_index: int | None = None  # move: where the cell was
    created: str | None = None  # create_notebook: the text written
    undone: bool = False


def _bound(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n… [{len(text) - limit} more characters]"


def _text(value: Any, limit: int = MAX_OUTPUT_CHARS) -> str:
    return _bound("".join(value) if isinstance(value, list) else str(value), limit)


def summarize_outputs(outputs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Outputs as the agent (and an ``on_edit`` record) gets them: text only, bounded."""
    out: list[dict[str, Any]] = []
    for o in (outputs or [])[:MAX_OUTPUTS_SHOWN]:
        kind = o.get("output_type")
        if kind == "stream":
            out.append({"type": "stream", "name": o.get("name"), "text": _text(o.get("text", ""))})
        elif kind == "error":
            out.append({"type": "error", "ename": _text(o.get("ename", ""), 200),
                        "evalue": _text(o.get("evalue", ""), 500)})
        else:
            data = o.get("data") or {}
            out.append({"type": kind, "mime": sorted(data)[:10], "text": _text(data.get("text/plain", ""))})
    if len(outputs or []) > MAX_OUTPUTS_SHOWN:
        out.append({"type": "omitted", "count": len(outputs or []) - MAX_OUTPUTS_SHOWN})
    return out


def _cut(text: str | None) -> str | None:
    return None if text is None else _bound(text, MAX_RECORD_CHARS)


class NotebookToolbox:
    """One session's notebook tools; see the module docstring. Built by the lead's channel
    with the session's ``WorkspaceFS`` and callbacks (``permit``, ``on_edit``, ``may_edit``)."""

    def __init__(self, serverapp: Any, *, fs: WorkspaceFS, api_prefix: str | None, origin: str,
                 permit: Permit, allow_kernel: bool, on_edit: Callable[[dict[str, Any]], None],
                 may_edit: Callable[[], str | None] = lambda: None, run_timeout: float = 120.0) -> None:
        self.serverapp = serverapp
        self.fs = fs  # (also sets ``nbfs``)
        self.api_prefix = None if api_prefix is None else api_prefix.strip("/")
        self.origin, self.permit, self.allow_kernel = origin, permit, allow_kernel
        self.on_edit, self.may_edit, self.run_timeout = on_edit, may_edit, run_timeout
        self.runs = kernel_run.KernelRuns(serverapp)
        self._edits: OrderedDict[str, _Edit] = OrderedDict()
        #: runs (never undoable), kept apart so that they do not push edits out of ``_edits``
        self._runs: OrderedDict[str, str] = OrderedDict()
        self._lock = asyncio.Lock()  # one read-modify-write of a file at a time
        self._closing: set[asyncio.Task[Any]] = set()
        self.closed = False

    @property
    def fs(self) -> WorkspaceFS:
        """The session's fs (paths are checked with it). Setting it (a restarted agent gets a
        new one) also makes ``nbfs``: its twin without the ``.ipynb`` write refusal and with the
        notebook size bound, through which notebook files are read and written."""
        return self._fs

    @fs.setter
    def fs(self, fs: WorkspaceFS) -> None:
        self._fs = fs
        self.nbfs = file_edit.notebook_fs(fs)

    # -- paths ----------------------------------------------------------------------------
    def _target(self, path: Any) -> _Target:
        """Check the agent's notebook ``path``; see "Paths" in the module docstring."""
        try:
            parts = self.fs.components(path)
        except Refused as r:
            raise ToolError(f"refused path {shown_path(path)!r}: {r.why}") from None
        if not parts or not parts[-1].lower().endswith(".ipynb"):
            raise ToolError(f"refused path {shown_path(path)!r}: not a notebook (*.ipynb)")
        st = self._lstat_no_symlinks(parts, shown_path(path))
        rel = "/".join(parts)
        api = None if self.api_prefix is None else "/".join(p for p in (self.api_prefix, rel) if p)
        return _Target(rel, api, st)

    def _lstat_no_symlinks(self, parts: list[str], shown: str) -> os.stat_result | None:
        """The final component's stat, walking from the root descriptor with ``O_NOFOLLOW``
        and refusing a symlink anywhere; None when a component does not exist."""
        flags = os.O_RDONLY | _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.fs.host_root, flags | os.O_DIRECTORY)
        except OSError:
            raise ToolError("the workspace is not available") from None
        try:
            for i, name in enumerate(parts):
                try:
                    nfd = os.open(name, flags, dir_fd=fd)
                except FileNotFoundError:
                    return None
                except OSError as e:
                    raise ToolError(f"refused path {shown!r}: {os.strerror(e.errno or 0).lower()}") from None
                os.close(fd)
                fd = nfd
                st = os.fstat(fd)
                if stat.S_ISLNK(st.st_mode):
                    raise ToolError(f"refused path {shown!r}: a symlink in the path is not allowed")
                if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
                    raise ToolError(f"refused path {shown!r}: not a directory")
                if i == len(parts) - 1:
                    if not stat.S_ISREG(st.st_mode):
                        raise ToolError(f"refused path {shown!r}: not a regular file")
                    if st.st_nlink > 1:  # another name of the same file, maybe outside the workspace
                        raise ToolError(f"refused path {shown!r}: the file has several hard links")
                    return st
            return None
        finally:
            os.close(fd)

    # -- plumbing -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise ToolError("the session has ended")

    def _check_edit(self) -> None:
        self._check_open()
        why = self.may_edit()
        if why:
            raise ToolError(why)

    @staticmethod
    def _check_source(source: Any, what: str = "source") -> str:
        if not isinstance(source, str):
            raise ToolError(f"{what} must be a string")
        if len(source) > MAX_SOURCE_CHARS:
            raise ToolError(f"{what} is longer than {MAX_SOURCE_CHARS} characters ({len(source)}); "
                            "split it into several cells")
        return source

    @staticmethod
    def _check_cell_id(cell_id: Any) -> str:
        if not isinstance(cell_id, str) or not cell_id or len(cell_id) > 100:
            raise ToolError("cell_id must be the id of a cell, as read_notebook gives it")
        return cell_id

    @staticmethod
    def _check_index(index: Any) -> int:
        if not isinstance(index, int) or isinstance(index, bool):
            raise ToolError("index must be an integer")
        return max(0, index)

    async def _live(self, t: _Target) -> LiveNotebook | None:
        if t.api is None or t.st is None:
            return None
        doc = await ydoc_edit.live_notebook(self.serverapp, t.api, t.st)
        return LiveNotebook(doc, self.origin) if doc is not None else None

    async def _apply(self, t: _Target, change: Callable[[Any], T]) -> tuple[T, bool]:
        """Run ``change`` on the notebook's cells, live (one transaction) or in the file
        (validated and written); → (its result, live?). Failures become ``ToolError``s."""
        if t.st is None:
            raise ToolError(f"{t.rel}: not found")
        try:
            live = await self._live(t)
            if live is not None:
                with live.transaction():
                    return change(live), True
            return await file_edit.edit(self.nbfs, t.rel, change), False
        except KeyError as e:
            raise ToolError(f"no cell {shown_path(str(e.args[0]))!r} in {t.rel}") from None
        except (_Conflict, NotebookFileError) as e:
            raise ToolError(f"{t.rel}: {e}") from None

    async def _cells(self, t: _Target) -> tuple[list[dict[str, Any]], bool]:
        if t.st is None:
            raise ToolError(f"{t.rel}: not found")
        live = await self._live(t)
        if live is not None:
            return live.cells(), True
        try:
            return FileCells(await file_edit.read(self.nbfs, t.rel)).cells(), False
        except NotebookFileError as e:
            raise ToolError(f"{t.rel}: {e}") from None

    def _emit(self, tool: str, t: _Target, *, live: bool, cell_id: str | None = None,
              cell_type: str | None = None, index: int | None = None, before: str | None = None,
              after: str | None = None, undoes: str | None = None, undoable: bool = True,
              **extra: Any) -> dict[str, Any]:
        """Build the record of one edit/run/undo and hand it to ``on_edit``."""
        record: dict[str, Any] = {
            "edit_id": uuid.uuid4().hex, "tool": tool, "path": t.rel, "cell_id": cell_id,
            "cell_type": cell_type, "live": live, "index": index, "before": _cut(before),
            "after": _cut(after), "outputs": None, "execution_count": None, "status": None,
            "undoes": undoes, "undoable": undoable, **extra}
        try:
            self.on_edit(record)
        except Exception:  # the edit happened; a broken listener must not turn it into an error
            log.exception("notebook on_edit listener failed")
        return record

    def _keep(self, edit: _Edit) -> None:
        self._edits[edit.record["edit_id"]] = edit
        while len(self._edits) > MAX_UNDO:
            self._edits.popitem(last=False)

    def _keep_run(self, record: dict[str, Any]) -> None:
        self._runs[record["edit_id"]] = record["tool"]
        while len(self._runs) > MAX_UNDO:
            self._runs.popitem(last=False)

    @staticmethod
    def _result(record: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"edit_id": record["edit_id"], "path": record["path"], "live": record["live"], **extra}

    # -- reading --------------------------------------------------------------------------
    async def list_notebooks(self) -> dict[str, Any]:
        """The workspace's notebooks (no hidden directories, no symlinks) and whether each is open."""
        self._check_open()
        found, truncated = await asyncio.to_thread(self._scan)
        notebooks = []
        for rel, st in found:
            api = None if self.api_prefix is None else "/".join(p for p in (self.api_prefix, rel) if p)
            rid = ydoc_edit.room_of(self.serverapp, api, st) if api is not None else None
            notebooks.append({"path": rel, "open": ydoc_edit.clients_of(self.serverapp, rid) > 0})
        return {"notebooks": notebooks, "truncated": truncated}

    def _scan(self) -> tuple[list[tuple[str, os.stat_result]], bool]:
        """``os.fwalk`` holds a descriptor per directory and never enters a symlink, so a swap
        while it runs cannot make it list another user's directory."""
        found: list[tuple[str, os.stat_result]] = []
        seen = 0
        root = self.fs.host_root
        for dirpath, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            seen += len(dirnames) + len(filenames)
            if seen > MAX_SCAN_ENTRIES:
                return found, True
            rel_dir = os.path.relpath(dirpath, root)
            for name in sorted(filenames):
                if not name.lower().endswith(".ipynb"):
                    continue
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if len(found) >= MAX_NOTEBOOKS:
                    return found, True
                found.append((name if rel_dir == "." else f"{rel_dir}/{name}", st))
        return found, False

    async def read_notebook(self, path: str) -> dict[str, Any]:
        """The notebook's cells (id, type, source, summarized outputs), at most ``MAX_READ_CHARS``."""
        self._check_open()
        t = self._target(path)
        cells, live = await self._cells(t)
        shown: list[dict[str, Any]] = []
        used = 0
        for cell in cells:
            entry: dict[str, Any] = {"id": cell.get("id"), "cell_type": cell.get("cell_type"),
                                     "source": _bound(source_of(cell), MAX_SOURCE_CHARS)}
            if cell.get("cell_type") == "code":
                entry["execution_count"] = cell.get("execution_count")
                entry["outputs"] = summarize_outputs(cell.get("outputs"))
            size = len(json.dumps(entry))
            if used + size > MAX_READ_CHARS:
                break
            used += size
            shown.append(entry)
        result: dict[str, Any] = {"path": t.rel, "live": live, "cell_count": len(cells), "cells": shown}
        if len(shown) < len(cells):
            result["omitted"] = (f"cells {len(shown)} to {len(cells) - 1} left out (over "
                                 f"{MAX_READ_CHARS} characters)")
        return result

    # -- edits ----------------------------------------------------------------------------
    async def insert_cell(self, path: str, index: int, cell_type: str, source: str) -> dict[str, Any]:
        """Insert a new cell at ``index`` (clamped); → its ``cell_id``."""
        self._check_edit()
        index = self._check_index(index)
        if cell_type not in CELL_TYPES:
            raise ToolError("cell_type must be code, markdown or raw")
        source = self._check_source(source)
        t = self._target(path)
        cell = file_edit.new_cell(cell_type, source)
        async with self._lock:
            at, live = await self._apply(t, lambda c: c.insert(index, cell))
            rec = self._emit("insert_cell", t, live=live, cell_id=cell["id"], cell_type=cell_type,
                             index=at, after=source)
            self._keep(_Edit(rec))
        return self._result(rec, cell_id=cell["id"], index=at)

    async def replace_cell(self, path: str, cell_id: str, source: str) -> dict[str, Any]:
        """Replace a cell's source (live: a granular text change, the cell and its outputs stay)."""
        self._check_edit()
        cell_id, source = self._check_cell_id(cell_id), self._check_source(source)
        t = self._target(path)

        def change(c: Any) -> tuple[dict[str, Any], int]:
            old = c.cell(cell_id)
            c.set_source(cell_id, source)
            return old, c.index_of(cell_id)

        async with self._lock:
            (old, at), live = await self._apply(t, change)
            rec = self._emit("replace_cell", t, live=live, cell_id=cell_id, cell_type=old.get("cell_type"),
                             index=at, before=source_of(old), after=source)
            self._keep(_Edit(rec, cell=old))
        return self._result(rec, cell_id=cell_id, index=at)

    async def move_cell(self, path: str, cell_id: str, index: int) -> dict[str, Any]:
        """Move a cell to ``index`` (clamped)."""
        self._check_edit()
        cell_id, index = self._check_cell_id(cell_id), self._check_index(index)
        t = self._target(path)

        def change(c: Any) -> tuple[dict[str, Any], tuple[int, int]]:
            return c.cell(cell_id), c.move(cell_id, index)

        async with self._lock:
            (cell, (was, at)), live = await self._apply(t, change)
            src = source_of(cell)
            rec = self._emit("move_cell", t, live=live, cell_id=cell_id, cell_type=cell.get("cell_type"),
                             index=at, before=src, after=src, from_index=was)
            self._keep(_Edit(rec, from_index=was))
        return self._result(rec, cell_id=cell_id, index=at, from_index=was)

    async def delete_cell(self, path: str, cell_id: str) -> dict[str, Any]:
        """Delete a cell (kept with its outputs so that ``undo`` can put it back)."""
        self._check_edit()
        cell_id = self._check_cell_id(cell_id)
        t = self._target(path)

        def change(c: Any) -> tuple[dict[str, Any], int]:
            return c.cell(cell_id), c.delete(cell_id)

        async with self._lock:
            (cell, at), live = await self._apply(t, change)
            rec = self._emit("delete_cell", t, live=live, cell_id=cell_id, cell_type=cell.get("cell_type"),
                             index=at, before=source_of(cell))
            self._keep(_Edit(rec, cell=cell))
        return self._result(rec, cell_id=cell_id, index=at)

    async def create_notebook(self, path: str) -> dict[str, Any]:
        """Create an empty notebook (refused when the file exists)."""
        self._check_edit()
        t = self._target(path)
        if t.st is not None:
            raise ToolError(f"{t.rel} exists; read it with read_notebook")
        async with self._lock:
            try:
                text = await file_edit.create(self.nbfs, t.rel)
            except NotebookFileError as e:
                raise ToolError(f"{t.rel}: {e}") from None
            rec = self._emit("create_notebook", t, live=False)
            self._keep(_Edit(rec, created=text))
        return self._result(rec)

    # -- kernels --------------------------------------------------------------------------
    async def _kernel(self, t: _Target) -> str:
        if not self.allow_kernel:
            raise ToolError("running code in the user's kernel is disabled by the administrator")
        if t.api is None:
            raise ToolError("this workspace is not under the Jupyter server's root: no kernels")
        if t.st is None:
            raise ToolError(f"{t.rel}: not found")
        kid = await kernel_run.kernel_of(self.serverapp, t.api)
        if kid is None:
            raise ToolError(f"{t.rel} has no running kernel; ask the user to open it in JupyterLab "
                            "and start its kernel (the agent cannot start one)")
        return kid

    async def _run(self, kid: str, code: str, writer: kernel_run.LiveOutputs | None) -> dict[str, Any]:
        if writer is not None:
            writer.start()
        try:
            result = await self.runs.run(kid, code, timeout=self.run_timeout,
                                         on_output=writer.add if writer is not None else None)
        except kernel_run.KernelRunError as e:
            raise ToolError(str(e)) from None
        finally:
            if writer is not None:
                writer.finish(None)
        if writer is not None:
            writer.finish(result["execution_count"])
        return result

    async def run_cell(self, path: str, cell_id: str) -> dict[str, Any]:
        """Run a code cell in the notebook's kernel, after the user allowed exactly this code.

        Live: outputs appear in the cell as they come. Closed: they are written to the file
        afterwards (unless the cell or the file changed meanwhile; ``saved`` says)."""
        self._check_edit()
        cell_id = self._check_cell_id(cell_id)
        t = self._target(path)
        kid = await self._kernel(t)
        cells, _ = await self._cells(t)
        cell = next((c for c in cells if c.get("id") == cell_id), None)
        if cell is None:
            raise ToolError(f"no cell {cell_id!r} in {t.rel}")
        if cell.get("cell_type") != "code":
            raise ToolError(f"cell {cell_id!r} is a {cell.get('cell_type')} cell, not code")
        code = source_of(cell)
        if not await self.permit(f"Run a cell of {os.path.basename(t.rel)} in your kernel", code, t.rel):
            raise ToolError("the user did not allow running this cell")
        self._check_open()
        kid = await self._kernel(t)  # the user may have restarted it while deciding
        live = await self._live(t)
        writer = kernel_run.LiveOutputs(live.nb, cell_id, self.origin) if live is not None else None
        result = await self._run(kid, code, writer)
        saved = live is not None
        if live is None:
            def store(c: FileCells) -> None:
                if source_of(c.cell(cell_id)) != code:
                    raise _Conflict("the cell changed while it ran")
                c.set_outputs(cell_id, result["outputs"], result["execution_count"])
            async with self._lock:
                with contextlib.suppress(KeyError, _Conflict, NotebookFileError):
                    await file_edit.edit(self.nbfs, t.rel, store)
                    saved = True
        outputs = summarize_outputs(result["outputs"])
        rec = self._emit("run_cell", t, live=live is not None, cell_id=cell_id, cell_type="code",
                         before=code, after=code, undoable=False, outputs=outputs,
                         execution_count=result["execution_count"], status=result["status"])
        self._keep_run(rec)
        return self._result(rec, cell_id=cell_id, status=result["status"],
                            execution_count=result["execution_count"], outputs=outputs, saved=saved)

    async def run_code(self, path: str, code: str) -> dict[str, Any]:
        """Run ``code`` in the notebook's kernel without a cell (asks the user first); the
        outputs come back to the agent only."""
        self._check_edit()
        code = self._check_source(code, "code")
        t = self._target(path)
        await self._kernel(t)
        if not await self.permit(f"Run code in the kernel of {os.path.basename(t.rel)}", code, t.rel):
            raise ToolError("the user did not allow running this code")
        self._check_open()
        kid = await self._kernel(t)
        result = await self._run(kid, code, None)
        outputs = summarize_outputs(result["outputs"])
        rec = self._emit("run_code", t, live=False, after=code, undoable=False, outputs=outputs,
                         execution_count=result["execution_count"], status=result["status"])
        self._keep_run(rec)
        return self._result(rec, status=result["status"], execution_count=result["execution_count"],
                            outputs=outputs)

    async def cancel(self) -> None:
        """Interrupt the kernels running this toolbox's requests (turn cancelled, session ended)."""
        await self.runs.cancel()

    def close(self) -> None:
        """Refuse further tool calls and stop running ones. ``undo`` keeps working: it is the
        user's action (REST), and the session's edits may be undone after it ended."""
        self.closed = True
        with contextlib.suppress(RuntimeError):  # no running loop: nothing can be running
            task = asyncio.get_running_loop().create_task(self.runs.cancel())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- undo -----------------------------------------------------------------------------
    async def undo(self, edit_id: str) -> dict[str, Any]:
        """Apply the inverse of edit ``edit_id``; → the ``undo`` record (also sent to ``on_edit``).

        ``EditNotFound`` for an unknown (or dropped) edit, ``EditConflict`` when the inverse
        does not apply any more (the text says why); then nothing changed."""
        edit = self._edits.get(edit_id) if isinstance(edit_id, str) else None
        if edit is None and isinstance(edit_id, str) and edit_id in self._runs:
            raise EditConflict(f"A {self._runs[edit_id]} cannot be undone")
        if edit is None:
            raise EditNotFound(f"No notebook edit {shown_path(edit_id)!r} of this session to undo")
        rec = edit.record
        if not rec.get("undoable"):
            raise EditConflict(f"A {rec['tool']} cannot be undone")
        if edit.undone:
            raise EditConflict("This edit was undone already")
        async with self._lock:
            try:
                t = self._target(rec["path"])
                if rec["tool"] == "create_notebook":
                    return await self._undo_create(edit, t)
                undo_rec = await self._undo_cells(edit, t)
            except ToolError as e:
                raise EditConflict(f"Cannot undo: {e}") from None
            edit.undone = True
            return undo_rec

    async def _undo_create(self, edit: _Edit, t: _Target) -> dict[str, Any]:
        if t.st is None:
            raise EditConflict(f"Cannot undo: {t.rel} no longer exists")
        if await self._live(t) is not None:
            raise EditConflict(f"Cannot undo: {t.rel} is open in JupyterLab; close it first")
        try:
            await file_edit.remove_if_unchanged(self.nbfs, t.rel, (edit.created or "").encode())
        except NotebookFileError as e:
            raise EditConflict(f"Cannot undo: {e}") from None
        edit.undone = True
        return self._emit("undo", t, live=False, undoes=edit.record["edit_id"], undoable=False,
                          undone_tool="create_notebook")

    async def _undo_cells(self, edit: _Edit, t: _Target) -> dict[str, Any]:
        rec = edit.record
        tool, cell_id = rec["tool"], rec["cell_id"]

        def current(c: Any) -> dict[str, Any]:
            try:
                return dict(c.cell(cell_id))
            except KeyError:
                raise _Conflict("the cell no longer exists") from None

        def inverse(c: Any) -> tuple[int | None, str | None, str | None]:
            if tool == "insert_cell":
                if source_of(current(c)) != rec["after"]:
                    raise _Conflict("the cell was edited since the agent inserted it")
                return c.delete(cell_id), rec["after"], None
            if tool == "replace_cell":
                assert edit.cell is not None
                now = source_of(current(c))
                if now != rec["after"]:
                    raise _Conflict("the cell was edited since the agent's change")
                c.set_source(cell_id, source_of(edit.cell))
                return c.index_of(cell_id), now, source_of(edit.cell)
            if tool == "delete_cell":
                assert edit.cell is not None
                with contextlib.suppress(KeyError):
                    c.index_of(cell_id)
                    raise _Conflict("a cell with that id exists again")
                return c.insert(rec["index"], edit.cell), None, source_of(edit.cell)
            if tool == "move_cell":
                src = source_of(current(c))
                _, at = c.move(cell_id, edit.from_index or 0)
                return at, src, src
            raise _Conflict(f"a {tool} cannot be undone")

        (at, before, after), live = await self._apply(t, inverse)
        return self._emit("undo", t, live=live, cell_id=cell_id, cell_type=rec.get("cell_type"), index=at,
                          before=before, after=after, undoes=rec["edit_id"], undoable=False, undone_tool=tool)
