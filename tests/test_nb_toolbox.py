"""``NotebookToolbox`` directly, against a real Jupyter server (pytest-jupyter), the real
collaboration websocket (a pycrdt "browser") and a real ipykernel: every tool on closed and on
open notebooks, the undo of each kind of edit (and its refusals), runs with and without the
user's permission, and the caps. The notebook on disk is valid nbformat after every step."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nbformat
import pytest
from test_nb_ydoc import browser, jp_server_config, read_saved, until

from jupyter_acp.notebooks import tools as nbtools
from jupyter_acp.notebooks.tools import EditConflict, EditNotFound, NotebookToolbox, ToolError
from jupyter_acp.workspace_fs import WorkspaceFS

__all__ = ["jp_server_config"]
pytestmark = pytest.mark.timeout(90)

KERNELSPEC = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
RECORD_KEYS = {"edit_id", "tool", "path", "cell_id", "cell_type", "live", "index", "before", "after",
               "outputs", "execution_count", "status", "undoes", "undoable"}


class Harness:
    """A workspace ``alice/`` under the server root, its session fs, and the toolbox's callbacks."""

    def __init__(self, serverapp: Any, root: Path) -> None:
        self.serverapp, self.ws = serverapp, root / "alice"
        self.ws.mkdir()
        self.fs = WorkspaceFS(self.ws, "/workspace", refused_writes={".ipynb": "use the notebook tools"})
        self.records: list[dict[str, Any]] = []
        self.asked: list[tuple[str, str, str]] = []
        self.answer = True
        self.refusal: str | None = None

    async def permit(self, title: str, code: str, path: str) -> bool:
        self.asked.append((title, code, path))
        return self.answer

    def toolbox(self, **kw: Any) -> NotebookToolbox:
        args: dict[str, Any] = {"api_prefix": "alice", "origin": "jupyter-acp:s1", "permit": self.permit,
                                "allow_kernel": True, "on_edit": self.records.append,
                                "may_edit": lambda: self.refusal, **kw}
        return NotebookToolbox(self.serverapp, fs=self.fs, **args)

    def write(self, name: str, *sources: str) -> None:
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources],
                                      metadata=KERNELSPEC)
        (self.ws / name).write_text(nbformat.writes(nb))

    def disk(self, name: str) -> nbformat.NotebookNode:
        nb = nbformat.read(self.ws / name, as_version=4)
        nbformat.validate(nb)
        return nb

    def sources(self, name: str) -> list[str]:
        return [c.source for c in self.disk(name).cells]


@pytest.fixture
def h(jp_serverapp: Any, jp_root_dir: Path) -> Harness:
    return Harness(jp_serverapp, jp_root_dir)


@pytest.fixture
async def kernel(jp_serverapp: Any) -> AsyncIterator[Callable[[str], Any]]:
    """Start a notebook session (with a python3 kernel) for an api path; all are ended after."""
    sm = jp_serverapp.session_manager

    async def start(api_path: str) -> Any:
        return await sm.create_session(path=api_path, type="notebook", kernel_name="python3")

    yield start
    for s in await sm.list_sessions():
        await sm.delete_session(s["id"])


async def test_closed_notebook_every_tool_and_undo(h: Harness) -> None:
    tb = h.toolbox()
    made = await tb.create_notebook("nb.ipynb")
    assert h.sources("nb.ipynb") == [] and made["live"] is False
    with pytest.raises(ToolError, match="exists"):
        await tb.create_notebook("/workspace/nb.ipynb")
    assert (await tb.list_notebooks())["notebooks"] == [{"path": "nb.ipynb", "open": False}]

    a = await tb.insert_cell("nb.ipynb", 0, "code", "a = 1")
    b = await tb.insert_cell("/workspace/nb.ipynb", 5, "markdown", "# b")
    assert (a["index"], b["index"]) == (0, 1)
    r = await tb.replace_cell("nb.ipynb", a["cell_id"], "a = 2")
    m = await tb.move_cell("nb.ipynb", b["cell_id"], 0)
    assert (m["from_index"], m["index"]) == (1, 0)
    assert h.sources("nb.ipynb") == ["# b", "a = 2"]
    d = await tb.delete_cell("nb.ipynb", a["cell_id"])
    assert h.sources("nb.ipynb") == ["# b"]
    read = await tb.read_notebook("nb.ipynb")
    assert read["live"] is False
    assert [(c["id"], c["source"]) for c in read["cells"]] == [(b["cell_id"], "# b")]

    assert [x["tool"] for x in h.records] == ["create_notebook", "insert_cell", "insert_cell", "replace_cell",
                                              "move_cell", "delete_cell"]
    assert all(set(x) >= RECORD_KEYS and x["path"] == "nb.ipynb" and not x["live"] for x in h.records)
    assert [x["edit_id"] for x in h.records[1:]] == [e["edit_id"] for e in (a, b, r, m, d)]
    assert (h.records[3]["before"], h.records[3]["after"]) == ("a = 1", "a = 2")

    # each inverse, newest first; the file stays valid at every step
    for edit, expect in ((d, ["# b", "a = 2"]), (m, ["a = 2", "# b"]), (r, ["a = 1", "# b"]),
                         (b, ["a = 1"]), (a, [])):
        rec = await tb.undo(edit["edit_id"])
        assert rec["tool"] == "undo" and rec["undoes"] == edit["edit_id"] and rec is h.records[-1]
        assert h.sources("nb.ipynb") == expect
    assert h.disk("nb.ipynb").nbformat_minor == 5
    with pytest.raises(EditConflict, match="already") as info:
        await tb.undo(a["edit_id"])
    assert info.value.status == 409
    with pytest.raises(EditNotFound) as missing:
        await tb.undo("nope")
    assert missing.value.status == 404

    await tb.undo(made["edit_id"])  # unchanged since created: removed
    assert not (h.ws / "nb.ipynb").exists()


