"""Qwen Code works on the notebook the user has open (issue 19), in a real Jupyter server.

Qwen Code 0.24 in bubblewrap, its LLM calls through the gateway to the scripted fake LLM
(``test_nb_qwen.ScriptedLLM``), the notebook open in a real collaboration client (what
JupyterLab joins) with its kernel running: the LLM has Qwen insert a cell, which the open
notebook shows at once, then run two cells; each run waits for the user's approval (over
REST, as the sidebar gives it), its output lands in the notebook's cell, and the LLM and the
agent's reply get it too. The notebook is valid nbformat on disk afterwards.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import acp_require_backend, wait_for
from test_nb_qwen import DONE, ScriptedLLM
from test_nb_ydoc import browser, read_saved, server_config, until
from test_real_agents import REAL_KEY, require_agent
from traitlets.config import Config

from jupyter_acp.testing import TokenPerUser, auth

pytestmark = [pytest.mark.agent, pytest.mark.sandbox, pytest.mark.timeout(240)]
KERNELSPEC = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}


@pytest.fixture
def scripted() -> Any:
    with ScriptedLLM() as server:
        yield server


@pytest.fixture
def jp_server_config(tmp_path: Path, scripted: ScriptedLLM) -> Config:
    acp_require_backend("bubblewrap")
    bin_dir = require_agent("qwen")
    config = server_config(tmp_path)  # jupyter_server_ydoc and the file ids, their databases here
    config.ServerApp.jpserver_extensions["jupyter_acp"] = True
    config.merge(Config({
        "ServerApp": {"identity_provider_class": TokenPerUser, "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": "bubblewrap", "workspace_template": "{root_dir}/{username}",
                               "agent_home_dir": str(tmp_path / "homes"), "monitor_interval": 0},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
        "SessionStore": {"enabled": False},
        "AgentConfigManager": {"extra_paths": [bin_dir], "credentials": {"qwen": {
            "api_key": REAL_KEY, "base_url": scripted.url + "/v1", "model": "fake-model"}}},
    }))
    return config


@pytest.fixture
def jp_auth_header() -> dict[str, str]:
    return auth("alice")


def cell_id_in(result: str) -> str:
    """The ``cell_id`` in a tool result as the LLM saw it (compact JSON inside Qwen's text)."""
    found = re.search(r'\\?"cell_id\\?":\s*\\?"([^"\\]+)', result)
    assert found, result
    return found.group(1)


async def test_qwen_inserts_a_cell_live_and_runs_cells_after_the_users_approval(
        jp_serverapp: Any, jp_root_dir: Path, jp_fetch: Any, jp_http_port: int, jp_base_url: str,
        scripted: ScriptedLLM) -> None:
    async def rest(method: str, path: str, body: Any = None) -> Any:
        kwargs = {"body": json.dumps(body or {})} if method == "POST" else {}
        resp = await jp_fetch(*path.split("/"), method=method, **kwargs)
        return json.loads(resp.body) if resp.body else None

    workspace = jp_root_dir / "alice"
    workspace.mkdir()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 20")], metadata=KERNELSPEC)
    nbformat.write(notebook, str(workspace / "nb.ipynb"))
    await rest("POST", "api/sessions", {"path": "alice/nb.ipynb", "type": "notebook", "name": "",
                                        "kernel": {"name": "python3"}})
    session = await rest("POST", "api/acp/sessions", {"agent": "qwen"})
    sid = session["id"]
    mode = await rest("POST", f"api/acp/sessions/{sid}/mode", {"mode_id": "default"})
    assert mode["current"] == "default"

    async with browser(jp_serverapp, jp_fetch, jp_http_port, jp_base_url, auth("alice"),
                       "alice/nb.ipynb") as client:
        first = client.get_cell(0)["id"]
        scripted.scripts["nb-live"] = [
            lambda r: ("mcp__jupyter__insert_cell", {"path": "nb.ipynb", "index": 1, "cell_type": "code",
                                                     "source": "print(x + 22)"}),
            lambda r: ("mcp__jupyter__run_cell", {"path": "nb.ipynb", "cell_id": first}),
            lambda r: ("mcp__jupyter__run_cell", {"path": "nb.ipynb", "cell_id": cell_id_in(r[0])}),
        ]
        reply = asyncio.ensure_future(rest("POST", f"api/acp/sessions/{sid}/messages",
                                           {"message": "nb-live: add a cell that prints the answer, run it"}))
        # the cell is in the open notebook while the turn still runs (the runs wait for the user)
        await until(lambda: client.cell_number == 2, timeout=120)
        assert client.get_cell(1)["source"] == "print(x + 22)"

        answered: list[dict[str, Any]] = []
        while len(answered) < 2:  # the two runs, each shown with its code
            events = (await rest("GET", f"api/acp/sessions/{sid}/history"))["events"]
            asked = [e["data"] for e in events if e["type"] == "permission:request"]
            for request in asked[len(answered):]:
                assert request["tool_call"]["kind"] == "execute", request
                answered.append(request)
                await rest("POST", f"api/acp/sessions/{sid}/permissions/{request['request_id']}",
                           {"option_id": "run"})
            assert not reply.done() or len(answered) == 2, reply.result()
            await asyncio.sleep(0.05)
        assert [r["tool_call"]["rawInput"]["code"] for r in answered] == ["x = 20", "print(x + 22)"]

        result = await asyncio.wait_for(reply, 180)
        assert DONE in result["text"] and "42" in result["text"], result["text"]
        inserted, _, ran = scripted.results["nb-live"]
        assert '\\"status\\":\\"ok\\"' in ran or '"status":"ok"' in ran, ran
        assert "42" in ran  # the LLM got the output
        await until(lambda: [o.get("text") for o in client.get_cell(1)["outputs"]] == ["42\n"])
        # only the runs asked the user: Qwen's own asks for the tools were answered by the server
        events = (await rest("GET", f"api/acp/sessions/{sid}/history"))["events"]
        assert len([e for e in events if e["type"] == "permission:request"]) == 2
        edits = [e["data"] for e in events if e["type"] == "notebook:edit"]
        assert [e["tool"] for e in edits] == ["insert_cell", "run_cell", "run_cell"]
        assert edits[0]["edit_id"] in inserted and edits[0]["live"] is True
    saved = await wait_for(lambda: (nb := read_saved(workspace / "nb.ipynb")) is not None
                           and len(nb.cells) == 2 and nb.cells[1].outputs and nb, timeout=30)
    nbformat.validate(saved)
    assert saved.cells[1].outputs[0]["text"] == "42\n"
    await rest("DELETE", f"api/acp/sessions/{sid}")
