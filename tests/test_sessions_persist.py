"""Sessions that outlive the server (issue 18), with the demo agent over real stdio.

A session is stored as it runs (``session_store.py``); when its agent stops without the user
deleting it — the server stops, the monitor culls it, the user closes it — it stays in the
user's list, suspended, and resuming it starts its agent again, which gets the conversation
back (the demo keeps it in its home, like real agents; ``/recall`` says what it remembers).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest
from conftest import acp_require_backend, wait_for
from sqlalchemy import create_engine, text

from jupyter_acp.agents import AgentConfigManager
from jupyter_acp.agents_builtin import demo_agent_spec
from jupyter_acp.errors import (
    AcpError,
    BadRequest,
    ModelNotAllowed,
    PathOutsideWorkspace,
    SessionBusy,
    SessionNotFound,
    SessionNotReady,
)
from jupyter_acp.session import AgentSession, SessionState
from jupyter_acp.usage import LedgerUnavailable


@pytest.fixture(params=["local", pytest.param("bubblewrap", marks=pytest.mark.sandbox),
                        pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> str:
    acp_require_backend(request.param)
    return request.param


def texts(events: list[dict]) -> list[str]:
    return [e["data"]["text"] for e in events if e["type"] in ("chat:message", "chat:response")]


async def test_a_session_outlives_the_server_and_resumes_with_its_context(acp_managers, backend, tmp_path):
    first = acp_managers(sandbox=backend)
    session = await first.create_user_session("alice", "demo")
    await first.send_message("alice", session.id, "my name is Ada")
    await first.send_message("alice", session.id, "the answer is 42")
    acp_id, before = session.acp_session_id, session.events()
    assert session.stats()["title"] == "my name is Ada" and session.stats()["resumable"] is True
    await first.shutdown()  # the server stops: the agent goes, the session stays

    second = acp_managers(sandbox=backend)  # the server starts again (same database, same homes)
    assert second.get_user_sessions("alice") == []
    [stored] = await second.suspended_sessions("alice")
    model = await second.stored_model(stored)
    assert (model["id"], model["state"], model["title"], model["turns"]) == \
        (session.id, "suspended", "my name is Ada", 2)
    assert model["tokens"]["total_tokens"] > 0 and model["resumable"] is True
    assert await second.suspended_sessions("bob") == []
    with pytest.raises(SessionNotFound):  # another user's: not found, like an unknown id
        await second.resume_user_session("bob", session.id)

    resumed = await second.resume_user_session("alice", session.id)
    assert resumed.id == session.id and resumed.state is SessionState.READY
    assert resumed.restore == "resume" and resumed.acp_session_id == acp_id  # the agent's own session
    assert resumed.turns == 2 and resumed.stats()["tokens"]["total_tokens"] == model["tokens"]["total_tokens"]
    # the transcript, from our own history, numbered as before and on from there
    replay = resumed.events()
    assert texts(replay)[:4] == texts(before)[:4]
    assert [e["seq"] for e in replay[:len(before)]] == [e["seq"] for e in before]
    result = await second.send_message("alice", session.id, "/recall")
    assert result.text == "Demo agent remembers: my name is Ada | the answer is 42"  # its context is back
    assert resumed.turns == 3 and result.turn == 3


async def test_cull_close_and_delete(acp_managers, tmp_path):
    manager = acp_managers()
    session = await manager.create_user_session("alice", "demo")
    await manager.send_message("alice", session.id, "remember the milk")
    home = tmp_path / "homes" / session.id
    assert home.is_dir()
    session.last_activity -= 3600
    assert await manager.cleanup(max_age=60) == [session.id]
    assert home.is_dir()  # culled, not forgotten: the agent's own record stays for the resume
    [stored] = await manager.suspended_sessions("alice")
    resumed = await manager.resume_user_session("alice", stored.id)
    assert (await manager.send_message("alice", resumed.id, "/recall")).text == \
        "Demo agent remembers: remember the milk"

    await manager.close_user_session("alice", resumed.id)  # the user's close: suspended
    assert manager.get_user_sessions("alice") == [] and home.is_dir()
    assert [s.id for s in await manager.suspended_sessions("alice")] == [resumed.id]
    again = await manager.resume_user_session("alice", resumed.id)
    assert again.restore == "resume"

    with pytest.raises(SessionNotFound):
        await manager.delete_user_session("bob", again.id)
    await manager.delete_user_session("alice", again.id)  # forgotten: history and home
    assert await manager.suspended_sessions("alice") == [] and not home.exists()
    with pytest.raises(SessionNotFound):
        await manager.resume_user_session("alice", again.id)
    engine = create_engine(manager.ledger.db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM acp_session_events WHERE session_id = :s"),
                            {"s": again.id}).scalar() == 0
    engine.dispose()


def demo_variant(restore: str) -> AgentConfigManager:
    """The demo agent advertising only some ways to restore a session (``--restore=``)."""
    spec = demo_agent_spec()
    return AgentConfigManager(agents={"demo": {
        "command": [*spec.command, f"--restore={restore}"], "display_name": spec.display_name,
        "demo": True, "mode_levels": spec.mode_levels, "ro_paths": spec.ro_paths}})


async def test_an_agent_without_resume_is_loaded(acp_managers):
    manager = acp_managers(agents=demo_variant("load"))
    session = await manager.create_user_session("alice", "demo")
    await manager.send_message("alice", session.id, "first words")
    await manager.shutdown()
    again = await acp_managers(agents=demo_variant("load")).resume_user_session("alice", session.id)
    assert again.restore == "load"  # session/load: the agent replays, the session drops the replay
    assert (await again.prompt("/recall")).text == "Demo agent remembers: first words"
    assert texts(again.events()).count("first words") == 1


async def test_an_agent_that_cannot_restore_starts_fresh_and_says_so(acp_managers):
    manager = acp_managers(agents=demo_variant("none"))
    session = await manager.create_user_session("alice", "demo")
    await manager.send_message("alice", session.id, "first words")
    await manager.shutdown()
    again = await acp_managers(agents=demo_variant("none")).resume_user_session("alice", session.id)
    assert again.restore == "fresh"
    lost = [e for e in again.events() if e["type"] == "error" and e["data"].get("context_lost")]
    assert lost and "does not remember the earlier messages" in lost[-1]["data"]["message"]
    assert texts(again.events())[0] == "first words"  # the old transcript stays visible
    assert (await again.prompt("/recall")).text == "Demo agent remembers: "


async def test_retention_and_the_per_user_cap(acp_managers, tmp_path):
    manager = acp_managers()
    manager.store.max_stored_per_user = 2
    ids = []
    for i in range(3):
        s = await manager.create_user_session("alice", "demo", new=True)
        await manager.send_message("alice", s.id, f"session {i}")
        await manager.close_user_session("alice", s.id)
        ids.append(s.id)
    assert await manager.purge_expired() == [ids[0]]  # the least recently used beyond the cap
    assert not (tmp_path / "homes" / ids[0]).exists()
    manager.store.retention_days = 1
    engine = create_engine(manager.ledger.db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE acp_sessions SET last_activity = last_activity - 2 * 86400 "
                          "WHERE id = :s"), {"s": ids[1]})
    engine.dispose()
    assert await manager.purge_expired() == [ids[1]]
    assert [s.id for s in await manager.suspended_sessions("alice")] == [ids[2]]


async def test_the_history_is_bounded_in_bytes(acp_managers):
    manager = acp_managers()
    manager.store.max_history_bytes = 20_000
    session = await manager.create_user_session("alice", "demo")
    for i in range(5):
        await manager.send_message("alice", session.id, f"/stream 100 round {i}")
    await manager.store.flush()
    events = await manager.store.events(session.id)
    assert sum(len(p) for _, p in events) <= 20_000
    seqs = [s for s, _ in events]
    assert seqs == list(range(seqs[0], seqs[-1] + 1)) and seqs[-1] == session.last_seq
    await manager.shutdown()
    again = acp_managers()
    resumed = await again.resume_user_session("alice", session.id)
    replay = resumed.events()
    assert replay[0]["type"] == "history:truncated"  # the client is told what is missing


async def test_mentions_images_commands_and_models(acp_managers, acp_workspace_root):
    manager = acp_managers(allowed_models={"demo": ["demo-small", "demo-large"]})
    (acp_workspace_root / "notes.txt").write_text("twelve bytes")
    (acp_workspace_root / "with space.md").write_text("# hi\n")
    session = await manager.create_user_session("alice", "demo")
    names = [c["name"] for c in session.stats()["available_commands"]] or None
    if names is None:
        await asyncio.sleep(0.5)
        names = [c["name"] for c in session.stats()["available_commands"]]
    assert "recall" in names
    assert session.stats()["prompt_capabilities"] == {"image": True, "audio": False, "embeddedContext": True}

    result = await session.prompt('read @notes.txt and @"with space.md", mail me at a@b.c')
    assert "Demo agent got file notes.txt (12 bytes)." in result.text
    assert "Demo agent got file with space.md (5 bytes)." in result.text
    user = [e for e in session.events() if e["type"] == "chat:message"][-1]["data"]
    assert [(a["type"], a["name"], a["size"]) for a in user["attachments"]] == \
        [("resource", "notes.txt", 12), ("resource", "with space.md", 5)]
    with pytest.raises(PathOutsideWorkspace):
        await session.prompt("look at @../../etc/passwd")
    os.symlink("/etc/passwd", acp_workspace_root / "leak")
    with pytest.raises(PathOutsideWorkspace):
        await session.prompt("look at @leak")

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 100).decode()
    result = await session.prompt("what is this?", images=[{"mime_type": "image/png", "data": png}])
    assert result.text.startswith("Demo agent got image image/png (108 bytes).")
    with pytest.raises(BadRequest, match="base64"):
        await session.prompt("x", images=[{"mime_type": "image/png", "data": "not base64!"}])
    with pytest.raises(BadRequest, match="image/png"):
        await session.prompt("x", images=[{"mime_type": "text/html", "data": png}])

    assert session.models["current"] == "demo-small"
    await session.set_config_option("model", "demo-large")
    assert (await session.prompt("hello")).text.startswith("[demo-large] Demo agent")
    assert json.loads(json.dumps(session.stats()))["models"]["current"] == "demo-large"


async def test_the_admin_narrows_the_models(acp_managers):
    manager = acp_managers(allowed_models={"*": ["demo-large"]})
    session = await manager.create_user_session("alice", "demo")
    # started on demo-small, which is not allowed: switched to the allowed one
    assert session.models == {"config_id": "model", "current": "demo-large",
                              "available": [{"value": "demo-large", "name": "Demo large",
                                             "description": None}]}
    with pytest.raises(ModelNotAllowed, match="demo-large"):
        await session.set_config_option("model", "demo-small")
    assert (await session.prompt("hi")).text.startswith("[demo-large]")


async def test_a_resume_raced_by_another_resume_and_a_delete(acp_managers, tmp_path):
    manager = acp_managers()
    session = await manager.create_user_session("alice", "demo")
    await manager.send_message("alice", session.id, "hello")
    await manager.close_user_session("alice", session.id)
    # two clients resume at once: one agent, one session
    a, b = await asyncio.gather(manager.resume_user_session("alice", session.id),
                                manager.resume_user_session("alice", session.id))
    assert a is b and len(manager.get_user_sessions("alice")) == 1
    await manager.close_user_session("alice", session.id)
    # a delete while the agent of a resume starts: nothing is left, no record comes back
    resuming = asyncio.ensure_future(manager.resume_user_session("alice", session.id))
    await wait_for(lambda: session.id in manager._sessions, timeout=20)
    await manager.delete_user_session("alice", session.id)
    with pytest.raises(AcpError):
        await resuming
    await manager.store.flush()
    assert await manager.suspended_sessions("alice") == [] and manager.get_user_sessions("alice") == []
    assert not (tmp_path / "homes" / session.id).exists()


def hold_stop(session: AgentSession) -> tuple[asyncio.Event, list[str]]:
    """Hold ``session``'s agent stop until the returned event is set, so that a test acts while
    the agent is still stopping however fast this machine stops one (a demo agent can stop
    between two polls of ``wait_for``); the list gets the reason of every stop asked meanwhile."""
    release = asyncio.Event()
    asked: list[str] = []
    stop = session.stop

    async def held(reason: str) -> None:
        asked.append(reason)
        await release.wait()
        await stop(reason)

    session.stop = held  # type: ignore[method-assign]
    return release, asked


async def test_a_session_being_stopped_is_not_resumed_twice(acp_managers):
    """A resume while the session's agent is still stopping (a close, a cull) is refused: two
    agents never share a session's home, and the store keeps tracking the right one."""
    manager = acp_managers()
    session = await manager.create_user_session("alice", "demo")
    await manager.send_message("alice", session.id, "hello")
    release, _ = hold_stop(session)
    closing = asyncio.ensure_future(manager.close_user_session("alice", session.id))
    await wait_for(lambda: session.id in manager._stopping)
    with pytest.raises(SessionBusy, match="being stopped"):
        await manager.resume_user_session("alice", session.id)
    release.set()
    await closing
    resumed = await manager.resume_user_session("alice", session.id)
    assert resumed is not session and manager.store._tracked[session.id].session is resumed
    assert (await resumed.prompt("/recall")).text == "Demo agent remembers: hello"