async def test_closed_notebook_undo_conflicts(h: Harness) -> None:
    tb = h.toolbox()
    made = await tb.create_notebook("c.ipynb")
    ins = await tb.insert_cell("c.ipynb", 0, "code", "x = 1")
    rep = await tb.replace_cell("c.ipynb", ins["cell_id"], "x = 2")
    # the user edits the agent's cell (a save of their own)
    nb = h.disk("c.ipynb")
    nb.cells[0].source = "x = 3  # mine"
    (h.ws / "c.ipynb").write_text(nbformat.writes(nb))
    for edit, why in ((rep, "edited since"), (ins, "edited since"), (made, "changed since")):
        with pytest.raises(EditConflict, match=why) as info:
            await tb.undo(edit["edit_id"])
        assert info.value.status == 409
    assert h.sources("c.ipynb") == ["x = 3  # mine"]
    moved = await tb.move_cell("c.ipynb", ins["cell_id"], 0)
    deleted = await tb.delete_cell("c.ipynb", ins["cell_id"])
    with pytest.raises(EditConflict, match="no longer exists"):
        await tb.undo(moved["edit_id"])
    h.write("c.ipynb")  # the user replaces the whole notebook; the deleted cell comes back by id
    nb = h.disk("c.ipynb")
    nb.cells.append(nbformat.v4.new_code_cell("user's", id=ins["cell_id"]))
    (h.ws / "c.ipynb").write_text(nbformat.writes(nb))
    with pytest.raises(EditConflict, match="exists again"):
        await tb.undo(deleted["edit_id"])
    assert h.sources("c.ipynb") == ["user's"]


async def test_live_notebook_every_tool_undo_and_the_users_edit(
        h: Harness, jp_serverapp: Any, jp_fetch: Any, jp_http_port: int, jp_base_url: str,
        jp_auth_header: dict[str, str]) -> None:
    h.write("live.ipynb", "u = 1", "v = 2")
    tb = h.toolbox()
    async with browser(jp_serverapp, jp_fetch, jp_http_port, jp_base_url, jp_auth_header,
                       "alice/live.ipynb") as client:
        assert (await tb.list_notebooks())["notebooks"] == [{"path": "live.ipynb", "open": True}]
        first, second = (client.ycells[i]["id"] for i in range(2))
        ins = await tb.insert_cell("live.ipynb", 1, "code", "agent = 1")
        assert ins["live"] is True
        await until(lambda: client.cell_number == 3 and client.get_cell(1)["source"] == "agent = 1")
        rep = await tb.replace_cell("live.ipynb", first, "u = 10")
        await until(lambda: client.get_cell(0)["source"] == "u = 10")
        mov = await tb.move_cell("live.ipynb", ins["cell_id"], 0)
        await until(lambda: client.ycells[0]["id"] == ins["cell_id"])
        dele = await tb.delete_cell("live.ipynb", second)
        await until(lambda: client.cell_number == 2)
        read = await tb.read_notebook("live.ipynb")
        assert read["live"] is True and [c["source"] for c in read["cells"]] == ["agent = 1", "u = 10"]
        assert all(r["live"] for r in h.records)

        # the user types in the agent's inserted cell: its undo is refused, their text stays
        client.set_cell(0, source="agent = 1  # kept by the user")
        await until_server(tb, "live.ipynb", ins["cell_id"], "agent = 1  # kept by the user")
        with pytest.raises(EditConflict, match="edited since"):
            await tb.undo(ins["edit_id"])

        # the other edits are undone; the user's edit stays
        await tb.undo(dele["edit_id"])
        await until(lambda: client.cell_number == 3 and client.ycells[2]["id"] == second)
        assert client.get_cell(2)["source"] == "v = 2"
        await tb.undo(mov["edit_id"])
        await until(lambda: client.ycells[1]["id"] == ins["cell_id"])
        await tb.undo(rep["edit_id"])
        await until(lambda: client.get_cell(0)["source"] == "u = 1")
        assert [client.get_cell(i)["source"] for i in range(3)] == [
            "u = 1", "agent = 1  # kept by the user", "v = 2"]
        assert [r["live"] for r in h.records if r["tool"] == "undo"] == [True, True, True]

        def saved() -> bool:
            disk = read_saved(h.ws / "live.ipynb")
            return disk is not None and [c.source for c in disk.cells] == [
                "u = 1", "agent = 1  # kept by the user", "v = 2"]
        await until(saved)
    h.disk("live.ipynb")


