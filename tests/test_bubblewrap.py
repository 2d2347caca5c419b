"""Bubblewrap limits really hold, measured from inside the sandbox (what the agent can do)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from conftest import acp_require

from jupyter_acp.errors import AgentError
from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox
from jupyter_acp.session import SessionState

pytestmark = pytest.mark.sandbox


@pytest.fixture
def manager(acp_managers):
    ok, why = BubblewrapSandbox.available()
    acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", ok, f"bubblewrap cannot run here: {why}")
    return acp_managers(sandbox="bubblewrap")


async def run(session, line: str) -> tuple[int, str]:
    """Run a shell line inside the session's sandbox (as ACP terminals do)."""
    proc = await session.sandbox.spawn_command(["/bin/sh", "-c", line], cwd=None, env=None)
    out = await asyncio.wait_for(proc.stdout.read(), 30)
    return await proc.wait(), out.decode()


async def test_no_network(manager):
    session = await manager.create_user_session("alice", "demo")
    status, out = await run(session, "tail -n +3 /proc/net/dev | cut -d: -f1")
    assert (status, out.split()) == (0, ["lo"])  # the only interface
    code = ("import socket; s = socket.socket(); s.settimeout(3)\n"
            "try:\n s.connect(('1.1.1.1', 80)); print('connected')\n"
            "except OSError as e: print('refused', e.errno)")
    py = session.sandbox_spec.argv[0]
    status, out = await run(session, f'{py} -c "{code}"')
    assert out.startswith("refused"), out
    assert session.stats()["limits"]["enforced"]["network"] is True


async def test_only_workspace_and_tmp_are_writable(manager, acp_workspace_root):
    session = await manager.create_user_session("alice", "demo")
    beside_home = os.path.dirname(session.sandbox_spec.home) + "/x"
    await run(session, f"echo hi > {beside_home}")  # lands (if at all) in the sandbox's own /tmp
    assert not os.path.exists(beside_home)
    for path in ("/usr/x", "/etc/x", "/x", "/root/x", "/proc/x", session.sandbox_spec.argv[0] + "-x"):
        status, out = await run(session, f"echo hi > {path}")
        assert status != 0, f"could write {path}"
        assert "Read-only file system" in out or "Permission denied" in out or "nonexistent" in out, out
    status, _ = await run(session, "echo hi > /workspace/ok.txt && echo hi > /tmp/ok.txt")
    assert status == 0
    assert (acp_workspace_root / "ok.txt").read_text() == "hi\n"
    # the host's secrets under /etc are not even visible
    status, out = await run(session, "ls /etc")
    assert "shadow" not in out.split() and "passwd" in out.split()


async def test_environment_is_only_the_agents(manager):
    os.environ["JUPYTER_ACP_TEST_SERVER_SECRET"] = "server-only"
    try:
        session = await manager.create_user_session("alice", "demo")
        status, out = await run(session, "env")
    finally:
        del os.environ["JUPYTER_ACP_TEST_SERVER_SECRET"]
    assert status == 0 and "server-only" not in out and "HOME=" in out


async def test_memory_limit_kills_inside_the_sandbox(acp_managers, manager):
    limited = acp_managers(sandbox="bubblewrap", mem_limit="96M")
    session = await limited.create_user_session("alice", "demo")
    if not session.stats()["limits"]["enforced"]["mem_limit"]:
        acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", False, "cgroups are not writable here")
    with pytest.raises(AgentError, match="ran out of memory"):
        await asyncio.wait_for(limited.send_message("alice", session.id, "/oom"), 60)
    assert session.state is SessionState.ERROR
    assert "96 MiB" in session.error
    # the server and other sessions are fine, and the session can come back
    other = await manager.create_user_session("bob", "demo")
    assert (await manager.send_message("bob", other.id, "still alive")).stop_reason == "end_turn"
    await limited.restart_user_session("alice", session.id)
    assert (await limited.send_message("alice", session.id, "back")).stop_reason == "end_turn"


async def test_pids_limit_holds(acp_managers):
    limited = acp_managers(sandbox="bubblewrap", pids_limit=40)
    session = await limited.create_user_session("alice", "demo")
    if not session.stats()["limits"]["enforced"]["pids_limit"]:
        acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", False, "cgroups are not writable here")
    _, out = await run(session, "i=0; while [ $i -lt 100 ]; do sleep 5 & i=$((i+1)); done; "
                                     "echo started $i; kill $(jobs -p) 2>/dev/null")
    assert "started 100" not in out
    assert "fork" in out.lower() or "resource temporarily unavailable" in out.lower(), out


async def test_cpu_quota_is_set(acp_managers):
    limited = acp_managers(sandbox="bubblewrap", cpu_limit=0.5)
    session = await limited.create_user_session("alice", "demo")
    cg = session.sandbox.cgroups
    if "cpu" not in cg.dirs:
        acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", False, "cgroups are not writable here")
    if cg.v2:
        assert (cg.dirs["cpu"] / "cpu.max").read_text().split() == ["50000", "100000"]
    else:
        assert (cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
    # the agent process itself is in that group
    members = (cg.dirs["cpu"] / "cgroup.procs").read_text().split()
    assert str(session.sandbox.process.pid) in members
    await limited.delete_user_session("alice", session.id)
    assert not cg.dirs  # removed with the session


async def test_agent_dies_with_the_sandbox_stop(manager):
    session = await manager.create_user_session("alice", "demo")
    pid = session.sandbox.process.pid
    await manager.delete_user_session("alice", session.id)
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"
