"""The admin's permission policy decides the mode every agent starts in and the modes it may be in.

Qwen Code 0.24 starts in its own ``auto`` mode (an LLM classifier approves tool calls), so with
``permission_policy = "ask"`` a file write ran without asking anybody. Now each built-in agent is
launched in the policy's mode (Qwen ``--approval-mode`` and ``tools.approvalMode``, Gemini
``--approval-mode``), the server checks the mode the agent reports after ``session/new`` and puts
it right with ``session/set_mode``, users may switch only to modes the admin allows, and an agent
that switches itself to a forbidden mode is switched back (or stopped).

Real agents (Qwen Code, Gemini CLI from ``scripts/agents``) run against the fake LLM; without them
these tests skip, or fail with ``JUPYTER_ACP_REQUIRE_AGENTS=1``. The hostile agent
(``agents/hostile.py``) plays an agent that changes its mode on its own.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from acp.client.connection import ClientSideConnection
from attack import hostile_agents, make_attacker
from conftest import wait_for
from fake_llm import TOOL_DONE_REPLY, FakeLLM
from test_real_agents import REAL_KEY, require_agent

from jupyter_acp.errors import AgentError, ModeNotAllowed
from jupyter_acp.session import SessionState

CREDS = {
    "qwen": lambda url: {"api_key": REAL_KEY, "base_url": url + "/v1", "model": "fake-model"},
    "gemini": lambda url: {"api_key": REAL_KEY, "base_url": url, "model": "gemini-2.5-flash"},
}
#: the mode each policy must start each agent in
POLICY_MODES = {
    "qwen": {"ask": "default", "allow": "auto-edit", "deny": "plan"},
    "gemini": {"ask": "default", "allow": "autoEdit", "deny": "plan"},
}


@pytest.fixture
def set_mode_calls(monkeypatch):
    """Every ``session/set_mode`` the server sends to an agent (a spy: the real call still runs)."""
    calls: list[str] = []
    original = ClientSideConnection.set_session_mode

    async def spy(self, mode_id, session_id, **kwargs):
        calls.append(mode_id)
        return await original(self, mode_id=mode_id, session_id=session_id, **kwargs)

    monkeypatch.setattr(ClientSideConnection, "set_session_mode", spy)
    return calls


def real_manager(acp_managers, fake: FakeLLM, agent: str, **traits):
    bin_dir = require_agent(agent)
    manager = acp_managers(sandbox="local", allow_unsandboxed=True, **traits)
    manager.agents.extra_paths = [bin_dir]
    manager.agents.credentials = {agent: CREDS[agent](fake.url)}
    return manager


# -- real agents ---------------------------------------------------------------------------------
@pytest.mark.agent
@pytest.mark.parametrize("agent", ["qwen", "gemini"])
async def test_with_ask_a_real_agent_asks_before_it_writes(acp_managers, fake, agent, set_mode_calls):
    """Policy ``ask``: a file write waits for the user's answer with nothing written, the agent
    started in its asking mode (by its launch, no fix-up needed), and ``yolo`` is neither
    offered nor accepted. Old code: Qwen started in ``auto`` and wrote at once, asking nobody;
    Gemini (which starts in ``default`` anyway) offered and accepted ``yolo``."""
    manager = real_manager(acp_managers, fake, agent, permission_policy="ask")
    session = await manager.create_user_session("alice", agent)

    # a write waits for the user: nothing on disk until they answer
    target_file = session.sandbox_spec.workspace / "hello.txt"
    before = None
    if agent == "gemini":  # Gemini edits an existing file through ACP (see test_real_agents)
        before = "old text\n"
        target_file.write_text(before)
    target = f"{session.sandbox.workspace_path}/hello.txt"
    turn = asyncio.ensure_future(manager.send_message(
        "alice", session.id, f"please write {target} containing hi from {agent}"))
    await wait_for(lambda: session.pending or turn.done(), timeout=60)
    assert session.pending, "the agent wrote without asking the user"
    assert (target_file.read_text() if target_file.exists() else None) == before
    request_id, pending = next(iter(session.pending.items()))
    assert pending.tool_call["kind"] == "edit"
    allow = next(o for o in pending.options if o.kind == "allow_once")
    session.answer_permission(request_id, allow.option_id)
    result = await asyncio.wait_for(turn, 60)
    assert TOOL_DONE_REPLY in result.text and target_file.read_text() == f"hi from {agent}"

    # it was started in its asking mode by its launch (no fix-up needed)
    modes = session.stats()["modes"]
    assert modes["currentModeId"] == "default" and set_mode_calls == []
    offered = {m["id"] for m in modes["availableModes"]}
    assert "yolo" not in offered and {"default", "plan"} <= offered
    assert "yolo" in {m["id"] for m in modes["forbiddenModes"]}

    # the user may not leave the admin's bounds; a mode within them is fine
    with pytest.raises(ModeNotAllowed, match="does not allow the mode 'yolo'") as info:
        await session.set_mode("yolo")
    assert info.value.status == 403
    assert session.stats()["modes"]["currentModeId"] == "default"
    await session.set_mode("plan")
    assert session.stats()["modes"]["currentModeId"] == "plan" and set_mode_calls == ["plan"]


@pytest.mark.agent
@pytest.mark.parametrize("agent", ["qwen", "gemini"])
@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_the_policy_picks_the_starting_mode(acp_managers, fake, agent, policy, set_mode_calls):
    """``allow`` starts the agent in its auto-edit mode (never ``yolo``), ``deny`` in ``plan``,
    each by the agent's own launch flags and settings. Old code: Qwen in ``auto``, Gemini in
    ``default`` whatever the policy."""
    manager = real_manager(acp_managers, fake, agent, permission_policy=policy)
    session = await manager.create_user_session("alice", agent)
    expected = POLICY_MODES[agent][policy]
    assert session.stats()["modes"]["currentModeId"] == expected and set_mode_calls == []
    offered = {m["id"] for m in session.stats()["modes"]["availableModes"]}
    assert "yolo" not in offered and (policy == "deny") == (offered == {"plan"})
    with pytest.raises(ModeNotAllowed):
        await session.set_mode("yolo")


@pytest.mark.agent
async def test_an_admin_defined_qwen_is_switched_out_of_auto(acp_managers, fake, set_mode_calls):
    """An admin's own entry for Qwen Code (no mode settings: it starts in ``auto``) is put in
    ``default`` by ``session/set_mode`` after ``session/new``, and the write then asks.
    Old code: it stayed in ``auto`` and wrote without asking."""
    bin_dir = require_agent("qwen")
    from jupyter_acp.agents import QWEN_SETTINGS

    manager = real_manager(acp_managers, fake, "qwen", permission_policy="ask")
    manager.agents.agents = {"qwen": {
        "command": [f"{bin_dir}/qwen", "--acp"], "llm_api": "openai",
        "credential_env": {"api_key": "OPENAI_API_KEY", "base_url": "OPENAI_BASE_URL",
                           "model": "OPENAI_MODEL"},
        "settings_files": {".qwen/settings.json": QWEN_SETTINGS}}}
    session = await manager.create_user_session("alice", "qwen")
    assert "--approval-mode" not in session.sandbox_spec.argv
    target = f"{session.sandbox.workspace_path}/x.txt"
    turn = asyncio.ensure_future(manager.send_message("alice", session.id, f"write {target} containing x"))
    await wait_for(lambda: session.pending or turn.done(), timeout=60)
    assert session.pending and not (session.sandbox_spec.workspace / "x.txt").exists()
    session.answer_permission(next(iter(session.pending)), None)  # rejected: still nothing written
    await asyncio.wait_for(turn, 60)
    assert not (session.sandbox_spec.workspace / "x.txt").exists()
    assert set_mode_calls == ["default"] and session.stats()["modes"]["currentModeId"] == "default"
    # ``auto`` is not a mode this server knows for an unknown agent: not offered
    assert "auto" in {m["id"] for m in session.stats()["modes"]["forbiddenModes"]}


@pytest.mark.agent
async def test_gemini_switching_itself_to_auto_edit_is_switched_back(acp_managers, fake, set_mode_calls):
    """Gemini CLI answers "allow always" on an edit by switching itself to ``autoEdit`` (said only
    in a ``[MODE_UPDATE] autoEdit`` message chunk): under ``ask`` the server switches it back, so
    its next edit (of another file) asks again. Old code: the next edit ran without asking."""
    manager = real_manager(acp_managers, fake, "gemini", permission_policy="ask")
    session = await manager.create_user_session("alice", "gemini")
    events: list[dict] = []
    session.subscribe(events.append)
    workspace, seen = session.sandbox_spec.workspace, session.sandbox.workspace_path
    for name in ("one.txt", "two.txt"):
        (workspace / name).write_text("old text\n")

    turn = asyncio.ensure_future(manager.send_message("alice", session.id,
                                                      f"write {seen}/one.txt containing 1"))
    await wait_for(lambda: session.pending or turn.done(), timeout=60)
    request_id, pending = next(iter(session.pending.items()))
    always = next(o for o in pending.options if o.kind == "allow_always")
    session.answer_permission(request_id, always.option_id)
    await asyncio.wait_for(turn, 60)
    assert (workspace / "one.txt").read_text() == "1"
    with contextlib.suppress(AssertionError):  # (the old code never switches it back)
        await wait_for(lambda: set_mode_calls, timeout=10)

    turn = asyncio.ensure_future(manager.send_message("alice", session.id,
                                                      f"write {seen}/two.txt containing 2"))
    await wait_for(lambda: session.pending or turn.done(), timeout=60)
    assert session.pending, "the agent edited without asking the user"
    assert (workspace / "two.txt").read_text() == "old text\n"
    session.answer_permission(next(iter(session.pending)), None)
    await asyncio.wait_for(turn, 60)
    assert (workspace / "two.txt").read_text() == "old text\n"
    assert set_mode_calls == ["default"] and session.stats()["modes"]["currentModeId"] == "default"
    told = [e["data"] for e in events if e["type"] == "error"]
    assert told and told[0]["mode"] == "autoEdit" and told[0]["restored"] == "default"


# -- a hostile agent -----------------------------------------------------------------------------
def modes_env(start: str = "default", stuck: bool = False, modes: str = "default,yolo") -> dict:
    env = {"HOSTILE_MODES": modes, "HOSTILE_START_MODE": start}
    return {**env, "HOSTILE_STUCK": "1"} if stuck else env


async def test_an_agent_switching_itself_to_yolo_is_switched_back(acp_managers):
    """The agent announces ``current_mode_update`` to ``yolo`` mid-turn: the server sets it back
    to the policy's mode at once and tells the user. Old code: it stayed in ``yolo`` (and the
    server showed ``yolo`` as the current mode)."""
    attacker = await make_attacker(acp_managers, "local", agents=hostile_agents(env=modes_env()))
    session = attacker.session
    assert session.stats()["modes"]["currentModeId"] == "default"
    events: list[dict] = []
    session.subscribe(events.append)
    report = await attacker("mode", mode="yolo")
    assert report == {"mode": "default", "set_by_client": ["default"]}
    assert session.stats()["modes"]["currentModeId"] == "default"
    told = [e["data"] for e in events if e["type"] == "error"]
    assert told and told[0]["mode"] == "yolo" and told[0]["restored"] == "default"
    assert "does not allow" in told[0]["message"]
    # a mode the policy allows is left alone
    assert await attacker("mode", mode="default", wait=0.2) == {"mode": "default",
                                                                 "set_by_client": ["default"]}
    assert session.state is SessionState.READY


async def test_an_agent_starting_in_yolo_is_put_in_the_policy_mode(acp_managers):
    """Old code: the session started in the agent's ``yolo``."""
    attacker = await make_attacker(acp_managers, "local", agents=hostile_agents(env=modes_env("yolo")))
    assert attacker.session.stats()["modes"]["currentModeId"] == "default"
    assert (await attacker("mode", mode="default", wait=0))["set_by_client"] == ["default"]


