"""Sessions that outlive the server: each session's record and event history, in the ledger's
database (tables ``acp_sessions`` and ``acp_session_events``, made by the ledger's migrations).

A live session is *tracked*: every event it emits is queued and written in batches, at most
``flush_interval`` seconds later, in one transaction per batch from the store's own thread (a
slow database delays the history's copy, never a session's stream); a prompt, the end of a
turn and a change of state are written at once (``DURABLE_NOW``). Its record (title, mode,
config options, the agent's ACP session id, turns) is rewritten with each batch. A server
killed with -9 loses at most the chunks streamed in the last ``flush_interval`` seconds of a
turn that had not ended; a clean stop writes everything first (``close``).

When the agent stops without the user deleting the session — the server stops, the monitor
culls it, the user closes it — the record becomes ``suspended``: the user's list shows it and
``UserSessionManager.resume_user_session`` starts its agent again, seeded with this history.
Deleting forgets it: record and events go. A session not used for ``retention_days`` is
forgotten by the monitor (``expired``), and a user keeps at most ``max_stored_per_user``
suspended sessions (the oldest go first): the database cannot be filled by one user.

Each session's events are bounded in bytes (``max_history_bytes``): the oldest rows are deleted
as new ones come in. Events are stored as the API sends them (``history.wire_json``: ASCII JSON,
so a payload's length is its size in bytes).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from traitlets import Bool, Float, Integer
from traitlets.config import LoggingConfigurable

from .usage.ledger import LedgerUnavailable
from .usage.schema import WRITE_OPTION, session_events_table, sessions_table

if TYPE_CHECKING:
    from .session import AgentSession
    from .usage import UsageLedger

log = logging.getLogger("jupyter_acp.store")
T = TypeVar("T")

LIVE, SUSPENDED = "live", "suspended"
#: Events written at once rather than within ``flush_interval``: a prompt, the end of a turn, a
#: change of state — the points a user would expect to find again after a crash. (Streamed
#: chunks are batched: they are most events, and the end of their turn writes them.)
DURABLE_NOW = frozenset({"user_message", "turn_end", "state"})
#: Events not stored: ``terminal:output`` snapshots (a terminal's whole output, replaced every
#: quarter second while it prints) would fill the stored history, which cannot drop the ones
#: they replace (``history.py``); a resumed session has no terminals.
NOT_STORED = frozenset({"terminal_output"})


@dataclass
class StoredSession:
    """A session's record as stored (``acp_sessions``)."""

    id: str
    user: str
    agent: str
    acp_session_id: str | None
    title: str
    cwd: str
    state: str
    mode: str | None
    meta: dict[str, Any]
    turns: int
    last_seq: int
    created: float
    last_activity: float

    @classmethod
    def from_row(cls, row: Any) -> StoredSession:
        data = dict(row._mapping)
        try:
            meta = json.loads(data.pop("meta") or "{}")
        except ValueError:
            meta = {}
        return cls(meta=meta if isinstance(meta, dict) else {}, **data)


def record_of(session: AgentSession, state: str = LIVE) -> dict[str, Any]:
    """The ``acp_sessions`` row of a live session, read on the event loop's thread."""
    modes = session.modes or {}
    return {
        "id": session.id, "user": session.user, "agent": session.spec.name,
        "acp_session_id": session.acp_session_id, "title": session.title,
        "cwd": str(session.sandbox_spec.workspace), "state": state,
        "mode": modes.get("currentModeId"),
        "meta": json.dumps({"config_options": session.config_options,
                            "available_commands": session.available_commands,
                            "prompt_capabilities": session.agent_capabilities.get("promptCapabilities"),
                            "agent_info": session.agent_info,
                            "display_name": session.spec.display_name}, default=str),
        "turns": session.turns, "last_seq": session.last_seq,
        "created": session.created, "last_activity": session.last_activity,
    }


@dataclass
class _Tracked:
    """A live session's writes not yet in the database, and the sizes of its stored events."""

    session: AgentSession
    unsubscribe: Callable[[], None]
    pending: list[tuple[int, str]] = field(default_factory=list)
    #: (seq, bytes) of each event stored or queued, oldest first: what the byte bound trims
    sizes: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    total: int = 0
    dirty: bool = True


