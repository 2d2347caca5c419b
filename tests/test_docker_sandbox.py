"""The Docker sandbox: the pure create-arguments builder (no engine) and, marked ``docker``, the
real thing against an engine (``DOCKER_HOST``; ``scripts/docker-engine`` starts one and
``scripts/sandbox-image`` builds the image). With ``JUPYTER_ACP_REQUIRE_DOCKER=1`` (CI) a missing
engine or image fails the engine tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import acp
import pytest
from conftest import acp_require
from traitlets.config import Config, LoggingConfigurable

from jupyter_acp.agents_builtin import python_ro_paths
from jupyter_acp.sandbox import backend
from jupyter_acp.sandbox.base import ResourceLimits, Sandbox, SandboxSpec
from jupyter_acp.sandbox.docker import (
    LABEL_POOL,
    LABEL_RUN,
    LABEL_SERVER,
    LABEL_SESSION,
    ContainerSandbox,
    DockerSandbox,
    DockerSettings,
    build_create_kwargs,
    container_labels,
    container_name,
    demultiplex,
    exit_status,
    pool_key,
    resolve_user,
    spare_template,
    with_spare_dirs,
)

DEMO = [sys.executable, "-m", "jupyter_acp.agents_builtin.demo"]
MiB = 1024**2


# -- the builder, without an engine --------------------------------------------------------------
def _spec(tmp_path: Path, **kw: Any) -> SandboxSpec:
    kw.setdefault("labels", {"user": "alice", "session": "abc123", "agent": "demo"})
    return SandboxSpec(argv=["agent", "--acp"], workspace=tmp_path / "ws", env={"HOME": "/h", "K": "v"}, **kw)


def _build(spec: SandboxSpec, **settings: Any) -> dict[str, Any]:
    labels = container_labels(spec, server_id="srv", run_id="run1")
    return build_create_kwargs(spec, DockerSettings(**settings), name="jupyter-acp-x", labels=labels,
                               exists=lambda p: not p.startswith("/missing"))


def test_create_kwargs_hold_every_limit(tmp_path: Path) -> None:
    spec = _spec(tmp_path, limits=ResourceLimits(mem_limit=512 * MiB, cpu_limit=1.5, pids_limit=256),
                 ro_paths=["/opt/py", "/usr/lib/python3", "/missing/x"], rw_paths=["/homes/s1"])
    kw = _build(spec, user="1000:1000")
    assert kw["image"] == "jupyter-acp-sandbox:test"
    assert kw["command"] == ["agent", "--acp"]
    assert kw["network_mode"] == "none"
    assert kw["mem_limit"] == kw["memswap_limit"] == 512 * MiB
    assert kw["nano_cpus"] == 1_500_000_000
    assert kw["pids_limit"] == 256
    assert kw["read_only"] is True
    assert kw["tmpfs"]["/tmp"].startswith("rw,") and "size=64m" in kw["tmpfs"]["/tmp"]
    assert kw["user"] == "1000:1000"
    assert kw["cap_drop"] == ["ALL"]
    assert kw["security_opt"] == ["no-new-privileges"]
    assert kw["init"] is True
    assert kw["stdin_open"] is True and kw["tty"] is False and kw["detach"] is False
    assert kw["working_dir"] == "/workspace"
    assert kw["environment"] == {"HOME": "/h", "K": "v"}
    assert kw["log_config"]["type"] == "none"
    assert kw["name"] == "jupyter-acp-x"
    assert kw["labels"] == {"jupyter-acp.user": "alice", "jupyter-acp.session": "abc123",
                            "jupyter-acp.agent": "demo", "jupyter-acp.server": "srv",
                            "jupyter-acp.run": "run1"}
    assert "storage_opt" not in kw
    mounts = {m["Target"]: (m["Source"], m["ReadOnly"]) for m in kw["mounts"]}
    assert mounts["/workspace"] == (str(tmp_path / "ws"), False)
    assert mounts["/homes/s1"] == ("/homes/s1", False)
    assert mounts["/opt/py"] == ("/opt/py", True)
    assert mounts["/usr"] == ("/usr", True)
    assert "/usr/lib/python3" not in mounts  # visible through /usr already
    assert "/missing/x" not in mounts
    # /etc is reduced to what programs need; Docker's own hosts/resolv.conf stay
    assert mounts["/etc/passwd"] == ("/etc/passwd", True)
    assert "/etc" not in mounts and "/etc/shadow" not in mounts and "/etc/hosts" not in mounts
    assert all(m["Type"] == "bind" for m in kw["mounts"])


def test_create_kwargs_options(tmp_path: Path) -> None:
    unlimited = ResourceLimits(mem_limit=None, cpu_limit=None, pids_limit=None, network=True,
                               disk_limit=10**9)
    kw = _build(_spec(tmp_path, limits=unlimited), host_mounts=(), tmpfs_size="", read_only=False,
                storage_opt_supported=True, extra_create_kwargs={"runtime": "runsc"}, log_driver="local",
                workspace_mount_path="/home/agent/work", host_etc_entries=())
    assert kw["network_mode"] == "bridge"
    assert not {"mem_limit", "memswap_limit", "nano_cpus", "pids_limit", "tmpfs"} & kw.keys()
    assert kw["storage_opt"] == {"size": str(10**9)}
    assert kw["runtime"] == "runsc"
    assert kw["log_config"]["type"] == "local"
    assert kw["working_dir"] == "/home/agent/work"
    assert [m["Target"] for m in kw["mounts"]] == ["/home/agent/work"]
    # storage_opt is pointless (and not sent) with a read-only root or an engine without support
    assert "storage_opt" not in _build(_spec(tmp_path, limits=unlimited), storage_opt_supported=True)
    assert "storage_opt" not in _build(_spec(tmp_path, limits=unlimited), read_only=False)
    # the whole /etc when no entries are listed
    kw = _build(_spec(tmp_path), host_etc_entries=())
    assert {"/etc", "/usr"} <= {m["Target"] for m in kw["mounts"]}


def test_spare_holds_nothing_of_a_session(tmp_path: Path) -> None:
    """A warm-pool spare is built from a session's arguments minus everything of the session:
    no environment (credentials), no agent command, no session label, not its home; its key
    is what must match (user, workspace, image, limits, read-only mounts)."""
    def session(name: str, home: Path, env: dict[str, str], **kw: Any) -> dict[str, Any]:
        labels = {"user": "alice", "session": name, "agent": "demo"}
        spec = _spec(tmp_path, labels=labels, home=str(home), **kw)
        spec.env = env
        return _build(spec)

    homes = tmp_path / "homes"
    a = session("s1", homes / "s1", {"HOME": str(homes / "s1"), "API_KEY": "secret-1"})
    b = session("s2", homes / "s2", {"HOME": str(homes / "s2"), "API_KEY": "secret-2"})
    ta = spare_template(a, idle_command=["sleep", "infinity"])
    tb = spare_template(b, idle_command=["sleep", "infinity"])
    assert pool_key(ta) == pool_key(tb)  # two sessions of one user: one pool
    assert ta == tb
    blob = repr(ta)
    assert "secret" not in blob and "s1" not in blob and "agent" not in ta["command"]
    assert ta["environment"] == {} and ta["command"] == ["sleep", "infinity"]
    assert ta["labels"][LABEL_SESSION] == "warm-pool" and "jupyter-acp.agent" not in ta["labels"]
    home_mount = next(m for m in ta["mounts"] if m["Target"] == "/home/agent")
    assert os.path.dirname(home_mount["Source"]) == str(homes) and home_mount["Source"] != str(homes)
    # a spare's own home directory keeps the key; name and pool labels do not count
    spare = with_spare_dirs(ta, {"/home/agent": str(homes / ".jupyter-acp-spare-1234")})
    assert pool_key(dict(spare, name="x", labels={**spare["labels"], LABEL_POOL: "k"})) == pool_key(ta)
    # what must match does count
    assert pool_key(ta) != pool_key(dict(ta, labels={**ta["labels"], "jupyter-acp.user": "bob"}))
    assert pool_key(ta) != pool_key(dict(ta, mem_limit=1))
    other_ws = _build(SandboxSpec(argv=["agent"], workspace=tmp_path / "elsewhere", home=str(homes / "s3"),
                                  labels={"user": "alice", "session": "s3"}))
    assert pool_key(ta) != pool_key(spare_template(other_ws, idle_command=["sleep", "infinity"]))
    assert pool_key(ta) != pool_key(spare_template(session("s4", tmp_path / "other-homes" / "s4", {}),
                                                   idle_command=["sleep", "infinity"]))


def test_adopt_home_moves_the_session_files_into_the_spare_home(tmp_path: Path) -> None:
    from jupyter_acp.sandbox.docker.sandbox import adopt_dir

    session, spare = tmp_path / "s1", tmp_path / ".jupyter-acp-spare-x"
    (session / ".agent").mkdir(parents=True)
    (session / ".agent" / "settings.json").write_text("{}")
    spare.mkdir()
    inode = spare.stat().st_ino
    adopt_dir(str(spare), str(session))
    assert session.stat().st_ino == inode  # the directory the spare's container has mounted
    assert (session / ".agent" / "settings.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1"]


def test_small_helpers(tmp_path: Path) -> None:
    assert exit_status(0) == 0 and exit_status(3) == 3
    assert exit_status(137) == -9 and exit_status(143) == -15 and exit_status(None) == -9
    name = container_name("jupyter-acp-", _spec(tmp_path, labels={"user": "a b/é", "session": "s" * 40}))
    assert name.startswith("jupyter-acp-a_b__-ssssssssssss-")
    assert resolve_user("123:45", tmp_path) == "123:45"
    owned = tmp_path / "owned"
    owned.mkdir()
    if os.geteuid() == 0:
        os.chown(owned, 4321, 4322)
    st = owned.stat()
    assert resolve_user("", owned) == (f"{st.st_uid}:{st.st_gid}" if st.st_uid else "1000:1000")
    assert resolve_user("", tmp_path / "missing") == "1000:1000"


async def test_demultiplex_splits_frames() -> None:
    raw = asyncio.StreamReader()

    def frame(stream: int, data: bytes) -> bytes:
        return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data

    raw.feed_data(frame(1, b'{"a":') + frame(2, b"warn\n") + frame(1, b"1}\n") + frame(1, b"")
                  + frame(2, b"xy")[:9])  # the last frame is cut short: what came still arrives
    raw.feed_eof()
    out, err = bytearray(), bytearray()
    await demultiplex(raw, out.extend, err.extend)
    assert bytes(out) == b'{"a":1}\n'
    assert bytes(err) == b"warn\nx"


async def test_bridge_joins_a_blocking_socket_to_asyncio() -> None:
    from jupyter_acp.sandbox.docker import Bridge

    engine_side, far = socket.socketpair()
    bridge = Bridge(engine_side)
    reader, writer = await asyncio.open_connection(sock=bridge.outer)
    try:
        writer.write(b"to the engine")
        await writer.drain()
        assert await asyncio.to_thread(far.recv, 100) == b"to the engine"
        far.sendall(b"from the engine")
        assert await reader.readexactly(15) == b"from the engine"
        writer.write_eof()  # half-close travels through
        assert await asyncio.to_thread(far.recv, 100) == b""
        far.close()
        assert await reader.read() == b""
    finally:
        writer.close()
        await writer.wait_closed()
        bridge.close()


def test_config_reaches_the_sandbox(tmp_path: Path) -> None:
    cfg = Config()
    cfg.DockerSandbox.image = "my-agents:1"
    cfg.DockerSandbox.host_mounts = []
    parent = LoggingConfigurable(config=cfg)
    sandbox = DockerSandbox.create(_spec(tmp_path), parent=parent)
    # the per-session sandbox and the admin's configurable (one per manager) are two objects
    assert isinstance(sandbox, Sandbox) and isinstance(sandbox.backend, LoggingConfigurable)
    assert isinstance(sandbox.backend, DockerSandbox) and sandbox.backend is DockerSandbox.for_parent(parent)
    assert DockerSandbox.create(_spec(tmp_path), parent=parent).backend is sandbox.backend
    assert backend("docker") is DockerSandbox and sandbox.kind == "docker"
    assert sandbox.backend.image == "my-agents:1" and sandbox.backend.host_mounts == []
    assert sandbox.workspace_path == "/workspace"
    kw = sandbox.container_args()
    assert kw["image"] == "my-agents:1"
    assert kw["labels"][LABEL_SERVER] == sandbox.backend.server_id and kw["labels"][LABEL_RUN]


async def test_unreachable_engine_is_explained(tmp_path: Path) -> None:
    cfg = Config()
    cfg.DockerSandbox.docker_host = f"unix://{tmp_path}/no-engine.sock"
    parent = LoggingConfigurable(config=cfg)
    ok, why = DockerSandbox.available(parent=parent)
    assert not ok and "no-engine.sock" in why
    await DockerSandbox.on_manager_start(parent=parent)  # logs, does not raise
    await DockerSandbox.on_manager_stop(parent=parent)


# -- against a real engine ---------------------------------------------------------------------
def containers_of_run(run_id: str) -> list[dict]:
    """Every container (running or not) labelled with a run of a manager."""
    import docker

    client = docker.DockerClient(version="auto", **docker.utils.kwargs_from_env())
    try:
        return client.api.containers(all=True, filters={"label": [f"{LABEL_RUN}={run_id}"]})
    finally:
        client.close()


def require_docker(image: str = "jupyter-acp-sandbox:test") -> None:
    """Skip without an engine or the image, or fail when ``JUPYTER_ACP_REQUIRE_DOCKER=1``."""
    why = ""
    try:
        import docker
    except ImportError:
        why = "the docker Python package is not installed"
    else:
        try:
            client = docker.DockerClient(version="auto", timeout=10, **docker.utils.kwargs_from_env())
        except Exception as e:
            why = f"no Docker engine at {os.environ.get('DOCKER_HOST') or 'the default socket'} ({e})"
        else:
            try:
                client.images.get(image)
            except Exception:
                why = f"the image {image} is missing (scripts/sandbox-image builds it)"
            finally:
                client.close()
    acp_require("JUPYTER_ACP_REQUIRE_DOCKER", not why,
                f"{why}; run scripts/docker-engine and export the DOCKER_HOST it prints")


class DemoClient:
    """The smallest ACP client the demo agent needs."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.updates: list[Any] = []

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        self.updates.append(update)
        content = getattr(update, "content", None)
        if getattr(update, "session_update", None) == "agent_message_chunk" and hasattr(content, "text"):
            self.chunks.append(content.text)

    async def request_permission(self, *args: Any, **kwargs: Any) -> Any:
        raise acp.RequestError.method_not_found("session/request_permission")

    def on_connect(self, conn: Any) -> None:
        pass


