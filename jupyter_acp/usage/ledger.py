"""The usage ledger: every turn's (or gateway request's) usage, persisted, with daily quotas.

Off the event loop (issue 14, item 10): the database is used from the ledger's own threads only,
through its async API, so a slow or locked database delays nothing but the turn whose record
waits for it. Never wedged, never lost (item 11): a record the database does not take goes to a
local spool (``spool.py``) and is replayed once the database is back; the session is told with
an ``error`` event before its turn ends, and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from jupyter_core.paths import jupyter_data_dir
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError, StatementError
from traitlets import Float, Unicode, default
from traitlets import Integer as IntTrait
from traitlets.config import LoggingConfigurable

from ..errors import AcpError, QuotaExceeded
from .admission import Leases, used_up
from .normalize import TurnUsage, _cost, _int, utc_day
from .schema import (
    COUNTS,
    INSERT,
    ROW_KEYS,
    SUMS,
    TOKENS_TODAY,
    TURNS,
    UIDS_PRESENT,
    WRITE_OPTION,
    private_file,
    sqlite_path,
    usage_table,
)
from .spool import UsageSpool

log = logging.getLogger("jupyter_acp.usage")
T = TypeVar("T")


class LedgerUnavailable(AcpError):
    """The usage database cannot be read right now (down, or its file unreachable)."""

    status = 503


class QuotaUnavailable(QuotaExceeded):
    """The daily quota cannot be checked: the database cannot be read and this server has not
    read the user's usage today. The turn is refused — a database that is down must not be a way
    around the quota — with 503 (try again), and the gateway refuses like for a used-up quota."""

    status = 503


@dataclass(frozen=True)
class RecordOutcome:
    """Where one record went."""

    uid: str
    id: int | None = None
    """The database row's id; None when the record waits in the spool (or was lost)."""
    spooled: bool = False
    error: str | None = None
    """Why the database did not take it (for the server's log; users get a plain message)."""

    @property
    def stored(self) -> bool:
        """In the database or in the spool: it will be counted."""
        return self.id is not None or self.spooled


@dataclass
class LiveTotals:
    """What this server recorded for one owner (a session), so that its stats never wait for
    the database, and the ledger failures its user has not been told about yet."""

    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    cost: float = 0.0
    spooled: int = 0
    lost: int = 0


def _describe(error: BaseException) -> str:
    """One line on why the database failed, for the log (the driver's message, not our SQL)."""
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0][:300] if text else ''}"


def _is_row_error(error: BaseException) -> bool:
    """The database refuses this row (a constraint, a value out of range), not every row."""
    return isinstance(error, IntegrityError | DataError) or (
        isinstance(error, StatementError) and not isinstance(error, DBAPIError))


async def _despite_cancel(future: asyncio.Future[T]) -> T:
    """Wait for ``future`` even if our task is cancelled meanwhile; the cancellation is then
    delivered at the task's next await. A turn's record, once begun, is waited for, so the turn
    still ends (``turn_end`` emitted, the session back to ready) when its client goes away just
    then, instead of leaving the session busy."""
    task = asyncio.current_task()
    interrupted = False
    try:
        while True:
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                if future.cancelled() or task is None:
                    raise
                interrupted = True
                if sys.version_info >= (3, 11):  # (3.10 counts no cancellations: none to undo)
                    task.uncancel()
    finally:
        if interrupted and task is not None:
            task.cancel()