async def until_server(tb: NotebookToolbox, path: str, cell_id: str, source: str) -> None:
    """Wait until the room (what the toolbox sees) has the browser's edit."""
    for _ in range(500):
        cells = (await tb.read_notebook(path))["cells"]
        if any(c["id"] == cell_id and c["source"] == source for c in cells):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the room never got the browser's edit")


async def test_runs(h: Harness, kernel: Any, jp_serverapp: Any, jp_fetch: Any, jp_http_port: int,
                    jp_base_url: str, jp_auth_header: dict[str, str]) -> None:
    h.write("k.ipynb", "x = 20", "print(x * 2)\nx + 1", "import time; time.sleep(60)")
    h.write("nokernel.ipynb", "1")
    tb = h.toolbox(run_timeout=3.0)
    ids = [c.id for c in h.disk("k.ipynb").cells]

    with pytest.raises(ToolError, match="no running kernel"):
        await tb.run_cell("nokernel.ipynb", h.disk("nokernel.ipynb").cells[0].id)
    assert h.asked == []  # nothing to ask about
    kid = (await kernel("alice/k.ipynb"))["kernel"]["id"]

    # refused by the user: nothing runs
    h.answer = False
    with pytest.raises(ToolError, match="did not allow"):
        await tb.run_cell("k.ipynb", ids[0])
    assert h.asked[-1] == ("Run a cell of k.ipynb in your kernel", "x = 20", "k.ipynb")
    h.answer = True

    # closed notebook: outputs written to the file afterwards
    ran = await tb.run_cell("k.ipynb", ids[0])
    assert ran["status"] == "ok" and ran["saved"] is True
    assert h.disk("k.ipynb").cells[0].execution_count == ran["execution_count"]
    code = await tb.run_code("k.ipynb", "x")
    assert code["outputs"] == [{"type": "execute_result", "mime": ["text/plain"], "text": "20"}]
    assert h.asked[-1][1] == "x" and h.records[-1]["tool"] == "run_code"

    async with browser(jp_serverapp, jp_fetch, jp_http_port, jp_base_url, jp_auth_header,
                       "alice/k.ipynb") as client:
        ran = await tb.run_cell("k.ipynb", ids[1])
        assert ran["status"] == "ok" and [o["text"] for o in ran["outputs"]] == ["40\n", "21"]
        await until(lambda: len(client.get_cell(1).get("outputs", [])) == 2
                    and client.get_cell(1)["execution_count"] == ran["execution_count"])
        rec = h.records[-1]
        assert (rec["tool"], rec["live"], rec["undoable"], rec["status"]) == ("run_cell", True, False, "ok")
        with pytest.raises(EditConflict, match="cannot be undone"):
            await tb.undo(rec["edit_id"])

        # longer than run_timeout: interrupted, the kernel stays usable
        slow = await tb.run_cell("k.ipynb", ids[2])
        assert slow["status"] == "timeout"
        # (an interrupted execution makes ipykernel abort what is queued behind it, as the
        # Interrupt button does: wait until the toolbox saw its request end)
        await until(lambda: not tb.runs._background, timeout=60)
        assert (await tb.run_code("k.ipynb", "x + 2"))["outputs"][0]["text"] == "22"

        # cancelled (turn cancelled): interrupted as well
        tb_long = h.toolbox()
        task = asyncio.ensure_future(tb_long.run_code(
            "k.ipynb", "import time; print('started', flush=True); time.sleep(60)"))
        await until(lambda: any(r.started for r in tb_long.runs._running.values()))
        await tb_long.cancel()
        assert (await task)["status"] == "cancelled"
        await until(lambda: not tb_long.runs._background, timeout=60)
        assert (await tb.run_code("k.ipynb", "x + 3"))["outputs"][0]["text"] == "23"

        # queued behind the user's own execution: a timeout never interrupts the user's code;
        # the abandoned request is stopped as soon as it starts
        user = jp_serverapp.kernel_manager.get_kernel(kid).client()
        user.start_channels()
        try:
            await user.wait_for_ready(timeout=30)
            running = asyncio.Event()
            users_run = asyncio.ensure_future(user.execute_interactive(
                "import time; time.sleep(2.5); user_done = 1", timeout=60,
                output_hook=lambda m: m["header"]["msg_type"] == "execute_input" and running.set()))
            await running.wait()
            quick = h.toolbox(run_timeout=0.5)
            queued = await quick.run_code("k.ipynb", "import time; time.sleep(60); agent_done = 1")
            assert queued["status"] == "timeout" and queued["outputs"] == []
            assert (await users_run)["content"]["status"] == "ok"
            await until(lambda: not quick.runs._background, timeout=60)
        finally:
            user.stop_channels()
        done = await tb.run_code("k.ipynb", "('user_done' in dir(), 'agent_done' in dir())")
        assert done["outputs"][0]["text"] == "(True, False)"

    h.disk("k.ipynb")
    asked = len(h.asked)
    with pytest.raises(ToolError, match="disabled by the administrator"):
        await h.toolbox(allow_kernel=False).run_cell("k.ipynb", ids[0])
    with pytest.raises(ToolError, match="markdown cell"):
        md = await tb.insert_cell("k.ipynb", 0, "markdown", "# m")
        await tb.run_cell("k.ipynb", md["cell_id"])
    assert len(h.asked) == asked  # refused before the user is asked