@pytest.fixture
async def docker_parent() -> AsyncIterator[LoggingConfigurable]:
    """A stand-in for the session manager: its own server id, so tests never see each other."""
    require_docker()
    cfg = Config()
    cfg.DockerSandbox.server_id = f"test-{uuid.uuid4().hex[:12]}"
    parent = LoggingConfigurable(config=cfg)
    await DockerSandbox.on_manager_start(parent=parent)
    yield parent
    await DockerSandbox.on_manager_stop(parent=parent)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    if os.geteuid() == 0:
        os.chown(ws, 1000, 1000)  # the agent's uid; a root-owned workspace is read-only to it
    return ws


class Running:
    """A started sandbox plus (optionally) an ACP connection to its demo agent."""

    def __init__(self, sandbox: ContainerSandbox) -> None:
        self.sandbox = sandbox
        self.client = DemoClient()
        self.conn: Any = None

    async def connect(self) -> str:
        self.conn = acp.connect_to_agent(self.client, self.sandbox.stdin, self.sandbox.stdout)
        await asyncio.wait_for(self.conn.initialize(protocol_version=acp.PROTOCOL_VERSION), 30)
        resp = await asyncio.wait_for(
            self.conn.new_session(cwd=self.sandbox.workspace_path, mcp_servers=[]), 10)
        return resp.session_id

    async def sh(self, script: str, timeout: float = 20) -> tuple[int, str]:
        proc = await self.sandbox.spawn_command(["/bin/sh", "-c", script], cwd=None, env=None)
        assert proc.stdout is not None
        out = await asyncio.wait_for(proc.stdout.read(), timeout)
        return await asyncio.wait_for(proc.wait(), timeout), out.decode(errors="replace")

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
        await self.sandbox.stop(timeout=1)
        await self.sandbox.remove()


