"""A hostile agent against ``NotebookToolbox``: paths out of its workspace, symlinks to another
user's notebook (closed, and open in a live room), a directory swapped for a symlink between the
toolbox's check and its use, files that are not notebooks, oversize input, and another user's
kernel. The other user's notebook is never read, changed or run, and stays valid nbformat."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import nbformat
import pytest
from test_nb_ydoc import browser, server_config, until
from traitlets.config import Config

from jupyter_acp.notebooks import file_edit
from jupyter_acp.notebooks.tools import NotebookToolbox, ToolError
from jupyter_acp.workspace_fs import WorkspaceFS

pytestmark = pytest.mark.timeout(90)

SECRET = "bob_secret = '7f3a-bob-only'"


class World:
    """``alice/`` (the agent's workspace) and ``bob/`` (another user's) under the server root."""

    def __init__(self, serverapp: Any, root: Path, *, api_prefix: str | None = "alice") -> None:
        self.root, self.alice, self.bob = root, root / "alice", root / "bob"
        self.alice.mkdir()
        self.bob.mkdir()
        self.write(self.bob / "secret.ipynb", SECRET)
        self.write(self.alice / "mine.ipynb", "alice = 1")
        self.asked: list[str] = []
        self.records: list[dict[str, Any]] = []
        fs = WorkspaceFS(self.alice, "/workspace", refused_writes={".ipynb": "use the notebook tools"})

        async def permit(title: str, code: str, path: str) -> bool:
            self.asked.append(code)
            return True

        self.tb = NotebookToolbox(serverapp, fs=fs, api_prefix=api_prefix, origin="jupyter-acp:evil",
                                  permit=permit, allow_kernel=True, on_edit=self.records.append)
        self.bob_bytes = (self.bob / "secret.ipynb").read_bytes()

    @staticmethod
    def write(path: Path, *sources: str) -> None:
        path.write_text(nbformat.writes(nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell(s) for s in sources])))

    def bob_untouched(self) -> None:
        assert (self.bob / "secret.ipynb").read_bytes() == self.bob_bytes
        nbformat.validate(nbformat.read(self.bob / "secret.ipynb", as_version=4))

    async def refused(self, path: Any, match: str = "refused") -> None:
        """Every tool on ``path`` is refused, and nothing of bob's shows in the refusal."""
        tb = self.tb
        calls = [lambda: tb.read_notebook(path), lambda: tb.insert_cell(path, 0, "code", "stolen = 1"),
                 lambda: tb.replace_cell(path, "x", "y"), lambda: tb.delete_cell(path, "x"),
                 lambda: tb.move_cell(path, "x", 0), lambda: tb.run_code(path, "print(1)"),
                 lambda: tb.run_cell(path, "x"), lambda: tb.create_notebook(path)]
        for call in calls:
            with pytest.raises(ToolError, match=match) as info:
                await call()
            shown = str(info.value).replace(str(path), "")  # (the agent's own path may be repeated)
            assert "7f3a" not in shown and str(self.root) not in shown
        self.bob_untouched()
        assert self.asked == [] and self.records == []


@pytest.fixture
def jp_server_config(tmp_path: Path, request: pytest.FixtureRequest) -> Config:
    """The collaboration server of ``test_nb_ydoc``; for a test parametrized ``ids="inode"``, with
    the inode-based ``LocalFileIdManager`` (rooms found by the inode of the checked file)."""
    config = server_config(tmp_path)
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("ids") == "inode":
        config.FileIdExtension.file_id_manager_class = "jupyter_server_fileid.manager.LocalFileIdManager"
    return config


@pytest.fixture
def w(jp_serverapp: Any, jp_root_dir: Path) -> World:
    return World(jp_serverapp, jp_root_dir)


async def test_paths_out_of_the_workspace(w: World) -> None:
    for path in ("../bob/secret.ipynb", "sub/../../bob/secret.ipynb", "/workspace/../bob/secret.ipynb",
                 str(w.bob / "secret.ipynb"), str(w.alice / "mine.ipynb"), "/etc/passwd.ipynb",
                 "nul\x00.ipynb", "x" * 300 + ".ipynb", "", 7, None):
        await w.refused(path)
    assert [n["path"] for n in (await w.tb.list_notebooks())["notebooks"]] == ["mine.ipynb"]