def _set_wal(cursor: Any, timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried for up to ``timeout`` s: SQLite answers "database is
    locked" at once, without its busy handler, when another connection holds a lock while a
    new database is switched to WAL (several servers starting at once on one new database;
    measured: one in ~12 runs of ``test_servers_starting_at_once_migrate_once``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


class UsageLedger(LoggingConfigurable):
    """Persists ``TurnUsage`` records and answers per session / user / day, enforcing quotas.

    SQLite (the default) is opened in WAL mode: a record is on disk when ``record`` returns, so a
    server killed with -9 right after loses nothing. Any SQLAlchemy URL works for a shared
    deployment (e.g. ``postgresql+psycopg://...``).

    The database is only ever used from the ledger's own threads by the async API (``arecord``,
    ``acheck_quota``, ``asession_totals``, ...): a slow or locked database never stalls the
    server's event loop, i.e. every other session's stream. The sync methods do the same work
    in the calling thread (for tests and scripts). Writes are serialised in one lock; a record
    the database does not take goes to the spool (``spool.py``) and is replayed later.

    The schema is Alembic's (``migrate.py``), upgraded at connect. ``admit``/``settle`` enforce
    a daily limit atomically across every server sharing the database (``admission.py``).
    """

    db_url = Unicode(
        help="""SQLAlchemy URL of the usage database. Default: a SQLite file
        ``jupyter_acp/usage.sqlite`` in the Jupyter data directory.""",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self) -> str:
        path = Path(jupyter_data_dir()) / "jupyter_acp" / "usage.sqlite"
        return f"sqlite:///{path}"

    max_tokens_per_user_per_day = IntTrait(
        0,
        help="""Tokens (input + output, all agents) one user may use per UTC day; a new prompt
        turn beyond it is refused with a clear error. 0 means unlimited.""",
    ).tag(config=True)

    spool_path = Unicode(
        help="""File where usage records wait while the database cannot be written (down,
        locked, read-only), replayed into it once it can; created 0600 (its directory 0700).
        Default: beside a SQLite ledger (``usage.sqlite-spool``), else
        ``jupyter_acp/usage-spool.jsonl`` in the Jupyter data directory.""",
    ).tag(config=True)

    @default("spool_path")
    def _default_spool_path(self) -> str:
        path = sqlite_path(self.db_url)
        if path is not None:
            return f"{path}-spool"
        return str(Path(jupyter_data_dir()) / "jupyter_acp" / "usage-spool.jsonl")

    write_timeout = Float(
        5.0,
        help="""Seconds a write waits for a locked SQLite database, or for a database server
        (to connect, then to run it), before its record goes to the spool: the end of a turn
        waits at most about this long for the ledger.""",
    ).tag(config=True)

    spool_retry_interval = Float(
        30.0,
        help="""Seconds between attempts to replay the spool while it holds records (it is
        also replayed right after every successful write).""",
    ).tag(config=True)

    lease_lifetime = Float(
        1200.0,
        help="""Seconds an admission lease (``admit``) holds its tokens of the quota when its
        request is never settled (its server died): then it expires and no longer counts.
        Longer than any one LLM request takes.""",
    ).tag(config=True)

    lease_poll_interval = Float(
        0.05,
        help="""Seconds (on average) between the attempts of an ``admit`` that waits for the
        user's requests in flight to settle.""",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine: Engine | None = None
        self._leases = Leases(self)
        self._spool: UsageSpool | None = None
        self._lock = threading.RLock()  # the engine and the retry thread
        self._write_lock = threading.Lock()  # one write (and spool replay) at a time
        #: (its own lock: the event loop takes it, and must never wait for a connect)
        self._pool_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._retry: threading.Thread | None = None
        self._closing = threading.Event()
        self._live: weakref.WeakKeyDictionary[Any, LiveTotals] = weakref.WeakKeyDictionary()
        #: each user's tokens today as last read from the database: the quota check's fallback
        #: while the database cannot be read (plus what the spool holds)
        self._known_today: dict[str, tuple[str, int]] = {}

    # -- connection ----------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self._connect()
                if self.spool.has_records():  # left by an earlier run (or an earlier outage)
                    self._start_retry(0.0)
            return self._engine

    @property
    def spool(self) -> UsageSpool:
        if self._spool is None:
            self._spool = UsageSpool(Path(self.spool_path))
        return self._spool

    def _connect(self) -> Engine:
        url = self.db_url
        path = sqlite_path(url)
        if path is not None:
            private_file(path)
        timeout = max(self.write_timeout, 0.0)
        backend = make_url(url).get_backend_name()
        if backend == "sqlite":
            engine = create_engine(url, connect_args={"timeout": timeout})

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we BEGIN ourselves (below)
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
                _set_wal(cur, timeout)
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @event.listens_for(engine, "begin")
            def _begin(conn: Connection) -> None:
                # a write takes the write lock first: a read-then-write transaction would fail
                # at once (SQLITE_BUSY_SNAPSHOT) instead of waiting when another writer commits
                write = conn.get_execution_options().get(WRITE_OPTION)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
        else:
            args = {"connect_timeout": max(math.ceil(timeout), 1)} if backend == "postgresql" else {}
            engine = create_engine(url, pool_pre_ping=True, connect_args=args)
        try:
            from .migrate import upgrade  # (Alembic is imported by the first connect only)

            upgrade(engine)  # the schema: Alembic's migrations, a pre-Alembic ledger adopted
        except BaseException:
            engine.dispose()
            raise
        return engine

    def close(self) -> None:
        """Wait for the writes under way, stop retrying the spool, release the database (the
        spool keeps what it holds for the next start)."""
        self._closing.set()
        with self._lock:
            retry, self._retry = self._retry, None
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if retry is not None:
            retry.join(timeout=self.write_timeout + 5)
        if pool is not None:
            pool.shutdown(wait=True)
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
        self._closing.clear()

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="acp-ledger")
            return self._pool

    async def _run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` in the ledger's threads: the event loop goes on meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._executor(), fn, *args)

    # -- writing -------------------------------------------------------------------------------
    @staticmethod
    def _row(*, user: str, session_id: str, agent: str, turn: int, usage: TurnUsage,
             started_at: float, ended_at: float | None) -> dict[str, Any]:
        ended = ended_at if ended_at is not None else time.time()
        row = {key: getattr(usage, key) for key in (*COUNTS, "cost", "currency", "model", "source")}
        row.update(record_uid=uuid.uuid4().hex, user=user, session_id=session_id, agent=agent,
                   turn=turn, started_at=started_at, ended_at=ended, day=utc_day(ended))
        return row

    def record(self, *, user: str, session_id: str, agent: str, turn: int, usage: TurnUsage,
               started_at: float, ended_at: float | None = None, owner: Any = None) -> RecordOutcome:
        """Store one record in this thread (the database, or else the spool); see ``arecord``."""
        row = self._row(user=user, session_id=session_id, agent=agent, turn=turn, usage=usage,
                        started_at=started_at, ended_at=ended_at)
        outcome = self._store(row)
        self._account(owner, usage, outcome)
        return outcome

    async def arecord(self, *, user: str, session_id: str, agent: str, turn: int, usage: TurnUsage,
                      started_at: float, ended_at: float | None = None, owner: Any = None
                      ) -> RecordOutcome:
        """Store one record durably — in the database, or else in the spool — before returning,
        without blocking the event loop. Never raises for a failing database: the outcome says
        where the record went. ``owner`` (a session) gets the record in its ``live_totals`` and
        a failure in its ``take_problem``."""
        row = self._row(user=user, session_id=session_id, agent=agent, turn=turn, usage=usage,
                        started_at=started_at, ended_at=ended_at)
        future = asyncio.get_running_loop().run_in_executor(self._executor(), self._store, row)
        outcome = await _despite_cancel(future)
        self._account(owner, usage, outcome)
        return outcome

    def _store(self, row: dict[str, Any], lease: str | None = None) -> RecordOutcome:
        """Insert ``row`` (and delete its admission ``lease`` in the same transaction), or else
        put it in the spool."""
        uid = row["record_uid"]
        with self._write_lock:
            try:
                with self._writing() as conn:
                    if lease is not None:
                        Leases.release(conn, lease, row["user"])
                    key = conn.execute(INSERT, row).inserted_primary_key
                    # a single-row insert() always has one (None is for executemany or
                    # returning(), neither used here); were it missing, the row is spooled
                    assert key is not None
                    record_id = int(key[0])
            except Exception as e:
                if lease is not None:
                    self._leases.unsettled(lease, e)
                return self._to_spool(row, e)
            self._count_known(row)
            if self.spool.has_records():  # the database is back: what waited goes in now
                self._replay()
            elif self._leases.has_stale:
                self._leases.drop_stale()
        return RecordOutcome(uid, record_id)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                if conn.dialect.name == "postgresql":  # bounded like SQLite's busy timeout
                    ms = max(int(self.write_timeout * 1000), 1)
                    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {ms}")
                yield conn

    def _to_spool(self, row: dict[str, Any], error: Exception) -> RecordOutcome:
        why = _describe(error)
        try:
            self.spool.append(row)
        except OSError as e:
            log.error("Usage ledger: neither the database (%s) nor the spool %s (%s) could be "
                      "written; the record is kept in this log line only: %s", why, self.spool.path,
                      e, json.dumps(row, sort_keys=True))
            return RecordOutcome(row["record_uid"], error=why)
        log.warning("Usage ledger: the database could not be written (%s); the record waits in "
                    "the spool %s", why, self.spool.path)
        self._start_retry(self.spool_retry_interval)
        return RecordOutcome(row["record_uid"], spooled=True, error=why)

    def _replay(self) -> bool:
        """Put the spool's records into the database (the caller holds the write lock); True
        when the spool is empty afterwards."""
        try:
            with self.spool.draining() as rows:
                if rows:
                    added = self._insert_missing_rows(rows)
                    log.info("Usage ledger: %d spooled record(s) written to the database (%d were "
                             "there already)", added, len(rows) - added)
        except Exception as e:
            log.warning("Usage ledger: the spool %s could not be replayed yet (%s); next try in %g s",
                        self.spool.path, _describe(e), self.spool_retry_interval)
            return False
        self._leases.drop_stale()
        return True

    def _insert_missing_rows(self, rows: list[dict[str, Any]]) -> int:
        try:
            with self._writing() as conn:
                return self._insert_missing(conn, rows)
        except Exception as e:
            if not _is_row_error(e):
                raise
        # some row is refused for good: one at a time, so that it does not hold back the others
        added, refused, why = 0, [], ""
        for row in rows:
            try:
                with self._writing() as conn:
                    added += self._insert_missing(conn, [row])
            except Exception as e:
                if not _is_row_error(e):
                    raise
                refused.append(row)
                why = _describe(e)
        if refused:
            self.spool.reject(refused, why)
        return added

    @staticmethod
    def _insert_missing(conn: Connection, rows: list[dict[str, Any]]) -> int:
        """Insert the rows whose uid the database does not hold yet (a replay that crashed after
        its commit but before the spool was emptied is done again without doubling anything)."""
        present = UsageLedger._present(conn, rows)
        missing = [{k: row.get(k) for k in ROW_KEYS} for row in rows if row["record_uid"] not in present]
        if missing:
            conn.execute(INSERT, missing)
        return len(missing)

    @staticmethod
    def _present(conn: Connection, rows: list[dict[str, Any]]) -> set[str]:
        uids = [row["record_uid"] for row in rows]
        present: set[str] = set()
        for start in range(0, len(uids), 500):
            present.update(conn.execute(UIDS_PRESENT, {"uids": uids[start:start + 500]}).scalars())
        return present

    def _start_retry(self, delay: float) -> None:
        """Replay the spool every ``spool_retry_interval`` until it is empty (a thread of ours:
        the database may come back while nobody writes)."""
        with self._lock:
            if self._retry is None and not self._closing.is_set():
                self._retry = threading.Thread(target=self._retry_loop, args=(delay,), daemon=True,
                                               name="acp-ledger-spool")
                self._retry.start()

    def _retry_loop(self, delay: float) -> None:
        while not self._closing.wait(delay):
            delay = max(self.spool_retry_interval, 0.05)
            with self._write_lock:
                self._replay()
            with self._lock:
                if not self.spool.has_records():  # (an append after this starts a new thread)
                    self._retry = None
                    return

    def _account(self, owner: Any, usage: TurnUsage, outcome: RecordOutcome) -> None:
        if owner is None:
            return
        live = self._live.get(owner)
        if live is None:
            live = self._live[owner] = LiveTotals()
        if outcome.stored:
            for key in COUNTS:
                live.tokens[key] += getattr(usage, key)
            live.cost += usage.cost
        if outcome.spooled:
            live.spooled += 1
        elif not outcome.stored:
            live.lost += 1

    def live_totals(self, owner: Any) -> dict[str, Any]:
        """Tokens and cost recorded for ``owner`` by this server (the database or the spool),
        from memory: a session's stats without a database round trip."""
        live = self._live.get(owner) or LiveTotals()
        return {**live.tokens, "cost": live.cost}

    def take_problem(self, owner: Any) -> dict[str, Any] | None:
        """The ledger failures of ``owner``'s records since the last call, as an ``error``
        event's data (None: none); the session emits it before the turn's end."""
        live = self._live.get(owner)
        if live is None or not (live.spooled or live.lost):
            return None
        spooled, lost = live.spooled, live.lost
        live.spooled = live.lost = 0
        if lost:
            message = ("The usage of this turn could not be recorded: neither the usage database "
                       "nor the server's spool could be written. An admin can find it in the "
                       "server log.")
        else:
            message = ("The usage database could not be written, so the usage of this turn waits "
                       "on the server; it is added to the database as soon as it is back.")
        return {"message": message, "ledger": "lost" if lost else "spooled", "records": spooled + lost}

    def _count_known(self, row: dict[str, Any]) -> None:
        known = self._known_today.get(row["user"])
        if known is not None and known[0] == row["day"]:
            self._known_today[row["user"]] = (known[0], known[1] + row["total_tokens"])

    # -- reading -------------------------------------------------------------------------------
    def _read(self, query: Callable[[Connection], T]) -> T:
        try:
            with self.engine.connect() as conn:
                return query(conn)
        except (SQLAlchemyError, OSError) as e:
            log.warning("Usage ledger: the database could not be read (%s)", _describe(e))
            raise LedgerUnavailable("The usage database cannot be read right now; try again "
                                    "in a minute") from e

    def _waiting(self, match: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """The spool's records that ``match`` (not yet known to be in the database)."""
        if not self.spool.has_records():
            return []
        return [row for row in self.spool.read() if match(row)]

    def _not_stored(self, conn: Connection, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not rows:
            return rows
        present = self._present(conn, rows)
        return [row for row in rows if row["record_uid"] not in present]

    def _totals(self, where: Any, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Sums over the database's records and the spool's (not counted twice)."""
        def query(conn: Connection) -> dict[str, Any]:
            row = conn.execute(select(*SUMS, TURNS.label("turns")).where(where)).mappings().one()
            totals = {k: (float(v) if k == "cost" else int(v)) for k, v in row.items()}
            waiting = self._not_stored(conn, self._waiting(match))
            if waiting:
                for key in COUNTS:
                    totals[key] += sum(_int(r.get(key)) for r in waiting)
                totals["cost"] += sum(_cost(r.get("cost")) for r in waiting)
                turns = {(r.get("session_id"), r.get("turn")) for r in waiting}
                known = select(usage_table.c.session_id, usage_table.c.turn).distinct().where(
                    usage_table.c.session_id.in_({s for s, _ in turns}))
                totals["turns"] += len(turns - {tuple(r) for r in conn.execute(known)})
            return totals
        return self._read(query)

    def session_totals(self, session_id: str) -> dict[str, Any]:
        return self._totals(usage_table.c.session_id == session_id,
                            lambda r: r.get("session_id") == session_id)

    def user_totals(self, user: str) -> dict[str, Any]:
        return self._totals(usage_table.c.user == user, lambda r: r.get("user") == user)

    def tokens_today(self, user: str) -> int:
        """The user's tokens of this UTC day, the spool's included. While the database cannot
        be read: the last value read from it today plus the spool's (``LedgerUnavailable`` if
        none was read today)."""
        day = utc_day()
        waiting = self._waiting(lambda r: r.get("user") == user and r.get("day") == day)

        def query(conn: Connection) -> int:
            stored = int(conn.execute(TOKENS_TODAY, {"user": user, "day": day}).scalar_one())
            self._known_today[user] = (day, stored)
            return stored + sum(_int(r.get("total_tokens")) for r in self._not_stored(conn, waiting))

        try:
            return self._read(query)
        except LedgerUnavailable:
            known = self._known_today.get(user)
            if known is None or known[0] != day:
                raise
            return known[1] + sum(_int(r.get("total_tokens")) for r in waiting)

    def check_quota(self, user: str) -> None:
        """Raise ``QuotaExceeded`` when ``user`` has no tokens left today (``QuotaUnavailable``
        when that cannot be known)."""
        cap = self.max_tokens_per_user_per_day
        if not cap:
            return
        try:
            used = self.tokens_today(user)
        except LedgerUnavailable:
            raise self._quota_unavailable() from None
        if used >= cap:
            raise used_up(used, cap)

    @staticmethod
    def _quota_unavailable(error: BaseException | None = None) -> QuotaUnavailable:
        if error is not None:
            log.warning("Usage ledger: the quota could not be checked (%s)", _describe(error))
        return QuotaUnavailable("The usage database cannot be read, so your daily token quota "
                                "cannot be checked; try again in a minute")

    def _grouped(self, keys: list[Any], *where: Any) -> list[dict[str, Any]]:
        """Sums per group, of the database's records (the spool's are in ``*_totals``)."""
        query = select(*keys, *SUMS, TURNS.label("turns")).where(*where).group_by(*keys)
        return self._read(lambda conn: [dict(r) for r in conn.execute(query.order_by(*keys)).mappings()])

    def per_session(self, user: str | None = None) -> list[dict[str, Any]]:
        where = [] if user is None else [usage_table.c.user == user]
        return self._grouped([usage_table.c.user, usage_table.c.session_id, usage_table.c.agent], *where)

    def per_day(self, user: str | None = None) -> list[dict[str, Any]]:
        where = [] if user is None else [usage_table.c.user == user]
        return self._grouped([usage_table.c.user, usage_table.c.day], *where)

    def turns(self, session_id: str) -> list[dict[str, Any]]:
        """Every turn record of a session, in turn order (for per-turn charts)."""
        query = select(usage_table).where(usage_table.c.session_id == session_id).order_by(
            usage_table.c.turn, usage_table.c.id)  # (a replayed record has a later id)
        return self._read(lambda conn: [dict(r) for r in conn.execute(query).mappings()])

    # -- the async API (the event loop's) ------------------------------------------------------
    async def acheck_quota(self, user: str) -> None:
        if self.max_tokens_per_user_per_day:  # (no thread hop without a quota)
            await self._run(self.check_quota, user)

    async def atokens_today(self, user: str) -> int:
        return await self._run(self.tokens_today, user)

    async def asession_totals(self, session_id: str) -> dict[str, Any]:
        return await self._run(self.session_totals, session_id)

    async def auser_totals(self, user: str) -> dict[str, Any]:
        return await self._run(self.user_totals, user)

    async def aper_session(self, user: str | None = None) -> list[dict[str, Any]]:
        return await self._run(self.per_session, user)

    async def aper_day(self, user: str | None = None) -> list[dict[str, Any]]:
        return await self._run(self.per_day, user)

    async def aturns(self, session_id: str) -> list[dict[str, Any]]:
        return await self._run(self.turns, session_id)

    # -- admission: leases (admission.py) ------------------------------------------------------
    def admit(self, user: str, limit: int | None, *, reserve: int, timeout: float,
              lifetime: float | None = None) -> str:
        """Admit one LLM request of ``user`` against a daily ``limit`` of tokens, atomically
        across every server sharing the database; returns a lease id for ``settle``.

        ``reserve``: the tokens the request may use (the lease holds them until settled);
        ``timeout``: seconds to wait, near the quota, for the user's requests in flight;
        ``lifetime``: seconds before an unsettled lease expires (``lease_lifetime``).
        ``limit=None`` admits without the database; ``0`` admits nothing. Raises
        ``QuotaExceeded`` (used up, or still busy at ``timeout``), ``QuotaUnavailable`` when
        the database cannot be used. In the calling thread; see ``aadmit``."""
        life = self.lease_lifetime if lifetime is None else lifetime
        return self._leases.admit(user, limit, reserve, timeout, life)

    async def aadmit(self, user: str, limit: int | None, *, reserve: int, timeout: float,
                     lifetime: float | None = None) -> str:
        """``admit`` without blocking the event loop (the database in the ledger's threads)."""
        life = self.lease_lifetime if lifetime is None else lifetime
        return await self._leases.aadmit(user, limit, reserve, timeout, life)

    def _settle_row(self, usage: TurnUsage, user: str, session_id: str, agent: str, turn: int,
                    started_at: float | None, ended_at: float | None) -> dict[str, Any]:
        if not (user and session_id and agent):
            raise TypeError("settle: a record needs user, session_id and agent")
        ended = time.time() if ended_at is None else ended_at
        return self._row(user=user, session_id=session_id, agent=agent, turn=turn, usage=usage,
                         started_at=ended if started_at is None else started_at, ended_at=ended)

    def settle(self, lease_id: str, usage: TurnUsage | None = None, *, user: str = "",
               session_id: str = "", agent: str = "", turn: int = 0,
               started_at: float | None = None, ended_at: float | None = None,
               owner: Any = None) -> RecordOutcome | None:
        """End an admitted request: store its usage record (as ``record`` does: the same row,
        spooled when the database fails, never doubled) and delete its lease in ONE
        transaction. ``usage=None``: the request used nothing, the lease is just dropped
        (returns None). ``user``, ``session_id``, ``agent`` are required with ``usage``;
        ``started_at`` defaults to the end. Never raises for a failing database (a lease it
        could not delete is retried, and expires anyway)."""
        if usage is None:
            self._leases.drop(lease_id)
            return None
        row = self._settle_row(usage, user, session_id, agent, turn, started_at, ended_at)
        outcome = self._store(row, lease_id)
        self._account(owner, usage, outcome)
        return outcome

    async def asettle(self, lease_id: str, usage: TurnUsage | None = None, *, user: str = "",
                      session_id: str = "", agent: str = "", turn: int = 0,
                      started_at: float | None = None, ended_at: float | None = None,
                      owner: Any = None) -> RecordOutcome | None:
        """``settle`` in the ledger's threads; carried through even if the caller is cancelled
        (a usage record, once begun, is written)."""
        loop = asyncio.get_running_loop()
        if usage is None:
            await _despite_cancel(loop.run_in_executor(self._executor(), self._leases.drop, lease_id))
            return None
        row = self._settle_row(usage, user, session_id, agent, turn, started_at, ended_at)
        outcome = await _despite_cancel(loop.run_in_executor(self._executor(), self._store, row,
                                                             lease_id))
        self._account(owner, usage, outcome)
        return outcome