async def test_a_resume_that_fails_keeps_the_session(acp_managers, tmp_path, monkeypatch):
    """The database cannot be read when the user resumes: a clear 503, and nothing of the
    session is lost — its home (the agent's own record) stays, a later resume works. Its list
    shows the live sessions meanwhile."""
    manager = acp_managers()
    session = await manager.create_user_session("alice", "demo")
    await manager.send_message("alice", session.id, "keep me")
    await manager.close_user_session("alice", session.id)

    async def down(*args, **kwargs):
        raise LedgerUnavailable("The session store cannot be read right now; try again")

    monkeypatch.setattr(manager.store, "events", down)
    with pytest.raises(LedgerUnavailable):
        await manager.resume_user_session("alice", session.id)
    assert (tmp_path / "homes" / session.id).is_dir() and manager.get_user_sessions("alice") == []
    monkeypatch.setattr(manager.store, "of_user", down)
    assert await manager.suspended_sessions("alice") == []  # (the live ones are listed all the same)
    monkeypatch.undo()
    resumed = await manager.resume_user_session("alice", session.id)
    assert (await resumed.prompt("/recall")).text == "Demo agent remembers: keep me"


async def test_a_row_the_database_refuses_stops_no_other_session(acp_managers):
    """Another server sharing the database wrote events under the same numbers (the same
    session resumed twice): that session's clashing events are dropped, the other sessions'
    are kept as before."""
    manager = acp_managers()
    a = await manager.create_user_session("alice", "demo", new=True)
    b = await manager.create_user_session("bob", "demo", new=True)
    await manager.store.flush()
    engine = create_engine(manager.ledger.db_url)
    with engine.begin() as conn:  # the numbers a's next events will take, already taken
        for seq in range(a.last_seq + 1, a.last_seq + 200):
            conn.execute(text("INSERT INTO acp_session_events (session_id, seq, payload) "
                              "VALUES (:s, :n, '{}')"), {"s": a.id, "n": seq})
    engine.dispose()
    await asyncio.gather(a.prompt("hello from alice"), b.prompt("hello from bob"))
    await manager.store.flush()
    stored_b = [json.loads(p) for _, p in await manager.store.events(b.id)]
    assert [e["seq"] for e in stored_b] == list(range(1, b.last_seq + 1))
    assert any(e["type"] == "chat:message" and e["data"]["text"] == "hello from bob" for e in stored_b)
    assert not manager.store._failing  # (nothing left to retry: a's clash was dropped)