@pytest.fixture
async def start(docker_parent: LoggingConfigurable, workspace: Path) -> AsyncIterator[Any]:
    made: list[Running] = []

    async def start(limits: ResourceLimits | None = None, argv: list[str] | None = None,
                    session: str | None = None) -> Running:
        spec = SandboxSpec(argv=argv or DEMO, workspace=workspace,
                           env={"HOME": "/tmp", "PATH": "/usr/local/bin:/usr/bin:/bin"},
                           limits=limits or ResourceLimits(),
                           labels={"user": "alice", "session": session or uuid.uuid4().hex[:12]},
                           ro_paths=python_ro_paths())
        sandbox = DockerSandbox.create(spec, parent=docker_parent)
        await sandbox.start()
        running = Running(sandbox)
        made.append(running)
        return running

    yield start
    for running in made:
        await running.close()


def _engine(parent: Any) -> Any:
    return DockerSandbox.for_parent(parent).get_engine().api


@pytest.mark.docker
async def test_demo_agent_streams_from_a_container(start: Any) -> None:
    run = await start()
    session_id = await run.connect()
    response = await asyncio.wait_for(
        run.conn.prompt(session_id=session_id, prompt=[acp.text_block("hello from docker")]), 20)
    assert response.stop_reason == "end_turn"
    assert "".join(run.client.chunks) == "Demo agent (no LLM) heard 3 words: hello from docker"
    assert len(run.client.chunks) > 3  # streamed in chunks, not one block
    assert response.usage is not None and response.usage.total_tokens > 0
    enforced = run.sandbox.limits_enforced()
    assert enforced == {"mem_limit": True, "cpu_limit": True, "pids_limit": True, "disk_limit": False,
                        "network": True}
    assert await run.sandbox.poll() is None
    # stderr and stdout stay apart; a terminal command merges them
    status, out = await run.sh("echo out; echo err >&2; exit 3")
    assert status == 3 and sorted(out.split()) == ["err", "out"]


