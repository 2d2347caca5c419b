"""The notebook tools through the session manager (issue 19), with the demo agent over real stdio.

Every session's agent gets a ``jupyter`` MCP server in ``session/new``: a stdlib relay it starts
inside its sandbox, which reaches this session's unix socket, where the MCP SDK serves the tools
in the server process (``notebooks/channel.py``). The demo's ``/nb TOOL JSON`` is an MCP client
(the SDK's ``ClientSession`` over ``stdio_client``), as a real agent is. Without a Jupyter server
(the manager alone) the tools edit closed notebooks through the session's confined file system;
live rooms and kernels are in ``test_nb_server.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import acp_require_backend, wait_for

from jupyter_acp.manager import UserSessionManager
from jupyter_acp.notebooks.tools import EditGone, EditNotFound
from jupyter_acp.session import AgentSession

pytestmark = pytest.mark.timeout(120)
#: each user a directory of the root (as under JupyterHub with a shared root)
PER_USER = "{root_dir}/{username}"


@pytest.fixture(params=["local", pytest.param("bubblewrap", marks=pytest.mark.sandbox),
                        pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> str:
    acp_require_backend(request.param)
    return request.param


async def nb(manager: UserSessionManager, session: AgentSession, tool: str, **args: Any) -> tuple[str, Any]:
    """Have the demo call ``tool``: (its reply, the tool's JSON result or None for an error)."""
    result = await manager.send_message(session.user, session.id, f"/nb {tool} {json.dumps(args)}")
    reply = result.to_dict()["text"]
    assert reply.startswith(f"{tool}: "), reply
    body = reply[len(tool) + 2:]
    try:
        return reply, json.loads(body)
    except ValueError:
        return reply, None


def edits(session: AgentSession) -> list[dict[str, Any]]:
    return [e["data"] for e in session.events() if e["type"] == "notebook:edit"]


def notebook(path: Path) -> nbformat.NotebookNode:
    nb_ = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb_)
    return nb_


async def test_an_agent_edits_a_notebook_cell_by_cell_and_the_user_undoes_it(acp_managers, backend,
                                                                           acp_workspace_root):
    manager = acp_managers(sandbox=backend, workspace_template=PER_USER)
    session = await manager.create_user_session("alice", "demo")
    assert [s.name for s in session.mcp_servers] == ["jupyter"]
    path = acp_workspace_root / "alice" / "analysis.ipynb"

    _, made = await nb(manager, session, "create_notebook", path="analysis.ipynb")
    assert made["path"] == "analysis.ipynb" and notebook(path).cells == []
    _, first = await nb(manager, session, "insert_cell", path="analysis.ipynb", index=0, cell_type="code",
                        source="x = 6 * 7")
    _, second = await nb(manager, session, "insert_cell", path="analysis.ipynb", index=1,
                         cell_type="markdown", source="# The answer")
    cells = notebook(path).cells
    assert [(c.id, c.cell_type, c.source) for c in cells] == [
        (first["cell_id"], "code", "x = 6 * 7"), (second["cell_id"], "markdown", "# The answer")]
    _, replaced = await nb(manager, session, "replace_cell", path="analysis.ipynb", cell_id=first["cell_id"],
                           source="x = 42")
    _, read = await nb(manager, session, "read_notebook", path="analysis.ipynb")
    assert [c["source"] for c in read["cells"]] == ["x = 42", "# The answer"]

    # each edit is an event (the sidebar's cell diff), named by the edit_id the agent was given
    records = edits(session)
    assert [r["tool"] for r in records] == ["create_notebook", "insert_cell", "insert_cell", "replace_cell"]
    assert [r["edit_id"] for r in records[1:]] == [first["edit_id"], second["edit_id"], replaced["edit_id"]]
    assert (records[3]["before"], records[3]["after"], records[3]["cell_id"]) == \
        ("x = 6 * 7", "x = 42", first["cell_id"])
    # the agent's own permission requests for these tools were answered by the server: no card
    assert not [e for e in session.events() if e["type"] == "permission:request"]

    # the user takes the replacement back, then the markdown cell
    await session.notebooks.undo(replaced["edit_id"])
    await session.notebooks.undo(second["edit_id"])
    assert [(c.id, c.source) for c in notebook(path).cells] == [(first["cell_id"], "x = 6 * 7")]
    assert [(r["tool"], r["undoes"]) for r in edits(session)[4:]] == \
        [("undo", replaced["edit_id"]), ("undo", second["edit_id"])]


