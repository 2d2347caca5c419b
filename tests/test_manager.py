"""The demo agent end to end through UserSessionManager, over real stdio, in local and bubblewrap.

Every seed operation (DESIGN.md §1) is exercised here: create (reuse / new / limit), get, list,
delete, send_message, update_token_usage, get_session_stats, cleanup.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from conftest import acp_require, answer_next_permission, wait_for

from jupyter_acp.errors import (
    AgentError,
    AgentUnavailable,
    BadRequest,
    PathOutsideWorkspace,
    QuotaExceeded,
    SessionBusy,
    SessionNotFound,
    TooManySessions,
)
from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox
from jupyter_acp.session import SessionState
from jupyter_acp.usage import UsageLedger

USD_PER_TOKEN = 0.000002


@pytest.fixture(params=["local", pytest.param("bubblewrap", marks=pytest.mark.sandbox)])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "bubblewrap":
        ok, why = BubblewrapSandbox.available()
        acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", ok, f"bubblewrap cannot run here: {why}")
    return request.param


@pytest.fixture
def manager(acp_managers, backend):
    return acp_managers(sandbox=backend)


def words(text: str) -> int:
    return len(text.split())


async def test_stream_arrives_in_order_and_usage_is_exact(manager, backend, acp_ledger):
    session = await manager.create_user_session("alice", "demo")
    assert session.state is SessionState.READY
    assert session.sandbox.kind == backend
    events: list[dict] = []
    session.subscribe(events.append)

    result = await manager.send_message("alice", session.id, "please say hello world")

    expected = "Demo agent (no LLM) heard 4 words: please say hello world"
    chunks = [e["data"]["content"]["text"] for e in events
              if e["type"] == "session_update" and e["data"]["sessionUpdate"] == "agent_message_chunk"]
    assert len(chunks) == words(expected)  # streamed, one chunk per word
    assert "".join(chunks) == expected == result.text
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert result.stop_reason == "end_turn"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (4, words(expected))

    second = await manager.send_message("alice", session.id, "again")
    # the agent reports cumulative usage; each turn must be counted once
    assert (second.usage.input_tokens, second.usage.output_tokens) == (1, words(second.text))
    totals = acp_ledger.session_totals(session.id)
    assert totals["turns"] == 2
    assert totals["input_tokens"] == 5
    assert totals["output_tokens"] == words(expected) + words(second.text)
    assert totals["total_tokens"] == totals["input_tokens"] + totals["output_tokens"]
    assert totals["cost"] == pytest.approx(totals["total_tokens"] * USD_PER_TOKEN)
    stats = manager.get_session_stats("alice", session.id)
    assert stats["tokens"]["total_tokens"] == totals["total_tokens"]
    assert stats["context"] == {"used": totals["total_tokens"], "size": 100_000}
    assert stats["turns"] == 2 and stats["state"] == "ready" and stats["demo"] is True


async def test_write_tool_call_with_permission_approved(manager, acp_workspace_root):
    session = await manager.create_user_session("alice", "demo")
    events: list[dict] = []
    session.subscribe(events.append)
    approve = asyncio.create_task(answer_next_permission(session, "allow"))

    result = await manager.send_message("alice", session.id, "/write notes/hello.txt hi from the agent")

    await approve
    assert result.text == "Wrote notes/hello.txt (18 bytes)."
    assert (acp_workspace_root / "notes" / "hello.txt").read_text() == "hi from the agent\n"
    kinds = [(e["type"], e["data"].get("sessionUpdate")) for e in events]
    assert ("session_update", "tool_call") in kinds
    assert ("permission_request", None) in kinds and ("permission_resolved", None) in kinds
    updates = [e["data"] for e in events if e["data"].get("sessionUpdate") == "tool_call_update"]
    assert updates[-1]["status"] == "completed"
    assert updates[-1]["content"][0]["type"] == "diff"
    resolved = next(e["data"] for e in events if e["type"] == "permission_resolved")
    assert resolved["option_id"] == "allow" and resolved["by"] == "user"


async def test_write_rejected_writes_nothing(manager, acp_workspace_root):
    session = await manager.create_user_session("alice", "demo")
    reject = asyncio.create_task(answer_next_permission(session, "reject"))
    result = await manager.send_message("alice", session.id, "/write secret.txt nope")
    await reject
    assert result.text == "Permission denied: did not write secret.txt."
    assert not (acp_workspace_root / "secret.txt").exists()


async def test_bad_permission_answers_are_refused(manager):
    session = await manager.create_user_session("alice", "demo")
    turn = asyncio.create_task(manager.send_message("alice", session.id, "/write x.txt y"))
    request_id = await wait_for(lambda: next(iter(session.pending), None))
    with pytest.raises(BadRequest, match="Unknown option"):
        session.answer_permission(request_id, "maybe")
    session.answer_permission(request_id, None)  # dismissed = rejected
    assert (await turn).text.startswith("Permission denied")


async def test_permission_policy_and_timeout(acp_managers, acp_workspace_root):
    allow = acp_managers(permission_policy="allow")
    s = await allow.create_user_session("alice", "demo")
    assert (await allow.send_message("alice", s.id, "/write a.txt yes")).text.startswith("Wrote")
    deny = acp_managers(permission_policy="deny")
    s = await deny.create_user_session("bob", "demo")
    assert (await deny.send_message("bob", s.id, "/write b.txt no")).text.startswith("Permission denied")
    asking = acp_managers(permission_timeout=0.2)
    s = await asking.create_user_session("carol", "demo")
    result = await asking.send_message("carol", s.id, "/write c.txt late")
    assert result.text.startswith("Permission denied")  # nobody answered: rejected on timeout
    assert [e["data"]["by"] for e in s.events() if e["type"] == "permission:resolved"] == ["timeout"]
    assert (acp_workspace_root / "a.txt").exists() and not (acp_workspace_root / "b.txt").exists()


async def test_cancel_stops_a_turn(manager):
    session = await manager.create_user_session("alice", "demo")
    turn = asyncio.create_task(manager.send_message("alice", session.id, "/sleep 60"))
    await wait_for(lambda: session.state is SessionState.BUSY and session._turn_text)
    with pytest.raises(SessionBusy):
        await manager.send_message("alice", session.id, "meanwhile")
    assert await session.cancel() is True
    result = await asyncio.wait_for(turn, 10)
    assert result.stop_reason == "cancelled"
    assert session.state is SessionState.READY
    assert await session.cancel() is False  # nothing to cancel any more


async def test_terminal_runs_inside_the_sandbox(acp_managers, backend, acp_workspace_root):
    # a local terminal runs on the host: the admin must opt in (bubblewrap always offers them)
    manager = acp_managers(sandbox=backend, allow_unsandboxed_terminals=True)
    (acp_workspace_root / "data.txt").write_text("x")
    session = await manager.create_user_session("alice", "demo")
    result = await manager.send_message("alice", session.id, "/shell pwd; ls")
    assert result.text.startswith("exit 0: ")
    expected_cwd = "/workspace" if backend == "bubblewrap" else str(acp_workspace_root)
    assert expected_cwd in result.text and "data.txt" in result.text


async def test_plan_modes_and_read(manager, acp_workspace_root):
    (acp_workspace_root / "in.txt").write_text("content of in")
    session = await manager.create_user_session("alice", "demo")
    events: list[dict] = []
    session.subscribe(events.append)
    await manager.send_message("alice", session.id, "/plan")
    plan = next(e["data"] for e in events if e["data"].get("sessionUpdate") == "plan")
    assert [p["content"] for p in plan["entries"]] == ["Step 1", "Step 2", "Step 3"]
    assert (await manager.send_message("alice", session.id, "/read in.txt")).text == "content of in"
    with pytest.raises(BadRequest, match="Unknown mode"):
        await session.set_mode("reckless")
    await session.set_mode("yolo")
    assert session.stats()["modes"]["currentModeId"] == "yolo"
    assert [o["id"] for o in session.stats()["config_options"]] == ["style", "model"]
    with pytest.raises(BadRequest, match="Unknown config option"):
        await session.set_config_option("colour", "red")
    await session.set_config_option("style", "shout")
    assert session.config_options[0]["currentValue"] == "shout"
    assert (await manager.send_message("alice", session.id, "hi")).text.startswith("DEMO AGENT")
    await session.set_config_option("style", "plain")
    # in yolo mode the agent writes without asking
    assert (await manager.send_message("alice", session.id, "/write y.txt ok")).text.startswith("Wrote")


async def test_agent_errors_are_reported_and_session_survives(manager):
    session = await manager.create_user_session("alice", "demo")
    with pytest.raises(AgentError, match="failed on purpose"):
        await manager.send_message("alice", session.id, "/fail")
    assert session.state is SessionState.READY
    assert (await manager.send_message("alice", session.id, "still there")).stop_reason == "end_turn"


async def test_crash_mid_turn_then_restart(manager, acp_ledger):
    session = await manager.create_user_session("alice", "demo")
    first = await manager.send_message("alice", session.id, "remember this")
    acp_id = session.acp_session_id
    with pytest.raises(AgentError, match="status 3"):
        await asyncio.wait_for(manager.send_message("alice", session.id, "/crash"), 20)
    assert session.state is SessionState.ERROR
    assert "status 3" in session.error and "crashing on purpose" in session.error
    with pytest.raises(Exception, match="error"):
        await manager.send_message("alice", session.id, "hello?")
    other = await manager.create_user_session("bob", "demo")  # the server is unaffected
    assert (await manager.send_message("bob", other.id, "hi")).stop_reason == "end_turn"

    await manager.restart_user_session("alice", session.id)
    assert session.state is SessionState.READY
    assert session.acp_session_id == acp_id  # continued through session/load
    after = await manager.send_message("alice", session.id, "and now")
    assert after.stop_reason == "end_turn"
    # cumulative usage continues from the loaded session: this turn counts only itself
    assert (after.usage.input_tokens, after.usage.output_tokens) == (2, words(after.text))
    # the crashed turn reported nothing (the agent died before its usage report)
    assert acp_ledger.session_totals(session.id)["input_tokens"] == words("remember this") + 2
    assert first.turn == 1 and after.turn == 3


async def test_seed_operations(manager, acp_ledger, acp_workspace_root):
    a1 = await manager.create_user_session("alice", "demo")
    assert await manager.create_user_session("alice", "demo") is a1  # reused
    a2 = await manager.create_user_session("alice", "demo", new=True)
    assert a2 is not a1
    assert [s.id for s in manager.get_user_sessions("alice")] == [a1.id, a2.id]
    assert manager.get_user_session("alice", a2.id) is a2

    record_id = await manager.update_token_usage("alice", a1.id, {"input_tokens": 7, "output_tokens": 5,
                                                                  "total_tokens": 12, "source": "gateway"})
    assert record_id > 0
    assert manager.get_session_stats("alice", a1.id)["tokens"]["total_tokens"] == 12
    with pytest.raises(BadRequest):
        await manager.update_token_usage("alice", a1.id, {"bogus": 1})

    (acp_workspace_root / "sub").mkdir()
    a3 = await manager.create_user_session("alice", "demo", new=True, cwd="sub")
    assert a3.sandbox_spec.workspace == acp_workspace_root / "sub"
    with pytest.raises(PathOutsideWorkspace):
        await manager.create_user_session("alice", "demo", cwd="../..")
    with pytest.raises(BadRequest):
        await manager.create_user_session("alice", "demo", cwd="missing-dir")
    with pytest.raises(BadRequest, match="not valid Unicode"):  # (was a UnicodeEncodeError)
        await manager.create_user_session("alice", "demo", cwd="sub/\ud800")

    await manager.delete_user_session("alice", a2.id)
    assert a2.state is SessionState.STOPPED
    with pytest.raises(SessionNotFound):
        manager.get_user_session("alice", a2.id)
    assert a2.sandbox is None and (acp_workspace_root / "sub").is_dir()  # workspace kept

    # cleanup: only sessions idle longer than max_age, never a busy one
    a1.last_activity -= 100
    assert await manager.cleanup(max_age=50) == [a1.id]
    assert [s.id for s in manager.get_user_sessions("alice")] == [a3.id]
    assert await manager.cleanup(max_age=0) == []


async def test_monitor_culls_idle_sessions(acp_managers):
    manager = acp_managers(monitor_interval=0.05, idle_max_age=0.1)
    session = await manager.create_user_session("alice", "demo")
    manager.start_monitor()
    await wait_for(lambda: session.state is SessionState.STOPPED, timeout=10)
    assert manager.get_user_sessions("alice") == []


async def test_two_users_are_isolated(manager):
    a = await manager.create_user_session("alice", "demo")
    assert manager.get_user_sessions("bob") == []
    with pytest.raises(SessionNotFound):
        manager.get_user_session("bob", a.id)
    with pytest.raises(SessionNotFound):
        await manager.send_message("bob", a.id, "hi")
    with pytest.raises(SessionNotFound):
        await manager.delete_user_session("bob", a.id)
    with pytest.raises(SessionNotFound):
        manager.get_session_stats("bob", a.id)
    with pytest.raises(SessionNotFound):
        await manager.update_token_usage("bob", a.id, {"input_tokens": 1})
    with pytest.raises(SessionNotFound):
        await manager.restart_user_session("bob", a.id)
    b = await manager.create_user_session("bob", "demo")  # bob never gets alice's session
    assert b is not a
    assert a.state is SessionState.READY


async def test_session_limit_per_user(acp_managers):
    manager = acp_managers(max_sessions_per_user=2)
    await manager.create_user_session("alice", "demo")
    await manager.create_user_session("alice", "demo", new=True)
    with pytest.raises(TooManySessions):
        await manager.create_user_session("alice", "demo", new=True)
    await manager.create_user_session("bob", "demo")  # per user


async def test_unsandboxed_real_agents_are_refused(acp_managers, tmp_path):
    fake = tmp_path / "bin" / "fake-agent"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexec sleep 1000\n")
    fake.chmod(0o755)
    manager = acp_managers(sandbox="local")
    manager.agents.agents = {"fake": {"command": [str(fake)]}}
    with pytest.raises(AgentUnavailable, match="allow_unsandboxed"):
        await manager.create_user_session("alice", "fake")


async def test_agent_that_never_initializes_times_out(acp_managers, tmp_path):
    manager = acp_managers(sandbox="local", allow_unsandboxed=True, init_timeout=0.5)
    manager.agents.agents = {"mute": {"command": ["sleep", "1000"]}}
    with pytest.raises(AgentError, match=r"did not answer initialize within 0\.5 s"):
        await manager.create_user_session("alice", "mute")
    assert manager.get_user_sessions("alice") == []  # a failed start leaves nothing behind


async def test_agent_that_exits_at_start_explains_why(acp_managers):
    manager = acp_managers(sandbox="local", allow_unsandboxed=True)
    manager.agents.agents = {"broken": {"command": ["sh", "-c", "echo missing API key >&2; exit 2"]}}
    with pytest.raises(AgentError, match=r"status 2.*missing API key"):
        await manager.create_user_session("alice", "broken")


async def test_credentials_reach_only_the_agent_env(acp_managers, caplog):
    manager = acp_managers(sandbox="local", allow_unsandboxed_terminals=True)  # /shell on the host
    secret = "sk-test-very-secret-value"
    manager.agents.agents = {"demo2": {"command": [sys.executable, "-m", "jupyter_acp.agents_builtin.demo"],
                                       "credential_env": {"api_key": "DEMO_API_KEY"}, "demo": True}}
    session = await manager.create_user_session("alice", "demo2", credentials={"api_key": secret})
    assert session.sandbox_spec.env["DEMO_API_KEY"] == secret
    assert "DEMO_API_KEY" not in os.environ
    result = await manager.send_message("alice", session.id, "/shell echo key=$DEMO_API_KEY")
    assert secret in result.text  # the agent has it ...
    assert secret not in str(session.stats()) and secret not in caplog.text  # ... nobody else shows it
    with pytest.raises(BadRequest, match="Unknown credential field"):
        await manager.create_user_session("alice", "demo2", new=True, credentials={"password": "x"})


async def test_ledger_persists_and_quota_refuses(acp_managers, tmp_path):
    db = f"sqlite:///{tmp_path / 'persist.sqlite'}"
    first = acp_managers(ledger=UsageLedger(db_url=db))
    s = await first.create_user_session("alice", "demo")
    result = await first.send_message("alice", s.id, "one two three")
    await first.shutdown()
    first.ledger.close()

    ledger = UsageLedger(db_url=db, max_tokens_per_user_per_day=result.usage.total_tokens + 1)
    second = acp_managers(ledger=ledger)
    assert ledger.user_totals("alice")["total_tokens"] == result.usage.total_tokens
    assert ledger.per_session("alice")[0]["session_id"] == s.id
    assert ledger.per_day("alice")[0]["total_tokens"] == result.usage.total_tokens
    s2 = await second.create_user_session("alice", "demo")
    await second.send_message("alice", s2.id, "below the cap")  # 13 of 14 used: allowed
    with pytest.raises(QuotaExceeded, match="quota"):
        await second.send_message("alice", s2.id, "over the cap")
    s3 = await second.create_user_session("bob", "demo")  # other users are not affected
    assert (await second.send_message("bob", s3.id, "hi")).stop_reason == "end_turn"
    ledger.close()


def test_workspace_template(acp_managers, tmp_path):
    manager = acp_managers(workspace_template=str(tmp_path / "users" / "{username}"))
    assert manager.workspace_for("a/../b c", None) == tmp_path / "users" / "a-2F-2E-2E-2Fb-20c"
    assert (tmp_path / "users" / "a-2F-2E-2E-2Fb-20c").is_dir()


def test_limits_from_jupyterhub_env(monkeypatch, acp_managers):
    monkeypatch.setenv("MEM_LIMIT", "2G")
    monkeypatch.setenv("CPU_LIMIT", "0.5")
    manager = acp_managers()
    from jupyter_acp.agents_builtin import demo_agent_spec

    limits = manager.limits_for(demo_agent_spec())
    assert limits.mem_limit == 256 * 1024**2  # the demo agent's own need, under the 2G cap
    assert limits.cpu_limit == 0.5 and limits.network is False
    manager.mem_limit = "128M"
    assert manager.limits_for(demo_agent_spec()).mem_limit == 128 * 1024**2  # the admin's cap wins




async def test_delete_during_a_turn_ends_the_turn(manager):
    session = await manager.create_user_session("alice", "demo")
    turn = asyncio.create_task(manager.send_message("alice", session.id, "/sleep 60"))
    await wait_for(lambda: session._turn_text)
    await manager.delete_user_session("alice", session.id)
    with pytest.raises(Exception, match="stopped"):
        await asyncio.wait_for(turn, 10)
    assert session.state is SessionState.STOPPED


async def test_a_caller_that_goes_away_does_not_leave_the_session_busy(manager):
    session = await manager.create_user_session("alice", "demo")
    turn = asyncio.create_task(manager.send_message("alice", session.id, "/sleep 60"))
    await wait_for(lambda: session._turn_text)
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    assert session.state is SessionState.READY
    assert (await manager.send_message("alice", session.id, "next")).stop_reason == "end_turn"