@pytest.mark.docker
async def test_inside_the_container_only_the_workspace_and_tmp_are_writable(start: Any, workspace: Path
                                                                            ) -> None:
    run = await start()
    # a TCP server on the host, reachable from the host itself
    server = await asyncio.start_server(lambda r, w: w.close(), "0.0.0.0", 0)
    port = server.sockets[0].getsockname()[1]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing address
        host_ip = probe.getsockname()[0]
    except OSError:
        host_ip = "172.17.0.1"
    finally:
        probe.close()
    script = f"""
        echo "net: $(ls /sys/class/net | tr '\\n' ' ')"
        {sys.executable} -c 'import socket
try:
    socket.create_connection(("{host_ip}", {port}), timeout=3); print("connect: ok")
except OSError as e:
    print("connect: failed", e)'
        for d in / /usr /etc /opt /workspace /tmp; do
            if echo x 2>/dev/null >"$d/probe.txt"; then echo "write $d: ok"; else echo "write $d: denied"; fi
        done
        echo "id: $(id -u):$(id -g)"
        grep -E '^(CapEff|NoNewPrivs)' /proc/self/status | tr -s '\\t' ' '
        test -e /etc/shadow && echo "shadow: visible" || echo "shadow: hidden"
    """
    try:
        status, out = await run.sh(script)
    finally:
        server.close()
        await server.wait_closed()
    assert status == 0, out
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines() if ": " in line)
    assert {"net", "connect", "id", "shadow", "write /", "write /usr", "write /etc"} <= set(lines), out
    assert lines["net"].split() == ["lo"]
    assert lines["connect"].startswith("failed"), out
    assert lines["write /"] == lines["write /usr"] == lines["write /etc"] == lines["write /opt"] == "denied"
    assert lines["write /workspace"] == lines["write /tmp"] == "ok"
    assert lines["id"] == "1000:1000"
    assert lines["CapEff"].strip() == "0000000000000000" and lines["NoNewPrivs"].strip() == "1"
    assert lines["shadow"] == "hidden"
    probe_file = workspace / "probe.txt"
    assert probe_file.read_text() == "x\n" and probe_file.stat().st_uid == 1000  # on the host


