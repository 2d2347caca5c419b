"""Usage normalisation of each agent's report shape; the ledger's queries, quota, async API and spool."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from acp import schema
from sqlalchemy import event

from jupyter_acp.errors import QuotaExceeded
from jupyter_acp.usage import (
    LedgerUnavailable,
    QuotaUnavailable,
    RecordOutcome,
    TurnUsage,
    UsageLedger,
    UsageNormalizer,
    utc_day,
)


def chunk(meta: dict | None = None) -> schema.AgentMessageChunk:
    return schema.AgentMessageChunk(session_update="agent_message_chunk",
                                    content=schema.TextContentBlock(type="text", text=""),
                                    field_meta=meta)


def response(meta: dict | None = None, **usage: int) -> schema.PromptResponse:
    return schema.PromptResponse(stop_reason="end_turn", usage=schema.Usage(**usage) if usage else None,
                                 field_meta=meta)


def test_qwen_per_request_meta_is_summed_and_wins():
    n = UsageNormalizer()
    n.begin_turn()
    n.on_update(chunk({"usage": {"inputTokens": 100, "outputTokens": 20, "totalTokens": 120,
                                 "cachedReadTokens": 50, "model": "qwen3-coder"}}))
    n.on_update(chunk({"usage": {"inputTokens": 130, "outputTokens": 5, "totalTokens": 135}}))
    turn = n.end_turn(response(input_tokens=999, output_tokens=999, total_tokens=1998))
    assert (turn.input_tokens, turn.output_tokens, turn.total_tokens) == (230, 25, 255)
    assert turn.cached_read_tokens == 50 and turn.model == "qwen3-coder" and turn.source == "request_meta"


def test_cumulative_prompt_response_is_not_double_counted():
    n = UsageNormalizer()
    n.begin_turn()
    first = n.end_turn(response(input_tokens=10, output_tokens=5, total_tokens=15))
    n.begin_turn()
    second = n.end_turn(response(input_tokens=14, output_tokens=9, total_tokens=23))
    assert (first.input_tokens, first.output_tokens, first.total_tokens) == (10, 5, 15)
    assert (second.input_tokens, second.output_tokens, second.total_tokens) == (4, 4, 8)
    n.begin_turn()  # an agent that restarted its count reports less than before
    third = n.end_turn(response(input_tokens=3, output_tokens=2, total_tokens=5))
    assert third.total_tokens == 5


def test_switching_source_keeps_the_baseline():
    n = UsageNormalizer()
    n.begin_turn()
    n.end_turn(response(input_tokens=10, output_tokens=5, total_tokens=15))
    n.begin_turn()
    n.on_update(chunk({"usage": {"inputTokens": 7, "outputTokens": 3, "totalTokens": 10}}))
    mid = n.end_turn(response(input_tokens=17, output_tokens=8, total_tokens=25))
    n.begin_turn()
    last = n.end_turn(response(input_tokens=20, output_tokens=9, total_tokens=29))
    assert mid.total_tokens == 10 and last.total_tokens == 4


def test_gemini_quota_block():
    n = UsageNormalizer()
    n.begin_turn()
    turn = n.end_turn(response({"quota": {"token_count": {"input_tokens": 11, "output_tokens": 4},
                                          "model_usage": [{"model": "gemini-2.5-flash"}]}}))
    assert (turn.input_tokens, turn.output_tokens, turn.total_tokens) == (11, 4, 15)
    assert turn.model == "gemini-2.5-flash" and turn.source == "gemini_quota"


def test_usage_update_cost_and_context():
    n = UsageNormalizer()
    n.begin_turn()
    n.on_update(schema.UsageUpdate(session_update="usage_update", used=100, size=1000,
                                   cost=schema.Cost(amount=0.5, currency="USD")))
    first = n.end_turn(None)
    n.begin_turn()
    n.on_update(schema.UsageUpdate(session_update="usage_update", used=150, size=1000,
                                   cost=schema.Cost(amount=0.75, currency="USD")))
    second = n.end_turn(None)
    assert (first.cost, second.cost, second.currency) == (0.5, 0.25, "USD")
    assert (n.context_used, n.context_size) == (150, 1000)
    assert second.source == "none" and second.total_tokens == 0


def test_ledger_queries_and_quota(tmp_path):
    ledger = UsageLedger(db_url=f"sqlite:///{tmp_path / 'u.sqlite'}", max_tokens_per_user_per_day=100)
    now = time.time()
    for i, (user, session, tokens) in enumerate([("alice", "s1", 30), ("alice", "s1", 40),
                                                  ("alice", "s2", 10), ("bob", "s3", 500)]):
        ledger.record(user=user, session_id=session, agent="demo", turn=i + 1, started_at=now,
                      usage=TurnUsage(input_tokens=tokens, total_tokens=tokens, cost=tokens / 1000))
    ledger.record(user="alice", session_id="s1", agent="demo", turn=9, started_at=now - 86400 * 3,
                  ended_at=now - 86400 * 3, usage=TurnUsage(input_tokens=1000, total_tokens=1000))
    assert ledger.session_totals("s1")["total_tokens"] == 1070
    assert ledger.user_totals("alice")["turns"] == 4
    assert ledger.tokens_today("alice") == 80
    days = {(r["user"], r["day"]): r["total_tokens"] for r in ledger.per_day()}
    assert days[("alice", utc_day(now))] == 80 and days[("bob", utc_day(now))] == 500
    assert days[("alice", utc_day(now - 86400 * 3))] == 1000
    sessions = {r["session_id"]: r["total_tokens"] for r in ledger.per_session("alice")}
    assert sessions == {"s1": 1070, "s2": 10}
    assert [t["turn"] for t in ledger.turns("s1")] == [1, 2, 9]
    ledger.check_quota("alice")  # 80 of 100
    with pytest.raises(QuotaExceeded, match="500 of 100"):
        ledger.check_quota("bob")
    ledger.max_tokens_per_user_per_day = 0
    ledger.check_quota("bob")  # 0 = unlimited
    ledger.close()


def test_the_ledger_file_is_private(tmp_path):
    """Nobody but the server's account may read the usage of every user."""
    db = tmp_path / "data" / "usage.sqlite"
    ledger = UsageLedger(db_url=f"sqlite:///{db}")
    try:
        ledger.record(user="alice", session_id="s", agent="demo", turn=1,
                      usage=TurnUsage(input_tokens=1, total_tokens=1), started_at=0.0)
        for path in (db, *db.parent.glob("usage.sqlite-*")):
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert db.parent.stat().st_mode & 0o077 == 0
    finally:
        ledger.close()
    db.chmod(0o644)  # one made by an earlier version is made private when opened
    UsageLedger(db_url=f"sqlite:///{db}").engine.dispose()
    assert db.stat().st_mode & 0o777 == 0o600