async def test_an_agent_that_will_not_leave_yolo_is_not_started(acp_managers):
    """Old code: the session started, in ``yolo``."""
    with pytest.raises(AgentError, match="could not be put in 'default'"):
        await make_attacker(acp_managers, "local", agents=hostile_agents(env=modes_env("yolo", stuck=True)))


async def test_an_agent_that_will_not_leave_a_forbidden_mode_is_stopped(acp_managers):
    """It switches itself to ``yolo`` and refuses ``session/set_mode``: the agent is stopped and
    the session is in ``error`` saying why. Old code: the turn ended normally, in ``yolo``."""
    attacker = await make_attacker(acp_managers, "local", agents=hostile_agents(env=modes_env(stuck=True)))
    session = attacker.session
    with pytest.raises(AgentError, match="switched itself to the mode 'yolo'"):
        await attacker("mode", mode="yolo")
    assert session.state is SessionState.ERROR and "does not allow" in session.error
    assert session.sandbox is None


async def test_users_switch_only_to_modes_the_admin_allows(acp_managers):
    """``set_mode`` refuses a forbidden mode with 403 (an unknown one with 400); the admin's
    ``allowed_modes`` opens one up. Old code: ``yolo`` was switched to."""
    attacker = await make_attacker(acp_managers, "local", agents=hostile_agents(env=modes_env()))
    session = attacker.session
    with pytest.raises(ModeNotAllowed):
        await session.set_mode("yolo")
    assert [m["id"] for m in session.modes["availableModes"]] == ["default"]
    assert [m["id"] for m in session.modes["forbiddenModes"]] == ["yolo"]
    opened = await make_attacker(acp_managers, "local", user="trent",
                                 agents=hostile_agents(env=modes_env()), allowed_modes={"hostile": ["yolo"]})
    await opened.session.set_mode("yolo")
    assert opened.session.stats()["modes"]["currentModeId"] == "yolo"
    assert (await opened("mode", mode="yolo", wait=0.2))["mode"] == "yolo"  # allowed: left alone


async def test_an_agent_with_only_unknown_modes_needs_the_admin(acp_managers):
    """Modes the server cannot judge (not declared in the spec, not well known) are never
    assumed safe: the session does not start until the admin declares or allows them."""
    env = modes_env("normal", modes="normal,turbo")
    with pytest.raises(AgentError, match="offers no mode known to match"):
        await make_attacker(acp_managers, "local", agents=hostile_agents(env=env))
    attacker = await make_attacker(acp_managers, "local", agents=hostile_agents(env=env),
                                   allowed_modes={"*": ["normal"]})
    assert attacker.session.policy_mode == "normal"
    assert (await attacker("mode", mode="turbo"))["mode"] == "normal"  # and turbo is undone