@pytest.mark.docker
async def test_cpu_quota_and_pids_limit_hold(start: Any) -> None:
    run = await start(ResourceLimits(mem_limit=256 * MiB, cpu_limit=0.5, pids_limit=32))
    status, out = await run.sh(
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us 2>/dev/null"
        " || cat /sys/fs/cgroup/cpu.max")
    assert status == 0
    quota, period = (int(x) for x in out.split())
    assert quota / period == pytest.approx(0.5)
    fork_bomb = (f"{sys.executable} -c 'import os, time\n"
                 "pids, err = [], 0\n"
                 "try:\n"
                 "    for _ in range(100):\n"
                 "        pid = os.fork()\n"
                 "        if pid == 0:\n"
                 "            time.sleep(30); os._exit(0)\n"
                 "        pids.append(pid)\n"
                 "except OSError as e:\n"
                 "    err = e.errno\n"
                 "for pid in pids:\n"
                 "    os.kill(pid, 9)\n"
                 "print(len(pids), err)'")
    status, out = await run.sh(fork_bomb)
    started, err = (int(x) for x in out.split()[:2])
    assert err != 0 and started < 32, out
    status, out = await run.sh("cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max")
    assert out.strip() == "32"


@pytest.mark.docker
async def test_memory_above_the_limit_is_oom_killed(start: Any) -> None:
    run = await start(ResourceLimits(mem_limit=128 * MiB, cpu_limit=1, pids_limit=64))
    session_id = await run.connect()
    turn = asyncio.ensure_future(run.conn.prompt(session_id=session_id, prompt=[acp.text_block("/oom")]))
    status = await asyncio.wait_for(run.sandbox.wait(), 30)
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(turn, 5)
    assert status == -9
    reason = run.sandbox.exit_reason(await run.sandbox.poll())
    assert "ran out of memory" in reason and "128 MiB" in reason


@pytest.mark.docker
async def test_kill_from_outside_ends_wait_without_hanging(start: Any, docker_parent: Any) -> None:
    run = await start()
    session_id = await run.connect()
    turn = asyncio.ensure_future(run.conn.prompt(session_id=session_id, prompt=[acp.text_block("/sleep 30")]))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    await asyncio.to_thread(_engine(docker_parent).kill, run.sandbox.container_id)
    status = await asyncio.wait_for(run.sandbox.wait(), 10)
    assert time.monotonic() - t0 < 5
    assert status == -9 and "SIGKILL" in run.sandbox.exit_reason(status)
    with pytest.raises(Exception):  # noqa: B017 - the SDK raises a connection error of its choice
        await asyncio.wait_for(turn, 5)
    # removal from outside: wait() returns too
    other = await start()
    await asyncio.to_thread(_engine(docker_parent).remove_container, other.sandbox.container_id, force=True)
    assert await asyncio.wait_for(other.sandbox.wait(), 10) < 0


@pytest.mark.docker
async def test_terminal_commands_run_and_die_inside(start: Any) -> None:
    run = await start()
    proc = await run.sandbox.spawn_command(["sleep", "30"], cwd="/tmp", env={"X": "1"})
    await asyncio.sleep(0.2)
    proc.kill()
    assert await asyncio.wait_for(proc.wait(), 10) == -9
    _, out = await run.sh("pwd; cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^sleep$' || true")
    assert out.split() == ["/workspace", "0"]  # the killed sleep is gone


@pytest.mark.docker
async def test_sdk_attach_fallback_works_too(start: Any, docker_parent: Any) -> None:
    """Engines we cannot reach with asyncio directly (TLS, ssh) go through the SDK and a bridge."""
    DockerSandbox.for_parent(docker_parent).get_engine().endpoint = None
    run = await start()
    assert run.sandbox._bridge is not None
    session_id = await run.connect()
    response = await run.conn.prompt(session_id=session_id, prompt=[acp.text_block("bridged")])
    assert response.stop_reason == "end_turn" and "".join(run.client.chunks).endswith("bridged")
    assert await run.sh("echo via exec") == (0, "via exec\n")


