"""Qwen Code uses the notebook tools through the whole server path (marker ``agent``).

``UserSessionManager`` starts Qwen Code 0.24 in a sandbox (bubblewrap, Docker); the session
hands it the ``jupyter`` MCP server in ``session/new`` (the stdio relay, through the session's
socket, to the tools in this process), and Qwen's LLM calls reach the fake LLM only through the
LLM gateway. The fake plays a tool loop (``ScriptedLLM``): it calls ``mcp__jupyter__*`` tools
and Qwen's ``write_file``, reads what Qwen sends back as each tool's result, then answers.

What must hold: the edit lands as a valid notebook and as a ``notebook:edit`` event whose
``edit_id`` is in the result the LLM saw (that is how the sidebar ties the diff to the card);
even in its asking mode Qwen runs our tools without a permission request (its settings allow
``mcp__jupyter``), so the user sees no card for an edit; raw ``.ipynb`` writes through ACP
``fs/write_text_file`` — Qwen's own ``notebook_edit`` tool (it rewrites the whole file) and
``write_file`` — are refused with a pointer to the tools and leave the notebook intact;
``run_cell`` without a Jupyter server (the manager alone: no rooms, no kernels) is refused
without asking the user, and the LLM is told why. The executables come
from ``scripts/agents``, as for ``test_real_agents.py`` (skip, or fail under
``JUPYTER_ACP_REQUIRE_AGENTS=1``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import nbformat
import pytest
from conftest import acp_require_backend
from fake_llm import FakeLLM, _Handler, _text_of
from test_real_agents import REAL_KEY, require_agent

from jupyter_acp.session import AgentSession, SessionState

pytestmark = [pytest.mark.agent, pytest.mark.timeout(240)]

#: One step of a script: from the tool results so far in this turn, the next call.
Step = Callable[[list[str]], tuple[str, dict[str, Any]]]
DONE = "Notebook work done."


class ScriptedLLM(FakeLLM):
    """The fake LLM (OpenAI, Gemini and Anthropic wire formats) playing scripted tool loops.

    A user message containing a key of ``scripts`` runs that script: step *n* is called with
    the *n* tool results the agent sent back since that message and returns the next call;
    after the last step the reply is ``DONE`` plus the last result. ``results`` keeps, per key,
    the tool results as the LLM saw them. Other messages get the base fake's replies."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[str, list[Step]] = {}
        self.results: dict[str, list[str]] = {}
        self._local = threading.local()
        self._ids = itertools.count(1)
        fake = self

        class Handler(_Handler):
            server_fake = fake

            def _openai(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
                fake._local.body = body
                super()._openai(path, headers, body)

            def _gemini(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
                fake._local.body = body
                super()._gemini(path, headers, body)

            def _anthropic(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
                fake._local.body, fake._local.args = body, None
                super()._anthropic(path, headers, body)

            def _named_event(self, name: str, obj: Any) -> None:
                # the base fake's Anthropic tool_use carries a write's or a command's input:
                # put the script's arguments in its place
                delta = obj.get("delta") or {}
                if delta.get("type") == "input_json_delta" and fake._local.args is not None:
                    obj = {**obj, "delta": {**delta, "partial_json": json.dumps(fake._local.args)}}
                super()._named_event(name, obj)

            def _event(self, obj: Any) -> None:
                # a fresh tool call id per call (the base fake always says call_1)
                if isinstance(obj, dict):
                    for choice in obj.get("choices") or []:
                        for call in (choice.get("delta") or {}).get("tool_calls") or []:
                            if call.get("id") == "call_1":
                                call["id"] = f"call_nb_{next(fake._ids)}"
                super()._event(obj)

        self.httpd.RequestHandlerClass = Handler

    @staticmethod
    def _results(body: dict[str, Any], key: str) -> list[str]:
        """The tool results in ``body`` since the user message holding ``key``: OpenAI ``tool``
        messages, Gemini ``functionResponse`` parts or Anthropic ``tool_result`` blocks (the
        last two as JSON text)."""
        results: list[str] = []
        for message in reversed(body.get("messages") or body.get("contents") or []):
            parts = message.get("parts") or []
            texts = [p["text"] for p in parts if isinstance(p.get("text"), str)]
            blocks = message.get("content") if isinstance(message.get("content"), list) else []
            texts += [b["text"] for b in blocks if isinstance(b, dict) and isinstance(b.get("text"), str)]
            if message.get("role") == "user" and key in (_text_of(message.get("content")) + " ".join(texts)):
                break
            if message.get("role") == "tool":
                results.insert(0, _text_of(message.get("content")))
            results[:0] = [json.dumps(b.get("content")) for b in blocks
                           if isinstance(b, dict) and b.get("type") == "tool_result"]
            results[:0] = [json.dumps(p["functionResponse"]) for p in parts if "functionResponse" in p]
        return results

    def script_step(self, user_text: str, done: int, tools: list[str]) -> tuple[str, Any]:  # type: ignore[override]
        """The Anthropic loop's step (the base fake's hook): the script's call, if any."""
        key = next((k for k in self.scripts if k in user_text), None)
        if key is None:
            return FakeLLM.script_step(user_text, done, tools)
        self.results[key] = results = self._results(self._local.body, key)
        steps = self.scripts[key]
        if len(results) >= len(steps):
            return "tool_done", f"{DONE} Last result: {results[-1][:1000] if results else ''}"
        name, self._local.args = steps[len(results)](results)
        if name not in tools:
            return "text", f"The tool {name} is not offered (offered: {sorted(tools)})"
        return "tool_call", ("script", name, "", "")

    def decide(self, last_is_tool_result: bool, user_text: str, tool_names: list[str]) -> tuple[str, Any]:
        key = next((k for k in self.scripts if k in user_text), None)
        if key is None:
            return FakeLLM.decide(last_is_tool_result, user_text, tool_names)
        self.results[key] = results = self._results(self._local.body, key)
        steps = self.scripts[key]
        if len(results) >= len(steps):
            return "tool_done", f"{DONE} Last result: {results[-1][:1000] if results else ''}"
        name, args = steps[len(results)](results)
        if name not in tool_names:
            return "text", f"The tool {name} is not offered (offered: {sorted(tool_names)})"
        return "tool_call", (name, args)


@pytest.fixture
def scripted() -> Any:
    with ScriptedLLM() as server:
        yield server


@pytest.fixture(params=[pytest.param("bubblewrap", marks=pytest.mark.sandbox),
                        pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> str:
    acp_require_backend(request.param)
    return str(request.param)


@pytest.fixture
def agent_asks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str | None, str]]:
    """Every permission request of the agent (its ``_meta.toolName``) and the kind of the option
    chosen, whoever chose it — the server itself or the user (a spy: the real method runs)."""
    asked: list[tuple[str | None, str]] = []
    original = AgentSession.on_permission_request

    async def spy(self: AgentSession, tool_call: Any, options: Any) -> Any:
        response = await original(self, tool_call, options)
        meta = tool_call.field_meta or {}
        chosen = getattr(response.outcome, "option_id", None)
        kind = next((o.kind for o in options if o.option_id == chosen), "cancelled")
        asked.append((meta.get("toolName"), kind))
        return response

    monkeypatch.setattr(AgentSession, "on_permission_request", spy)
    return asked


async def answer_all(session: AgentSession, seen: list[Any], stop: asyncio.Event) -> None:
    """Answer every permission request the user gets "allow once" (recording it), until ``stop``."""
    done: set[str] = set()
    while not stop.is_set():
        for request_id, pending in list(session.pending.items()):
            if request_id not in done:
                done.add(request_id)
                seen.append(pending)
                allow = next(o for o in pending.options if o.kind == "allow_once")
                session.answer_permission(request_id, allow.option_id)
        await asyncio.sleep(0.02)


async def turn(manager: Any, session: AgentSession, text: str, seen: list[Any]) -> str:
    stop = asyncio.Event()
    answering = asyncio.ensure_future(answer_all(session, seen, stop))
    try:
        result = await asyncio.wait_for(manager.send_message("alice", session.id, text), 120)
    finally:
        stop.set()
        await answering
    assert result.stop_reason == "end_turn", result
    return str(result.text)


def events_of(session: AgentSession, wire_type: str, since: int = 0) -> list[dict[str, Any]]:
    return [e for e in session.events(since) if e["type"] == wire_type]


async def test_qwen_edits_a_notebook_through_the_session(acp_managers: Any, scripted: ScriptedLLM,
                                                        backend: str, agent_asks: list[Any]) -> None:
    bin_dir = require_agent("qwen")
    manager = acp_managers(sandbox=backend, allow_unsandboxed=True)
    manager.agents.extra_paths = [bin_dir]
    manager.agents.credentials = {"qwen": {"api_key": REAL_KEY, "base_url": scripted.url + "/v1",
                                           "model": "fake-model"}}
    if backend == "docker" and os.getuid() == 0:  # the agent's uid owns a user's workspace
        os.chown(manager.root_dir, 1000, 1000)
    session = await manager.create_user_session("alice", "qwen")
    assert session.state is SessionState.READY and session.metered_by_gateway
    await session.set_mode("default")  # the mode that asks before edits and commands
    workspace = session.sandbox_spec.workspace
    nb_path = workspace / "nb.ipynb"
    source = "print('hello from qwen')"

    # 1. one turn: create a notebook, insert a cell, answer after seeing the results
    scripted.scripts["nb-step-1"] = [
        lambda r: ("mcp__jupyter__create_notebook", {"path": "nb.ipynb"}),
        lambda r: ("mcp__jupyter__insert_cell", {"path": "nb.ipynb", "index": 0, "cell_type": "code",
                                                 "source": source}),
    ]
    seen: list[Any] = []
    mark = session.history.seq
    reply = await turn(manager, session, "nb-step-1: make nb.ipynb with a hello cell", seen)
    assert DONE in reply, reply
    nb = nbformat.read(nb_path, as_version=4)
    nbformat.validate(nb)
    assert [(c.cell_type, c.source) for c in nb.cells] == [("code", source)]
    edits = [e["data"] for e in events_of(session, "notebook:edit", mark)]
    assert [e["tool"] for e in edits] == ["create_notebook", "insert_cell"], edits
    insert = edits[1]
    assert insert["path"] == "nb.ipynb" and insert["cell_id"] == nb.cells[0].id
    assert insert["after"] == source and insert["live"] is False
    created, inserted = scripted.results["nb-step-1"]
    # the LLM saw each tool's result, with the edit_id the sidebar matches the card by
    assert edits[0]["edit_id"] in created and insert["edit_id"] in inserted and nb.cells[0].id in inserted
    # in its asking mode Qwen still runs our tools without a permission request (its settings
    # allow ``mcp__jupyter``: agents.py); the user saw no card for the edits
    assert agent_asks == [], agent_asks
    assert not (workspace / ".qwen").exists()  # (where Qwen would keep an "always allow")
    assert not seen and not events_of(session, "permission:request", mark)
    calls = [e["data"] for e in events_of(session, "session/update", mark)
             if e["data"]["sessionUpdate"] in ("tool_call", "tool_call_update")]
    assert any((c.get("_meta") or {}).get("toolName") == "mcp__jupyter__insert_cell" for c in calls)
    assert calls[-1]["status"] == "completed"

    # 2. raw writes of notebooks (ACP fs/write_text_file) are refused with a pointer to the tools:
    #    write_file of a new raw.ipynb is not made, the notebook stays as it was. (Qwen's own cell
    #    editor, notebook_edit, rewrites the whole file the same way: it is not even offered while
    #    the tools are on, test_nb_agents.py)
    before = nb_path.read_bytes()
    target = f"{session.sandbox.workspace_path}/nb.ipynb"
    scripted.scripts["nb-step-2"] = [
        lambda r: ("read_file", {"file_path": target}),
        lambda r: ("write_file", {"file_path": f"{session.sandbox.workspace_path}/raw.ipynb",
                                  "content": nbformat.writes(nbformat.v4.new_notebook())}),
    ]
    mark = session.history.seq
    reply = await turn(manager, session, "nb-step-2: edit the notebooks as files", seen)
    assert DONE in reply, reply
    read, *refusals = scripted.results["nb-step-2"]
    print(f"\n[qwen in {backend}] raw notebook writes, as the LLM saw them: {refusals}")
    assert source in read  # reading a notebook as a file is fine
    assert len(refusals) == 1
    for refusal in refusals:
        assert "MCP tools" in refusal and "insert_cell" in refusal, refusal
    assert nb_path.read_bytes() == before and not (workspace / "raw.ipynb").exists()
    nbformat.validate(nbformat.read(nb_path, as_version=4))
    assert [p.tool_call["kind"] for p in seen] == ["edit"]  # the user allowed it
    assert not events_of(session, "notebook:edit", mark)

    # 3. run_cell with no Jupyter server (the manager alone): refused, and the LLM is told why
    cell_id = nb.cells[0].id
    scripted.scripts["nb-step-3"] = [
        lambda r: ("mcp__jupyter__run_cell", {"path": "nb.ipynb", "cell_id": cell_id}),
    ]
    mark = session.history.seq
    asked_before = len(seen)
    reply = await turn(manager, session, "nb-step-3: run the hello cell", seen)
    assert DONE in reply, reply
    (ran,) = scripted.results["nb-step-3"]
    print(f"\n[qwen in {backend}] run_cell result seen by the LLM: {ran[:300]}")
    assert "kernel" in ran.lower() and "edit_id" not in ran, ran
    assert len(seen) == asked_before  # nothing to run in: the user is not asked
    assert not events_of(session, "notebook:edit", mark)
    assert nbformat.read(nb_path, as_version=4).cells[0].outputs == []

    # the LLM was offered the notebook tools by name on the first request already
    offered = {t.get("function", {}).get("name") for t in scripted.requests[0].body.get("tools") or []}
    assert {"mcp__jupyter__insert_cell", "mcp__jupyter__run_cell"} <= offered
    assert all(r.headers.get("authorization", "").endswith(REAL_KEY) for r in scripted.requests)
    await manager.delete_user_session("alice", session.id)
