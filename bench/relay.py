"""Relay overhead: the same prompt to the demo agent directly over ACP stdio, and through the server.

(a) ``direct``: this process spawns ``python -m jupyter_acp.agents_builtin.demo`` and speaks ACP
    to it over its stdio with the official SDK (``acp.connect_to_agent``): no server at all.
(b) ``server``: a real ``jupyter server`` with jupyter-acp (local sandbox: the same plain
    process) relays the turn: WebSocket frame in → ACP ``session/prompt`` → every
    ``session/update`` re-emitted as an event with a sequence number, kept in the history and
    sent on the WebSocket → usage written to the ledger → ``chat:response``.

For each, ``--turns`` turns after ``--warmup`` unmeasured ones, one at a time: prompt → first
message chunk, and prompt → end of the turn (the prompt response; ``chat:response`` through the
server). Prints medians, p95 and the ratio server/direct, measured in this one run. No asserts.

    .venv/bin/python bench/relay.py [--turns 200] [--warmup 20] [--profile FILE]

``--profile FILE`` runs the server under cProfile (``python -m cProfile -o FILE``) to see what
the relay costs.
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
from harness import cpu_seconds, direct_demo, events, jupyter_server, median, pct, profiled, rest, table
from websockets.asyncio.client import connect

PROMPT = "hello relay benchmark"


class TimingClient:
    """The client side of the direct run: notes when the first message chunk arrives."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.chunks: list[str] = []

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        if getattr(update, "session_update", None) == "agent_message_chunk":
            if self.first is None:
                self.first = time.perf_counter()
            self.chunks.append(update.content.text)

    async def request_permission(self, *args: Any, **kwargs: Any) -> Any:
        raise acp.RequestError.method_not_found("session/request_permission")

    def on_connect(self, conn: Any) -> None:
        pass


async def direct(turns: int, warmup: int, workdir: Path) -> tuple[list[float], list[float], str, dict]:
    client = TimingClient()
    cpu: dict[str, float] = {}
    async with direct_demo(client, workdir) as (conn, sid):
        firsts, ends = [], []
        for i in range(warmup + turns):
            if i == warmup:
                cpu["client"] = time.process_time()
            client.first, client.chunks = None, []
            t0 = time.perf_counter()
            await conn.prompt(session_id=sid, prompt=[acp.text_block(PROMPT)])
            t1 = time.perf_counter()
            if i >= warmup:
                firsts.append(client.first - t0)
                ends.append(t1 - t0)
        cpu["client"] = (time.process_time() - cpu["client"]) / turns
        return firsts, ends, "".join(client.chunks), cpu


async def through_server(server: dict, turns: int, warmup: int, batch: bool
                         ) -> tuple[list[float], list[float], str, dict]:
    session = await asyncio.to_thread(rest, server, "POST", "sessions", 0, {"new": True})
    # ?batch=1 is how the sidebar and the kernel open it; without, one frame per event
    url = f"{server['ws']}api/acp/sessions/{session['id']}/ws?batch={int(batch)}"
    firsts, ends = [], []
    text = ""
    async with connect(url, additional_headers={"Authorization": "token user:u0"}, max_size=None) as ws:
        stream = events(ws)
        while (await anext(stream))["type"] != "history:end":
            pass
        cpu: dict[str, float] = {}
        for i in range(warmup + turns):
            if i == warmup:
                cpu = {"client": time.process_time(), "server": cpu_seconds(server["pid"])}
            first = None
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "chat:message", "message": PROMPT}))
            while True:
                frame = await anext(stream)
                if first is None and frame["type"] == "session/update" \
                        and frame["data"].get("sessionUpdate") == "agent_message_chunk":
                    first = time.perf_counter()
                elif frame["type"] == "chat:response":
                    t1 = time.perf_counter()
                    text = frame["data"]["text"]
                    break
                elif frame["type"] == "error":
                    raise RuntimeError(f"the server refused the turn: {frame['data']}")
            if i >= warmup:
                firsts.append(first - t0)
                ends.append(t1 - t0)
        cpu = {"client": (time.process_time() - cpu["client"]) / turns,
               "server": (cpu_seconds(server["pid"]) - cpu["server"]) / turns}
    return firsts, ends, text, cpu


def row(name: str, firsts: list[float], ends: list[float], cpu: dict,
        base: tuple[list[float], list[float]] | None) -> list[str]:
    ms = [f"{v * 1000:.2f}" for v in (median(firsts), pct(firsts, 0.95), median(ends), pct(ends, 0.95))]
    ms += [f"{cpu['client'] * 1000:.2f}", f"{cpu['server'] * 1000:.2f}" if "server" in cpu else "-"]
    if base is None:
        return [name, *ms, "1.00x", "1.00x"]
    return [name, *ms, f"{median(firsts) / median(base[0]):.2f}x", f"{median(ends) / median(base[1]):.2f}x"]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--profile", default="", help="write a cProfile of the server to this file")
    args = parser.parse_args()

    d_first, d_end, d_text, d_cpu = await direct(args.turns, args.warmup,
                                                 Path(tempfile.mkdtemp(prefix="acp-bench-direct-")))
    with jupyter_server("local", python=profiled(args.profile)) as server:
        s_first, s_end, s_text, s_cpu = await through_server(server, args.turns, args.warmup, True)
        o_first, o_end, o_text, o_cpu = await through_server(server, args.turns, args.warmup, False)
    # the same reply every way (a sanity check, not a timing)
    assert d_text == s_text == o_text, (d_text, s_text, o_text)

    print(f"Relay overhead: one prompt turn of the demo agent ({PROMPT!r}, {len(d_text.split())} chunks), "
          f"{args.turns} turns after {args.warmup} warm-up, ms")
    print(table([["path", "1st chunk p50", "1st chunk p95", "end p50", "end p95",
                  "client CPU/turn", "server CPU/turn", "1st vs direct",
                  "end vs direct"],
                 row("direct (SDK, stdio)", d_first, d_end, d_cpu, None),
                 row("server (WebSocket, ?batch=1)", s_first, s_end, s_cpu, (d_first, d_end)),
                 row("server (WebSocket, a frame/event)", o_first, o_end, o_cpu, (d_first, d_end))]))
    cost = (median(s_end) - median(d_end)) * 1000
    print(f"relay cost per turn (end p50 difference, ?batch=1): {cost:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
