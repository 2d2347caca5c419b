"""Gateway overhead per LLM request: direct, in-server route, and in-server route → hub service.

The same streamed OpenAI chat completion (``stream: true``, the fake LLM's word-by-word SSE),
``--requests`` times after ``--warmup`` unmeasured ones, one at a time, three ways:

(a) ``direct``: this process → the fake LLM (``tests/fake_llm.py``) over TCP: no gateway;
(b) ``in-server route``: → ``LlmGateway.open_route`` (the single-user server's gateway, in this
    process, as in the Jupyter server) over its unix socket, without the in-sandbox relay →
    the fake LLM: key swap, ``include_usage``, metering, and — as a server without a hub does —
    the quota check and the usage record in a local SQLite ``UsageLedger`` per request;
(c) ``route → hub service``: the same route with the hub service's gateway as its upstream and a
    gateway token as its key (hub mode) → ``python -m jupyter_acp.hub`` (a subprocess, SQLite
    ledger, a daily quota so that every request is admitted with a lease and settled in the
    database) → the fake LLM. The route itself checks and records nothing here (hub mode: the
    service does).

Each request opens a new connection (``Connection: close``) and is timed to its first body byte
and to its last. Prints p50/p95 and the ratios to (a) and (b), measured in this one run. No
asserts, except that the three answers are the same.

    .venv/bin/python bench/hub_gateway.py [--requests 300] [--warmup 30] [--no-quota]

The hub service needs no hub here: its gateway checks the gateway token itself (the bench signs
one with the secret it gives the service) and, with no ``group_quotas``, never asks the hub.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import free_port, median, pct, table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fake_llm import FakeLLM

from jupyter_acp.gateway import LlmGateway
from jupyter_acp.hub.tokens import TokenSigner, load_secret
from jupyter_acp.testing import dechunk, stop_process
from jupyter_acp.usage import TurnUsage, UsageLedger

REAL_KEY = "sk-bench-real-key-0000000000"
BODY = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hello gateway benchmark"}]}


async def request(connect: object, path: str, key: str) -> tuple[float, float, bytes]:
    """One POST on a new connection: (seconds to the first body byte, to the end, the body)."""
    raw = json.dumps(BODY).encode()
    t0 = time.perf_counter()
    reader, writer = await connect()  # type: ignore[operator]
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", f"Content-Length: {len(raw)}",
            "Content-Type: application/json", f"Authorization: Bearer {key}"]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + raw)
    await writer.drain()
    data = b""
    first = None
    while chunk := await reader.read(65536):
        data += chunk
        if first is None and b"\r\n\r\n" in data and data.partition(b"\r\n\r\n")[2]:
            first = time.perf_counter()
    t1 = time.perf_counter()
    writer.close()
    status = data.split(b" ", 2)[1]
    if status != b"200":
        raise RuntimeError(f"HTTP {status.decode()}: {data[-500:]!r}")
    return (first or t1) - t0, t1 - t0, dechunk(data.partition(b"\r\n\r\n")[2])


def _text(body: bytes) -> str:
    """The streamed reply's text (the answers of the three paths must be the same)."""
    text = []
    for line in body.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:]).get("choices") or []:
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


async def measure(connect: object, path: str, key: str, n: int, warmup: int
                  ) -> tuple[list[float], list[float], str]:
    firsts, ends, text = [], [], ""
    for i in range(warmup + n):
        first, end, body = await request(connect, path, key)
        if i >= warmup:
            firsts.append(first)
            ends.append(end)
            text = _text(body)
    return firsts, ends, text


def start_service(tmp: Path, fake: FakeLLM, quota: bool) -> tuple[subprocess.Popen, str, TokenSigner]:
    data = tmp / "data"
    signer = TokenSigner(load_secret(data / "token-secret"))  # (the service reads the same file)
    (tmp / "jupyter_acp_hub_config.py").write_text(
        f"c.AcpHub.data_dir = {str(data)!r}\n"
        f"c.AcpHub.daily_token_quota = {10**12 if quota else 0}\n"
        f"c.AcpHub.credentials = {{'qwen': {{'api': 'openai', 'api_key': {REAL_KEY!r}, "
        f"'base_url': {fake.url + '/v1'!r}}}}}\n")
    port = free_port()
    env = {**os.environ, "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{port}",
           "JUPYTERHUB_SERVICE_PREFIX": "/services/jupyter-acp/", "JUPYTERHUB_API_TOKEN": "unused",
           "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api"}
    log = open(tmp / "service.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_acp.hub", "--log-level=WARN"], cwd=tmp, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/services/jupyter-acp/gateway"
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the service did not start:\n{(tmp / 'service.log').read_text()[-3000:]}"
                                   ) from None
            time.sleep(0.1)
    return proc, base, signer