@pytest.mark.docker
async def test_orphans_of_an_earlier_run_are_removed(docker_parent: Any) -> None:
    api = _engine(docker_parent)
    server_id = DockerSandbox.for_parent(docker_parent).server_id
    ours = api.create_container("jupyter-acp-sandbox:test", ["/nothing"], labels={
        LABEL_SERVER: server_id, LABEL_RUN: "crashed-run", LABEL_SESSION: "s-old"})["Id"]
    theirs = api.create_container("jupyter-acp-sandbox:test", ["/nothing"], labels={
        LABEL_SERVER: "another-server", LABEL_RUN: "r", LABEL_SESSION: "s-other"})["Id"]
    try:
        await DockerSandbox.on_manager_start(parent=docker_parent)
        ids = {c["Id"] for c in api.containers(all=True, filters={"label": [LABEL_SESSION]})}
        assert ours not in ids
        assert theirs in ids  # another server sharing the engine keeps its containers
    finally:
        api.remove_container(theirs, force=True)
        with contextlib.suppress(Exception):
            api.remove_container(ours, force=True)


@pytest.mark.docker
async def test_warm_pool_and_manager_stop(workspace: Path) -> None:
    require_docker()
    cfg = Config()
    cfg.DockerSandbox.server_id = f"test-{uuid.uuid4().hex[:12]}"
    cfg.DockerSandbox.warm_pool_size = 1
    parent = LoggingConfigurable(config=cfg)
    spec = SandboxSpec(argv=DEMO, workspace=workspace, env={"HOME": "/tmp"}, ro_paths=python_ro_paths(),
                       labels={"user": "alice", "session": "pooled"})
    runs = []
    try:
        await DockerSandbox.on_manager_start(parent=parent)
        first = DockerSandbox.create(spec, parent=parent)
        await first.start()
        runs.append(Running(first))
        assert not first.from_pool
        await asyncio.wait_for(DockerSandbox.pool_settled(parent=parent), 20)
        assert list(DockerSandbox.pool_status(parent=parent).values()) == [1]
        second = DockerSandbox.create(spec, parent=parent)
        t0 = time.perf_counter()
        await second.start()
        runs.append(Running(second))
        took = time.perf_counter() - t0
        assert second.from_pool and second.container_id != first.container_id
        await runs[-1].connect()  # the spare's agent answers like a fresh one
        assert took < 0.3, took
        await asyncio.wait_for(DockerSandbox.pool_settled(parent=parent), 20)
        assert list(DockerSandbox.pool_status(parent=parent).values()) == [1]  # replenished
    finally:
        for run in runs:
            await run.close()
        run_id = DockerSandbox.for_parent(parent).run_id
        spares = _engine(parent).containers(all=True, filters={"label": [f"{LABEL_RUN}={run_id}"]})
        await DockerSandbox.on_manager_stop(parent=parent)
    assert [c["Labels"][LABEL_SESSION] for c in spares] == ["warm-pool"]

    assert containers_of_run(run_id) == []


@pytest.mark.docker
async def test_warm_pool_serves_new_sessions_with_their_own_home_and_env(workspace: Path,
                                                                          tmp_path: Path) -> None:
    """Sessions with different homes and credentials each get a spare; each agent sees its own
    home (the files the server wrote there) and environment, and nothing of another session."""
    require_docker()
    cfg = Config()
    cfg.DockerSandbox.server_id = f"test-{uuid.uuid4().hex[:12]}"
    cfg.DockerSandbox.warm_pool_size = 1
    parent = LoggingConfigurable(config=cfg)
    homes = tmp_path / "homes"
    homes.mkdir(mode=0o700)

    def spec(name: str) -> SandboxSpec:
        home = homes / name
        home.mkdir(mode=0o700)
        (home / "who").write_text(name)
        if os.geteuid() == 0:
            os.chown(home, 1000, 1000)
        return SandboxSpec(argv=DEMO, workspace=workspace, home=str(home),
                           env={"HOME": str(home), "SECRET": f"key-of-{name}", "PATH": "/usr/bin:/bin"},
                           ro_paths=python_ro_paths(), labels={"user": "alice", "session": name})

    runs: list[Running] = []
    try:
        await DockerSandbox.on_manager_start(parent=parent)
        await DockerSandbox.prewarm(spec("first"), parent=parent)
        for name in ("s1", "s2", "s3"):
            await asyncio.wait_for(DockerSandbox.pool_settled(parent=parent), 20)
            assert list(DockerSandbox.pool_status(parent=parent).values()) == [1]
            sandbox = DockerSandbox.create(spec(name), parent=parent)
            await sandbox.start()
            run = Running(sandbox)
            runs.append(run)
            assert sandbox.from_pool, name
            await run.connect()
            status, out = await run.sh('echo "$HOME $SECRET $(cat ~/who)"; ls -a ~')
            assert status == 0
            first, listing = out.split("\n", 1)
            assert first == f"/home/agent key-of-{name} {name}"
            # its own files (and what its agent wrote), nothing of the sessions before it
            others = [n for n in ("first", "s1", "s2") if n != name]
            assert "who" in listing.split() and not any(n in listing for n in others)
            status, out = await run.sh("tr '\\0' ' ' < /proc/1/environ")
            assert status == 0 and "key-of" not in out  # the spare's init never had a session's secret
        # the spare homes became the sessions' homes: only session homes and one spare's are left
        await asyncio.wait_for(DockerSandbox.pool_settled(parent=parent), 20)
        left = sorted(p.name for p in homes.iterdir())
        assert [n for n in left if not n.startswith(".jupyter-acp-spare-")] == ["first", "s1", "s2", "s3"]
        assert len(left) == 5
        # stop: the agent (an exec) ends, and so does its session
        await runs[0].sandbox.stop(timeout=2)
        assert await asyncio.wait_for(runs[0].sandbox.wait(), 10) is not None
    finally:
        for run in runs:
            await run.close()
        run_id = DockerSandbox.for_parent(parent).run_id
        await DockerSandbox.on_manager_stop(parent=parent)
    assert containers_of_run(run_id) == []
    assert not [p for p in homes.iterdir() if p.name.startswith(".jupyter-acp-spare-")]


