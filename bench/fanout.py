"""Fan-out throughput: one turn streaming N chunks, delivered to 1 and to 10 WebSocket subscribers.

The demo agent's ``/stream N`` writes N ``agent_message_chunk`` notifications as fast as it can.
Side by side, in one run:

* ``direct``: this process reads them over the agent's stdio with the ACP SDK (no server): what
  the agent itself can produce, the ceiling of any relay;
* ``server, K sockets``: a real ``jupyter server`` with jupyter-acp relays the same turn to K
  WebSocket clients of the same session (same user), every one of which gets every event.

Reported: seconds from the prompt to the last client's end of turn, events delivered per
second per socket, and in total (K x events / s). The clients count frames without decoding
them (only the end of turn is parsed), so that this process measures the server, not itself.
No asserts.

    .venv/bin/python bench/fanout.py [-n 20000] [--sockets 1,10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import acp
from harness import cpu_seconds, direct_demo, jupyter_server, profiled, rest, table
from websockets.asyncio.client import connect


class CountingClient:
    def __init__(self) -> None:
        self.chunks = 0

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        self.chunks += 1

    async def request_permission(self, *args: Any, **kwargs: Any) -> Any:
        raise acp.RequestError.method_not_found("session/request_permission")

    def on_connect(self, conn: Any) -> None:
        pass


async def direct(n: int) -> tuple[float, int]:
    client = CountingClient()
    async with direct_demo(client, Path(tempfile.mkdtemp(prefix="acp-bench-direct-"))) as (conn, sid):
        await conn.prompt(session_id=sid, prompt=[acp.text_block("/stream 100")])  # warm-up
        client.chunks = 0
        t0 = time.perf_counter()
        await conn.prompt(session_id=sid, prompt=[acp.text_block(f"/stream {n}")])
        return time.perf_counter() - t0, client.chunks


async def subscriber(url: str, ready: asyncio.Event, go: asyncio.Event, prompt: str | None
                     ) -> tuple[int, float, str]:
    """Count the frames of one turn; returns (events, when the turn ended, its text).

    The subscriber given ``prompt`` sends it once every subscriber is connected."""
    async with connect(url, additional_headers={"Authorization": "token user:u0"}, max_size=None,
                       max_queue=None) as ws:
        while json.loads(await ws.recv())["type"] != "history:end":
            pass
        ready.set()
        await go.wait()
        if prompt is not None:
            await ws.send(json.dumps({"type": "chat:message", "message": prompt}))
        events = 0
        while True:
            raw = await ws.recv()
            # count events without decoding them: one "seq" each (a ?batch=1 frame holds many)
            events += raw.count('"seq":') or 1
            if '"chat:response"' in raw:
                data = json.loads(raw)
                for frame in data if isinstance(data, list) else [data]:
                    if frame["type"] == "chat:response":
                        return events, time.perf_counter(), frame["data"]["text"]


async def through_server(server: dict, n: int, sockets: int, batch: bool
                         ) -> tuple[float, list[int], tuple[float, float]]:
    session = await asyncio.to_thread(rest, server, "POST", "sessions", 0, {"new": True})
    sid = session["id"]
    await asyncio.to_thread(rest, server, "POST", f"sessions/{sid}/messages", 0,
                            {"message": "/stream 100"})  # warm-up
    url = f"{server['ws']}api/acp/sessions/{sid}/ws?since={session['last_seq'] + 10**9}&batch={int(batch)}"
    readies = [asyncio.Event() for _ in range(sockets)]
    go = asyncio.Event()
    tasks = [asyncio.create_task(subscriber(url, r, go, f"/stream {n}" if i == 0 else None))
             for i, r in enumerate(readies)]
    await asyncio.gather(*(r.wait() for r in readies))
    cpu0, mine0 = cpu_seconds(server["pid"]), time.process_time()
    t0 = time.perf_counter()
    go.set()
    results = await asyncio.gather(*tasks)
    cpu = (cpu_seconds(server["pid"]) - cpu0, time.process_time() - mine0)
    expected = "".join(f"c{i} " for i in range(n))
    if any(text != expected for _, _, text in results):
        raise RuntimeError("a subscriber got a different reply")
    await asyncio.to_thread(rest, server, "DELETE", f"sessions/{sid}")
    return max(end for _, end, _ in results) - t0, [events for events, _, _ in results], cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="chunks in the turn (default 20000)")
    parser.add_argument("--sockets", default="1,10", help="subscriber counts (default 1,10)")
    parser.add_argument("--frames", default="one,batch",
                        help="one event per frame (the default socket), bursts as arrays (?batch=1)")
    parser.add_argument("--profile", default="", help="write a cProfile of the server to this file")
    args = parser.parse_args()

    d_secs, d_events = await direct(args.n)
    rows = [["path", "frames", "sockets", "seconds", "events/socket", "events/s per socket", "events/s total",
             "vs direct", "server CPU s", "clients CPU s"],
            ["direct (SDK, stdio)", "-", "-", f"{d_secs:.2f}", str(d_events), f"{d_events / d_secs:,.0f}",
             f"{d_events / d_secs:,.0f}", "1.00x", "-", "-"]]
    with jupyter_server("local", python=profiled(args.profile)) as server:
        for mode in args.frames.split(","):
            for k in (int(s) for s in args.sockets.split(",")):
                secs, events, (server_cpu, client_cpu) = await through_server(server, args.n, k,
                                                                              mode == "batch")
                per = min(events) / secs
                rows.append(["server (WebSocket)", mode, str(k), f"{secs:.2f}", str(min(events)),
                             f"{per:,.0f}", f"{sum(events) / secs:,.0f}",
                             f"{per / (d_events / d_secs):.2f}x", f"{server_cpu:.2f}", f"{client_cpu:.2f}"])
    print(f"Fan-out: /stream {args.n} (one turn), events delivered per second")
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(main())
