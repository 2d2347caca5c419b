"""Edits of a notebook nobody has open (``file_edit``): through the session's ``WorkspaceFS``
and nbformat, never the contents manager. No Jupyter server is needed: that is the point."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from acp.exceptions import RequestError

from jupyter_acp.notebooks import file_edit as fe
from jupyter_acp.workspace_fs import WorkspaceFS

pytestmark = pytest.mark.timeout(60)

WHY = "notebooks are edited with the jupyter MCP tools (mcp__jupyter__insert_cell, ...)"


@pytest.fixture
def fs(tmp_path: Path) -> WorkspaceFS:
    """The tools' twin of a session fs that refuses raw ``.ipynb`` writes (as the lead wires it)."""
    return fe.notebook_fs(WorkspaceFS(tmp_path, "/workspace", refused_writes={".ipynb": WHY}))


def on_disk(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


async def test_edit_closed_notebook(fs: WorkspaceFS, tmp_path: Path) -> None:
    await fe.create(fs, "sub/new.ipynb")  # missing directories are made
    assert on_disk(tmp_path / "sub/new.ipynb").metadata.kernelspec.name == "python3"
    code = fe.new_cell("code", "x = 1")
    md = fe.new_cell("markdown", "# hi")
    assert await fe.edit(fs, "sub/new.ipynb", lambda c: c.insert(0, code)) == 0
    assert await fe.edit(fs, "/workspace/sub/new.ipynb", lambda c: c.insert(-5, md)) == 0  # agent's view
    assert await fe.edit(fs, "sub/new.ipynb", lambda c: c.move(md["id"], 5)) == (0, 1)
    await fe.edit(fs, "sub/new.ipynb", lambda c: c.set_source(code["id"], "x = 2"))
    disk = on_disk(tmp_path / "sub/new.ipynb")
    assert [(c.cell_type, c.source, c.id) for c in disk.cells] == [
        ("code", "x = 2", code["id"]), ("markdown", "# hi", md["id"])]
    saved = await fe.edit(fs, "sub/new.ipynb", lambda c: c.cell(md["id"]))
    assert await fe.edit(fs, "sub/new.ipynb", lambda c: c.delete(md["id"])) == 1
    assert len(on_disk(tmp_path / "sub/new.ipynb").cells) == 1
    assert await fe.edit(fs, "sub/new.ipynb", lambda c: c.insert(1, saved)) == 1  # re-inserted, same id
    assert on_disk(tmp_path / "sub/new.ipynb").cells[1].id == md["id"]
    with pytest.raises(KeyError):
        await fe.edit(fs, "sub/new.ipynb", lambda c: c.delete("nope"))
    with pytest.raises(fe.NotebookFileError, match="exists"):
        await fe.create(fs, "sub/new.ipynb")


async def test_invalid_edit_is_never_written(fs: WorkspaceFS, tmp_path: Path) -> None:
    await fe.create(fs, "v.ipynb")
    before = (tmp_path / "v.ipynb").read_bytes()

    def corrupt(c: fe.FileCells) -> None:
        c.nb.cells.append(nbformat.from_dict({"cell_type": "code", "id": "x1", "source": 42, "metadata": {},
                                              "outputs": [], "execution_count": None}))

    with pytest.raises(fe.NotebookFileError, match="invalid"):
        await fe.edit(fs, "v.ipynb", corrupt)
    assert (tmp_path / "v.ipynb").read_bytes() == before


async def test_old_notebook_gets_cell_ids(fs: WorkspaceFS, tmp_path: Path) -> None:
    old = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("a")])
    old.nbformat_minor = 4
    del old.cells[0]["id"]
    (tmp_path / "old.ipynb").write_text(json.dumps(old))
    await fe.edit(fs, "old.ipynb", lambda c: c.insert(1, fe.new_cell("code", "b")))
    disk = on_disk(tmp_path / "old.ipynb")
    assert disk.nbformat_minor == 5 and all(c.get("id") for c in disk.cells)