async def test_not_notebooks(w: World) -> None:
    (w.alice / "notes.txt").write_text("hello")
    (w.alice / "dir.ipynb").mkdir()
    os.mkfifo(w.alice / "fifo.ipynb")
    for path, why in (("notes.txt", "not a notebook"), ("dir.ipynb", "regular"),
                      ("fifo.ipynb", "regular"), ("/workspace", "not a notebook")):
        with pytest.raises(ToolError, match=why):
            await w.tb.read_notebook(path)
        with pytest.raises(ToolError):
            await w.tb.insert_cell(path, 0, "code", "x")
    with pytest.raises(ToolError, match="regular"):
        await w.tb.create_notebook("dir.ipynb")
    assert (w.alice / "notes.txt").read_text() == "hello"


async def test_symlinks_to_another_users_notebook(w: World) -> None:
    os.symlink(w.bob / "secret.ipynb", w.alice / "abs.ipynb")
    os.symlink("../bob/secret.ipynb", w.alice / "rel.ipynb")
    os.symlink("../bob", w.alice / "bobdir")
    os.symlink("mine.ipynb", w.alice / "inside.ipynb")  # even inside the workspace: no symlinks
    for path in ("abs.ipynb", "rel.ipynb", "bobdir/secret.ipynb", "/workspace/bobdir/secret.ipynb",
                 "inside.ipynb"):
        await w.refused(path, "symlink")
    with pytest.raises(ToolError, match="symlink"):
        await w.tb.create_notebook("bobdir/new.ipynb")
    assert not (w.bob / "new.ipynb").exists()
    listed = [n["path"] for n in (await w.tb.list_notebooks())["notebooks"]]
    assert listed == ["mine.ipynb"]


@pytest.mark.parametrize("ids", ["path", "inode"])
async def test_symlink_to_a_notebook_open_in_a_room(w: World, jp_serverapp: Any, jp_fetch: Any,
                                                    jp_http_port: int, jp_base_url: str,
                                                    jp_auth_header: dict[str, str], ids: str) -> None:
    os.symlink("../bob/secret.ipynb", w.alice / "rel.ipynb")
    os.symlink("../bob", w.alice / "bobdir")
    os.link(w.bob / "secret.ipynb", w.alice / "hard.ipynb")
    fim = jp_serverapp.web_app.settings["file_id_manager"]
    assert type(fim).__name__ == ("LocalFileIdManager" if ids == "inode" else "ArbitraryFileIdManager")
    async with browser(jp_serverapp, jp_fetch, jp_http_port, jp_base_url, jp_auth_header,
                       "bob/secret.ipynb") as bobs_view:
        for path in ("rel.ipynb", "bobdir/secret.ipynb", "../bob/secret.ipynb", str(w.bob / "secret.ipynb")):
            await w.refused(path)
        await w.refused("hard.ipynb", "hard links")
        assert bobs_view.cell_number == 1 and bobs_view.get_cell(0)["source"] == SECRET
        # a notebook of alice's with the same name is hers, not bob's room
        w.write(w.alice / "secret.ipynb", "alice's")
        read = await w.tb.read_notebook("secret.ipynb")
        assert read["live"] is False and read["cells"][0]["source"] == "alice's"
        await w.tb.insert_cell("secret.ipynb", 0, "code", "alice's agent")
        assert bobs_view.cell_number == 1
        # and alice's own open notebook is found live, whichever file id manager
        async with browser(jp_serverapp, jp_fetch, jp_http_port, jp_base_url, jp_auth_header,
                           "alice/mine.ipynb") as alices_view:
            added = await w.tb.insert_cell("mine.ipynb", 1, "code", "live = True")
            assert added["live"] is True
            await until(lambda: alices_view.cell_number == 2)
    w.bob_untouched()