class SessionStore(LoggingConfigurable):
    """Persists agent sessions (records and event histories) in the usage ledger's database."""

    enabled = Bool(
        True,
        help="""Keep every session (its record and events) in the usage database, so that it
        survives a server restart or an idle cull and can be resumed from the session list.
        False: a session ends with its agent, as before.""",
    ).tag(config=True)

    retention_days = Float(
        30.0,
        help="""Days a session that is not running is kept after its last activity (its
        transcript, and its agent's home, where the agent keeps its own copy of the
        conversation); then the monitor deletes it. 0 keeps sessions until their user deletes
        them.""",
    ).tag(config=True)

    max_history_bytes = Integer(
        8 * 1024 * 1024,
        help="""Bytes of event JSON kept per stored session; the oldest events go first. A
        resumed session shows what is kept (its agent may remember more).""",
    ).tag(config=True)

    max_stored_per_user = Integer(
        100,
        help="""Suspended sessions kept per user; beyond it the least recently used are
        deleted. 0 means no limit.""",
    ).tag(config=True)

    flush_interval = Float(
        0.5,
        help="""Seconds between two writes of the streamed events of live sessions (each
        write is one transaction for every session; a prompt, the end of a turn and a change of
        state are written at once). A server killed without a clean stop loses at most this
        much of a running turn's stream (never usage: the ledger writes that at once).""",
    ).tag(config=True)

    def __init__(self, ledger: UsageLedger, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ledger = ledger
        self._tracked: dict[str, _Tracked] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._flush_lock = asyncio.Lock()
        self._scheduled: asyncio.TimerHandle | None = None
        self._soon = False
        self._flushing: set[asyncio.Task[None]] = set()
        self._failing = False
        #: sessions forgotten (deleted) by this server: hidden from readers at once, deleted
        #: from the database as soon as it can be written, never written again (``forget``)
        self._forgotten: set[str] = set()
        self._ending: set[asyncio.Task[None]] = set()

    # -- the store's thread --------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` in the store's one thread: writes happen in the order they were asked."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="acp-store")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _write(self, fn: Callable[[Any], T]) -> T:
        with self.ledger.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})  # SQLite: BEGIN IMMEDIATE
            with conn.begin():
                return fn(conn)

    def _read(self, fn: Callable[[Any], T]) -> T:
        """A read; a database that cannot be read is ``LedgerUnavailable`` (503), like the
        ledger's own reads."""
        try:
            with self.ledger.engine.connect() as conn:
                return fn(conn)
        except (SQLAlchemyError, OSError) as e:
            log.warning("Session store: the database could not be read (%s)", type(e).__name__)
            raise LedgerUnavailable("The session store cannot be read right now; try again") from None

    # -- live sessions -------------------------------------------------------------------------
    def track(self, session: AgentSession, stored_sizes: Iterable[tuple[int, int]] = ()) -> None:
        """Write ``session``'s record and events from now on (``stored_sizes``: the sizes of its
        events already in the database, for a resumed session)."""
        if not self.enabled or session.id in self._tracked:
            return
        tracked = _Tracked(session, lambda: None)
        stored_sizes = list(stored_sizes)
        for seq, size in stored_sizes:
            tracked.sizes.append((seq, size))
            tracked.total += size

        def on_event(event: dict[str, Any]) -> None:
            if event["type"] in NOT_STORED:
                return
            tracked.pending.append((event["seq"], session.payload(event["seq"])))
            tracked.dirty = True
            self._schedule(soon=event["type"] in DURABLE_NOW)

        tracked.unsubscribe = session.subscribe(on_event)
        self._tracked[session.id] = tracked
        # the events emitted before this (the start's ``state`` events): stored too
        tracked.pending.extend((seq, p) for seq, p in _numbered(session, stored_sizes))
        self._schedule()

    def _schedule(self, soon: bool = False) -> None:
        """A write of what is queued: within ``flush_interval``, or at once (``soon``)."""
        if self._scheduled is not None:
            if not soon or self._soon:
                return
            self._scheduled.cancel()
        self._soon = soon
        delay = 0.0 if soon else self.flush_interval
        self._scheduled = asyncio.get_running_loop().call_later(delay, self._flush_soon)

    def _flush_soon(self) -> None:
        self._scheduled = None
        self._soon = False
        task = asyncio.get_running_loop().create_task(self.flush(), name="acp-store-flush")
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self, only: str | None = None) -> None:
        """Write the queued events and changed records (of session ``only``, or of all)."""
        async with self._flush_lock:
            batch = []
            for tracked in list(self._tracked.values()):
                if only is not None and tracked.session.id != only:
                    continue
                if (tracked.pending or tracked.dirty) and tracked.session.id not in self._forgotten:
                    batch.append(self._take(tracked))
            if not batch:
                return
            retry = await self._write_items(batch)
            if not retry:
                self._failing = False
                return
            for (tracked, _row, events, _cut) in retry:  # back in the queue, still bounded
                if events:  # (counted again when they are taken again)
                    while tracked.sizes and tracked.sizes[-1][0] >= events[0][0]:
                        tracked.total -= tracked.sizes.pop()[1]
                tracked.pending[:0] = events
                tracked.dirty = True
                self._bound_pending(tracked)
            if only is None and self._tracked:
                self._schedule()

    async def _write_items(self, batch: list[Any]) -> list[Any]:
        """Write a batch in one transaction; the items to try again (none: written). If the
        database refuses a row for good (a duplicate event number: two servers sharing one
        database resumed the same session), each item is written alone and the refused ones
        are dropped, so one session cannot stop the others' from being kept."""
        try:
            await self._run(self._write, lambda conn: _write_batch(conn, batch))
            return []
        except IntegrityError:
            pass
        except (SQLAlchemyError, OSError) as e:
            self._cannot_write(e)
            return batch
        retry = []
        for item in batch:
            try:
                await self._run(self._write, lambda conn, item=item: _write_batch(conn, [item]))
            except IntegrityError as e:
                log.warning("Session store: the database refused events of session %s (%s); "
                            "they are not kept", item[1]["id"], type(e).__name__)
            except (SQLAlchemyError, OSError) as e:
                self._cannot_write(e)
                retry.append(item)
        return retry

    def _cannot_write(self, error: BaseException) -> None:
        if not self._failing:
            log.warning("Session store: could not write session histories (%s); will retry",
                        type(error).__name__)
        self._failing = True

    def _take(self, tracked: _Tracked) -> tuple[_Tracked, dict[str, Any], list[tuple[int, str]], int]:
        events, tracked.pending = tracked.pending, []
        tracked.dirty = False
        for seq, payload in events:
            tracked.sizes.append((seq, len(payload)))
            tracked.total += len(payload)
        cut = 0  # delete the stored events before this seq
        while tracked.total > self.max_history_bytes and len(tracked.sizes) > 1:
            seq, size = tracked.sizes.popleft()
            tracked.total -= size
            cut = seq + 1
        if cut:
            events = [(s, p) for s, p in events if s >= cut]
        return tracked, record_of(tracked.session), events, cut

    def _bound_pending(self, tracked: _Tracked) -> None:
        size = sum(len(p) for _, p in tracked.pending)
        while size > self.max_history_bytes and len(tracked.pending) > 1:
            size -= len(tracked.pending.pop(0)[1])

    async def untrack(self, session: AgentSession, state: str | None = SUSPENDED) -> None:
        """Stop writing ``session``: its last events are written and its record set to
        ``state`` (None: nothing written, e.g. the session is being deleted)."""
        tracked = self._tracked.get(session.id)
        if tracked is None or tracked.session is not session:  # (not this object's any more)
            return
        if state is not None:
            await self.flush(only=session.id)
        tracked.unsubscribe()
        self._tracked.pop(session.id, None)
        if state is not None and session.id not in self._forgotten:
            row = record_of(session, state)
            with contextlib.suppress(SQLAlchemyError, OSError):
                await self._run(self._write, lambda conn: _upsert(conn, row))

    def end(self, session: AgentSession, *, keep: bool) -> asyncio.Task[None]:
        """The session's agent has stopped: keep it, suspended (its last events and record
        written), or forget it. In the background, retried while the database cannot be
        written: a slow or locked database must not hold up a delete, a cull or a shutdown (the
        caller waits a bounded time for the task, if at all)."""
        if not keep and self.enabled:
            self._forgotten.add(session.id)

        async def ending() -> None:
            await self.untrack(session, SUSPENDED if keep else None)
            if not keep:
                await self._forget(session.id)

        return self._background(ending())

    def forget(self, session_id: str) -> asyncio.Task[None]:
        """Forget a stored session (see ``end``): gone for readers at once."""
        if self.enabled:
            self._forgotten.add(session_id)
        return self._background(self._forget(session_id))

    def _background(self, coro: Any) -> asyncio.Task[None]:
        if not self.enabled:  # (nothing was stored)
            coro.close()
            coro = asyncio.sleep(0)
        task = asyncio.get_running_loop().create_task(coro, name="acp-store-end")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        return task

    async def _forget(self, session_id: str) -> None:
        delay = 0.5
        while True:
            try:
                await self._run(self._write, lambda conn: _delete(conn, [session_id]))
            except (SQLAlchemyError, OSError) as e:
                log.warning("Session store: could not delete session %s yet (%s); retrying",
                            session_id, type(e).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            return  # (its id stays in ``_forgotten``: a suspension still under way must not
            # bring it back; one short string per deleted session)

    # -- stored sessions -----------------------------------------------------------------------
    async def of_user(self, user: str) -> list[StoredSession]:
        """The user's stored sessions, most recently used first."""
        query = (select(sessions_table).where(sessions_table.c.user == user)
                 .order_by(sessions_table.c.last_activity.desc()))
        rows = await self._run(self._read, lambda conn: list(conn.execute(query)))
        return [s for s in map(StoredSession.from_row, rows) if s.id not in self._forgotten]

    async def get(self, user: str, session_id: str) -> StoredSession | None:
        """The stored session ``session_id`` of ``user`` (None for another user's: not found)."""
        query = select(sessions_table).where(sessions_table.c.id == session_id,
                                             sessions_table.c.user == user)
        row = await self._run(self._read, lambda conn: conn.execute(query).first())
        if row is None or session_id in self._forgotten:
            return None
        return StoredSession.from_row(row)

    async def events(self, session_id: str, since: int = 0, last: int | None = None
                     ) -> list[tuple[int, str]]:
        """The stored events of a session with ``seq > since`` (only the ``last`` ones: what a
        resumed session's history can keep), in order."""
        table = session_events_table
        query = select(table.c.seq, table.c.payload).where(table.c.session_id == session_id,
                                                           table.c.seq > since)
        if last is not None:
            query = query.order_by(table.c.seq.desc()).limit(last)
        else:
            query = query.order_by(table.c.seq)
        rows = await self._run(self._read, lambda conn: [(s, p) for s, p in conn.execute(query)])
        return sorted(rows) if last is not None else rows

    async def sizes(self, session_id: str) -> list[tuple[int, int]]:
        """(seq, bytes) of each stored event of a session, in order: what the byte bound of a
        resumed session counts (payloads are ASCII: characters are bytes)."""
        table = session_events_table
        query = (select(table.c.seq, func.length(table.c.payload)).where(table.c.session_id == session_id)
                 .order_by(table.c.seq))
        return await self._run(self._read, lambda conn: [(s, n) for s, n in conn.execute(query)])

    async def expired(self, now: float | None = None) -> list[StoredSession]:
        """The sessions past ``retention_days``, and each user's least recently used beyond
        ``max_stored_per_user``: the monitor deletes them (with their agents' homes), except
        those live on this server. (A record's ``state`` is not trusted here: a server killed
        with -9 left its sessions ``live``.)"""
        now = time.time() if now is None else now
        table = sessions_table

        def query(conn: Any) -> list[Any]:
            out = []
            if self.retention_days > 0:
                cutoff = now - self.retention_days * 86400
                out += list(conn.execute(select(table).where(table.c.last_activity < cutoff)))
            if self.max_stored_per_user > 0:
                counts = conn.execute(select(table.c.user, func.count()).group_by(table.c.user)
                                      .having(func.count() > self.max_stored_per_user))
                for user, count in list(counts):
                    out += list(conn.execute(
                        select(table).where(table.c.user == user)
                        .order_by(table.c.last_activity).limit(count - self.max_stored_per_user)))
            return out

        rows = await self._run(self._read, query)
        unique = {StoredSession.from_row(r).id: StoredSession.from_row(r) for r in rows}
        return list(unique.values())

    async def close(self) -> None:
        """Write what is queued (the server is stopping), then release the thread. Deletions
        and suspensions still retrying get ``ledger.write_timeout`` more, then are dropped."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        for task in list(self._flushing):
            with contextlib.suppress(Exception):
                await task
        if self._ending:
            _, late = await asyncio.wait(set(self._ending), timeout=max(self.ledger.write_timeout, 1.0))
            for task in late:
                task.cancel()
        with contextlib.suppress(Exception):
            await self.flush()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _numbered(session: AgentSession, stored: Iterable[tuple[int, int]]) -> list[tuple[int, str]]:
    """The session's kept events not yet stored (those after the last stored seq)."""
    last = max((seq for seq, _ in stored), default=0)
    out = []
    for payload in session.payloads(last):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event = json.loads(payload)
            seq = event["seq"]
            if isinstance(seq, int) and seq > last and event["type"] != "terminal:output":
                out.append((seq, payload))
    return out


def _upsert(conn: Any, row: dict[str, Any]) -> None:
    values = {k: v for k, v in row.items() if k != "id"}
    if conn.execute(update(sessions_table).where(sessions_table.c.id == row["id"])
                    .values(**values)).rowcount == 0:
        conn.execute(insert(sessions_table).values(**row))


def _write_batch(conn: Any, batch: list[tuple[_Tracked, dict[str, Any], list[tuple[int, str]], int]]) -> None:
    events = session_events_table
    for _tracked, row, rows, cut in batch:
        _upsert(conn, row)
        if cut:
            conn.execute(delete(events).where(events.c.session_id == row["id"], events.c.seq < cut))
        if rows:
            conn.execute(insert(events), [{"session_id": row["id"], "seq": s, "payload": p}
                                          for s, p in rows])


def _delete(conn: Any, ids: list[str]) -> None:
    conn.execute(delete(session_events_table).where(session_events_table.c.session_id.in_(ids)))
    conn.execute(delete(sessions_table).where(sessions_table.c.id.in_(ids)))