async def test_a_delete_while_the_session_is_being_culled_forgets_it(acp_managers, tmp_path):
    manager = acp_managers()
    session = await manager.create_user_session("alice", "demo")
    await manager.send_message("alice", session.id, "hello")
    session.last_activity -= 3600
    release, asked = hold_stop(session)
    culling = asyncio.ensure_future(manager.cleanup(max_age=60))
    await wait_for(lambda: session.id in manager._stopping)
    deleting = asyncio.ensure_future(manager.delete_user_session("alice", session.id))
    await wait_for(lambda: len(asked) == 2)  # (the delete waits for the cull's stop under way)
    assert asked[1] == "deleted by the user"
    release.set()
    await deleting  # (not a 409: deleting always works)
    await culling
    await manager.store.flush()
    await asyncio.sleep(0.2)  # (the cull's suspension, in the background, must not bring it back)
    assert await manager.suspended_sessions("alice") == [] and not (tmp_path / "homes" / session.id).exists()
    with pytest.raises(SessionNotFound):
        await manager.resume_user_session("alice", session.id)


async def test_no_prompt_reaches_the_agent_after_its_session_close(acp_managers):
    """Once the agent is told ``session/close`` (a close or a delete under way: the stop comes
    next), a prompt is refused (409), never sent to an agent that no longer knows the session
    (it answered 502 "Invalid params" in a lifecycle storm, a prompt between the two steps)."""
    manager = acp_managers()
    session = await manager.create_user_session("alice", "demo")
    assert await session.close_at_agent() is True  # (the first step of a close, alone)
    with pytest.raises(SessionNotReady):
        await session.prompt("hello")
    await manager.close_user_session("alice", session.id)  # (the rest of it)
    [stored] = await manager.suspended_sessions("alice")
    assert stored.id == session.id