async def test_refusals_and_caps(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h.write("a.ipynb", "a")
    tb = h.toolbox()
    h.refusal = "this session's policy is deny: no edits"
    for call in (lambda: tb.insert_cell("a.ipynb", 0, "code", "x"), lambda: tb.create_notebook("n.ipynb"),
                 lambda: tb.run_code("a.ipynb", "1")):
        with pytest.raises(ToolError, match="policy is deny"):
            await call()
    assert (await tb.read_notebook("a.ipynb"))["cell_count"] == 1  # reading stays allowed
    h.refusal = None

    with pytest.raises(ToolError, match="longer than 20000"):
        await tb.insert_cell("a.ipynb", 0, "code", "x" * 20_001)
    for bad in ((0, "python", "x"), ("0", "code", "x"), (True, "code", "x"), (0, "code", 7)):
        with pytest.raises(ToolError):
            await tb.insert_cell("a.ipynb", *bad)  # type: ignore[arg-type]
    with pytest.raises(ToolError, match="no cell"):
        await tb.replace_cell("a.ipynb", "nope", "x")
    with pytest.raises(ToolError, match="not found"):
        await tb.read_notebook("missing.ipynb")
    assert h.sources("a.ipynb") == ["a"]

    # read_notebook answers at most MAX_READ_CHARS
    big = ["y" * 19_000 for _ in range(20)]
    h.write("big.ipynb", *big)
    read = await tb.read_notebook("big.ipynb")
    assert read["cell_count"] == 20 and 0 < len(read["cells"]) < 20 and "left out" in read["omitted"]

    # the oldest edits are dropped from undo; the listing is capped
    monkeypatch.setattr(nbtools, "MAX_UNDO", 2)
    monkeypatch.setattr(nbtools, "MAX_NOTEBOOKS", 2)
    h.write("c.ipynb")
    edits = [await tb.insert_cell("a.ipynb", 0, "code", str(i)) for i in range(3)]
    with pytest.raises(EditNotFound):
        await tb.undo(edits[0]["edit_id"])
    await tb.undo(edits[2]["edit_id"])
    listed = await tb.list_notebooks()
    assert len(listed["notebooks"]) == 2 and listed["truncated"] is True

    tb.close()
    with pytest.raises(ToolError, match="ended"):
        await tb.read_notebook("a.ipynb")
    await tb.undo(edits[1]["edit_id"])  # the user's undo still works after the session ended
    assert h.sources("a.ipynb") == ["0", "a"]  # (the dropped edit stays)