# -- through the session manager ---------------------------------------------------------------
@pytest.mark.docker
async def test_manager_session_in_docker(acp_managers: Any, acp_workspace_root: Path,
                                         acp_ledger: Any) -> None:
    from conftest import answer_next_permission, wait_for

    from jupyter_acp.errors import AgentError
    from jupyter_acp.session import SessionState

    require_docker()
    manager = acp_managers(sandbox="docker")
    session = await manager.create_user_session("alice", "demo")
    assert session.state is SessionState.READY and session.sandbox.kind == "docker"
    sandbox = session.sandbox
    api = _engine(manager)
    labels = api.inspect_container(sandbox.container_id)["Config"]["Labels"]
    assert labels["jupyter-acp.user"] == "alice" and labels["jupyter-acp.session"] == session.id
    events: list[dict[str, Any]] = []
    session.subscribe(events.append)

    result = await manager.send_message("alice", session.id, "hello from a container")
    assert result.text == "Demo agent (no LLM) heard 4 words: hello from a container"
    chunks = [e for e in events if e["data"].get("sessionUpdate") == "agent_message_chunk"]
    assert len(chunks) > 4

    approve = asyncio.create_task(answer_next_permission(session, "allow"))
    result = await manager.send_message("alice", session.id, "/write notes/docker.txt written in docker")
    await approve
    assert result.text == "Wrote notes/docker.txt (18 bytes)."
    written = acp_workspace_root / "notes" / "docker.txt"
    assert written.read_text() == "written in docker\n"  # visible on the host, owned by the server
    assert written.stat().st_uid == os.geteuid()
    assert any(e["type"] == "permission_resolved" and e["data"]["option_id"] == "allow" for e in events)

    stats = manager.get_session_stats("alice", session.id)
    assert stats["sandbox"] == "docker" and stats["turns"] == 2
    assert stats["tokens"]["total_tokens"] == acp_ledger.session_totals(session.id)["total_tokens"] > 0
    assert stats["limits"]["enforced"]["mem_limit"] and stats["limits"]["enforced"]["network"]

    # killed from outside mid-turn: the session goes to error, the server carries on, restart works
    turn = asyncio.create_task(manager.send_message("alice", session.id, "/sleep 30"))
    await wait_for(lambda: session.state is SessionState.BUSY)
    await asyncio.sleep(0.2)
    await asyncio.to_thread(api.kill, sandbox.container_id)
    with pytest.raises(AgentError):
        await asyncio.wait_for(turn, 15)
    await wait_for(lambda: session.state is SessionState.ERROR, timeout=10)
    assert "SIGKILL" in (session.error or "")

    await manager.restart_user_session("alice", session.id)
    assert session.state is SessionState.READY and session.sandbox.container_id != sandbox.container_id
    assert (await manager.send_message("alice", session.id, "still here")).text.endswith("still here")

    run_id = DockerSandbox.for_parent(manager).run_id
    await manager.shutdown()

    assert containers_of_run(run_id) == []


@pytest.mark.docker
async def test_manager_oom_is_a_session_error(acp_managers: Any) -> None:
    from jupyter_acp.errors import AgentError
    from jupyter_acp.session import SessionState

    require_docker()
    manager = acp_managers(sandbox="docker", mem_limit="128M")
    session = await manager.create_user_session("alice", "demo")
    with pytest.raises(AgentError, match="ran out of memory"):
        await asyncio.wait_for(manager.send_message("alice", session.id, "/oom"), 30)
    assert session.state is SessionState.ERROR and "128 MiB" in (session.error or "")
    other = await manager.create_user_session("bob", "demo")  # the server carries on
    assert (await manager.send_message("bob", other.id, "ok")).text.endswith("ok")


