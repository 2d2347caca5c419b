"""The usage ledger when its database is slow, locked or down (issue 14, items 10 and 11).

Real faults only, with real turns of the demo agent through the real manager (and one through
the real server's REST API):

* a *slow* database is another process holding SQLite's write lock (``BEGIN EXCLUSIVE``) for a
  while: every write waits for it. Tests run as root, for whom ``chmod 0400`` changes nothing;
  a lock stops root too;
* a *failing* database is the same lock held past the ledger's ``write_timeout`` (SQLite gives
  up with "database is locked", as it does for any writer that cannot get in), or a real
  PostgreSQL server stopped mid-session (``pg_ctl stop -m immediate``) and started again.

What must hold: another session's stream never waits for the ledger (the event loop's lag stays
small while a write waits seconds); a turn whose record could not be written still ends — its
``error`` event before its ``turn_end`` (the wire's ``chat:response``), the session back to
``ready`` — and the next turn works; the record waits in a private spool and is replayed once
the database is back: the ledger's totals are then the sum of every turn, nothing lost or
doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from fake_llm import FakeLLM
from pg import postgres_fixture  # noqa: F401 (the fixture postgres)
from test_gateway import http
from traitlets.config import Config

from jupyter_acp.errors import QuotaExceeded, SessionNotReady
from jupyter_acp.session import AgentSession, SessionState
from jupyter_acp.testing import TokenPerUser, auth
from jupyter_acp.usage import LedgerUnavailable, TurnUsage, UsageLedger

pytestmark = pytest.mark.timeout(120)

_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
print("ready", flush=True)
sys.stdin.readline()
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("released", flush=True)
"""


class LockHolder:
    """Another process that holds the SQLite database's write lock until ``release``.
    ``lock=False``: started, the lock taken only by ``lock()`` (a pipe round trip, not a
    process start: what a test needs to lock the database *during* a short turn)."""

    def __init__(self, db: Path, lock: bool = True) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"ready\n"
        if lock:
            self.lock()

    def lock(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == b"locked\n"

    @classmethod
    async def take(cls, db: Path, lock: bool = True) -> LockHolder:
        return await asyncio.to_thread(cls, db, lock)

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
            assert self.proc.stdout.readline() == b"released\n"
        self.proc.wait(10)

    def kill(self) -> None:
        """(After ``release``, or instead of it when a test failed.)"""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)  # (and closes the pipes)


class LoopLag:
    """How late the event loop runs a task that sleeps ``tick`` s, at worst: what every other
    session's stream would wait."""

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.tick)
            self.worst = max(self.worst, loop.time() - before - self.tick)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> Iterator[Callable[..., tuple[UsageLedger, Path]]]:
    """``make(**traits)`` → a SQLite ledger (created, so that another process can lock it) and
    its file; closed after the test."""
    made: list[UsageLedger] = []

    def make(**traits: Any) -> tuple[UsageLedger, Path]:
        db = tmp_path / "ledger" / "usage.sqlite"
        ledger = UsageLedger(db_url=f"sqlite:///{db}", spool_path=str(tmp_path / "spool" / "usage.spool"),
                             **traits)
        ledger.engine  # noqa: B018
        made.append(ledger)
        return ledger, db

    yield make
    for ledger in made:
        ledger.close()


def chunks(events: list[dict[str, Any]]) -> int:
    return sum(1 for e in events if e["type"] == "session_update"
               and e["data"]["sessionUpdate"] == "agent_message_chunk")


def turn_events(events: list[dict[str, Any]], turn: int) -> list[dict[str, Any]]:
    """The events of one turn, from its ``user_message`` to its ``turn_end``."""
    start = next(i for i, e in enumerate(events) if e["type"] == "user_message" and e["data"]["turn"] == turn)
    end = next(i for i, e in enumerate(events) if e["type"] == "turn_end" and e["data"]["turn"] == turn)
    return events[start:end + 1]


def assert_spool_is_private(ledger: UsageLedger) -> None:
    path = ledger.spool.path
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


async def sleeping_turn(session: AgentSession, events: list[dict[str, Any]], seconds: float
                        ) -> asyncio.Task[Any]:
    """A turn under way: its first chunk has arrived, the agent now sleeps ``seconds``."""
    before = chunks(events)
    task = asyncio.create_task(session.prompt(f"/sleep {seconds}"))
    await wait_for(lambda: chunks(events) > before)
    return task


