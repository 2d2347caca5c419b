"""The notebook tools in a real Jupyter server (issue 19): live in the open notebook, a run in
the notebook's kernel after the user's approval, the user's undo, and another user's notebook and
kernel out of reach, all through the REST API with the demo agent over real stdio.

The "browser" is a real collaboration client (``test_nb_ydoc.browser``: the y-websocket room
JupyterLab joins); the kernel is a real ipykernel started through ``POST /api/sessions``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import wait_for
from test_nb_ydoc import browser, read_saved, server_config, until
from traitlets.config import Config

from jupyter_acp.testing import TokenPerUser, auth

pytestmark = pytest.mark.timeout(120)
KERNELSPEC = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


@pytest.fixture
def jp_server_config(tmp_path: Path) -> Config:
    config = server_config(tmp_path)  # jupyter_server_ydoc and the file ids, their databases here
    config.ServerApp.jpserver_extensions["jupyter_acp"] = True
    config.merge(Config({
        "ServerApp": {"identity_provider_class": TokenPerUser, "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": "local", "allow_unsandboxed": True,
                               "workspace_template": "{root_dir}/{username}",
                               "agent_home_dir": str(tmp_path / "homes"), "monitor_interval": 0,
                               "permission_timeout": 30},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
        "SessionStore": {"enabled": False},
    }))
    return config


@pytest.fixture
def jp_auth_header() -> dict[str, str]:
    return auth("alice")


@pytest.fixture
def api(jp_fetch: Any) -> Any:
    async def call(method: str, path: str, body: Any = None, user: str = "alice") -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"method": method, "headers": auth(user), "raise_error": False}
        if method == "POST":
            kwargs["body"] = json.dumps(body if body is not None else {})
        resp = await jp_fetch(*path.split("/"), **kwargs)
        return resp.code, json.loads(resp.body) if resp.body else None
    return call


def write_notebook(path: Path, *sources: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources],
                                            metadata=KERNELSPEC), str(path))


async def start_kernel(api: Any, path: str, user: str) -> str:
    status, model = await api("POST", "api/sessions", {"path": path, "type": "notebook", "name": "",
                                                        "kernel": {"name": "python3"}}, user=user)
    assert status == 201, model
    return str(model["kernel"]["id"])


async def events(api: Any, session_id: str, kind: str) -> list[dict[str, Any]]:
    status, body = await api("GET", f"api/acp/sessions/{session_id}/history")
    assert status == 200
    return [e["data"] for e in body["events"] if e["type"] == kind]


def tool_result(reply: str, tool: str) -> dict[str, Any]:
    assert reply.startswith(f"{tool}: "), reply
    return dict(json.loads(reply[len(tool) + 2:]))


async def test_the_agent_edits_the_open_notebook_live_runs_a_cell_after_approval_and_the_user_undoes(
        jp_serverapp: Any, jp_root_dir: Path, jp_fetch: Any, jp_http_port: int, jp_base_url: str,
        api: Any) -> None:
    write_notebook(jp_root_dir / "alice" / "nb.ipynb", "x = 20")
    status, session = await api("POST", "api/acp/sessions", {"agent": "demo"})
    assert status == 201, session
    sid = session["id"]
    await start_kernel(api, "alice/nb.ipynb", "alice")

    async def prompt(text: str) -> str:
        status, result = await api("POST", f"api/acp/sessions/{sid}/messages", {"message": text})
        assert status == 200, result
        return str(result["text"])

    async with browser(jp_serverapp, jp_fetch, jp_http_port, jp_base_url, auth("alice"),
                       "alice/nb.ipynb") as client:
        inserted = tool_result(await prompt('/nb insert_cell {"path": "nb.ipynb", "index": 1, '
                                            '"cell_type": "code", "source": "print(x + 22)"}'), "insert_cell")
        assert inserted["live"] is True
        await until(lambda: client.cell_number == 2)  # in the open notebook, without a reload
        cell = client.get_cell(1)
        assert (cell["id"], cell["source"]) == (inserted["cell_id"], "print(x + 22)")
        [edit] = await events(api, sid, "notebook:edit")
        assert (edit["edit_id"], edit["tool"], edit["before"], edit["after"]) == \
            (inserted["edit_id"], "insert_cell", None, "print(x + 22)")

        # a run asks the user first, showing the code; outputs land in the cell and the reply
        async def run(message: str, code: str, option: str) -> tuple[str, dict[str, Any]]:
            reply = asyncio.create_task(prompt(message))
            for _ in range(500):
                asked = [r for r in await events(api, sid, "permission:request")
                         if r["tool_call"]["rawInput"]["code"] == code]
                if asked:
                    break
                await asyncio.sleep(0.02)
            status, _ = await api("POST", f"api/acp/sessions/{sid}/permissions/{asked[0]['request_id']}",
                                  {"option_id": option})
            assert status == 204
            return await reply, asked[0]["tool_call"]

        first = client.get_cell(0)["id"]
        def run_cell(cell_id: str) -> str:
            return "/nb run_cell " + json.dumps({"path": "nb.ipynb", "cell_id": cell_id})

        await run(run_cell(first), "x = 20", "run")
        reply, call = await run(run_cell(inserted["cell_id"]), "print(x + 22)", "run")
        assert call["kind"] == "execute" and call["_meta"] == {"jupyterAcp": {"notebookRun": True}}
        assert "print(x + 22)" in call["content"][0]["content"]["text"]
        ran = tool_result(reply, "run_cell")
        assert ran["status"] == "ok" and ran["outputs"][0]["text"] == "42\n", ran
        await until(lambda: [o["text"] for o in client.get_cell(1)["outputs"]] == ["42\n"])
        assert client.get_cell(1)["execution_count"] == ran["execution_count"]

        # a refused run leaves the kernel alone
        reply, _ = await run('/nb run_code {"path": "nb.ipynb", "code": "x = 0"}', "x = 0", "no")
        assert "did not allow" in reply and not reply.startswith("run_code: {"), reply
        reply, _ = await run('/nb run_code {"path": "nb.ipynb", "code": "print(x)"}', "print(x)", "run")
        assert tool_result(reply, "run_code")["outputs"][0]["text"] == "20\n", reply

        # another user cannot undo alice's edit; alice can, once
        edit_path = f"api/acp/sessions/{sid}/notebook-edits/{inserted['edit_id']}/undo"
        assert (await api("POST", edit_path, user="bob"))[0] == 404
        status, undone = await api("POST", edit_path)
        assert status == 200 and undone["undone"] == inserted["edit_id"], undone
        await until(lambda: client.cell_number == 1)
        assert client.get_cell(0)["source"] == "x = 20"
        status, again = await api("POST", edit_path)
        assert status == 409, again
        assert (await api("POST", f"api/acp/sessions/{sid}/notebook-edits/nope/undo"))[0] == 404
    saved = await wait_for(lambda: (nb := read_saved(jp_root_dir / "alice" / "nb.ipynb")) is not None
                           and len(nb.cells) == 1 and nb)
    nbformat.validate(saved)


async def test_another_users_notebook_and_kernel_are_out_of_reach(jp_serverapp: Any, jp_root_dir: Path,
                                                                  api: Any) -> None:
    write_notebook(jp_root_dir / "bob" / "b.ipynb", "secret = 'bob'")
    await start_kernel(api, "bob/b.ipynb", "bob")
    (jp_root_dir / "alice").mkdir()
    status, session = await api("POST", "api/acp/sessions", {"agent": "demo"})
    sid = session["id"]
    for path in ("../bob/b.ipynb", str(jp_root_dir / "bob" / "b.ipynb")):
        message = "/nb run_code " + json.dumps({"path": path, "code": "print(secret)"})
        status, result = await api("POST", f"api/acp/sessions/{sid}/messages", {"message": message})
        assert status == 200 and "bob'" not in result["text"] and "refused" in result["text"].lower(), result
    assert await events(api, sid, "permission:request") == []  # never even asked
    assert await events(api, sid, "notebook:edit") == []
