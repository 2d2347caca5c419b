"""Atomic admission against the daily quota: leases in the database (issue 16).

On SQLite and on a real PostgreSQL server: under the limit a request is admitted, at or over it
refused with the usual message; far from the quota several requests are in flight, near it ONE
(the next waits for it to settle, then is admitted or refused); a lease never settled expires;
a database that cannot be used refuses admission (fail closed); and the point of it all —
several "servers" (separate ``UsageLedger`` instances, each with its own connections) admitting
one user's requests as fast as they can end the day within one request's tokens of the limit.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from pg import (  # noqa: F401 (fixtures)
    Postgres,
    db_url_fixture,
    ledgers_fixture,
    pg_cluster_fixture,
    pg_database_fixture,
    postgres_fixture,
)
from sqlalchemy import select
from test_ledger_faults import LockHolder

from jupyter_acp.errors import QuotaExceeded
from jupyter_acp.usage import QuotaUnavailable, TurnUsage, UsageLedger, leases_table

pytestmark = pytest.mark.timeout(120)

WHO = {"user": "alice", "session_id": "s1", "agent": "demo"}


def use(ledger: UsageLedger, lease: str, tokens: int, **who: Any) -> None:
    ledger.settle(lease, TurnUsage(input_tokens=tokens, total_tokens=tokens), **{**WHO, **who})


def live_leases(ledger: UsageLedger, user: str = "alice") -> list[dict[str, Any]]:
    with ledger.engine.connect() as conn:
        query = select(leases_table).where(leases_table.c.user == user)
        return [dict(r) for r in conn.execute(query).mappings()]


class Admitting(threading.Thread):
    """An ``admit`` waiting in another thread: its lease, or what it raised."""

    def __init__(self, ledger: UsageLedger, *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self.call = lambda: ledger.admit(*args, **kwargs)
        self.lease: str | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.lease = self.call()
        except BaseException as e:
            self.error = e


def test_under_the_limit_admitted_at_it_refused(db_url, ledgers):
    ledger = ledgers(db_url)
    lease = ledger.admit("alice", 100, reserve=10, timeout=0)
    assert [row["id"] for row in live_leases(ledger)] == [lease]
    assert live_leases(ledger)[0]["reserved"] == 10
    use(ledger, lease, 60)
    assert live_leases(ledger) == [] and ledger.tokens_today("alice") == 60
    use(ledger, ledger.admit("alice", 100, reserve=10, timeout=0), 40)
    with pytest.raises(QuotaExceeded, match=r"quota used up: 100 of 100 tokens today"):
        ledger.admit("alice", 100, reserve=10, timeout=5)  # (refused at once: no waiting)
    with pytest.raises(QuotaExceeded, match=r"quota used up: 100 of 90 tokens today"):
        ledger.admit("alice", 90, reserve=1, timeout=0)
    assert live_leases(ledger) == []
    # others are not concerned; no limit needs no database; a limit of 0 admits nothing
    use(ledger, ledger.admit("bob", 100, reserve=10, timeout=0), 5, user="bob")
    unmetered = ledger.admit("alice", None, reserve=10, timeout=0)
    use(ledger, unmetered, 7)
    assert ledger.tokens_today("alice") == 107 and live_leases(ledger) == []
    with pytest.raises(QuotaExceeded, match="0 of 0"):
        ledger.admit("carol", 0, reserve=0, timeout=0)
    with pytest.raises(ValueError):
        ledger.admit("alice", 100, reserve=-1, timeout=0)


def test_settle_writes_what_record_writes(db_url, ledgers):
    """The same row as ``record`` (a fresh record_uid: never doubled), the lease gone with it;
    ``settle(lease, None)`` only drops the lease."""
    ledger = ledgers(db_url)
    usage = TurnUsage(input_tokens=5, output_tokens=3, cached_read_tokens=2, total_tokens=8,
                      cost=0.25, currency="USD", model="m", source="gateway")
    ledger.record(**WHO, turn=1, usage=usage, started_at=100.0, ended_at=200.0)
    lease = ledger.admit("alice", 1000, reserve=50, timeout=0)
    outcome = ledger.settle(lease, usage, **WHO, turn=2, started_at=100.0, ended_at=200.0)
    assert outcome is not None and outcome.id is not None and not outcome.spooled
    first, second = ledger.turns("s1")
    assert first["record_uid"] != second["record_uid"]
    assert ({k: v for k, v in first.items() if k not in ("id", "record_uid", "turn")}
            == {k: v for k, v in second.items() if k not in ("id", "record_uid", "turn")})
    assert live_leases(ledger) == []
    dropped = ledger.admit("alice", 1000, reserve=50, timeout=0)
    assert ledger.settle(dropped, None) is None
    assert live_leases(ledger) == [] and len(ledger.turns("s1")) == 2
    with pytest.raises(TypeError):
        ledger.settle(ledger.admit("alice", 1000, reserve=1, timeout=0), usage)  # who is it?


def test_near_the_quota_one_request_at_a_time(db_url, ledgers):
    """80 of 100 used: a request reserving 30 is admitted (no other in flight); a second waits
    for it. It used 15: the second is admitted. Then a third waits for the second, which uses
    the rest: the third is refused with the usual message."""
    ledger = ledgers(db_url)
    use(ledger, ledger.admit("alice", 100, reserve=80, timeout=0), 80)
    first = ledger.admit("alice", 100, reserve=30, timeout=0)
    with pytest.raises(QuotaExceeded, match=r"nearly used up: 80 of 100 .* 1 request"):
        ledger.admit("alice", 100, reserve=30, timeout=0.2)
    second = Admitting(ledger, "alice", 100, reserve=30, timeout=30)
    time.sleep(0.5)
    assert second.is_alive() and len(live_leases(ledger)) == 1  # waiting
    use(ledger, first, 15)
    second.join(10)
    assert second.error is None and second.lease is not None
    third = Admitting(ledger, "alice", 100, reserve=30, timeout=30)
    time.sleep(0.5)
    assert third.is_alive()
    use(ledger, second.lease, 10)
    third.join(10)
    assert isinstance(third.error, QuotaExceeded)
    assert "quota used up: 105 of 100 tokens today" in str(third.error)
    assert live_leases(ledger) == []


def test_far_from_the_quota_several_in_flight(db_url, ledgers):
    """1000 tokens left, requests reserving 100: ten in flight at once, not eleven; one that
    ends without using anything makes room at once."""
    ledger = ledgers(db_url)
    leases = [ledger.admit("alice", 1000, reserve=100, timeout=0) for _ in range(10)]
    assert len(set(leases)) == 10 and len(live_leases(ledger)) == 10
    with pytest.raises(QuotaExceeded, match=r"nearly used up: 0 of 1000 .* 10 request"):
        ledger.admit("alice", 1000, reserve=100, timeout=0.1)
    eleventh = Admitting(ledger, "alice", 1000, reserve=100, timeout=30)
    time.sleep(0.3)
    assert eleventh.is_alive()
    ledger.settle(leases[0], None)
    eleventh.join(10)
    assert eleventh.error is None and len(live_leases(ledger)) == 10
    for lease in [*leases[1:], eleventh.lease]:
        assert lease is not None
        use(ledger, lease, 100)
    with pytest.raises(QuotaExceeded, match="used up: 1000 of 1000"):
        ledger.admit("alice", 1000, reserve=100, timeout=0)


def test_an_expired_lease_does_not_block(db_url, ledgers):
    """A server admitted a request and died (its lease is never settled): once the lease's
    lifetime is over, it holds nothing, and it is deleted at the user's next admission."""
    crashed = ledgers(db_url)
    crashed.admit("alice", 100, reserve=90, timeout=0, lifetime=0.5)
    crashed.close()
    ledger = ledgers(db_url)
    started = time.monotonic()
    lease = ledger.admit("alice", 100, reserve=90, timeout=30)
    waited = time.monotonic() - started
    assert 0.2 < waited < 5
    assert [row["id"] for row in live_leases(ledger)] == [lease]  # the expired one is gone
    # the default lifetime is the trait's
    assert live_leases(ledger)[0]["expires"] - live_leases(ledger)[0]["created"] == pytest.approx(
        ledger.lease_lifetime)
    assert ledger.lease_lifetime == 1200