# -- item 10: a slow database ---------------------------------------------------------------------
async def test_a_slow_database_stalls_no_other_session(acp_managers, sqlite_ledger):
    """Alice's turn waits ~1.5 s for a locked database (its record is durable before its end);
    meanwhile Bob's turn streams at full speed and the event loop is never late by more than a
    fraction of that. The control: the same lock with a ledger write made on the loop (what
    every record did before) stalls the loop for the whole wait."""
    hold = 1.5
    ledger, db = sqlite_ledger(write_timeout=30)
    manager = acp_managers(ledger=ledger)
    alice = await manager.create_user_session("alice", "demo")
    bob = await manager.create_user_session("bob", "demo")
    a_events: list[dict[str, Any]] = []
    b_events: list[dict[str, Any]] = []
    alice.subscribe(a_events.append)
    bob.subscribe(b_events.append)

    holder = await LockHolder.take(db)
    try:
        with LoopLag() as lag:
            locked = time.monotonic()
            locked_wall = time.time()
            a_turn = asyncio.create_task(alice.prompt("hello there"))
            # alice's reply has streamed; her turn now waits for the locked database
            await wait_for(lambda: any(e["type"] == "session_update" and e["data"]["sessionUpdate"]
                                       == "usage_update" for e in a_events))
            await asyncio.sleep(0.2)
            assert not a_turn.done()
            started = time.monotonic()
            b_turn = asyncio.create_task(bob.prompt("/stream 200"))
            await wait_for(lambda: chunks(b_events) == 200)
            b_streamed = time.monotonic() - started
            assert not a_turn.done() and not any(e["type"] == "turn_end" for e in a_events)
            await asyncio.sleep(max(hold - (time.monotonic() - locked), 0))
            await asyncio.to_thread(holder.release)
            a_result, b_result = await a_turn, await b_turn
    finally:
        holder.kill()
    a_waited = next(e["time"] for e in a_events if e["type"] == "turn_end") - locked_wall
    print(f"\nslow database ({hold} s lock): loop lag at worst {lag.worst * 1000:.1f} ms; "
          f"another session streamed 200 chunks in {b_streamed * 1000:.0f} ms; "
          f"the waiting turn ended {a_waited:.2f} s after the lock was taken")
    assert a_waited >= hold - 0.1  # it really waited for the lock...
    assert lag.worst < 0.25 and b_streamed < 1.0  # ...and nobody else did
    assert b_result.stop_reason == "end_turn"
    # both records are in the database (not spooled), and no error was shown
    assert not ledger.spool.has_records()
    assert ledger.session_totals(alice.id)["total_tokens"] == a_result.usage.total_tokens > 0
    assert ledger.session_totals(bob.id)["total_tokens"] == b_result.usage.total_tokens > 0
    assert not any(e["type"] == "error" for e in a_events + b_events)

    # the control: a write on the loop itself waits for the lock, and so does everything else
    holder = await LockHolder.take(db)
    timer = threading.Timer(0.5, holder.release)
    try:
        with LoopLag() as control:
            await asyncio.sleep(0.05)
            timer.start()
            ledger.record(user="carol", session_id="c", agent="demo", turn=1, started_at=time.time(),
                          usage=TurnUsage(input_tokens=1, total_tokens=1))
            await asyncio.sleep(0.05)
    finally:
        timer.join()
        holder.kill()
    print(f"control, a ledger write on the loop: loop lag at worst {control.worst * 1000:.0f} ms")
    assert control.worst >= 0.4


