"""The ledger's schema under Alembic (issue 16): made from nothing, adopted from a database the
previous versions made (without a version table), re-run, and raced by servers starting at
once — on SQLite and on a real PostgreSQL server.

The reference is ``schema.py``: after the migrations, Alembic's own comparison of the database
with those table definitions finds no difference (columns, types, nullability, indexes, the
unique ``record_uid`` index), so the code and the migrations cannot drift apart unnoticed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pg import db_url_fixture, ledgers_fixture, pg_cluster_fixture, pg_database_fixture  # noqa: F401
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    inspect,
    text,
)
from sqlalchemy.engine import Engine

from jupyter_acp.usage import TurnUsage, UsageLedger, metadata
from jupyter_acp.usage.migrate import FIRST, HEAD, SCRIPTS, alembic_config, current, head, upgrade
from jupyter_acp.usage.schema import VERSION_TABLE

pytestmark = pytest.mark.timeout(120)

TOKENS = ("input_tokens", "output_tokens", "thought_tokens", "cached_read_tokens",
          "cached_write_tokens", "total_tokens")


def old_usage_table(meta: MetaData, *, record_uid: bool, counts: type) -> Table:
    """``acp_usage`` as a previous version's ``metadata.create_all`` made it: with the spool's
    ``record_uid`` and BIGINT counts (issue 14), or before (INTEGER counts, no uid)."""
    table = Table(
        "acp_usage", meta,
        Column("id", Integer, primary_key=True, autoincrement=True),
        *([Column("record_uid", String(32))] if record_uid else []),
        Column("user", String(255), nullable=False),
        Column("session_id", String(64), nullable=False),
        Column("agent", String(255), nullable=False),
        Column("model", String(255)),
        Column("turn", Integer, nullable=False),
        *(Column(name, counts, nullable=False, default=0) for name in TOKENS),
        Column("cost", Float, nullable=False, default=0.0),
        Column("currency", String(8)),
        Column("source", String(32), nullable=False),
        Column("started_at", Float, nullable=False),
        Column("ended_at", Float, nullable=False),
        Column("day", String(10), nullable=False),
        Index("ix_acp_usage_user_day", "user", "day"),
        Index("ix_acp_usage_session", "session_id"),
    )
    if record_uid:  # (the old _migrate's UID_INDEX.create)
        Index("ix_acp_usage_record_uid", table.c.record_uid, unique=True)
    return table


def old_row(n: int, **extra: Any) -> dict[str, Any]:
    now = time.time()
    return {"user": "alice", "session_id": f"old-{n}", "agent": "demo", "model": None, "turn": 1,
            **dict.fromkeys(TOKENS, 0), "total_tokens": 10 * n, "input_tokens": 10 * n, "cost": 0.0,
            "currency": None, "source": "prompt_response", "started_at": now, "ended_at": now,
            "day": time.strftime("%Y-%m-%d", time.gmtime(now)), **extra}


def plain_engine(url: str) -> Engine:
    """An engine of our own, to look at (or prepare) the database beside the ledger's."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url)


