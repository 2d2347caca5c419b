"""Atomic admission against the daily quota: leases, enforced in the database (issue 16).

A quota check before a request and a record after it leave a window: two servers of one user
(or two replicas of the hub service) both read "900 of 1000 used", both forward a request of
500 tokens, and the user ends the day at 1900. Admission closes that window in the database,
so it holds however many processes share the ledger.

``admit`` runs ONE transaction holding a per-user lock (PostgreSQL's
``pg_advisory_xact_lock(hashtextextended(user, 0))``; SQLite's ``BEGIN IMMEDIATE``, the
database's write lock) that drops the user's expired leases, reads ``used`` (the user's
tokens today, the spool's included) and ``held`` (the ``reserved`` tokens of the user's live
leases), and

* refuses (``QuotaExceeded``, the usual message) when ``used >= limit``: usage never goes down
  within a day, waiting would not help;
* admits — inserts a lease of ``reserve`` tokens and returns its id — when the user has no live
  lease, or when ``used + held + reserve <= limit``;
* otherwise waits (polls, the lock released in between) for leases to be settled, until that
  holds or ``timeout``; then refuses.

``settle`` inserts the request's usage record and deletes its lease in one transaction, under
the same lock, so that an admission never sees the record without the lease gone or the
lease gone without the record. Far from the quota a user has several requests in flight; near
it, ONE: the day's overshoot is at most that request's tokens (given reserves that cover what
requests really use: a request that uses more than it reserved can overshoot by the excess).

A lease whose request never settles (a crashed server) expires after its lifetime, and is
ignored from then on. A database that cannot be used refuses admission (``QuotaUnavailable``,
fail closed): unlike ``check_quota``, admission has no fallback to a value read earlier,
because a lease that is not in the database holds nothing against the other servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, bindparam, cast, delete, func, insert, select, text
from sqlalchemy.engine import Connection

from ..errors import QuotaExceeded
from .normalize import _int, utc_day
from .schema import TOKENS_TODAY, leases_table

if TYPE_CHECKING:
    from .ledger import UsageLedger

log = logging.getLogger("jupyter_acp.usage")

#: A lease given without a limit: nothing in the database to hold or to drop.
UNMETERED = "unmetered-"

_lease = leases_table.c
DROP_EXPIRED = delete(leases_table).where(_lease.user == bindparam("user"),
                                          _lease.expires <= bindparam("now"))
LIVE = select(func.count(), cast(func.coalesce(func.sum(_lease.reserved), 0), BigInteger)).where(
    _lease.user == bindparam("user"), _lease.expires > bindparam("now"))
INSERT_LEASE = insert(leases_table)
DROP_LEASE = delete(leases_table).where(_lease.id == bindparam("lease"))
DROP_LEASES = delete(leases_table).where(_lease.id.in_(bindparam("leases", expanding=True)))


def used_up(used: int, limit: int) -> QuotaExceeded:
    """The refusal of a user whose quota is used up (the words ``check_quota`` uses)."""
    return QuotaExceeded(
        f"Daily token quota used up: {used} of {limit} tokens today (UTC); it renews at midnight UTC")


def lock_user(conn: Connection, user: str) -> None:
    """Take ``user``'s admission lock for the rest of the transaction (PostgreSQL). On SQLite
    the transaction began with ``BEGIN IMMEDIATE``: it holds the whole database's write lock.
    Forces READ COMMITTED too: every statement after the lock must see what the previous holder
    committed (a REPEATABLE READ snapshot taken before the lock would not). Other servers
    (MySQL, ...) get no per-user lock: admission there is only as atomic as their default
    isolation makes it."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:user, 0))"), {"user": user})


@dataclass(frozen=True)
class Busy:
    """Not admitted yet: the user's requests in flight hold what is left of the quota."""

    used: int
    held: int
    leases: int