# -- item 11: a failing database ------------------------------------------------------------------
async def test_a_locked_database_ends_the_turn_with_an_error_and_loses_nothing(acp_managers,
                                                                              sqlite_ledger):
    """The database becomes unwritable mid-turn: the turn still ends, with an error event before
    its end; the session is ready and the next turn works; the spool (private) holds the usage,
    which quota checks and totals count; once the database is back, the spool is replayed
    without a new turn, and the ledger holds every turn exactly once."""
    ledger, db = sqlite_ledger(write_timeout=0.2, spool_retry_interval=0.3)
    manager = acp_managers(ledger=ledger)
    session = await manager.create_user_session("alice", "demo")
    events: list[dict[str, Any]] = []
    session.subscribe(events.append)

    first = await session.prompt("one two three")
    # (the holder's process starts before the turn: a process start on a loaded machine can
    # outlast the agent's sleep, and the turn would end before the database is locked)
    holder = await LockHolder.take(db, lock=False)
    turn = await sleeping_turn(session, events, 1.0)
    await asyncio.to_thread(holder.lock)  # mid-turn
    try:
        second = await turn
        third = await session.prompt("four five")  # the next turn works (still locked)
        # each turn ended: its error (the ledger's) came before its turn_end
        for result in (second, third):
            types = [e["type"] for e in turn_events(events, result.turn)]
            assert types[-1] == "turn_end" and types[-2:] == ["error", "turn_end"], types
            error = turn_events(events, result.turn)[-2]["data"]
            assert error["ledger"] == "spooled" and "usage database" in error["message"]
            assert result.stop_reason == "end_turn" and result.usage.total_tokens > 0
        assert session.state is SessionState.READY
        assert [e["type"] for e in turn_events(events, first.turn)].count("error") == 0
        # the spool holds both records, privately; reads (WAL) still work and count them
        assert len(ledger.spool.read()) == 2
        assert_spool_is_private(ledger)
        expected = sum(r.usage.total_tokens for r in (first, second, third))
        assert ledger.session_totals(session.id)["total_tokens"] == expected
        assert ledger.session_totals(session.id)["turns"] == 3
        assert manager.get_session_stats("alice", session.id)["tokens"]["total_tokens"] == expected
        ledger.max_tokens_per_user_per_day = expected  # the spooled usage counts against the quota
        with pytest.raises(QuotaExceeded, match=f"{expected} of {expected}"):
            await session.prompt("over the quota")
        ledger.max_tokens_per_user_per_day = 0
    finally:
        await asyncio.to_thread(holder.release)
        holder.kill()

    # the database is back: the spool goes in by itself (no new turn needed)
    await wait_for(lambda: not ledger.spool.has_records(), timeout=10)
    fourth = await session.prompt("six")
    assert not any(e["type"] == "error" for e in turn_events(events, fourth.turn))
    results = (first, second, third, fourth)
    totals = ledger.session_totals(session.id)
    assert totals["total_tokens"] == sum(r.usage.total_tokens for r in results)
    assert totals["input_tokens"] == sum(r.usage.input_tokens for r in results)
    assert totals["turns"] == 4 and [t["turn"] for t in ledger.turns(session.id)] == [1, 2, 3, 4]
    assert manager.get_session_stats("alice", session.id)["tokens"]["total_tokens"] == totals["total_tokens"]


async def turn_waiting_for_its_record(acp_managers: Any, sqlite_ledger: Any) -> tuple[Any, ...]:
    """A demo turn whose usage record waits for a database another process holds locked:
    (ledger, manager, session, events, lock holder, turn task). The caller releases the lock."""
    ledger, db = sqlite_ledger(write_timeout=30)
    manager = acp_managers(ledger=ledger)
    session = await manager.create_user_session("alice", "demo")
    events: list[dict[str, Any]] = []
    session.subscribe(events.append)
    holder = await LockHolder.take(db)
    try:
        turn = asyncio.create_task(session.prompt("hello there"))
        await wait_for(lambda: any(e["type"] == "session_update" and e["data"]["sessionUpdate"]
                                   == "usage_update" for e in events))
        await asyncio.sleep(0.2)  # in _finish_turn, waiting for the lock
    except BaseException:
        holder.kill()
        raise
    return ledger, manager, session, events, holder, turn


async def test_a_turn_whose_client_goes_away_while_its_record_waits_still_ends(acp_managers,
                                                                               sqlite_ledger):
    """The caller of a turn is cancelled (a closed request) while the turn's record waits for the
    database: the record is still written, the turn still ends, the session is ready."""
    ledger, _, session, events, holder, turn = await turn_waiting_for_its_record(
        acp_managers, sqlite_ledger)
    try:
        turn.cancel()
        await asyncio.sleep(0.2)
        assert session.state is SessionState.BUSY  # (the record is not given up)
        await asyncio.to_thread(holder.release)
    finally:
        holder.kill()
    with contextlib.suppress(asyncio.CancelledError):
        await turn
    assert turn.cancelled()
    assert [e["type"] for e in events][-2:] == ["turn_end", "state"]
    assert session.state is SessionState.READY
    recorded = events[-2]["data"]["usage"]["total_tokens"]
    assert ledger.session_totals(session.id)["total_tokens"] == recorded > 0
    assert (await session.prompt("again")).stop_reason == "end_turn"


