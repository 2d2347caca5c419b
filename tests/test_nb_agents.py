"""Gemini CLI, Claude Code and Codex get the notebook tools too (marker ``agent``).

Each runs in bubblewrap through ``UserSessionManager`` and the LLM gateway to the fake LLM; the
session hands it the ``jupyter`` MCP server in ``session/new``. Each agent starts the relay
itself and offers the tools to its LLM in its own way (measured with Gemini CLI 0.61, Claude
Code 2.1 through claude-agent-acp 0.101, Codex 0.137 through codex-acp 0.16):

- Gemini: plain functions ``mcp_jupyter_<tool>``;
- Claude: *deferred* tools — named ``mcp__jupyter__<tool>`` in the request, their schemas
  loaded on demand through its ``ToolSearch`` tool (so a scripted fake cannot call them
  directly; a real model does);
- Codex: one Responses-API ``namespace`` tool ``mcp__jupyter`` holding the ``<tool>`` functions.

Gemini then edits a notebook through the fake LLM's tool loop (``ScriptedLLM`` of
``test_nb_qwen.py``, which speaks Gemini's format too).
"""

from __future__ import annotations

from typing import Any

import nbformat
import pytest
from conftest import acp_require_backend
from fake_llm import FakeLLM
from test_nb_qwen import DONE, ScriptedLLM, agent_asks, events_of, scripted, turn
from test_real_agents import REAL_KEY, require_agent

from jupyter_acp.session import SessionState

__all__ = ["agent_asks", "scripted"]
pytestmark = [pytest.mark.agent, pytest.mark.sandbox, pytest.mark.timeout(180)]

#: Per agent: the credentials' endpoint suffix and model.
AGENTS = {"gemini": ("", "gemini-2.5-flash"), "claude": ("", "claude-sonnet-4-5"),
          "codex": ("/v1", "gpt-5.3-codex")}


async def start(acp_managers: Any, fake: FakeLLM, agent: str) -> tuple[Any, Any]:
    bin_dir = require_agent(agent)
    acp_require_backend("bubblewrap")
    suffix, model = AGENTS[agent]
    manager = acp_managers(sandbox="bubblewrap")
    manager.agents.extra_paths = [bin_dir]
    manager.agents.credentials = {agent: {"api_key": REAL_KEY, "base_url": fake.url + suffix, "model": model}}
    session = await manager.create_user_session("alice", agent)
    assert session.state is SessionState.READY
    assert [s.name for s in session.mcp_servers] == ["jupyter"]
    return manager, session


def offered_tools(body: dict[str, Any]) -> set[str]:
    """The tool names in one LLM request, whatever the wire format (a Codex namespace's as
    ``namespace/tool``)."""
    names: set[str] = set()
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        names.update(d.get("name", "") for d in tool.get("functionDeclarations") or [])  # Gemini
        names.update(f"{tool.get('name')}/{t.get('name')}" for t in tool.get("tools") or [])  # namespace
        names.add(tool.get("name") or (tool.get("function") or {}).get("name") or "")
    return names - {""}


@pytest.mark.parametrize("agent", sorted(AGENTS))
async def test_agent_offers_the_notebook_tools(acp_managers: Any, fake: FakeLLM, agent: str) -> None:
    manager, session = await start(acp_managers, fake, agent)
    result = await manager.send_message("alice", session.id, "hello there agent")
    assert "Hello from the fake LLM" in result.text
    requests = [r for r in fake.requests if r.kind != "count_tokens"]
    offered = set().union(*(offered_tools(r.body) for r in requests))
    print(f"\n[{agent}] notebook tools offered: {sorted(n for n in offered if 'jupyter' in n)}")
    if agent == "gemini":
        assert {"mcp_jupyter_insert_cell", "mcp_jupyter_run_cell"} <= offered
    elif agent == "codex":
        assert {"mcp__jupyter/insert_cell", "mcp__jupyter/run_cell"} <= offered
    else:  # deferred: named in the request, loadable through ToolSearch
        assert "ToolSearch" in offered
        assert any("mcp__jupyter__insert_cell" in str(r.body) for r in requests)
    await manager.delete_user_session("alice", session.id)


#: Each agent's own notebook editor that the server refuses while the notebook tools are on (it
#: rewrites the whole ``.ipynb`` through ACP ``fs/write_text_file``), and the agent's
#: credentials' endpoint suffix and model. (Gemini CLI and Codex have none; Claude Code's
#: ``NotebookEdit`` writes the file itself, not through ACP.)
OWN_EDITORS = {"qwen": ("notebook_edit", "/v1", "fake-model")}