async def test_directory_swapped_for_a_symlink_after_the_check(w: World,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The check passes on a real directory, then the agent swaps it for a symlink to bob's
    directory before the file is opened: the confined walk of every read and write refuses."""
    (w.alice / "sub").mkdir()
    w.write(w.alice / "sub" / "secret.ipynb", "alice's own")
    check = NotebookToolbox._lstat_no_symlinks

    def check_then_swap(self: NotebookToolbox, parts: list[str], shown: str) -> os.stat_result | None:
        st = check(self, parts, shown)
        if (w.alice / "sub").is_dir() and not (w.alice / "sub").is_symlink():
            os.rename(w.alice / "sub", w.alice / "sub.real")
            os.symlink("../bob", w.alice / "sub")
        return st

    monkeypatch.setattr(NotebookToolbox, "_lstat_no_symlinks", check_then_swap)
    for call in (lambda: w.tb.read_notebook("sub/secret.ipynb"),
                 lambda: w.tb.insert_cell("sub/secret.ipynb", 0, "code", "stolen = 1"),
                 lambda: w.tb.replace_cell("sub/secret.ipynb", "x", "y")):
        with pytest.raises(ToolError, match="outside the workspace") as info:
            await call()
        assert "7f3a" not in str(info.value)
        os.unlink(w.alice / "sub")
        os.rename(w.alice / "sub.real", w.alice / "sub")
    w.bob_untouched()


async def test_directory_swapped_in_a_loop(w: World) -> None:
    """A thread swaps ``sub`` between a real directory and a symlink to bob's as fast as it can
    while the agent reads and edits: every call either works on alice's file or is refused."""
    sub, aside = w.alice / "sub", w.alice / "sub.real"
    sub.mkdir()
    w.write(sub / "secret.ipynb", "alice's own")
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            os.rename(sub, aside)
            os.symlink("../bob", sub)
            os.unlink(sub)
            os.rename(aside, sub)

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    outcomes: dict[str, int] = {"ok": 0, "refused": 0}
    try:
        for _ in range(60):
            try:
                read = await w.tb.read_notebook("sub/secret.ipynb")
                assert read["cells"][0]["source"] != SECRET
                outcomes["ok"] += 1
            except ToolError as e:
                assert "7f3a" not in str(e)
                outcomes["refused"] += 1
            try:
                await w.tb.insert_cell("sub/secret.ipynb", 0, "raw", "x")
                outcomes["ok"] += 1
            except ToolError:
                outcomes["refused"] += 1
    finally:
        stop.set()
        t.join()
    assert outcomes["refused"] > 0
    w.bob_untouched()
    nbformat.validate(nbformat.read(sub / "secret.ipynb", as_version=4))


async def test_oversize_and_invalid_notebooks(w: World) -> None:
    big = nbformat.v4.new_notebook(cells=[nbformat.v4.new_raw_cell("x" * (file_edit.MAX_NOTEBOOK_BYTES + 1))])
    (w.alice / "big.ipynb").write_text(nbformat.writes(big))
    (w.alice / "broken.ipynb").write_text('{"cells": [')
    for path, why in (("big.ipynb", "larger than"), ("broken.ipynb", "not valid JSON")):
        with pytest.raises(ToolError, match=why):
            await w.tb.read_notebook(path)
        with pytest.raises(ToolError, match=why):
            await w.tb.insert_cell(path, 0, "code", "x")
    assert (w.alice / "broken.ipynb").read_text() == '{"cells": ['
    for call in (lambda: w.tb.insert_cell("mine.ipynb", 0, "code", "x" * 20_001),
                 lambda: w.tb.replace_cell("mine.ipynb", "x", "y" * 100_000),
                 lambda: w.tb.run_code("mine.ipynb", "z" * 20_001)):
        with pytest.raises(ToolError, match="longer than 20000"):
            await call()
    assert w.asked == [] and w.records == []
    nbformat.validate(nbformat.read(w.alice / "mine.ipynb", as_version=4))


async def test_another_users_kernel_is_unreachable(w: World, jp_serverapp: Any) -> None:
    sm = jp_serverapp.session_manager
    await sm.create_session(path="bob/secret.ipynb", type="notebook", kernel_name="python3")
    try:
        os.symlink("../bob/secret.ipynb", w.alice / "rel.ipynb")
        os.symlink("../bob", w.alice / "bobdir")
        for path in ("../bob/secret.ipynb", "rel.ipynb", "bobdir/secret.ipynb", str(w.bob / "secret.ipynb")):
            with pytest.raises(ToolError, match="refused"):
                await w.tb.run_code(path, "print(secret)")
            with pytest.raises(ToolError, match="refused"):
                await w.tb.run_cell(path, "x")
        # alice's own notebook of the same name has no kernel: bob's is not used for it
        w.write(w.alice / "secret.ipynb", "1")
        with pytest.raises(ToolError, match="no running kernel"):
            await w.tb.run_code("secret.ipynb", "print(secret)")
        # nor without an api path (a workspace outside the server root)
        outside = NotebookToolbox(jp_serverapp, fs=w.tb.fs, api_prefix=None, origin="o",
                                  permit=w.tb.permit, allow_kernel=True, on_edit=w.records.append)
        with pytest.raises(ToolError, match="no kernels"):
            await outside.run_code("mine.ipynb", "1")
        assert (await outside.read_notebook("mine.ipynb"))["live"] is False
        assert w.asked == []
    finally:
        for s in await sm.list_sessions():
            await sm.delete_session(s["id"])
    w.bob_untouched()