async def test_not_a_notebook_is_refused_untouched(fs: WorkspaceFS, tmp_path: Path) -> None:
    v3 = {"nbformat": 3, "nbformat_minor": 0, "metadata": {}, "worksheets": []}
    bad_schema = json.loads(nbformat.writes(nbformat.v4.new_notebook()))
    bad_schema["cells"] = [{"cell_type": "code", "source": 1}]
    for name, text, why in (("j.ipynb", "{not json", "not valid JSON"), ("l.ipynb", "[1, 2]", "no nbformat"),
                            ("v3.ipynb", json.dumps(v3), "nbformat 3"),
                            ("s.ipynb", json.dumps(bad_schema), "not a valid notebook"),
                            ("b.ipynb", "\xff\xfe", "not valid JSON")):
        (tmp_path / name).write_text(text)
        with pytest.raises(fe.NotebookFileError, match=why):
            await fe.edit(fs, name, lambda c: c.insert(0, fe.new_cell("code", "x")))
        assert (tmp_path / name).read_text() == text


async def test_size_bound(fs: WorkspaceFS, tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_raw_cell("x" * (fe.MAX_NOTEBOOK_BYTES + 10))])
    (tmp_path / "big.ipynb").write_text(nbformat.writes(nb))
    with pytest.raises(fe.NotebookFileError, match="larger than"):
        await fe.read(fs, "big.ipynb")
    assert await fe.exists(fs, "big.ipynb")


async def test_conflicting_save_is_refused(fs: WorkspaceFS, tmp_path: Path) -> None:
    await fe.create(fs, "c.ipynb")

    def meanwhile(c: fe.FileCells) -> None:  # the user saves while the agent's edit is under way
        user = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("user")])
        (tmp_path / "c.ipynb").write_text(nbformat.writes(user))
        c.insert(0, fe.new_cell("code", "agent"))

    with pytest.raises(fe.NotebookFileConflict):
        await fe.edit(fs, "c.ipynb", meanwhile)
    assert on_disk(tmp_path / "c.ipynb").cells[0].source == "user"


async def test_remove_if_unchanged(fs: WorkspaceFS, tmp_path: Path) -> None:
    text = await fe.create(fs, "r.ipynb")
    await fe.create(fs, "r2.ipynb")
    await fe.edit(fs, "r2.ipynb", lambda c: c.insert(0, fe.new_cell("code", "kept")))
    with pytest.raises(fe.NotebookFileConflict):
        await fe.remove_if_unchanged(fs, "r2.ipynb", text.encode())
    assert (tmp_path / "r2.ipynb").exists()
    await fe.remove_if_unchanged(fs, "r.ipynb", text.encode())
    assert not (tmp_path / "r.ipynb").exists()
    with pytest.raises(fe.NotebookFileConflict):
        await fe.remove_if_unchanged(fs, "r.ipynb", text.encode())


async def test_raw_notebook_writes_are_refused(tmp_path: Path) -> None:
    """The agent's own ``fs/write_text_file`` of a notebook is refused with a pointer to the
    tools, also through a symlink with another name, while the tools' twin may write it."""
    session_fs = WorkspaceFS(tmp_path, "/workspace", refused_writes={".ipynb": WHY})
    (tmp_path / "nb.ipynb").write_text("{}")
    (tmp_path / "alias.txt").symlink_to("nb.ipynb")
    for path in ("/workspace/nb.ipynb", "/workspace/NEW.IPYNB", "/workspace/alias.txt"):
        with pytest.raises(RequestError) as info:
            await session_fs.write(path, "{}")
        assert "jupyter MCP tools" in str(info.value)
    assert (tmp_path / "nb.ipynb").read_text() == "{}" and not (tmp_path / "NEW.IPYNB").exists()
    await session_fs.write("/workspace/notes.txt", "ok")
    assert (tmp_path / "notes.txt").read_text() == "ok"
    await fe.create(fe.notebook_fs(session_fs), "NEW.IPYNB")
    on_disk(tmp_path / "NEW.IPYNB")