@pytest.mark.docker
async def test_manager_sessions_from_the_warm_pool(acp_managers: Any, tmp_path: Path) -> None:
    """Through the session manager: a user's second session (a new id, home and environment)
    runs in a spare, works, restarts, and nothing (containers, spare homes) outlives shutdown."""
    require_docker()
    cfg = Config()
    cfg.DockerSandbox.warm_pool_size = 1
    manager = acp_managers(sandbox="docker", config=cfg)
    first = await manager.create_user_session("alice", "demo")
    assert not first.sandbox.from_pool
    await asyncio.wait_for(DockerSandbox.pool_settled(parent=manager), 20)
    second = await manager.create_user_session("alice", "demo", new=True)
    assert second.id != first.id and second.sandbox_spec.home != first.sandbox_spec.home
    assert second.sandbox.from_pool and second.sandbox.container_id != first.sandbox.container_id
    assert (await manager.send_message("alice", second.id, "from a spare")).text.endswith("from a spare")
    labels = _engine(manager).inspect_container(second.sandbox.container_id)["Config"]["Labels"]
    assert labels[LABEL_SESSION] == "warm-pool"  # (labels are fixed at create; the name is renamed)
    await asyncio.wait_for(DockerSandbox.pool_settled(parent=manager), 20)
    await manager.restart_user_session("alice", second.id)
    assert second.sandbox.from_pool
    assert (await manager.send_message("alice", second.id, "restarted")).text.endswith("restarted")
    run_id = DockerSandbox.for_parent(manager).run_id
    homes = Path(manager.agent_home_dir)
    await manager.shutdown()
    assert containers_of_run(run_id) == []
    assert not [p for p in homes.iterdir() if p.name.startswith(".jupyter-acp-spare-")]


@pytest.mark.docker
@pytest.mark.agent
async def test_gateway_sessions_are_served_by_the_warm_pool(acp_managers: Any, tmp_path: Path) -> None:
    """A real agent that reaches its LLM through the gateway (every real agent does) takes a
    spare too: the spare was made before the session's gateway route existed, and the route's
    socket directory, shown at a fixed path in every container, is swapped in at claim like
    the home. The turn reaches the fake LLM through that socket and is metered exactly."""
    from fake_llm import FakeLLM
    from test_real_agents import REAL_KEY, require_agent

    require_docker()
    bin_dir = require_agent("qwen")
    cfg = Config()
    cfg.DockerSandbox.warm_pool_size = 1
    with FakeLLM() as fake:
        manager = acp_managers(sandbox="docker", config=cfg)
        manager.agents.extra_paths = [bin_dir]
        manager.agents.credentials = {"qwen": {"api_key": REAL_KEY, "base_url": fake.url + "/v1",
                                               "model": "fake-model"}}
        first = await manager.create_user_session("alice", "qwen")
        assert first.metered_by_gateway and not first.sandbox.from_pool
        await asyncio.wait_for(DockerSandbox.pool_settled(parent=manager), 30)
        second = await manager.create_user_session("alice", "qwen", new=True)
        assert second.metered_by_gateway and second.sandbox.from_pool
        route = manager.gateway.routes[second.id]
        assert second.sandbox_spec.gateway_dir == os.path.dirname(route.socket_path)
        assert "/run/jupyter-acp-llm/llm.sock" in second.sandbox_spec.argv
        assert REAL_KEY not in repr(second.sandbox_spec)
        result = await asyncio.wait_for(manager.send_message("alice", second.id, "hello from a spare"), 90)
        assert "You said: hello from a spare" in result.text
        billed = fake.billed()
        totals = manager.ledger.session_totals(second.id)
        assert billed["requests"] >= 1 and totals["total_tokens"] == billed["total"] > 0
        run_id = DockerSandbox.for_parent(manager).run_id
        socket_dir = manager.gateway.socket_dir
        await manager.shutdown()
        assert containers_of_run(run_id) == []
        assert not [p for p in Path(socket_dir).iterdir() if p.name.startswith(".jupyter-acp-spare-")]


@pytest.mark.docker
async def test_limits_the_engine_cannot_enforce_refuse_the_session(acp_managers: Any) -> None:
    """An engine without cgroups for memory (a rootless engine without delegation reports
    ``MemoryLimit: false`` in its info; this engine has them, so its report is edited) does
    not silently run an agent without its limit: the session is refused, with the reason and
    the admin's options, unless the admin allows unlimited containers."""
    from jupyter_acp.errors import AgentError

    require_docker()
    manager = acp_managers(sandbox="docker", mem_limit="256M")
    engine = DockerSandbox.for_parent(manager).get_engine()
    engine.info = {**engine.info, "MemoryLimit": False}
    with pytest.raises(AgentError, match=r"cannot enforce mem_limit.*limits_required = True"):
        await manager.create_user_session("alice", "demo")
    assert manager.get_user_sessions("alice") == []
    assert containers_of_run(DockerSandbox.for_parent(manager).run_id) == []

    cfg = Config()
    cfg.DockerSandbox.limits_required = False
    lenient = acp_managers(sandbox="docker", mem_limit="256M", config=cfg)
    engine = DockerSandbox.for_parent(lenient).get_engine()
    engine.info = {**engine.info, "MemoryLimit": False}
    session = await lenient.create_user_session("alice", "demo")
    enforced = session.sandbox.limits_enforced()
    assert enforced["mem_limit"] is False and enforced["pids_limit"] is True
    assert (await lenient.send_message("alice", session.id, "unlimited")).text.endswith("unlimited")