async def test_an_edit_of_an_earlier_run_is_gone_not_unknown(acp_managers, acp_workspace_root):
    """What undoes an edit is kept in memory while the session runs: after a suspension (or a
    server restart) its Undo answers 410 with why, not 404 as if the edit never was; an edit of
    the resumed run is undone as usual, and an id the session never made is still 404."""
    manager = acp_managers(workspace_template=PER_USER)
    session = await manager.create_user_session("alice", "demo")
    await nb(manager, session, "create_notebook", path="n.ipynb")
    _, old = await nb(manager, session, "insert_cell", path="n.ipynb", index=0, cell_type="code",
                      source="a = 1")
    await manager.close_user_session("alice", session.id)
    resumed = await manager.resume_user_session("alice", session.id)
    assert resumed.notebooks is not None
    with pytest.raises(EditGone, match="not across a suspension") as gone:
        await resumed.notebooks.undo(old["edit_id"])
    assert gone.value.status == 410
    _, new = await nb(manager, resumed, "insert_cell", path="n.ipynb", index=1, cell_type="code",
                      source="b = 2")
    await resumed.notebooks.undo(new["edit_id"])
    assert [c.source for c in notebook(acp_workspace_root / "alice" / "n.ipynb").cells] == ["a = 1"]
    with pytest.raises(EditNotFound):
        await resumed.notebooks.undo("0" * 32)


async def test_raw_notebook_writes_are_refused_and_point_at_the_tools(acp_managers, backend,
                                                                       acp_workspace_root):
    manager = acp_managers(sandbox=backend, permission_policy="allow", workspace_template=PER_USER)
    session = await manager.create_user_session("alice", "demo")
    path = acp_workspace_root / "alice" / "kept.ipynb"
    await nb(manager, session, "create_notebook", path="kept.ipynb")
    before = path.read_bytes()
    reply = (await manager.send_message("alice", session.id, '/write kept.ipynb {"cells": []}')).text
    assert "Could not write" in reply and "insert_cell" in reply, reply
    reply = (await manager.send_message("alice", session.id, "/write NEW.IPYNB {}")).text
    assert "Could not write" in reply and "insert_cell" in reply, reply
    assert path.read_bytes() == before and not (path.parent / "NEW.IPYNB").exists()
    notebook(path)
    # other files are written as before
    reply = (await manager.send_message("alice", session.id, "/write notes.txt fine")).text
    assert reply.startswith("Wrote notes.txt"), reply


async def test_the_tools_reach_only_the_users_workspace(acp_managers, backend, acp_workspace_root):
    manager = acp_managers(sandbox=backend, workspace_template=PER_USER)
    bob_nb = acp_workspace_root / "bob" / "secret.ipynb"
    bob_nb.parent.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("token = 'bob'")]), str(bob_nb))
    session = await manager.create_user_session("alice", "demo")
    os.symlink(bob_nb, acp_workspace_root / "alice" / "link.ipynb")
    for args in ({"path": "../bob/secret.ipynb"}, {"path": str(bob_nb)}, {"path": "link.ipynb"}):
        reply, result = await nb(manager, session, "read_notebook", **args)
        assert result is None or "cells" not in result, reply
        assert "bob" not in reply.replace(args["path"], ""), reply
        _, result = await nb(manager, session, "insert_cell", cell_type="code", source="stolen", index=0,
                             **args)
        assert result is None or "cell_id" not in result
    assert [c.source for c in notebook(bob_nb).cells] == ["token = 'bob'"]
    assert edits(session) == []


