"""Scale: 50, 100, 200 users, each with one demo-agent session, all prompting at once.

One real ``jupyter server`` with jupyter-acp and ``TokenPerUser`` (the token ``user:uN`` is user
``uN``). The users are added level by level (50, then 50 more, then 100 more); at each level
every user's WebSocket client prompts for ``--seconds``: send a prompt, wait for its
``chat:response``, think ``--think`` seconds (± 50 %, so the users do not march in step), again.
A user who types takes seconds between prompts; ``--think 0`` measures saturation instead.

Each session has had one turn before (its agent's first prompt pays one-time costs).
Reported per level: turns done, turns/s, turn latency (prompt → ``chat:response``) and
first-chunk latency p50/p99, the server's RSS (its own process, agents excluded) idle and after
the load, the server's RSS beyond its start per session, the agents' RSS (every process
under the server), and the CPU used during the load (100 % = one core; the machine's cores are
shared by the server, the agents and this process's clients). No asserts.

    .venv/bin/python bench/scale.py [--levels 50,100,200] [--seconds 10] [--think 1.0]
                                    [--sandbox local|bubblewrap]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import time
from concurrent.futures import ThreadPoolExecutor

from harness import children, cpu_seconds, events, jupyter_server, median, pct, profiled, rest, rss_kb, table
from websockets.asyncio.client import connect

PROMPT = "hello scale benchmark"


def descendants(pid: int) -> list[int]:
    out, todo = [], children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def sum_cpu(pids: list[int]) -> float:
    total = 0.0
    for p in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(p)
    return total


def descendants_rss_kb(pid: int) -> tuple[int, int]:
    """(agent sandboxes, total RSS in KiB of every process below ``pid``)."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            total += rss_kb(p)
    return len(children(pid)), total


def start_session(server: dict, user: int) -> dict:
    """A user's session, after a first turn (the agent's first prompt pays one-time costs)."""
    session = rest(server, "POST", "sessions", user, {"new": True})
    rest(server, "POST", f"sessions/{session['id']}/messages", user, {"message": PROMPT})
    return session


async def user_load(server: dict, user: int, sid: str, clock: dict[str, float], think: float,
                    turns: list[float], firsts: list[float], opened: asyncio.Event, go: asyncio.Event
                    ) -> None:
    """One user's client: prompt, wait for the end of the turn, think, until ``clock["until"]``."""
    url = f"{server['ws']}api/acp/sessions/{sid}/ws?since=1000000000&batch=1"
    async with connect(url, additional_headers={"Authorization": f"token user:u{user}"},
                       max_size=None, open_timeout=120) as ws:
        stream = events(ws)
        while (await anext(stream))["type"] != "history:end":
            pass
        opened.set()
        await go.wait()
        await asyncio.sleep(random.uniform(0, think or 0.01))  # users do not start in step
        while time.perf_counter() < clock["until"]:
            first = None
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "chat:message", "message": PROMPT}))
            while True:
                frame = await anext(stream)
                kind = frame["type"]
                if first is None and kind == "session/update" \
                        and frame["data"].get("sessionUpdate") == "agent_message_chunk":
                    first = time.perf_counter() - t0
                elif kind == "chat:response":
                    turns.append(time.perf_counter() - t0)
                    firsts.append(first if first is not None else turns[-1])
                    break
                elif kind == "error":
                    raise RuntimeError(f"user u{user}: {frame['data']}")
            if think:
                await asyncio.sleep(think * random.uniform(0.5, 1.5))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="50,100,200")
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per level")
    parser.add_argument("--think", type=float, default=1.0, help="seconds between a user's prompts")
    parser.add_argument("--sandbox", default="local", choices=["local", "bubblewrap"])
    parser.add_argument("--profile", default="", help="write a cProfile of the server to this file")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra option of the server (repeatable), e.g. --UsageLedger.db_url=...")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 65536))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # sockets + 3 pipes per agent

    rows = [["users", "turns", "turns/s", "turn p50 ms", "turn p99 ms", "1st chunk p50", "1st chunk p99",
             "server RSS idle MB", "server RSS loaded MB", "server KB/session", "agents", "agents RSS MB",
             "CPU% server", "CPU% agents", "CPU% clients"]]
    with jupyter_server(args.sandbox, extra=["--UserSessionManager.init_timeout=300",
                                             "--UserSessionManager.monitor_interval=0",
                                             *args.server_arg], python=profiled(args.profile)) as server:
        pid = server["pid"]
        # warm the server (imports, the ledger, a first agent) so that the baseline is fair
        warm = rest(server, "POST", "sessions", 10_000, {"new": True})
        rest(server, "POST", f"sessions/{warm['id']}/messages", 10_000, {"message": PROMPT})
        rest(server, "DELETE", f"sessions/{warm['id']}", 10_000)
        time.sleep(1)
        base_kb = rss_kb(pid)
        sessions: dict[int, str] = {}
        pool = ThreadPoolExecutor(8)
        loop = asyncio.get_running_loop()
        for level in levels:
            new_users = range(len(sessions), level)
            t0 = time.perf_counter()
            made = await asyncio.gather(*(loop.run_in_executor(pool, start_session, server, u)
                                          for u in new_users))
            sessions.update((u, s["id"]) for u, s in zip(new_users, made, strict=True))
            started = time.perf_counter() - t0
            time.sleep(1)
            idle_kb = rss_kb(pid)
            turns: list[float] = []
            firsts: list[float] = []
            clock: dict[str, float] = {}
            opened = [asyncio.Event() for _ in sessions]
            go = asyncio.Event()
            tasks = [asyncio.create_task(user_load(server, u, sid, clock, args.think, turns, firsts, o, go))
                     for (u, sid), o in zip(sessions.items(), opened, strict=True)]
            await asyncio.gather(*(o.wait() for o in opened))  # every socket has read its history
            agent_pids = descendants(pid)
            cpu0 = (cpu_seconds(pid), time.process_time(), sum_cpu(agent_pids))
            t_load = time.perf_counter()
            clock["until"] = t_load + args.seconds
            go.set()
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - t_load
            cpu = [(now - before) / wall * 100 for now, before in zip(
                (cpu_seconds(pid), time.process_time(), sum_cpu(agent_pids)), cpu0, strict=True)]
            loaded_kb = rss_kb(pid)
            agents, agents_kb = descendants_rss_kb(pid)
            rows.append([str(level), str(len(turns)), f"{len(turns) / args.seconds:.0f}",
                         f"{median(turns) * 1000:.1f}", f"{pct(turns, 0.99) * 1000:.1f}",
                         f"{median(firsts) * 1000:.1f}", f"{pct(firsts, 0.99) * 1000:.1f}",
                         f"{idle_kb / 1024:.0f}", f"{loaded_kb / 1024:.0f}",
                         f"{(loaded_kb - base_kb) / level:.0f}", str(agents), f"{agents_kb / 1024:.0f}",
                         *(f"{c:.0f}" for c in cpu)])
            print(f"  {level} users: {len(new_users)} sessions started in {started:.1f} s", flush=True)
        pool.shutdown()
    print(f"Scale: users each with one demo-agent session ({args.sandbox} sandbox), prompting for "
          f"{args.seconds:g} s with {args.think:g} s think time; server RSS at start {base_kb / 1024:.0f} MB")
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(main())