@pytest.mark.parametrize("agent", sorted(OWN_EDITORS))
async def test_the_agents_own_notebook_editor_only_without_the_tools(acp_managers: Any, fake: FakeLLM,
                                                                   agent: str) -> None:
    """While the notebook tools are on, the agent's own notebook editor is taken away (its
    settings deny it: agents.py ``notebook_tools_settings``): the LLM is not offered it, so no
    call is wasted on a whole-file write the server refuses then. With the tools off it is
    offered (and such writes are allowed)."""
    editor, suffix, model = OWN_EDITORS[agent]
    bin_dir = require_agent(agent)
    acp_require_backend("bubblewrap")
    named: dict[bool, bool] = {}
    for tools_on in (True, False):
        manager = acp_managers(sandbox="bubblewrap")
        manager.notebooks.enabled = tools_on
        manager.agents.extra_paths = [bin_dir]
        manager.agents.credentials = {agent: {"api_key": REAL_KEY, "base_url": fake.url + suffix,
                                              "model": model}}
        session = await manager.create_user_session("alice", agent)
        assert [s.name for s in session.mcp_servers] == (["jupyter"] if tools_on else [])
        mark = len(fake.requests)
        result = await manager.send_message("alice", session.id, "hello there agent")
        assert "Hello from the fake LLM" in result.text
        requests = [r for r in fake.requests[mark:] if r.kind != "count_tokens"]
        offered = set().union(*(offered_tools(r.body) for r in requests))
        # (offered directly, or named for a deferred load through ToolSearch)
        named[tools_on] = editor in offered or any(editor in str(r.body) for r in requests)
        await manager.delete_user_session("alice", session.id)
    assert named == {True: False, False: True}, named


async def test_gemini_edits_a_notebook(acp_managers: Any, scripted: ScriptedLLM,
                                      agent_asks: list[Any]) -> None:
    manager, session = await start(acp_managers, scripted, "gemini")
    await session.set_mode("default")
    source = "print('hello from gemini')"
    scripted.scripts["nb-gemini"] = [
        lambda r: ("mcp_jupyter_create_notebook", {"path": "g.ipynb"}),
        lambda r: ("mcp_jupyter_insert_cell", {"path": "g.ipynb", "index": 0, "cell_type": "code",
                                               "source": source}),
    ]
    seen: list[Any] = []
    reply = await turn(manager, session, "nb-gemini: make g.ipynb with a hello cell", seen)
    assert DONE in reply, reply
    nb = nbformat.read(session.sandbox_spec.workspace / "g.ipynb", as_version=4)
    nbformat.validate(nb)
    assert [c.source for c in nb.cells] == [source]
    edits = [e["data"] for e in events_of(session, "notebook:edit")]
    assert [e["tool"] for e in edits] == ["create_notebook", "insert_cell"]
    created, inserted = scripted.results["nb-gemini"]
    assert edits[0]["edit_id"] in created and edits[1]["edit_id"] in inserted
    print(f"\n[gemini] asks: {agent_asks}; user cards: {[p.tool_call for p in seen]}")
    print(f"[gemini] insert_cell result seen by the LLM: {inserted[:300]}")
    assert not seen, [p.tool_call for p in seen]  # Gemini's own asks are answered by the server
    await manager.delete_user_session("alice", session.id)


async def test_claude_edits_a_notebook(acp_managers: Any, scripted: ScriptedLLM,
                                      agent_asks: list[Any]) -> None:
    manager, session = await start(acp_managers, scripted, "claude")
    await session.set_mode("default")
    source = "print('hello from claude')"
    scripted.scripts["nb-claude"] = [  # (its MCP tools are deferred: load them first)
        lambda r: ("ToolSearch", {"query": "select:mcp__jupyter__create_notebook,mcp__jupyter__insert_cell",
                                  "max_results": 5}),
        lambda r: ("mcp__jupyter__create_notebook", {"path": "c.ipynb"}),
        lambda r: ("mcp__jupyter__insert_cell", {"path": "c.ipynb", "index": 0, "cell_type": "code",
                                                 "source": source}),
    ]
    seen: list[Any] = []
    reply = await turn(manager, session, "nb-claude: make c.ipynb with a hello cell", seen)
    print(f"\n[claude] reply: {reply[:300]}; results: {scripted.results.get('nb-claude')}")
    print(f"[claude] asks: {agent_asks}; user cards: {[p.tool_call for p in seen]}")
    assert DONE in reply, reply
    nb = nbformat.read(session.sandbox_spec.workspace / "c.ipynb", as_version=4)
    nbformat.validate(nb)
    assert [c.source for c in nb.cells] == [source]
    edits = [e["data"] for e in events_of(session, "notebook:edit")]
    assert [e["tool"] for e in edits] == ["create_notebook", "insert_cell"]
    _, created, inserted = scripted.results["nb-claude"]
    assert edits[0]["edit_id"] in created and edits[1]["edit_id"] in inserted
    assert not seen, [p.tool_call for p in seen]
    await manager.delete_user_session("alice", session.id)