async def test_a_session_stopped_while_its_record_waits_stays_stopped(acp_managers, sqlite_ledger):
    """The user deletes the session while its last turn's record waits for the database: the
    record is still written and the turn ends, but the session stays stopped (not ready)."""
    ledger, manager, session, events, holder, turn = await turn_waiting_for_its_record(
        acp_managers, sqlite_ledger)
    try:
        await manager.delete_user_session("alice", session.id)
        assert session.state is SessionState.STOPPED and not turn.done()
        await asyncio.to_thread(holder.release)
    finally:
        holder.kill()
    with pytest.raises(SessionNotReady, match="stopped during the turn"):
        await turn
    assert session.state is SessionState.STOPPED and events[-1]["type"] == "turn_end"
    assert ledger.session_totals(session.id)["total_tokens"] == events[-1]["data"]["usage"]["total_tokens"]


# -- the LLM gateway's records --------------------------------------------------------------------
async def test_gateway_requests_while_the_database_is_locked(acp_managers, sqlite_ledger):
    """The gateway awaits the manager's callbacks (the ledger's threads): with the database
    locked, the agent's LLM request is answered all the same and its usage spooled; the next
    quota check counts it (and refuses once it is over); the session's next turn tells its
    user before it ends; once the database is back, nothing is lost or doubled."""
    ledger, db = sqlite_ledger(write_timeout=0.2)
    manager = acp_managers(ledger=ledger)
    session = await manager.create_user_session("alice", "demo")
    events: list[dict[str, Any]] = []
    session.subscribe(events.append)
    ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with FakeLLM() as fake:
        # the route as the manager opens it for a metered session (its own callbacks)
        route = manager.gateway.open_route(
            session_id=session.id, user="alice", api="openai", upstream=fake.url + "/v1",
            api_key="sk-real", on_usage=lambda usage: session.gateway_usage(usage),
            check_quota=lambda: ledger.acheck_quota("alice"))
        key = {"Authorization": f"Bearer {route.dummy_key}"}
        holder = await LockHolder.take(db)
        try:
            status, _, _ = await http(route.socket_path, "POST", "/v1/chat/completions", key, ask)
            assert status == 200 and len(ledger.spool.read()) == 1
            billed = fake.billed()["total"]
            ledger.max_tokens_per_user_per_day = billed
            status, _, body = await http(route.socket_path, "POST", "/v1/chat/completions", key, ask)
            assert status == 429 and f"{billed} of {billed}" in body.decode()
            ledger.max_tokens_per_user_per_day = 0
            result = await session.prompt("hello")  # (its own record is spooled too)
            error = turn_events(events, result.turn)[-2]
            assert error["type"] == "error" and error["data"]["ledger"] == "spooled"
            assert error["data"]["records"] == 2
        finally:
            await asyncio.to_thread(holder.release)
            holder.kill()
    last = await session.prompt("the database is back")  # its write replays the spool
    assert not ledger.spool.has_records()
    totals = ledger.session_totals(session.id)
    assert totals["total_tokens"] == billed + result.usage.total_tokens + last.usage.total_tokens
    assert len(ledger.turns(session.id)) == 3


# -- the same over the REST API of a real server --------------------------------------------------
@pytest.fixture
def jp_server_config(tmp_path: Path) -> Config:
    return Config({
        "ServerApp": {"jpserver_extensions": {"jupyter_acp": True, "jupyter_server_terminals": False},
                      "identity_provider_class": TokenPerUser, "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": "local", "allow_unsandboxed": True,
                               "workspace_template": "{root_dir}/{username}",
                               "agent_home_dir": str(tmp_path / "homes"), "monitor_interval": 0},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'ledger' / 'usage.sqlite'}",
                        "spool_path": str(tmp_path / "spool" / "usage.spool"),
                        "write_timeout": 0.2, "spool_retry_interval": 3600},
    })