async def test_a_run_without_a_kernel_is_refused_with_a_reason(acp_managers, acp_workspace_root):
    manager = acp_managers(workspace_template=PER_USER)
    session = await manager.create_user_session("alice", "demo")
    await nb(manager, session, "create_notebook", path="k.ipynb")
    _, cell = await nb(manager, session, "insert_cell", path="k.ipynb", index=0, cell_type="code",
                       source="print('hi')")

    async def answer_runs() -> None:  # (were a run asked for, the user would allow it)
        while True:
            for request_id in list(session.pending):
                session.answer_permission(request_id, "run")
            await asyncio.sleep(0.02)

    answering = asyncio.create_task(answer_runs())
    try:
        reply, result = await nb(manager, session, "run_cell", path="k.ipynb", cell_id=cell["cell_id"])
    finally:
        answering.cancel()
    assert result is None and "kernel" in reply, reply
    assert [c.get("outputs") for c in notebook(acp_workspace_root / "alice" / "k.ipynb").cells] == [[]]


async def test_each_agent_start_gets_a_fresh_route_and_the_session_end_removes_it(acp_managers, backend):
    manager = acp_managers(sandbox=backend, workspace_template=PER_USER)
    session = await manager.create_user_session("alice", "demo")
    assert session.notebooks is not None and session.notebooks.route is not None
    first_socket, first_token = session.notebooks.route.socket_path, session.notebooks.route.token
    directory = session.notebooks.directory
    await manager.restart_user_session("alice", session.id)
    route = session.notebooks.route
    assert route is not None and route.token != first_token
    assert session.mcp_servers[0].env[0].value == route.token  # (the agent gets the new one)
    await nb(manager, session, "create_notebook", path="after-restart.ipynb")
    await manager.delete_user_session("alice", session.id)
    assert session.notebooks.route is None
    await wait_for(lambda: not os.path.exists(directory) and not os.path.exists(first_socket))


async def test_the_admin_can_turn_the_tools_off(acp_managers, acp_workspace_root):
    manager = acp_managers(workspace_template=PER_USER)
    manager.notebooks.enabled = False
    session = await manager.create_user_session("alice", "demo")
    assert session.notebooks is None and session.mcp_servers == []
    reply = (await manager.send_message("alice", session.id, '/nb list_notebooks {}')).text
    assert "needs the jupyter MCP server" in reply
    # and raw notebook writes are then the agent's own business again (nothing else edits them)
    allowing = acp_managers(workspace_template=PER_USER, permission_policy="allow")
    allowing.notebooks.enabled = False
    other = await allowing.create_user_session("alice", "demo")
    reply = (await allowing.send_message("alice", other.id, "/write free.ipynb {}")).text
    assert reply.startswith("Wrote free.ipynb"), reply


@pytest.mark.sandbox
async def test_an_agent_reaches_its_own_sessions_socket_only(acp_managers, acp_workspace_root):
    acp_require_backend("bubblewrap")
    manager = acp_managers(sandbox="bubblewrap", workspace_template=PER_USER, permission_policy="allow")
    alice = await manager.create_user_session("alice", "demo")
    bob = await manager.create_user_session("bob", "demo")
    assert alice.notebooks and alice.notebooks.route and bob.notebooks and bob.notebooks.route
    probe = ("/shell python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('{}'); "
             "print('connected')\"")
    ask = manager.send_message
    own = (await ask("alice", alice.id, probe.format(alice.notebooks.route.socket_path))).text
    assert own.startswith("exit 0") and "connected" in own, own  # (the probe itself works)
    other = (await ask("alice", alice.id, probe.format(bob.notebooks.route.socket_path))).text
    assert not other.startswith("exit 0") and "FileNotFoundError" in other, other  # not even there