def differences(engine: Engine) -> list[Any]:
    """What Alembic finds different between the database and ``schema.py``'s tables."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE,
                                                         "compare_type": True})
        return compare_metadata(context, metadata)


def versions(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]


def test_the_migrations_ship_with_the_package():
    """No alembic.ini at runtime: the scripts are found beside the module (hatch's wheel takes
    every file under jupyter_acp/, these included)."""
    names = {p.name for p in (SCRIPTS / "versions").glob("*.py")}
    assert (SCRIPTS / "env.py").is_file()
    assert {"0001_acp_usage.py", "0002_acp_leases.py", "0003_acp_sessions.py"} <= names
    assert head() == (HEAD,) == ("0003",)  # (HEAD: the fast path's, without Alembic)


def test_a_new_database_is_made_by_the_migrations(db_url, ledgers):
    ledger = ledgers(db_url)
    engine = plain_engine(db_url)
    try:
        assert versions(engine) == ["0003"]
        assert differences(engine) == []
        inspector = inspect(engine)
        assert {"acp_usage", "acp_leases", VERSION_TABLE} <= set(inspector.get_table_names())
        uid = next(ix for ix in inspector.get_indexes("acp_usage") if ix["name"] == "ix_acp_usage_record_uid")
        assert uid["unique"] and uid["column_names"] == ["record_uid"]
        # the ledger works on it, and BIGINT holds what a 32-bit INTEGER would not
        ledger.record(user="alice", session_id="s", agent="demo", turn=1, started_at=time.time(),
                      usage=TurnUsage(input_tokens=3 * 10**9, total_tokens=3 * 10**9))
        assert ledger.tokens_today("alice") == 3 * 10**9
        # the migrations run again (a restart, another server): nothing changes
        upgrade(ledger.engine)
        ledgers(db_url)
        assert versions(engine) == ["0003"] and differences(engine) == []
        assert ledger.tokens_today("alice") == 3 * 10**9
        # and the downgrades are real: down to nothing, up again
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(engine).get_table_names()) == {VERSION_TABLE}
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "head")
        assert versions(engine) == ["0003"] and differences(engine) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("legacy", ["issue14", "before_spool"])
def test_a_database_made_before_alembic_is_adopted(db_url, ledgers, legacy):
    """A ledger of the previous version (``acp_usage`` with the spool's ``record_uid`` and its
    unique index, no version table), or of the one before (no ``record_uid``, INTEGER counts):
    its records are kept, it is stamped at 0001 and upgraded, and ends exactly as a new one."""
    engine = plain_engine(db_url)
    try:
        old = old_usage_table(MetaData(), record_uid=legacy == "issue14",
                              counts=BigInteger if legacy == "issue14" else Integer)
        old.metadata.create_all(engine)
        uid: dict[str, Any] = {"record_uid": "u1"} if legacy == "issue14" else {}
        with engine.begin() as conn:
            conn.execute(old.insert(), [old_row(1, **uid), old_row(2, **dict.fromkeys(uid))])
        assert VERSION_TABLE not in inspect(engine).get_table_names()

        ledger = ledgers(db_url)
        assert versions(engine) == ["0003"]
        # the old ad-hoc steps were done, and BIGINT on PostgreSQL; SQLite stores INTEGER and
        # BIGINT alike (64-bit), so its old declared type is left (no table rebuild for a name)
        left = [d for diff in differences(engine) for d in (diff if isinstance(diff, list) else [diff])]
        if engine.dialect.name == "sqlite" and legacy == "before_spool":
            assert sorted(d[3] for d in left) == sorted(TOKENS)
            assert all(d[0] == "modify_type" and isinstance(d[-1], BigInteger) for d in left)
        else:
            assert left == []
        assert ledger.tokens_today("alice") == 30  # the old records are still there
        ledger.record(user="alice", session_id="new", agent="demo", turn=1, started_at=time.time(),
                      usage=TurnUsage(input_tokens=3 * 10**9, total_tokens=3 * 10**9))
        assert ledger.tokens_today("alice") == 30 + 3 * 10**9
        with engine.connect() as conn:
            uids = [r[0] for r in conn.execute(text("SELECT record_uid FROM acp_usage ORDER BY id"))]
        assert uids[:2] == (["u1", None] if legacy == "issue14" else [None, None]) and uids[2]
        # idempotent: the next start finds it at head
        ledgers(db_url)
        assert versions(engine) == ["0003"] and len(differences(engine)) == len(left)
    finally:
        engine.dispose()


def test_a_database_stamped_at_the_first_revision_is_upgraded(db_url, ledgers):
    """A database at 0001 (an earlier release with Alembic) gets the leases table."""
    engine = plain_engine(db_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), FIRST)
        assert versions(engine) == [FIRST] and "acp_leases" not in inspect(engine).get_table_names()
        ledger = ledgers(db_url)
        assert versions(engine) == ["0003"] and differences(engine) == []
        lease = ledger.admit("alice", 100, reserve=10, timeout=0)
        ledger.settle(lease, TurnUsage(total_tokens=7), user="alice", session_id="s", agent="demo")
        assert ledger.tokens_today("alice") == 7
    finally:
        engine.dispose()


def test_servers_starting_at_once_migrate_once(db_url, tmp_path):
    """Six ledgers (six servers) connect to a new database at the same moment: the upgrade's
    lock lets one make the tables; the others find them, and every ledger works."""
    made = [UsageLedger(db_url=db_url, spool_path=str(tmp_path / f"spool-{i}"), write_timeout=30)
            for i in range(6)]
    if db_url.startswith("sqlite:///"):
        Path(db_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    errors: list[BaseException] = []
    start = threading.Barrier(len(made))

    def connect(ledger: UsageLedger) -> None:
        try:
            start.wait()
            ledger.record(user="alice", session_id="s", agent="demo", turn=1, started_at=time.time(),
                          usage=TurnUsage(total_tokens=1))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=connect, args=(ledger,)) for ledger in made]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert not any(ledger.spool.has_records() for ledger in made)  # all went to the database
        engine = plain_engine(db_url)
        try:
            assert versions(engine) == ["0003"] and differences(engine) == []
            with engine.connect() as conn:
                assert current(conn) == ("0003",)
        finally:
            engine.dispose()
        assert made[0].tokens_today("alice") == len(made)
    finally:
        for ledger in made:
            ledger.close()