async def test_over_rest_a_locked_database_is_neither_a_500_nor_a_409(jp_fetch, jp_serverapp, tmp_path):
    """The issue's report, as a client sees it: the turn's request answers 200 (its reply and
    usage), its history has the error before the ``chat:response``, the next turn is not a 409,
    and the usage endpoint counts the spooled turns; once the database is back, the next write
    replays them."""
    async def api(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"method": method, "headers": auth("alice"), "raise_error": False}
        if method == "POST":
            kwargs["body"] = json.dumps(body or {})
        resp = await jp_fetch("api", "acp", *path.split("/"), **kwargs)
        return resp.code, json.loads(resp.body) if resp.body else None

    status, session = await api("POST", "sessions", {"new": True})
    assert status == 201, session
    sid = session["id"]
    ledger = jp_serverapp.web_app.settings["acp_manager"].ledger
    ledger.engine  # noqa: B018
    holder = await LockHolder.take(tmp_path / "ledger" / "usage.sqlite")
    try:
        replies = []
        for text in ("hello there", "and again"):
            status, reply = await api("POST", f"sessions/{sid}/messages", {"message": text})
            assert status == 200, reply
            replies.append(reply)
        status, history = await api("GET", f"sessions/{sid}/history")
        types = [e["type"] for e in history["events"]]
        ends = [i for i, t in enumerate(types) if t == "chat:response"]
        assert len(ends) == 2 and all(types[i - 1] == "error" for i in ends)
        assert (await api("GET", f"sessions/{sid}"))[1]["state"] == "ready"
        status, usage = await api("GET", "usage")
        assert status == 200 and usage["total"]["turns"] == 2
        assert usage["quota"]["used_today"] == usage["total"]["total_tokens"] == sum(
            r["usage"]["total_tokens"] for r in replies)
    finally:
        await asyncio.to_thread(holder.release)
        holder.kill()
    status, reply = await api("POST", f"sessions/{sid}/messages", {"message": "the database is back"})
    assert status == 200 and not ledger.spool.has_records()
    replies.append(reply)
    status, usage = await api("GET", "usage")
    assert usage["total"]["turns"] == 3 and usage["per_session"][0]["turns"] == 3
    assert usage["total"]["total_tokens"] == sum(r["usage"]["total_tokens"] for r in replies)


# -- a real PostgreSQL server that goes down and comes back ---------------------------------------
# (the cluster fixture ``postgres`` is shared with other tests: tests/pg.py)


async def test_postgresql_down_mid_turn_and_back(acp_managers, tmp_path, postgres):
    """PostgreSQL stops while a turn runs: the turn ends with the error before its end, the
    session is ready, the next turn works (its quota check counts the last value read plus the
    spool), reads say 503 instead of hanging or 500; PostgreSQL starts again, the spool is
    replayed, and the ledger holds every turn once."""
    ledger = UsageLedger(db_url=postgres.url, spool_path=str(tmp_path / "spool" / "usage.spool"),
                         write_timeout=2, spool_retry_interval=0.3, max_tokens_per_user_per_day=10**6)
    manager = acp_managers(ledger=ledger)
    try:
        session = await manager.create_user_session("alice", "demo")
        events: list[dict[str, Any]] = []
        session.subscribe(events.append)
        first = await session.prompt("one two three")
        turn = await sleeping_turn(session, events, 0.3)
        await asyncio.to_thread(postgres.stop)  # mid-turn
        second = await turn
        third = await session.prompt("four five")
        for result in (second, third):
            types = [e["type"] for e in turn_events(events, result.turn)]
            assert types[-2:] == ["error", "turn_end"], types
        assert session.state is SessionState.READY and len(ledger.spool.read()) == 2
        assert_spool_is_private(ledger)
        with pytest.raises(LedgerUnavailable):
            await ledger.asession_totals(session.id)
        expected = sum(r.usage.total_tokens for r in (first, second, third))
        assert await ledger.atokens_today("alice") == expected  # the last value read + the spool
        ledger.max_tokens_per_user_per_day = expected
        with pytest.raises(QuotaExceeded, match=f"{expected} of {expected}"):
            await session.prompt("over the quota, with the database down")
        ledger.max_tokens_per_user_per_day = 10**6

        await asyncio.to_thread(postgres.start)
        await wait_for(lambda: not ledger.spool.has_records(), timeout=15)
        fourth = await session.prompt("six")
        results = (first, second, third, fourth)
        totals = await ledger.asession_totals(session.id)
        assert totals["total_tokens"] == sum(r.usage.total_tokens for r in results)
        assert totals["turns"] == 4 and len(await ledger.aturns(session.id)) == 4
        (day,) = await ledger.aper_day("alice")  # (what GET usage sends: plain JSON numbers)
        assert json.loads(json.dumps(day))["total_tokens"] == totals["total_tokens"]
        assert json.dumps(await ledger.aper_session("alice"))
    finally:
        ledger.close()