def row(name: str, firsts: list[float], ends: list[float], bases: list[list[float]]) -> list[str]:
    cells = [f"{v * 1000:.2f}" for v in (median(firsts), pct(firsts, 0.95), median(ends), pct(ends, 0.95))]
    ratios = [f"{median(ends) / median(b):.2f}x" for b in bases]
    return [name, *cells, *ratios, *["-"] * (2 - len(ratios))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--no-quota", action="store_true",
                        help="run the service without a quota (no admission lease per request)")
    args = parser.parse_args()
    n, warm = args.requests, args.warmup
    tmp = Path(tempfile.mkdtemp(prefix="acp-bench-hub-"))
    usages: list[TurnUsage] = []
    ledger: UsageLedger | None = None
    with FakeLLM() as fake:
        proc, base, signer = start_service(tmp, fake, not args.no_quota)
        gateway = LlmGateway()
        try:
            direct = await measure(lambda: asyncio.open_connection("127.0.0.1", fake.port),
                                   "/v1/chat/completions", REAL_KEY, n, warm)
            ledger = UsageLedger(db_url=f"sqlite:///{tmp / 'local.sqlite'}",
                                 max_tokens_per_user_per_day=0 if args.no_quota else 10**12)

            async def record(usage: TurnUsage) -> None:  # (what the session manager does)
                usages.append(usage)
                await ledger.arecord(user="bench", session_id="b-local", agent="qwen", turn=1, usage=usage,
                                     started_at=time.time())

            local = gateway.open_route(session_id="b-local", user="bench", api="openai",
                                       upstream=fake.url + "/v1", api_key=REAL_KEY, on_usage=record,
                                       check_quota=lambda: ledger.acheck_quota("bench"))
            routed = await measure(lambda: asyncio.open_unix_connection(local.socket_path),
                                   "/v1/chat/completions", local.dummy_key, n, warm)
            token, _ = signer.mint("bench", "b-hub", "qwen", 3600)
            hub_route = gateway.open_route(session_id="b-hub", user="bench", api="openai", upstream=base,
                                           api_key=token, on_usage=usages.append, check_quota=lambda: None)
            through_hub = await measure(lambda: asyncio.open_unix_connection(hub_route.socket_path),
                                        "/v1/chat/completions", hub_route.dummy_key, n, warm)
        finally:
            gateway.close()
            stop_process(proc, 15)
            if ledger is not None:
                ledger.close()
    assert direct[2] == routed[2] == through_hub[2], (direct[2], routed[2], through_hub[2])
    assert len(usages) == 2 * (n + warm) and all(u.total_tokens for u in usages)

    mode = "without a quota" if args.no_quota else "with a daily quota (admission lease + settle per request)"
    print(f"Gateway overhead per LLM request: a streamed chat completion of the fake LLM "
          f"({len(direct[2].split())} chunks), {n} requests after {warm} warm-up, one at a time, ms; "
          f"service {mode}")
    print(table([["path", "1st byte p50", "1st byte p95", "end p50", "end p95", "end vs direct",
                  "end vs route"],
                 row("(a) direct to the LLM", direct[0], direct[1], []),
                 row("(b) in-server route", routed[0], routed[1], [direct[1]]),
                 row("(c) route -> hub service", through_hub[0], through_hub[1], [direct[1], routed[1]])]))
    route_cost = (median(routed[1]) - median(direct[1])) * 1000
    hub_cost = (median(through_hub[1]) - median(routed[1])) * 1000
    print(f"in-server route cost per request (end p50 difference): {route_cost:.2f} ms; "
          f"the hub service adds: {hub_cost:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main())
