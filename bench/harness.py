"""Shared pieces of the benchmarks: a real Jupyter server with jupyter-acp, users, statistics.

The server runs as a subprocess (as in production), with an identity provider that maps the
token ``user:NAME`` to the user ``NAME`` (``jupyter_acp.testing``), so that one benchmark can act
as many users.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from jupyter_acp.testing import stop_process

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_server(sandbox: str = "local", extra: list[str] | None = None,
                   workdir: Path | None = None, python: list[str] | None = None) -> Iterator[dict]:
    """Start ``jupyter server`` with the extension; yields {url, ws, root, pid, tmp, proc}.

    ``workdir`` reuses the directory of an earlier server (its root and usage ledger), so that
    a restarted server finds what the previous one committed. Arguments in ``extra`` come last
    on the command line and replace the defaults here of the same options. ``python`` replaces
    the interpreter (e.g. ``[sys.executable, "-m", "cProfile", "-o", FILE]`` to profile it).
    """
    tmp = workdir or Path(tempfile.mkdtemp(prefix="acp-bench-"))
    root = tmp / "root"
    root.mkdir(exist_ok=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_DATA_DIR": str(tmp / "data")}
    cmd = [*(python or [sys.executable]), "-m", "jupyter_server", "--no-browser", f"--port={port}",
           "--ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", "--ServerApp.jpserver_extensions={'jupyter_acp': True}",
           "--ServerApp.identity_provider_class=jupyter_acp.testing.TokenPerUser",
           f"--UserSessionManager.sandbox={sandbox}", "--UserSessionManager.max_sessions_per_user=50",
           f"--UsageLedger.db_url=sqlite:///{tmp / 'usage.sqlite'}", "--ServerApp.log_level=WARN",
           *(["--allow-root"] if os.geteuid() == 0 else [])]
    overridden = {arg.split("=", 1)[0] for arg in extra or []}
    cmd = [arg for arg in cmd if arg.split("=", 1)[0] not in overridden] + list(extra or [])
    log = open(tmp / "server.log", "a")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while True:
        try:
            req = urllib.request.Request(url + "api/acp/agents", headers={"Authorization": "token user:u0"})
            urllib.request.urlopen(req, timeout=2).read()
            break
        except Exception as e:
            # a 404 there: the server runs but the extension failed to load (see the log)
            failed = isinstance(e, urllib.error.HTTPError) and e.code == 404
            if failed or proc.poll() is not None or time.time() > deadline:
                proc.kill()
                proc.wait()
                log.close()
                raise RuntimeError(
                    f"the server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}"
                ) from None
            time.sleep(0.1)
    try:
        yield {"url": url, "ws": f"ws://127.0.0.1:{port}/", "root": root, "pid": proc.pid, "tmp": tmp,
               "proc": proc}
    finally:
        stop_process(proc, 15)
        log.close()


def profiled(path: str) -> list[str] | None:
    """The ``python`` argument of ``jupyter_server`` that writes a cProfile to ``path`` (if any)."""
    return [sys.executable, "-m", "cProfile", "-o", str(Path(path).resolve())] if path else None


def rest(server: dict, method: str, path: str, user: int = 0, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server["url"] + "api/acp/" + path, data=data, method=method,
                                 headers={"Authorization": f"token user:u{user}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


async def events(ws: object) -> AsyncIterator[dict]:
    """Every frame of a ``?batch=1`` socket (what the sidebar and the kernel open), one at a
    time: a frame holds one event, or a burst of them as an array. Keep one per socket
    (``anext``): a burst may hold more than the frame a caller waits for."""
    while True:
        data = json.loads(await ws.recv())  # type: ignore[attr-defined]
        for frame in data if isinstance(data, list) else [data]:
            yield frame


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (e.g. a server's agent sandboxes)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def p95(values: list[float]) -> float:
    """The 95th percentile as the sandbox benchmarks report it (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


class QuietClient:
    """An ACP client that ignores updates and refuses permissions: enough to open a session."""

    async def session_update(self, session_id: str, update: object, **kwargs: object) -> None:
        pass

    async def request_permission(self, *args: object, **kwargs: object) -> object:
        import acp

        raise acp.RequestError.method_not_found("session/request_permission")

    def on_connect(self, conn: object) -> None:
        pass


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


DEMO = [sys.executable, "-m", "jupyter_acp.agents_builtin.demo"]


@contextlib.asynccontextmanager
async def direct_demo(client: object, workdir: Path) -> AsyncIterator[tuple[object, str]]:
    """The baseline of the benchmarks: the demo agent as a plain process, driven with the ACP SDK
    over its stdio (no server, no sandbox). Yields (connection, session id)."""
    import acp

    proc = await asyncio.create_subprocess_exec(
        *DEMO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env={"HOME": str(workdir), "PATH": "/usr/bin:/bin"}, cwd=workdir, limit=50 * 1024**2)
    conn = acp.connect_to_agent(client, proc.stdin, proc.stdout)
    try:
        await conn.initialize(protocol_version=acp.PROTOCOL_VERSION)
        yield conn, (await conn.new_session(cwd=str(workdir), mcp_servers=[])).session_id
    finally:
        await conn.close()
        proc.stdin.close()
        await proc.wait()

