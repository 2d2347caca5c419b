"""Real agents get their conversation back after the server restarts (issue 18).

Each agent (Qwen Code, Gemini CLI, Claude Code, Codex from npm) runs in bubblewrap and reaches
the fake LLM only through the gateway. Two turns, the server stops (the manager shuts down:
agents and sandboxes gone, sessions suspended), a new server resumes the session from its list
in a fresh sandbox, and the third turn's request to the LLM carries the first two turns: the
agent really has its context back (ACP ``session/resume`` or ``session/load``, whichever it
advertises), not only our transcript on screen.

Gemini CLI 0.61 advertises ``session/load`` but often cannot restore a conversation in a new
process: its load starts a new chat recording under the same session id, which may replace the
earlier recording in ``~/.gemini/tmp/<project>/chats`` before it is read ("No previous sessions
found for this project"; traced with a readdir hook; a race inside the agent: some runs load).
Its test accepts either outcome, each told truthfully: loaded, and the LLM request carries the
earlier turns; or fresh, said (``context_lost``), the transcript kept, and the request without
them.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import acp_require_backend
from fake_llm import FakeLLM
from test_real_agents import REAL_KEY, require_agent

from jupyter_acp.session import SessionState

pytestmark = [pytest.mark.agent, pytest.mark.sandbox, pytest.mark.timeout(300)]

CREDS = {
    "qwen": lambda fake: {"api_key": REAL_KEY, "base_url": fake.url + "/v1", "model": "fake-model"},
    "gemini": lambda fake: {"api_key": REAL_KEY, "base_url": fake.url, "model": "gemini-2.5-flash"},
    "claude": lambda fake: {"api_key": REAL_KEY, "base_url": fake.url, "model": "claude-sonnet-4-5"},
    "codex": lambda fake: {"api_key": REAL_KEY, "base_url": fake.url + "/v1", "model": "gpt-5.3-codex"},
}


def server(acp_managers, agent: str, fake: FakeLLM):
    """One "server": a manager as the extension makes it (same database, homes and root)."""
    manager = acp_managers(sandbox="bubblewrap")
    manager.agents.extra_paths = [require_agent(agent)]
    manager.agents.credentials = {agent: CREDS[agent](fake)}
    return manager


def asked_with(fake: FakeLLM, word: str) -> list[str]:
    """The request bodies (as text) of the LLM requests whose conversation contains ``word``."""
    return [text for text in (json.dumps(r.body) for r in fake.requests) if word in text]


@pytest.mark.parametrize("agent", ["qwen", "gemini", "claude", "codex"])
async def test_the_agent_remembers_after_a_server_restart(acp_managers, fake, agent):
    acp_require_backend("bubblewrap")
    first = server(acp_managers, agent, fake)
    session = await first.create_user_session("alice", agent)
    for text in ("remember the word aardvark", "and the word bumblebee"):
        assert (await first.send_message("alice", session.id, text)).stop_reason == "end_turn"
    tokens_before = session.stats()["tokens"]["total_tokens"]
    await first.shutdown()

    second = server(acp_managers, agent, fake)
    [listed] = await second.suspended_sessions("alice")
    assert listed.id == session.id and listed.turns == 2
    resumed = await second.resume_user_session("alice", session.id)
    assert resumed.state is SessionState.READY
    result = await second.send_message("alice", session.id, "what about the word chinchilla")
    assert "Hello from the fake LLM" in result.text and result.turn == 3
    third = asked_with(fake, "chinchilla")
    assert third
    lost = [e for e in resumed.events() if e["type"] == "error" and e["data"].get("context_lost")]
    if agent == "gemini" and resumed.restore == "fresh":  # (see the module's docstring)
        assert len(lost) == 1 and "does not remember the earlier messages" in lost[0]["data"]["message"]
        assert not any("aardvark" in t for t in third)  # what we said is what happened
    else:
        assert not lost
        assert resumed.restore in ("resume", "load"), resumed.restore
        # the LLM request of the third turn holds the two earlier prompts: the agent's context
        # (some requests of a turn are side calls, e.g. Claude's session title, not the conversation)
        assert any("aardvark" in t and "bumblebee" in t for t in third), [t[:300] for t in third]
    # the ledger goes on under the same session; the transcript shows all three turns
    assert resumed.stats()["tokens"]["total_tokens"] > tokens_before
    prompts = [e["data"]["text"] for e in resumed.events() if e["type"] == "chat:message"]
    assert prompts == ["remember the word aardvark", "and the word bumblebee",
                       "what about the word chinchilla"]
    # the store holds no key: neither the admin's real one nor the sandbox's dummy one
    dump = "\n".join(sqlite3.connect(second.ledger.db_url.removeprefix("sqlite:///")).iterdump())
    assert REAL_KEY not in dump and "jacp-" not in dump
    print(f"\n[{agent}] restored with {resumed.restore}")
