"""The ledger's schema, kept up to date by Alembic when ``UsageLedger`` connects (issue 16).

Several servers (a hub service's replicas, users' single-user servers) may share one ledger
database and start at the same moment, so the upgrade runs in ONE transaction under a lock:
PostgreSQL's advisory lock, SQLite's write lock (``BEGIN IMMEDIATE``). The one that waited
finds the database at head and does nothing. A database already at head costs one read at
connect, no lock (a server still starts while another holds SQLite's write lock) and no import
of Alembic (half a second: it is imported only when there is something to migrate).

A ledger made before Alembic (``acp_usage`` present, no version table) is adopted: brought to
the shape of revision 0001 by the steps the old ad-hoc ``_migrate`` did (the spool's
``record_uid`` column and its unique index) plus the token columns' BIGINT (earlier servers
made them INTEGER, too small on PostgreSQL), stamped at 0001, then upgraded like any other.

No ``alembic.ini``: the configuration is built here, ``script_location`` is the package's
``migrations`` directory (shipped in the wheel with the package's files).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, Column, String, inspect, text
from sqlalchemy.engine import Connection, Engine

from .schema import COUNTS, VERSION_TABLE, WRITE_OPTION, usage_table

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("jupyter_acp.usage")

SCRIPTS = Path(__file__).with_name("migrations")
#: The revision a pre-Alembic ledger is stamped at.
FIRST = "0001"
#: The newest revision (``head()``, known without Alembic: a test checks they agree).
HEAD = "0003"
#: PostgreSQL's advisory lock key for the upgrade (a user's admission lock is keyed by their name).
LOCK_KEY = "jupyter_acp.usage migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code; ``env.py`` runs on ``connection``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(SCRIPTS))
    config.attributes["connection"] = connection
    return config


@functools.cache
def head() -> tuple[str, ...]:
    """The revision(s) the code expects (read from the scripts once per process)."""
    from alembic.script import ScriptDirectory

    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


def current(connection: Connection) -> tuple[str, ...]:
    """The revision(s) the database is at (none: a new or a pre-Alembic database)."""
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return tuple(context.get_current_heads())


def upgrade(engine: Engine) -> None:
    """Bring the database to head (see the module's docstring); raises what the database
    raises (the caller treats it as a database that cannot be used)."""
    if at_head(engine):
        return
    from alembic import command

    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE, the lock
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
                             {"key": LOCK_KEY})
            tables = set(inspect(conn).get_table_names())
            if usage_table.name in tables and VERSION_TABLE not in tables:
                log.info("Usage ledger: adopting a database made before migrations (stamped %s)",
                         FIRST)
                adopt(conn)
                command.stamp(alembic_config(conn), FIRST)
            command.upgrade(alembic_config(conn), "head")


def at_head(engine: Engine) -> bool:
    """The database is at ``HEAD`` (read with plain SQL)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return False
        return list(conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()) == [HEAD]


def adopt(conn: Connection) -> None:
    """Give a pre-Alembic ``acp_usage`` the shape of revision 0001 (in the caller's transaction).

    What the old ``_migrate`` did: a ledger made before the spool has no ``record_uid`` column
    (added nullable: its records have none) nor its unique index. And what it did not: servers
    before issue 14 made the token columns INTEGER, which PostgreSQL keeps 32-bit (a report may
    claim up to 10**12); SQLite stores both alike, so only a server database is altered. The
    two other indexes were always created with the table; a missing one is created all the same.
    """
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext

    inspector = inspect(conn)
    columns = {c["name"]: c for c in inspector.get_columns(usage_table.name)}
    indexes = {ix["name"] for ix in inspector.get_indexes(usage_table.name)}
    ops = Operations(MigrationContext.configure(conn))
    if "record_uid" not in columns:
        ops.add_column(usage_table.name, Column("record_uid", String(32)))
    if conn.dialect.name != "sqlite":
        for name in COUNTS:
            kind = columns[name]["type"]
            if not isinstance(kind, BigInteger):
                ops.alter_column(usage_table.name, name, type_=BigInteger(), existing_type=kind,
                                 existing_nullable=columns[name]["nullable"])
    for index in sorted(usage_table.indexes, key=lambda ix: str(ix.name)):
        if index.name not in indexes:
            ops.create_index(str(index.name), usage_table.name, [c.name for c in index.columns],
                             unique=index.unique)
