"""The Docker warm pool against new sessions: cold vs warm session-ready time, and idle spares.

Every session is a *new* one: its own home directory (with a file the server wrote), its own
credentials in the environment and its own LLM gateway route (the agent is started by the
gateway's relay, whose socket directory the container shows at a fixed path, as for every real
agent), as the session manager makes them. Two workloads of 20
sessions each, one after the other (each closed before the next starts):

* ``one user``      20 sessions of one user (one workspace)
* ``4 users``       5 sessions each of 4 users (4 workspaces), interleaved

For each, docker cold (``warm_pool_size = 0``) and warm (``warm_pool_size = 1``; the spare of
the previous session has been started, i.e. the steady state of sessions opened a moment apart).
Timed from ``start()``: its return (container ready, agent started) and ``session/new``
answered (ready). Printed: p50/p95, how many sessions a spare served, and how many spare
containers sit idle after the 20 sessions. A spare saves the container's create and start; the
agent's own start-up (most of "ready" for the demo agent on a busy host) is the same.

    .venv/bin/python bench/docker_pool.py [-n 20]

Needs ``DOCKER_HOST`` (``scripts/docker-engine``) and the image (``scripts/sandbox-image``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import acp
from harness import QuietClient, p95
from traitlets.config import Config, LoggingConfigurable

from jupyter_acp.agents_builtin import python_ro_paths
from jupyter_acp.gateway import LlmGateway
from jupyter_acp.sandbox.base import ResourceLimits, SandboxSpec
from jupyter_acp.sandbox.docker import LABEL_RUN, LABEL_SESSION, WARM_SESSION, DockerSandbox

DEMO = [sys.executable, "-m", "jupyter_acp.agents_builtin.demo"]


async def one(spec: SandboxSpec, parent: Any) -> tuple[float, bool, float]:
    sandbox = DockerSandbox.create(spec, parent=parent)
    conn = None
    t0 = time.perf_counter()
    try:
        await sandbox.start()
        started = time.perf_counter() - t0
        conn = acp.connect_to_agent(QuietClient(), sandbox.stdin, sandbox.stdout)
        await asyncio.wait_for(conn.initialize(protocol_version=acp.PROTOCOL_VERSION), 60)
        await asyncio.wait_for(conn.new_session(cwd=sandbox.workspace_path, mcp_servers=[]), 30)
        return time.perf_counter() - t0, sandbox.from_pool, started
    except Exception:
        print("agent stderr:", "\n".join(sandbox.stderr_tail), file=sys.stderr)
        raise
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
        await sandbox.stop(timeout=1)
        await sandbox.remove()


async def workload(users: list[str], n: int, pool: int, root: Path) -> dict[str, Any]:
    cfg = Config()
    cfg.DockerSandbox.server_id = f"bench-{uuid.uuid4().hex[:8]}"
    cfg.DockerSandbox.warm_pool_size = pool
    parent = LoggingConfigurable(config=cfg)
    ok, why = DockerSandbox.available(parent=parent)
    if not ok:
        raise SystemExit(f"docker: {why}")
    run = root / uuid.uuid4().hex[:8]
    homes = run / "homes"
    homes.mkdir(parents=True, mode=0o700)
    workspaces = {}
    for user in users:
        workspaces[user] = run / "ws" / user
        workspaces[user].mkdir(parents=True)
        if os.geteuid() == 0:
            os.chown(workspaces[user], 1000, 1000)
    limits = ResourceLimits(mem_limit=512 * 1024**2, cpu_limit=1.0, pids_limit=256)
    gateway = LlmGateway(socket_dir=str(run / "llm"))

    def spec(user: str) -> SandboxSpec:
        session = uuid.uuid4().hex[:12]
        home = homes / session
        home.mkdir(mode=0o700)
        (home / "settings.json").write_text("{}")
        if os.geteuid() == 0:
            os.chown(home, 1000, 1000)
        route = gateway.open_route(session_id=session, user=user, api="openai", upstream="http://127.0.0.1:9/v1",
                                   api_key=f"secret-{session}", on_usage=lambda usage: None,
                                   check_quota=lambda: None)
        argv = gateway.relay_argv(route, DEMO, {"OPENAI_BASE_URL": route.agent_base_url},
                                  socket_dir=DockerSandbox.gateway_target)
        relay_ro, _ = gateway.sandbox_paths(route)
        return SandboxSpec(argv=argv, workspace=workspaces[user], home=str(home), limits=limits,
                           env={"HOME": str(home), "PATH": "/usr/bin:/bin",
                                "OPENAI_API_KEY": route.dummy_key},
                           labels={"user": user, "session": session, "agent": "demo"},
                           ro_paths=[*python_ro_paths(), *relay_ro],
                           gateway_dir=os.path.dirname(route.socket_path))

    times: list[float] = []
    starts: list[float] = []
    hits = 0
    backend = DockerSandbox.for_parent(parent)
    await DockerSandbox.on_manager_start(parent=parent)
    try:
        await one(spec(users[0]), parent)  # warm-up (page cache), not counted
        if pool:
            for user in users:  # as when each user opens the UI
                await DockerSandbox.prewarm(spec(user), parent=parent)
        for i in range(n):
            if pool:
                await DockerSandbox.pool_settled(parent=parent)
            took, warm, started = await one(spec(users[i % len(users)]), parent)
            times.append(took)
            starts.append(started)
            hits += warm
        await DockerSandbox.pool_settled(parent=parent)
        engine = backend.get_engine()
        idle = len(engine.api.containers(all=True, filters={"label": [f"{LABEL_RUN}={backend.run_id}",
                                                                      f"{LABEL_SESSION}={WARM_SESSION}"]}))
    finally:
        await DockerSandbox.on_manager_stop(parent=parent)
        gateway.close()
    leftovers = [p.name for d in (homes, run / "llm") for p in d.iterdir()
                 if p.name.startswith(".jupyter-acp-spare-")]
    return {"times": times, "starts": starts, "hits": hits, "idle": idle,
            "leftover_spare_homes": len(leftovers)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20, help="sessions per workload (default 20)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="jupyter-acp-pool-bench-"))
    rows = []
    try:
        for label, users in (("one user", ["alice"]), ("4 users", ["u1", "u2", "u3", "u4"])):
            for mode, pool in (("cold", 0), ("warm", 1)):
                r = await workload(users, args.n, pool, root)
                rows.append((label, mode, r))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"Docker session-ready time (start → initialize → session/new), {args.n} new sessions "
          "(each its own home and credentials), ms")
    print(f"{'workload':<10} {'mode':<5} {'start() p50':>11} {'ready p50':>9} {'ready p95':>9} "
          f"{'from pool':>9} {'idle spares after':>17}")
    for label, mode, r in rows:
        ms = [t * 1000 for t in r["times"]]
        started = statistics.median(r["starts"]) * 1000
        print(f"{label:<10} {mode:<5} {started:>11.1f} {statistics.median(ms):>9.1f} {p95(ms):>9.1f} "
              f"{r['hits']:>6}/{len(ms):<2} {r['idle']:>17}")
    if any(r["leftover_spare_homes"] for _, _, r in rows):
        print("WARNING: spare directories were left behind")


if __name__ == "__main__":
    asyncio.run(main())