class Leases:
    """The admission leases of one ``UsageLedger`` (which owns the engine, the spool and the
    threads; its ``admit``/``settle`` methods are the public API)."""

    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger
        self._lock = threading.Lock()
        #: leases whose settle could not reach the database: dropped once it is back (else
        #: they would hold their reserve until they expire)
        self._stale: set[str] = set()

    # -- one attempt (in a ledger thread) ------------------------------------------------------
    def attempt(self, user: str, limit: int, reserve: int, lifetime: float) -> str | Busy:
        """One admission transaction: a lease id, ``Busy``, or ``QuotaExceeded`` raised (and
        ``QuotaUnavailable`` when the database cannot be used)."""
        ledger = self.ledger
        try:
            with ledger._writing() as conn:
                lock_user(conn, user)
                now = time.time()
                conn.execute(DROP_EXPIRED, {"user": user, "now": now})
                used = self._used(conn, user)
                if used >= limit:
                    raise used_up(used, limit)
                leases, held = conn.execute(LIVE, {"user": user, "now": now}).one()
                if leases and used + held + reserve > limit:
                    return Busy(used, int(held), int(leases))
                lease = uuid.uuid4().hex
                conn.execute(INSERT_LEASE, {"id": lease, "user": user, "reserved": reserve,
                                            "created": now, "expires": now + lifetime})
                return lease
        except QuotaExceeded:
            raise
        except Exception as e:
            raise ledger._quota_unavailable(e) from None

    def _used(self, conn: Connection, user: str) -> int:
        """The user's tokens today: the database's and this server's spool's not yet in it."""
        day = utc_day()
        ledger = self.ledger
        stored = int(conn.execute(TOKENS_TODAY, {"user": user, "day": day}).scalar_one())
        ledger._known_today[user] = (day, stored)
        waiting = ledger._waiting(lambda r: r.get("user") == user and r.get("day") == day)
        return stored + sum(_int(r.get("total_tokens")) for r in ledger._not_stored(conn, waiting))

    # -- the waits -----------------------------------------------------------------------------
    @staticmethod
    def _check(limit: int | None, reserve: int, timeout: float) -> None:
        if reserve < 0 or timeout < 0 or (limit is not None and limit < 0):
            raise ValueError("admit: limit, reserve and timeout must not be negative")

    def _interval(self) -> float:
        """The next poll's wait: jittered, so that the waiting requests do not poll in step."""
        return self.ledger.lease_poll_interval * random.uniform(0.5, 1.5)

    @staticmethod
    def _in_flight(busy: Busy, limit: int) -> QuotaExceeded:
        return QuotaExceeded(
            f"Daily token quota nearly used up: {busy.used} of {limit} tokens today (UTC), and "
            f"{busy.leases} request(s) of yours still running may use the rest; try again when "
            f"they have finished")

    def admit(self, user: str, limit: int | None, reserve: int, timeout: float,
              lifetime: float) -> str:
        """``UsageLedger.admit``, in the calling thread."""
        self._check(limit, reserve, timeout)
        if limit is None:
            return UNMETERED + uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        while True:
            result = self.attempt(user, limit, reserve, lifetime)
            if isinstance(result, str):
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._in_flight(result, limit)
            time.sleep(min(self._interval(), left))

    async def aadmit(self, user: str, limit: int | None, reserve: int, timeout: float,
                     lifetime: float) -> str:
        """``UsageLedger.aadmit``: each attempt in a ledger thread, the waits on the event loop
        (a thread per waiting request would starve the ledger's few threads, the settles the
        waits are for among them)."""
        self._check(limit, reserve, timeout)
        if limit is None:
            return UNMETERED + uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            future = loop.run_in_executor(self.ledger._executor(), self.attempt, user, limit,
                                          reserve, lifetime)
            try:
                result = await asyncio.shield(future)
            except asyncio.CancelledError:
                # the caller is gone: a lease taken meanwhile is given back, not left to expire
                future.add_done_callback(self._give_back)
                raise
            if isinstance(result, str):
                return result
            left = deadline - loop.time()
            if left <= 0:
                raise self._in_flight(result, limit)
            await asyncio.sleep(min(self._interval(), left))

    def _give_back(self, future: asyncio.Future[str | Busy]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        lease = future.result()
        if isinstance(lease, str):
            with contextlib.suppress(RuntimeError):  # (the ledger is closing: it expires)
                self.ledger._executor().submit(self.drop, lease)

    # -- settling ------------------------------------------------------------------------------
    @staticmethod
    def release(conn: Connection, lease: str, user: str) -> None:
        """Delete ``lease`` in the transaction that inserts its record (``UsageLedger._store``),
        under the user's lock (taken first: an admission deleting the same expired lease under
        the lock would otherwise wait for us while we wait for it)."""
        lock_user(conn, user)
        if not lease.startswith(UNMETERED):
            conn.execute(DROP_LEASE, {"lease": lease})

    def drop(self, lease: str) -> None:
        """Delete a lease whose request used nothing (``settle(lease, None)``); never raises:
        a lease the database does not hear of is dropped later, or expires."""
        if lease.startswith(UNMETERED):
            return
        try:
            with self.ledger._writing() as conn:
                conn.execute(DROP_LEASE, {"lease": lease})
        except Exception as e:
            self.unsettled(lease, e)

    def unsettled(self, lease: str, error: BaseException) -> None:
        """The database did not take ``lease``'s settle: drop it once the database is back."""
        if lease.startswith(UNMETERED):
            return
        log.warning("Usage ledger: lease %s could not be released (%s); it is retried, and "
                    "expires anyway", lease, type(error).__name__)
        with self._lock:
            self._stale.add(lease)

    def drop_stale(self) -> None:
        """Delete the leases whose settle failed (after a successful write: the database is
        back). Deleting a lease without its usage can only make an admission wait less long."""
        with self._lock:
            stale, self._stale = self._stale, set()
        if not stale:
            return
        try:
            with self.ledger._writing() as conn:
                conn.execute(DROP_LEASES, {"leases": sorted(stale)})
        except Exception:
            with self._lock:
                self._stale |= stale

    @property
    def has_stale(self) -> bool:
        return bool(self._stale)

