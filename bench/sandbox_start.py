"""Session-ready time of the demo agent per sandbox backend, side by side.

For each backend, N times: start the sandbox, connect the ACP SDK to its stdio, ``initialize``
and ``session/new``. Three instants are taken from the moment ``start()`` is called:

* ``started``  ``start()`` returned (process spawned / container created, attached and started)
* ``1st line`` ``initialize`` answered: the agent's first JSON line arrived and was parsed
* ``ready``    ``session/new`` answered: the session-ready time

Backends: local (a plain process), bubblewrap (when installed and usable), docker cold (create +
attach + start per session) and docker warm (``c.DockerSandbox.warm_pool_size = 1``: a started
spare holding nothing of any session is taken and the agent is exec'd in it; measured once the
spare is ready, i.e. the steady state of a user starting sessions one after another; each spare
has waited ``SPARE_IDLE`` seconds). ``bench/docker_pool.py`` measures the pool with new sessions
of one and of several users. Docker needs ``DOCKER_HOST``
(``scripts/docker-engine``) and the image (``scripts/sandbox-image``).

    .venv/bin/python bench/sandbox_start.py [-n 20] [--only local,docker-cold]

Prints medians and p95 and the ratio of each median to local's. No asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import acp
from harness import QuietClient, p95
from traitlets.config import Config, LoggingConfigurable

from jupyter_acp.agents_builtin import python_ro_paths
from jupyter_acp.sandbox.base import ResourceLimits, Sandbox, SandboxSpec
from jupyter_acp.sandbox.local import LocalProcessSandbox

DEMO = [sys.executable, "-m", "jupyter_acp.agents_builtin.demo"]
#: Seconds a warm spare waits before it is used, as for a user who opens a session a moment
#: after the previous one.
SPARE_IDLE = 1.0


async def one(make: Callable[[], Sandbox]) -> tuple[float, float, float]:
    sandbox = make()
    conn = None
    t0 = time.perf_counter()
    try:
        await sandbox.start()
        started = time.perf_counter()
        conn = acp.connect_to_agent(QuietClient(), sandbox.stdin, sandbox.stdout)
        await asyncio.wait_for(conn.initialize(protocol_version=acp.PROTOCOL_VERSION), 60)
        first_line = time.perf_counter()  # the initialize answer is the agent's first line
        await asyncio.wait_for(conn.new_session(cwd=sandbox.workspace_path, mcp_servers=[]), 30)
        ready = time.perf_counter()
        return started - t0, first_line - t0, ready - t0
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
        await sandbox.stop(timeout=1)
        await sandbox.remove()


async def run_backend(name: str, n: int, make: Callable[[], Sandbox],
                      before_each: Callable[[], Awaitable[None]] | None = None) -> list[tuple[float, ...]]:
    await one(make)  # warm-up (page cache, image layers), not counted
    samples = []
    for _ in range(n):
        if before_each is not None:
            await before_each()
        samples.append(await one(make))
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20, help="sessions per backend (default 20)")
    parser.add_argument("--only", default="", help="comma-separated subset of the backends")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))

    tmp = Path(tempfile.mkdtemp(prefix="jupyter-acp-bench-"))
    workspace = tmp / "ws"
    workspace.mkdir()
    limits = ResourceLimits(mem_limit=512 * 1024**2, cpu_limit=1.0, pids_limit=256)

    def spec() -> SandboxSpec:
        return SandboxSpec(argv=DEMO, workspace=workspace, env={"HOME": "/tmp", "PATH": "/usr/bin:/bin"},
                           limits=limits, labels={"user": "bench", "session": uuid.uuid4().hex[:12]},
                           ro_paths=python_ro_paths())

    results: dict[str, list[tuple[float, ...]]] = {}
    notes: list[str] = []

    def wanted(name: str) -> bool:
        return not only or name in only

    if wanted("local"):
        results["local"] = await run_backend("local", args.n, lambda: LocalProcessSandbox(spec()))

    if wanted("bubblewrap"):
        try:
            from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox
        except ImportError:
            notes.append("bubblewrap: backend not in this version")
        else:
            ok, why = BubblewrapSandbox.available()
            if ok:
                results["bubblewrap"] = await run_backend(
                    "bubblewrap", args.n, lambda: BubblewrapSandbox.create(spec()))
            else:
                notes.append(f"bubblewrap: skipped ({why})")

    if wanted("docker-cold") or wanted("docker-warm"):
        from jupyter_acp.sandbox.docker import DockerSandbox

        for name, pool in (("docker-cold", 0), ("docker-warm", 1)):
            if not wanted(name):
                continue
            cfg = Config()
            cfg.DockerSandbox.server_id = f"bench-{uuid.uuid4().hex[:8]}"
            cfg.DockerSandbox.warm_pool_size = pool
            parent = LoggingConfigurable(config=cfg)
            ok, why = DockerSandbox.available(parent=parent)
            if not ok:
                notes.append(f"{name}: skipped ({why})")
                continue
            fixed = spec()  # (any spec of this user and agent would do: a spare holds no session)
            await DockerSandbox.on_manager_start(parent=parent)
            try:
                if pool:
                    await DockerSandbox.prewarm(fixed, parent=parent)

                    async def settle(parent: Any = parent) -> None:
                        await DockerSandbox.pool_settled(parent=parent)
                        await asyncio.sleep(SPARE_IDLE)  # its agent has finished importing

                    def make(fixed: SandboxSpec = fixed, parent: Any = parent) -> Sandbox:
                        return DockerSandbox.create(fixed, parent=parent)

                    results[name] = await run_backend(name, args.n, make, settle)
                else:
                    results[name] = await run_backend(
                        name, args.n, lambda parent=parent: DockerSandbox.create(spec(), parent=parent))
            finally:
                await DockerSandbox.on_manager_stop(parent=parent)

    base = statistics.median(r[2] for r in results["local"]) if "local" in results else None
    print(f"Session-ready time of the demo agent (start → initialize → session/new), n={args.n}, ms")
    print(f"{'backend':<12} {'started p50':>11} {'1st line p50':>12} {'ready p50':>9} {'ready p95':>9} "
          f"{'vs local':>8}")
    for name, samples in results.items():
        cols = [[s[i] * 1000 for s in samples] for i in range(3)]
        ready = statistics.median(cols[2])
        ratio = f"{ready / (base * 1000):.2f}x" if base else "-"
        print(f"{name:<12} {statistics.median(cols[0]):>11.1f} {statistics.median(cols[1]):>12.1f} "
              f"{ready:>9.1f} {p95(cols[2]):>9.1f} {ratio:>8}")
    for note in notes:
        print(note)


if __name__ == "__main__":
    asyncio.run(main())