async def test_async_admission_waits_on_the_loop_and_cancels_cleanly(db_url, ledgers):
    """``aadmit``/``asettle`` in the ledger's threads; many waiting admissions do not take the
    ledger's (four) threads, so the settle they wait for still runs; a cancelled admission leaves
    no lease behind."""
    ledger = ledgers(db_url)
    first = await ledger.aadmit("alice", 100, reserve=60, timeout=0)
    waiting = [asyncio.create_task(ledger.aadmit("alice", 100, reserve=60, timeout=30))
               for _ in range(8)]
    await asyncio.sleep(0.3)
    assert not any(task.done() for task in waiting)
    outcome = await ledger.asettle(first, TurnUsage(total_tokens=20), **WHO, turn=1)
    assert outcome is not None and outcome.id is not None
    done, pending = await asyncio.wait(waiting, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    (admitted,) = done
    assert len(pending) == 7  # one at a time: 20 + 60 + 60 > 100
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert await ledger.asettle(admitted.result(), None) is None
    await asyncio.sleep(0.3)  # (a lease taken by an attempt under way when cancelled: given back)
    assert live_leases(ledger) == []
    assert await ledger.atokens_today("alice") == 20


def test_a_locked_database_refuses_admission(tmp_path, ledgers):
    """SQLite locked by another process past ``write_timeout``: admission fails closed with
    ``QuotaUnavailable`` (503) — although ``check_quota`` would still pass on the value it read
    earlier — and the settle of a request admitted before is spooled, not lost."""
    db = tmp_path / "ledger" / "usage.sqlite"
    ledger = ledgers(f"sqlite:///{db}", write_timeout=0.2, max_tokens_per_user_per_day=1000)
    ledger.check_quota("alice")  # (reads today's usage: the fallback check_quota would use)
    lease = ledger.admit("alice", 1000, reserve=10, timeout=0)
    holder = LockHolder(db)
    try:
        with pytest.raises(QuotaUnavailable, match="cannot be checked") as refused:
            ledger.admit("alice", 1000, reserve=10, timeout=1)
        assert refused.value.status == 503
        ledger.check_quota("alice")  # the non-atomic check still passes; admission does not
        outcome = ledger.settle(lease, TurnUsage(total_tokens=5), **WHO)
        assert outcome is not None and outcome.spooled
    finally:
        holder.release()
        holder.kill()
    # the next write replays the spool and drops the lease its settle could not
    use(ledger, ledger.admit("alice", 1000, reserve=10, timeout=0), 1)
    assert ledger.tokens_today("alice") == 6 and not ledger.spool.has_records()
    assert live_leases(ledger) == []


def test_postgresql_down_refuses_admission_and_comes_back(postgres: Postgres, ledgers):
    ledger = ledgers(postgres.url, write_timeout=1, spool_retry_interval=0.3)
    lease = ledger.admit("alice", 1000, reserve=10, timeout=0)
    postgres.stop()
    try:
        with pytest.raises(QuotaUnavailable):
            ledger.admit("alice", 1000, reserve=10, timeout=1)
        outcome = ledger.settle(lease, TurnUsage(total_tokens=5), **WHO)
        assert outcome is not None and outcome.spooled
        ledger.settle(ledger.admit("bob", None, reserve=1, timeout=0), None)  # (no limit: no database)
    finally:
        postgres.start()
    # the spool is replayed, and the lease its settle could not delete is dropped then
    wait_for_sync(lambda: not ledger.spool.has_records() and live_leases(ledger) == [])
    assert ledger.tokens_today("alice") == 5
    use(ledger, ledger.admit("alice", 1000, reserve=10, timeout=0), 1)
    assert ledger.tokens_today("alice") == 6


def wait_for_sync(condition: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- the point: several servers, one user, as fast as they can ------------------------------------
def hammer(servers: list[UsageLedger], user: str, limit: int, reserve: int, threads: int,
           request: Callable[[UsageLedger, random.Random, int], None]) -> float:
    """``threads`` threads per server run ``request`` until it raises QuotaExceeded; seconds."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(servers) * threads)

    def worker(ledger: UsageLedger, seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            n = 0
            while True:
                n += 1
                try:
                    request(ledger, rng, n)
                except QuotaExceeded:
                    return
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=worker, args=(ledger, i * 100 + t))
               for i, ledger in enumerate(servers) for t in range(threads)]
    began = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(90)
    assert errors == [] and not any(w.is_alive() for w in workers)
    return time.monotonic() - began


def test_two_servers_cannot_both_slip_past_the_quota(db_url, ledgers):
    """2 ledgers x 4 threads, one user: admit → the request (0-3 ms) → settle its cost (1 to
    ``reserve`` tokens), until refused; five users one after the other (five measurements). Each
    day ends at most one request's tokens over the limit — less than the tokens of the request
    that crossed it, the last one. The control does the same with ``check_quota`` then
    ``record`` (what a server did before): its overshoot is printed, not asserted."""
    limit, reserve, threads = 3000, 100, 4
    servers = [ledgers(db_url, write_timeout=30), ledgers(db_url, write_timeout=30)]
    name = db_url.split(":")[0]
    overshoots = []
    for round_ in range(5):
        user = f"user{round_}"
        costs: list[int] = []

        def leased(ledger: UsageLedger, rng: random.Random, n: int, user: str = user,
                   costs: list[int] = costs) -> None:
            lease = ledger.admit(user, limit, reserve=reserve, timeout=60)
            cost = rng.randint(1, reserve)
            time.sleep(rng.uniform(0, 0.003))
            use(ledger, lease, cost, user=user, session_id=threading.current_thread().name, turn=n)
            costs.append(cost)

        seconds = hammer(servers, user, limit, reserve, threads, leased)
        total = servers[0].tokens_today(user)
        rows = servers[1].per_session(user)
        assert sum(r["total_tokens"] for r in rows) == total == sum(costs)
        assert live_leases(servers[0], user) == []
        last = max((row for s in rows for row in servers[0].turns(s["session_id"])
                    if row["user"] == user), key=lambda r: r["id"])
        overshoot = total - limit
        overshoots.append(overshoot)
        print(f"\n[{name}] leases, 2 servers x {threads} threads: {len(costs)} requests in "
              f"{seconds:.2f} s, used {total} of {limit}: overshoot {overshoot} tokens (bound: one "
              f"request, <= {reserve}; the last request used {last['total_tokens']})", end="")
        assert limit <= total <= limit + reserve
        assert overshoot <= 0 or overshoot < last["total_tokens"]  # the one that crossed it
    print(f"\n[{name}] leases: overshoot per round {overshoots}, at most {max(overshoots)} "
          f"(bound {reserve})")

    for ledger in servers:
        ledger.max_tokens_per_user_per_day = limit

    def unleased(ledger: UsageLedger, rng: random.Random, n: int) -> None:
        ledger.check_quota("bob")
        time.sleep(rng.uniform(0, 0.003))
        cost = rng.randint(1, reserve)
        ledger.record(user="bob", session_id="b", agent="demo", turn=n, started_at=time.time(),
                      usage=TurnUsage(input_tokens=cost, total_tokens=cost))

    seconds = hammer(servers, "bob", limit, reserve, threads, unleased)
    control = servers[0].tokens_today("bob") - limit
    print(f"[{name}] control (check_quota then record, no leases): overshoot {control} tokens "
          f"in {seconds:.2f} s")


async def test_async_servers_cannot_both_slip_past_the_quota(db_url, ledgers):
    """The same through ``aadmit``/``asettle`` (what the hub's gateway calls): 2 ledgers x 8
    concurrent tasks on one event loop."""
    limit, reserve = 2000, 100
    servers = [ledgers(db_url, write_timeout=30), ledgers(db_url, write_timeout=30)]
    costs: list[int] = []

    async def client(ledger: UsageLedger, seed: int) -> None:
        rng = random.Random(seed)
        for n in range(1, 10**6):
            try:
                lease = await ledger.aadmit("alice", limit, reserve=reserve, timeout=60)
            except QuotaExceeded:
                return
            await asyncio.sleep(rng.uniform(0, 0.003))
            cost = rng.randint(1, reserve)
            await ledger.asettle(lease, TurnUsage(total_tokens=cost), **{**WHO, "session_id": f"s{seed}"},
                                 turn=n)
            costs.append(cost)

    await asyncio.gather(*(client(ledger, i * 10 + t) for i, ledger in enumerate(servers)
                           for t in range(8)))
    total = await servers[0].atokens_today("alice")
    assert total == sum(costs)
    print(f"\n[{db_url.split(':')[0]}] async leases, 2 servers x 8 tasks: {len(costs)} requests, "
          f"used {total} of {limit}: overshoot {total - limit} tokens (bound {reserve})")
    assert limit <= total <= limit + reserve