# -- the ledger off the event loop, and its spool (issue 14, items 10 and 11) ---------------------
def locked(db: Path) -> sqlite3.Connection:
    """Another connection holding the database's write lock (as root too, unlike a chmod)."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


def usage(tokens: int) -> TurnUsage:
    return TurnUsage(input_tokens=tokens, total_tokens=tokens)


def record(ledger: UsageLedger, tokens: int, turn: int = 1, user: str = "alice") -> RecordOutcome:
    return ledger.record(user=user, session_id="s1", agent="demo", turn=turn, usage=usage(tokens),
                         started_at=time.time())


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[UsageLedger]:
    ledger = UsageLedger(db_url=f"sqlite:///{tmp_path / 'db' / 'u.sqlite'}", write_timeout=0.1,
                         spool_path=str(tmp_path / "spool" / "usage.spool"), spool_retry_interval=3600)
    ledger.engine  # noqa: B018
    yield ledger
    ledger.close()


async def test_the_async_api_uses_the_database_only_in_the_ledgers_threads(ledger):
    threads: set[str] = set()
    event.listen(ledger.engine, "before_cursor_execute",
                 lambda *args: threads.add(threading.current_thread().name))
    ledger.max_tokens_per_user_per_day = 100

    class Owner:
        """(a session, for the ledger)"""

    owner = Owner()
    outcome = await ledger.arecord(user="alice", session_id="s1", agent="demo", turn=1, usage=usage(30),
                                   started_at=time.time(), owner=owner)
    assert outcome.id is not None and not outcome.spooled and outcome.stored
    await ledger.acheck_quota("alice")
    assert await ledger.atokens_today("alice") == 30
    assert (await ledger.asession_totals("s1"))["total_tokens"] == 30
    assert (await ledger.auser_totals("alice"))["turns"] == 1
    assert [r["session_id"] for r in await ledger.aper_session("alice")] == ["s1"]
    assert (await ledger.aper_day())[0]["total_tokens"] == 30
    assert len(await ledger.aturns("s1")) == 1
    assert threads and all(name.startswith("acp-ledger") for name in threads), threads
    # the session's stats come from memory, and no failure is pending
    assert ledger.live_totals(owner)["total_tokens"] == 30 and ledger.take_problem(owner) is None


def test_a_record_the_database_cannot_take_waits_in_a_private_spool(ledger):
    assert record(ledger, 10).id is not None
    holder = locked(Path(ledger.engine.url.database))
    try:
        outcome = record(ledger, 20, turn=2)
        assert outcome.spooled and outcome.id is None and "database is locked" in outcome.error
        spool = ledger.spool.path
        assert spool.stat().st_mode & 0o777 == 0o600 and spool.parent.stat().st_mode & 0o777 == 0o700
        [row] = ledger.spool.read()
        assert row["record_uid"] == outcome.uid and row["total_tokens"] == 20
        # reads (WAL) still work, and count the spool
        assert ledger.session_totals("s1")["total_tokens"] == 30
        assert ledger.session_totals("s1")["turns"] == 2 and ledger.tokens_today("alice") == 30
    finally:
        holder.rollback()
        holder.close()
    assert record(ledger, 5, turn=3).id is not None  # the database is back: the spool goes in
    assert not ledger.spool.has_records()
    assert ledger.session_totals("s1")["total_tokens"] == 35
    assert [t["turn"] for t in ledger.turns("s1")] == [1, 2, 3]


def test_a_replay_that_crashed_before_emptying_the_spool_counts_nothing_twice(ledger):
    holder = locked(Path(ledger.engine.url.database))
    try:
        for turn in (1, 2, 3):
            assert record(ledger, 10 * turn, turn=turn).spooled
    finally:
        holder.rollback()
        holder.close()
    spooled = ledger.spool.path.read_bytes()
    assert record(ledger, 1, turn=4).id is not None and not ledger.spool.has_records()
    # as if the replay had committed, then died before it emptied the spool
    ledger.spool.path.write_bytes(spooled)
    assert ledger.session_totals("s1")["total_tokens"] == 61  # (read: not counted twice)
    assert ledger.tokens_today("alice") == 61
    assert record(ledger, 2, turn=5).id is not None and not ledger.spool.has_records()
    assert ledger.session_totals("s1")["total_tokens"] == 63
    assert len(ledger.turns("s1")) == 5


def test_a_spooled_record_the_database_refuses_does_not_hold_back_the_others(ledger):
    good = {"record_uid": "a" * 32, "user": "alice", "session_id": "s1", "agent": "demo", "model": None,
            "turn": 1, "input_tokens": 7, "output_tokens": 0, "thought_tokens": 0,
            "cached_read_tokens": 0, "cached_write_tokens": 0, "total_tokens": 7, "cost": 0.0,
            "currency": None, "source": "none", "started_at": 0.0, "ended_at": 0.0, "day": utc_day()}
    ledger.spool.append({**good, "record_uid": "b" * 32, "user": None})  # NOT NULL: refused for good
    ledger.spool.append(good)
    with ledger.spool.path.open("ab") as f:
        f.write(b'{"torn": ')  # a crash mid-append: the next append starts a new line
    ledger.spool.append({**good, "record_uid": "c" * 32, "turn": 2})
    assert record(ledger, 1, turn=3).id is not None
    assert not ledger.spool.has_records()
    assert ledger.session_totals("s1")["total_tokens"] == 15
    rejected = ledger.spool.rejected_path
    assert json.loads(rejected.read_text())["record_uid"] == "b" * 32
    assert rejected.stat().st_mode & 0o777 == 0o600


def test_the_quota_counts_the_spool_and_outlives_an_unreadable_database(ledger):
    """While the database cannot be read, the quota check goes on from the last value read today
    plus the spool; a user never read today is refused (503), never let through unmetered."""
    ledger.max_tokens_per_user_per_day = 100
    record(ledger, 60)
    ledger.check_quota("alice")  # 60 of 100, read from the database
    db = Path(ledger.engine.url.database)
    ledger.engine.dispose()
    db.rename(db.with_name("moved"))
    db.write_bytes(b"this is not a database" * 100)  # unreadable and unwritable, for root too
    try:
        with pytest.raises(LedgerUnavailable):
            ledger.session_totals("s1")
        assert record(ledger, 30, turn=2).spooled
        ledger.check_quota("alice")  # 90 of 100
        assert record(ledger, 15, turn=3).spooled
        with pytest.raises(QuotaExceeded, match="105 of 100"):
            ledger.check_quota("alice")
        with pytest.raises(QuotaUnavailable) as refused:
            ledger.check_quota("bob")
        assert refused.value.status == 503
    finally:
        ledger.engine.dispose()
        db.with_name("moved").replace(db)
    assert record(ledger, 1, turn=4).id is not None
    assert ledger.tokens_today("alice") == 106 and not ledger.spool.has_records()


def test_an_older_ledger_gets_the_record_uid_column(tmp_path):
    db = tmp_path / "old.sqlite"
    old = sqlite3.connect(db)
    old.execute("CREATE TABLE acp_usage (id INTEGER PRIMARY KEY, user VARCHAR(255) NOT NULL, "
                "session_id VARCHAR(64) NOT NULL, agent VARCHAR(255) NOT NULL, model VARCHAR(255), "
                "turn INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, "
                "thought_tokens INTEGER NOT NULL, cached_read_tokens INTEGER NOT NULL, "
                "cached_write_tokens INTEGER NOT NULL, total_tokens INTEGER NOT NULL, cost FLOAT NOT NULL, "
                "currency VARCHAR(8), source VARCHAR(32) NOT NULL, started_at FLOAT NOT NULL, "
                "ended_at FLOAT NOT NULL, day VARCHAR(10) NOT NULL)")
    old.execute("INSERT INTO acp_usage VALUES (1, 'alice', 's1', 'demo', NULL, 1, 4, 0, 0, 0, 0, 4, 0, "
                f"NULL, 'none', 0, 0, '{utc_day()}')")
    old.commit()
    old.close()
    ledger = UsageLedger(db_url=f"sqlite:///{db}")
    try:
        assert record(ledger, 6, turn=2).id == 2
        assert ledger.session_totals("s1")["total_tokens"] == 10
        indexes = {r[1]: r[2] for r in sqlite3.connect(db).execute("PRAGMA index_list(acp_usage)")}
        assert indexes["ix_acp_usage_record_uid"] == 1  # unique
    finally:
        ledger.close()


async def test_a_record_is_not_given_up_when_its_caller_is_cancelled(tmp_path):
    """A turn's record, once begun, is written even if the turn's task is cancelled meanwhile
    (a client went away); the cancellation then reaches the task."""
    ledger = UsageLedger(db_url=f"sqlite:///{tmp_path / 'u.sqlite'}", write_timeout=30)
    holder = locked(Path(ledger.engine.url.database))
    task = asyncio.create_task(ledger.arecord(user="alice", session_id="s1", agent="demo", turn=1,
                                              usage=usage(9), started_at=time.time()))
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.sleep(0.2)
    assert not task.done()
    holder.rollback()
    holder.close()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ledger.session_totals("s1")["total_tokens"] == 9 and not ledger.spool.has_records()
    ledger.close()
