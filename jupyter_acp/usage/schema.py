"""The ledger's tables and their prepared statements (SQLAlchemy Core: SQLite or any server).

The tables are created and changed by the Alembic migrations in ``migrations/`` (``migrate.py``),
not from here: these definitions are what the code reads and writes, and a test checks that the
migrated database matches them exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    cast,
    func,
    insert,
    select,
)

from .normalize import TOKEN_FIELDS
from .spool import private_dir


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None: another database, or SQLite in memory)."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url[len("sqlite:///"):])
    return None


def private_file(path: Path) -> None:
    """Create the SQLite file (and its directory) readable by the server's account only, before
    SQLite does with the umask's mode (0644): in a home directory others may enter, they would
    read every user's usage. SQLite gives its ``-wal`` and ``-shm`` files the same mode."""
    private_dir(path.parent)
    fd = os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)  # a ledger created by an earlier version
    finally:
        os.close(fd)


#: The token columns (``TurnUsage``'s counts).
COUNTS = (*TOKEN_FIELDS, "total_tokens")
metadata = MetaData()
usage_table = Table(
    "acp_usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("record_uid", String(32)),  # unique (below): a replayed spool record is never doubled
    Column("user", String(255), nullable=False),
    Column("session_id", String(64), nullable=False),
    Column("agent", String(255), nullable=False),
    Column("model", String(255)),
    Column("turn", Integer, nullable=False),
    # BIGINT: a report may claim up to MAX_REPORTED_TOKENS, past PostgreSQL's 32-bit INTEGER
    *(Column(name, BigInteger, nullable=False, default=0) for name in COUNTS),
    Column("cost", Float, nullable=False, default=0.0),
    Column("currency", String(8)),
    Column("source", String(32), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=False),
    Column("day", String(10), nullable=False),
    Index("ix_acp_usage_user_day", "user", "day"),
    Index("ix_acp_usage_session", "session_id"),
)
UID_INDEX = Index("ix_acp_usage_record_uid", usage_table.c.record_uid, unique=True)
#: Admission leases (``admission.py``): one row per LLM request admitted and not yet settled,
#: holding ``reserved`` tokens of its user's quota until it is settled or ``expires`` (unix time).
leases_table = Table(
    "acp_leases",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user", String(255), nullable=False),
    Column("reserved", BigInteger, nullable=False),
    Column("created", Float, nullable=False),
    Column("expires", Float, nullable=False),
    Index("ix_acp_leases_user", "user", "expires"),
)
#: Persisted agent sessions (``session_store.py``): what a session is, so that it outlives the
#: server and an idle cull and can be resumed; one row per session of every user.
sessions_table = Table(
    "acp_sessions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("user", String(255), nullable=False),
    Column("agent", String(255), nullable=False),
    Column("acp_session_id", Text),  # the agent's own id (session/load, session/resume)
    Column("title", Text, nullable=False),
    Column("cwd", Text, nullable=False),  # the session's workspace on the host
    Column("state", String(16), nullable=False),  # "live" or "suspended"
    Column("mode", String(255)),
    Column("meta", Text, nullable=False),  # JSON: config options, commands, capabilities
    Column("turns", Integer, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("created", Float, nullable=False),
    Column("last_activity", Float, nullable=False),
    Index("ix_acp_sessions_user", "user", "last_activity"),
)
#: Each stored session's events, as the API sends them (``history.wire_json``), bounded in
#: bytes per session (``SessionStore.max_history_bytes``: the oldest go first).
session_events_table = Table(
    "acp_session_events",
    metadata,
    Column("session_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("payload", Text, nullable=False),
)
#: Alembic's version table, named for us: the ledger may live in a database that has other
#: Alembic-managed tables (JupyterHub's own ``alembic_version``, say).
VERSION_TABLE = "acp_alembic_version"
#: The columns of a record as the ledger writes it (and as the spool keeps it).
ROW_KEYS = tuple(c.name for c in usage_table.columns if c.name != "id")


def _total(column: Column) -> Any:
    """SUM as a BIGINT (PostgreSQL sums a BIGINT as NUMERIC, which reads as Decimal, not JSON)."""
    return cast(func.coalesce(func.sum(column), 0), BigInteger)


SUMS = [*(_total(usage_table.c[name]).label(name) for name in COUNTS),
        func.coalesce(func.sum(usage_table.c.cost), 0.0).label("cost")]
#: Turns, not records: the LLM gateway writes one record per LLM request of a turn.
TURNS = func.count(func.distinct(usage_table.c.session_id + ":" + cast(usage_table.c.turn, String)))

# Built once: SQLAlchemy caches the compiled form of a statement object, so a turn's insert and
# the quota check before every prompt cost ~0.1 ms each instead of ~0.6 and ~1.2 ms of
# building and compiling them anew (measured, SQLite).
INSERT = insert(usage_table)
TOKENS_TODAY = select(_total(usage_table.c.total_tokens)).where(
    usage_table.c.user == bindparam("user"), usage_table.c.day == bindparam("day"))
UIDS_PRESENT = select(usage_table.c.record_uid).where(
    usage_table.c.record_uid.in_(bindparam("uids", expanding=True)))
#: The execution option that makes a SQLite transaction take the write lock at BEGIN.
WRITE_OPTION = "acp_ledger_write"
