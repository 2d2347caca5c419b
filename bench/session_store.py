"""What keeping sessions costs (issue 18): streaming with the session store on and off, and
resuming a session against starting a new one.

Side by side, in one run, each through ``UserSessionManager`` with the demo agent (local):

* ``stream``: turns of ``/stream N`` (N ``agent_message_chunk`` events each) with
  ``c.SessionStore.enabled`` False and True: seconds per turn (the store writes in the
  background meanwhile) and the server process's CPU
  µs per event (the store's subscriber, its batches and their SQLite writes
  included, which run in the store's thread);
* ``start``: a new session (``create_user_session``) against a resume of a suspended one whose
  history holds those turns (``resume_user_session``: the stored events read and seeded, a
  fresh agent, ACP ``session/resume``).

No asserts: the figures are printed.

    .venv/bin/python bench/session_store.py [-n 5000] [--turns 5] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from harness import table

from jupyter_acp.manager import UserSessionManager
from jupyter_acp.usage import UsageLedger


def manager(tmp: Path, ledger: UsageLedger, store: bool) -> UserSessionManager:
    m = UserSessionManager(ledger=ledger, root_dir=str(tmp / "root"), agent_home_dir=str(tmp / "homes"),
                           monitor_interval=0, sandbox="local")
    m.store.enabled = store
    return m


async def streaming(tmp: Path, ledger: UsageLedger, store: bool, n: int, turns: int
                    ) -> tuple[float, float, str]:
    m = manager(tmp, ledger, store)
    session = await m.create_user_session("u", "demo", new=True)
    await session.prompt("/stream 100")  # warm-up
    times, cpu = [], 0.0
    for _ in range(turns):
        c0, t0 = time.process_time(), time.perf_counter()
        await session.prompt(f"/stream {n}")
        times.append(time.perf_counter() - t0)  # the turn as its user waits for it
        await m.store.flush()  # (the rest of what the store owes: in the CPU, not the turn's time)
        cpu += time.process_time() - c0
    sid = session.id
    await m.shutdown()
    return statistics.median(times), cpu / (turns * n) * 1e6, sid


async def starting(tmp: Path, ledger: UsageLedger, sid: str, repeat: int
                   ) -> tuple[list[float], list[float], int]:
    new, resumed = [], []
    events = 0
    for _ in range(repeat):
        m = manager(tmp, ledger, True)
        t0 = time.perf_counter()
        s = await m.create_user_session("u", "demo", new=True)
        new.append(time.perf_counter() - t0)
        await m.delete_user_session("u", s.id)
        t0 = time.perf_counter()
        r = await m.resume_user_session("u", sid)
        resumed.append(time.perf_counter() - t0)
        events = len(r.history.payloads(0))
        await m.shutdown()
    return new, resumed, events


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=5000, help="chunks per turn (default 5000)")
    parser.add_argument("--turns", type=int, default=5, help="turns per setting (default 5)")
    parser.add_argument("--repeat", type=int, default=5, help="starts and resumes (default 5)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="acp-bench-store-"))
    (tmp / "root").mkdir()
    ledger = UsageLedger(db_url=f"sqlite:///{tmp / 'usage.sqlite'}")
    off = await streaming(tmp, ledger, False, args.n, args.turns)
    on = await streaming(tmp, ledger, True, args.n, args.turns)
    rows = [["store", "s per turn", "CPU µs per event", "vs off (time)", "vs off (CPU)"],
            ["off", f"{off[0]:.2f}", f"{off[1]:.0f}", "1.00x", "1.00x"],
            ["on", f"{on[0]:.2f}", f"{on[1]:.0f}", f"{on[0] / off[0]:.2f}x", f"{on[1] / off[1]:.2f}x"]]
    print(f"Streaming /stream {args.n}, {args.turns} turns (median s per turn; CPU of this process)")
    print(table(rows))
    new, resumed, events = await starting(tmp, ledger, on[2], args.repeat)
    size = sum(p.stat().st_size for p in tmp.glob("usage.sqlite*"))
    rows = [["start", "p50 s", "max s", "vs new"],
            ["new session", f"{statistics.median(new):.2f}", f"{max(new):.2f}", "1.00x"],
            [f"resume ({events} events kept)", f"{statistics.median(resumed):.2f}", f"{max(resumed):.2f}",
             f"{statistics.median(resumed) / statistics.median(new):.2f}x"]]
    print(f"\nSession ready, {args.repeat} times each (database {size / 1024**2:.1f} MiB)")
    print(table(rows))
    ledger.close()


if __name__ == "__main__":
    asyncio.run(main())
